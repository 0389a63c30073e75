"""Parsing reasoning-model answers: reasoning in three forms, fenced code, failure reasons."""

import pytest

from torch_r1attn.search.response import (
    StreamAccumulator, code_blocks, parse_answer, pick_code, split_reasoning, usage_dict,
)

KERNEL_PY = "import triton\n\nSUPPORTS = {}\n\ndef forward(q, k, v, out, scale):\n    pass\n"
KERNEL_CU = '#include "r1attn_shim.h"\nextern "C" int r1attn_forward() { return 0; }\n'


@pytest.mark.parametrize("content, reasoning, answer", [
    ("<think>plan tiles</think>\n\nHere it is.", "plan tiles", "Here it is."),
    ("plan tiles\n</think>\nHere it is.", "plan tiles", "Here it is."),  # template pre-filled <think>
    ("  <think>\nplan</think>A", "plan", "A"),
    ("<think>still thinking when cut", "still thinking when cut", ""),
    ("no tags at all", "", "no tags at all"),
    ("<think>a</think>B</think>C", "a", "B</think>C"),  # the first close ends the reasoning
])
def test_split_reasoning(content, reasoning, answer):
    assert split_reasoning(content) == (reasoning, answer)


def test_code_blocks_complete_only_and_fence_rules():
    text = (
        "intro\n```python\nx = 1\n```\n"
        "````cuda\nint a;\n```\nstill inside (shorter fence does not close)\n````\n"
        "~~~\nplain\n~~~\n"
        "```python\nunclosed = True\n"
    )
    blocks = code_blocks(text)
    assert [b.info for b in blocks] == ["python", "cuda", ""]
    assert blocks[0].code == "x = 1"
    assert "still inside" in blocks[1].code
    assert all("unclosed" not in b.code for b in blocks)


def test_pick_code_last_block_that_defines_the_entry_point():
    answer = (f"Draft:\n```python\n{KERNEL_PY.replace('pass', 'return 1')}```\n"
              f"Final:\n```python\n{KERNEL_PY}```\n"
              "Usage:\n```python\nforward(q, k, v, out, 0.1)\n```\n"
              "```bash\npip install triton\n```\n")
    code, lang = pick_code(answer)
    assert lang == "triton" and code == KERNEL_PY


@pytest.mark.parametrize("fence, lang", [
    ("python", "triton"), ("py", "triton"), ("triton", "triton"),
    ("cuda", "cuda"), ("cpp", "cuda"), ("c++", "cuda"), ("CUDA", "cuda"),
])
def test_language_from_fence(fence, lang):
    code = KERNEL_CU if lang == "cuda" else KERNEL_PY
    res = parse_answer(f"done\n```{fence}\n{code}```\n", finish_reason="stop")
    assert res.ok, res.reason
    assert res.language == lang and res.code == code


def test_unlabelled_fence_language_is_inferred():
    assert parse_answer(f"```\n{KERNEL_CU}```").language == "cuda"
    assert parse_answer(f"```\n{KERNEL_PY}```").language == "triton"


def test_finish_reason_length_is_a_failed_candidate_with_reason():
    res = parse_answer(f"<think>long</think>```python\n{KERNEL_PY}```", finish_reason="length")
    assert not res.ok and "max_tokens" in res.reason and "finish_reason=length" in res.reason
    res = parse_answer("<think>never finished", finish_reason="length")
    assert not res.ok and "while reasoning" in res.reason


@pytest.mark.parametrize("content, reasoning, needle", [
    ("", "lots of thought", "empty"),
    ("<think>only thinking</think>   ", "", "empty"),
    ("I would tile it by 128.", "", "no complete fenced code block"),
    ("```python\ndef forward(q, k, v, out, scale):\n    return (\n```", "", "does not parse: line"),
    ("```cuda\n__global__ void f() {}\n```", "", "r1attn_forward"),
    ("```python\ndef forward(q):\n  pass\n", "", "no complete fenced code block"),  # cut mid-fence
])
def test_unusable_answers_have_reasons(content, reasoning, needle):
    res = parse_answer(content, reasoning, "stop")
    assert not res.ok
    assert needle in res.reason


def test_other_finish_reasons_fail():
    res = parse_answer(f"```python\n{KERNEL_PY}```", finish_reason="content_filter")
    assert not res.ok and "content_filter" in res.reason


def _chunk(delta=None, finish=None, usage=None):
    c = {"choices": [] if delta is None and finish is None else [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}
    if usage:
        c["usage"] = usage
    return c


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_accumulator_reasoning_fields(field):
    acc = StreamAccumulator()
    acc.feed(_chunk({"role": "assistant", "content": ""}))
    for piece in ("think ", "hard"):
        acc.feed(_chunk({field: piece, "content": None}))
    acc.feed(_chunk({"content": f"```python\n{KERNEL_PY}"}))
    acc.feed(_chunk({"content": "```\n"}))
    acc.feed(_chunk({}, finish="stop"))
    acc.feed(_chunk(usage={"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30,
                           "completion_tokens_details": {"reasoning_tokens": 5}}))
    res = acc.parse()
    assert res.ok and res.reasoning == "think hard" and res.code == KERNEL_PY
    assert acc.usage == {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30, "reasoning_tokens": 5}


def test_accumulator_inline_think_and_sdk_objects():
    class Obj:
        def __init__(self, **kw):
            self.__dict__.update(kw)
            self.model_extra = kw.pop("_extra", {})

    acc = StreamAccumulator()
    acc.feed(Obj(choices=[Obj(index=0, delta=Obj(content="reason </think>", _extra={}), finish_reason=None)], usage=None))
    acc.feed(Obj(choices=[Obj(index=0, delta=Obj(content=None, _extra={"reasoning_content": "more"}),
                              finish_reason=None)], usage=None))
    acc.feed(Obj(choices=[Obj(index=0, delta=Obj(content=f"```python\n{KERNEL_PY}```"), finish_reason="stop")],
                 usage=None))
    res = acc.parse()
    assert res.ok, res.reason
    assert "more" in res.reasoning and "reason" in res.reasoning


def test_usage_dict_missing_fields():
    assert usage_dict({"total_tokens": 7}) == {"total_tokens": 7}
    assert usage_dict({}) == {}
