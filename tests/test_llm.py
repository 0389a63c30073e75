"""The LLM proposer against a scripted OpenAI-compatible server on loopback.

Unit tests drive :class:`LLMProposer` directly; the end-to-end tests run the real search loop,
verifier and cache (``@pytest.mark.slow``), and one GPU test builds and times a CUDA and a
Triton candidate on the device.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import pytest
import torch

from torch_r1attn import variants as V
from torch_r1attn.config import Settings
from torch_r1attn.problem import Problem
from torch_r1attn.reference import eager_attention, reference_attention
from torch_r1attn.search import llm as llm_mod
from torch_r1attn.search.base import Candidate, Feedback
from torch_r1attn.search.llm import LLMProposer, make_llm_proposer, reference_source
from torch_r1attn.spec import AttentionSpec

from tests.fake_openai_server import FakeOpenAI, Script
from tests.kernels import kernel_source
from tests.helpers import assert_close_to_ref

# the verifier's known-good kernel, made causal: what the scripted LLM "writes"
GOOD = kernel_source("good_attention.py").replace("CAUSAL = False", "CAUSAL = True", 1)

# A compile error (undefined name inside the jitted kernel), then its fix.
BROKEN = GOOD.replace("m_i = m_new\n", "m_i = m_neww\n")
# Wrong numerics: forgets the running-max rescale of the accumulator.
WRONG = GOOD.replace("acc = acc * alpha[:, None] + ", "acc = acc + ")
# A cheat: the launcher computes with PyTorch instead of a kernel.
CHEAT = GOOD.replace(
    "def forward(q, k, v, out, scale, **variant_tensors):\n",
    "def forward(q, k, v, out, scale, **variant_tensors):\n"
    "    import torch.nn.functional as F\n"
    "    out.copy_(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True))\n"
    "    return\n",
)


def answer(code: str, lang: str = "python", **kw) -> Script:
    return Script.answer(f"Here is the kernel.\n\n```{lang}\n{code}```\n", **kw)


def make_problem(variant: V.Variant | None = None, device: str = "cpu", dtype=torch.float16, D: int = 32,
                 S: int = 48, B: int = 1, Hq: int = 2, Hkv: int = 1, small: bool = True) -> Problem:
    variant = variant if variant is not None else V.causal()
    q = torch.empty(B, Hq, S, D, dtype=dtype)
    k = torch.empty(B, Hkv, S, D, dtype=dtype)
    spec = AttentionSpec.from_call(q, k, k, variant.key)
    return Problem.from_spec(spec, variant, device=device, small=small)


@pytest.fixture
def server():
    pytest.importorskip("openai", reason="the LLM proposer needs the openai package (carry its wheel)")
    with FakeOpenAI() as srv:
        yield srv


def make_settings(srv: FakeOpenAI, **kw) -> Settings:
    base = dict(llm_base_url=srv.base_url, llm_api_key="test-key", llm_samples=1, llm_concurrency=2,
                llm_request_timeout_s=20.0, budget_s=120.0)
    base.update(kw)
    return Settings(**base)


@pytest.fixture
def proposer_factory(server):
    made = []

    def make(max_retries: int = 2, **kw):
        p = LLMProposer(make_settings(server, **kw), max_retries=max_retries)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


# --------------------------------------------------------------------------------- construction
def test_unset_endpoint_means_no_proposer(caplog, monkeypatch):
    monkeypatch.setattr(llm_mod, "_logged_off", False)
    with caplog.at_level(logging.INFO, logger="torch_r1attn.search.llm"):
        assert make_llm_proposer(Settings()) is None
        assert make_llm_proposer(Settings()) is None
    lines = [r for r in caplog.records if "llm proposer off" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO


def test_make_llm_proposer_with_endpoint(server):
    p = make_llm_proposer(make_settings(server))
    try:
        assert isinstance(p, LLMProposer) and p.name == "llm"
        from torch_r1attn.search.base import Proposer

        assert isinstance(p, Proposer)
    finally:
        p.close()
    with pytest.raises(RuntimeError, match="after close"):
        p.propose(make_problem(), [], 1)


# ------------------------------------------------------------------------------------ reasoning
@pytest.mark.parametrize("field", ["reasoning_content", "reasoning", None])
def test_reasoning_forms_and_provenance(server, proposer_factory, field):
    reasoning = "Let me think about the tiling. " * 20
    server.push(answer(GOOD, reasoning=reasoning, reasoning_field=field))
    p = proposer_factory()
    cands = p.propose(make_problem(), [], 1)
    assert len(cands) == 1, p.failures
    c = cands[0]
    assert c.language == "triton" and c.proposer == "llm" and c.source.strip() == GOOD.strip()
    req = server.requests[0]
    prov = c.provenance
    assert prov["prompt_sha256"] == hashlib.sha256(req.prompt.encode()).hexdigest()
    assert prov["model"] == "deepseek-ai/deepseek-r1" and prov["finish_reason"] == "stop"
    assert prov["reasoning_chars"] == len(reasoning.strip())
    assert prov["reasoning_tokens"] == len(reasoning) // 4  # what the server reported
    assert prov["completion_tokens"] > 0 and prov["seconds"] >= 0
    assert "reasoning" not in {k for k, v in prov.items() if isinstance(v, str) and len(v) > 200}


def test_request_follows_r1_guidance(server, proposer_factory):
    server.push(answer(GOOD))
    p = proposer_factory()
    p.propose(make_problem(), [], 1)
    body = server.requests[0].body
    assert [m["role"] for m in body["messages"]] == ["user"]  # no system prompt
    assert body["temperature"] == pytest.approx(0.6) and body["stream"] is True
    assert body["model"] == "deepseek-ai/deepseek-r1"
    assert server.requests[0].headers.get("authorization") == "Bearer test-key"


# -------------------------------------------------------------------------------------- prompts
def test_prompt_contents(server, proposer_factory):
    server.push(answer(GOOD))
    p = proposer_factory()
    problem = make_problem(V.sliding_window(8) + V.softcap(30.0))
    p.propose(problem, [], 1)
    prompt = server.requests[0].prompt
    for needle in [
        problem.spec.uri, "def reference(q, k, v, scale", "(q_pos - kv_idx < 8)", "torch.tanh(s / 30.0)",
        "def forward(q, k, v, out, scale", "SUPPORTS", "No torch compute on the inputs",
        "No `try`/`except`", "No streams, threads", "No `exec`, `eval`", "No file, network or OS access",
        "No module-level caches", "CPU interpreter", "This is the first round", "```python",
    ]:
        assert needle in prompt, needle
    assert "```cuda" not in prompt  # CUDA candidates cannot run under the CPU interpreter


@pytest.mark.parametrize("variant, seed_line", [
    (V.causal(), "#define R1_MASK_KIND 1"), (V.softcap(20.0), "seed kernel for FULL attention"),
])
def test_prompt_offers_cuda_where_it_can_run(monkeypatch, variant, seed_line):
    monkeypatch.setattr(LLMProposer, "cuda_allowed", lambda self, problem: True)
    p = LLMProposer(Settings(llm_base_url="http://127.0.0.1:9/v1", llm_api_key="x"), max_retries=0)
    try:
        prompt = p.build_prompt(make_problem(variant), [])
    finally:
        p.close()
    for needle in ['extern "C" int r1attn_forward', "typedef struct r1attn_tensor", "compute_90a",
                   "```cuda", "CUDA C++ allowed", seed_line]:
        assert needle in prompt, needle


def test_prompt_shows_best_kernel_and_feedback(server, proposer_factory):
    problem = make_problem()
    slow = Candidate(source="# slow but correct\n" + GOOD, proposer="templates")
    fast = Candidate(source="# fast and correct\n" + GOOD, proposer="llm")
    bad = Candidate(source=BROKEN, proposer="llm")
    history = [
        Feedback(slow, True, 2.0, 1.5, "sdpa_cudnn", 0.75, "correct; 2.0 ms"),
        Feedback(fast, True, 1.2, 1.5, "sdpa_cudnn", 1.25, "correct; 1.2 ms"),
        Feedback(bad, False, None, None, None, None, "compile error: NameError: m_neww is not defined"),
    ]
    server.push(answer(GOOD))
    p = proposer_factory()
    p.propose(problem, history, 1)
    prompt = server.requests[0].prompt
    best = prompt.split("# 4. The best kernel so far")[1].split("# 5.")[0]
    assert "# fast and correct" in best and "# slow but correct" not in best
    assert "1.2000 ms" in best and "sdpa_cudnn" in best and "1.250x" in best
    fb = prompt.split("# 5. Feedback on the previous round")[1]
    assert "NameError: m_neww is not defined" in fb and "m_i = m_neww" in fb  # message + source to fix


def test_feedback_on_unusable_answer_reaches_next_prompt(server, proposer_factory):
    server.push(answer(GOOD, finish_reason="length"), answer(GOOD))
    p = proposer_factory()
    problem = make_problem()
    assert p.propose(problem, [], 1) == []
    assert "max_tokens" in p.failures[-1].reason
    assert len(p.propose(problem, [], 1)) == 1
    assert "finish_reason=length" in server.requests[1].prompt


def test_unparsable_code_is_quoted_and_transport_errors_are_not(server, proposer_factory):
    server.push(Script.error(400, message="bad request"),
                answer("def forward(q, k, v, out, scale):\n    return (\n"), answer(GOOD))
    p = proposer_factory()
    problem = make_problem()
    assert p.propose(problem, [], 1) == []  # 400: not retried, recorded
    assert "BadRequestError" in p.failures[-1].reason and not p.failures[-1].from_answer
    assert p.propose(problem, [], 1) == []
    assert "does not parse" in p.failures[-1].reason
    assert len(p.propose(problem, [], 1)) == 1
    second, third = server.requests[1].prompt, server.requests[2].prompt
    assert "This is the first round" in second and "BadRequestError" not in second
    assert "does not parse" in third and "    return (" in third


@pytest.mark.parametrize("variant", [
    V.full(), V.causal(), V.causal("bottom_right"), V.sliding_window(5), V.prefix_lm(7),
    V.document(torch.tensor([0] * 10 + [1] * 20 + [2] * 18)) + V.causal(),
    V.document(torch.zeros(2, 48, dtype=torch.int64)),
    V.alibi(4) + V.softcap(20.0), V.relative_bias(torch.randn(4, 9)), V.relative_bias(torch.randn(1, 5)),
    V.Variant([V.DenseMask(torch.rand(1, 1, 48, 48) > 0.3)]),
    V.Variant([V.DenseBias(torch.randn(4, 48, 48))]),
    V.score_mod(lambda s, b, h, qi, ki: s - 0.1 * (qi - ki).abs()),
    V.mask_mod(lambda b, h, qi, ki: (qi - ki) % 3 != 1),
], ids=lambda v: v.key[:30])
def test_reference_source_matches_reference_attention(variant):
    """The math shown to the model is the math the verifier checks against."""
    ref_py, callables = reference_source(variant)
    B, Hq, Hkv, Sq, Sk, D = 2, 4, 2, 40 if variant.align == "bottom_right" else 48, 48, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, s, D, generator=g) for h, s in ((Hq, Sq), (Hkv, Sk), (Hkv, Sk)))
    ns: dict = {"torch": torch}
    for i, p in enumerate(variant.canonical_parts):  # the callables, as the prompt names them
        if isinstance(p, (V.ScoreMod, V.MaskMod)):
            ns[f"{'score_mod' if p.kind == 'score' else 'mask_mod'}_{i}"] = p.fn
    exec(ref_py, ns)  # test-only: runs the generated reference text
    got = ns["reference"](q, k, v, 0.25, **variant.tensors())
    want = reference_attention(q.double(), k.double(), v.double(), variant, 0.25)
    assert_close_to_ref(got, want, eager_attention(q, k, v, variant, 0.25))
    if any(isinstance(p, (V.ScoreMod, V.MaskMod)) for p in variant.parts):
        assert "lambda" in callables


def test_hardware_summary_cpu():
    text = llm_mod.hardware_summary("cpu")
    assert "CPU interpreter" in text and "Triton" in text


# ----------------------------------------------------------------------------------- robustness
def test_retry_after_is_honoured(server, proposer_factory):
    server.push(Script.error(429, retry_after=1.0), answer(GOOD))
    p = proposer_factory()
    cands = p.propose(make_problem(), [], 1)
    assert len(cands) == 1, p.failures
    t = [r.t for r in server.requests]
    assert len(t) == 2 and t[1] - t[0] >= 1.0  # waited at least Retry-After before retrying


def test_503_retry_then_give_up_is_a_recorded_failure(server):
    server.push(Script.error(503, retry_after=0.2), Script.error(503, retry_after=0.2))
    p = LLMProposer(make_settings(server), max_retries=1)
    try:
        assert p.propose(make_problem(), [], 1) == []
    finally:
        p.close()
    assert len(server.requests) == 2
    assert "InternalServerError" in p.failures[-1].reason or "503" in p.failures[-1].reason


def test_stalled_stream_is_cut_by_the_deadline(server, proposer_factory):
    server.push(answer(GOOD, stall_after_chunks=3, stall_max_s=30.0))
    p = proposer_factory(llm_request_timeout_s=1.5)
    t0 = time.monotonic()
    assert p.propose(make_problem(), [], 1) == []
    took = time.monotonic() - t0
    assert 1.4 <= took < 1.5 + llm_mod.GRACE_S, took
    assert "deadline" in p.failures[-1].reason


def test_concurrency_limit(server, proposer_factory):
    for _ in range(4):
        server.push(answer(GOOD, delay_s=0.05, chunk_chars=1024))
    p = proposer_factory(llm_samples=4, llm_concurrency=2)
    cands = p.propose(make_problem(), [], 4)
    assert len(cands) == 4
    assert server.max_active == 2
    assert sorted(c.provenance["sample"] for c in cands) == [0, 1, 2, 3]


def test_request_budget(server, proposer_factory):
    server.push(answer(GOOD), answer(GOOD), answer(GOOD))
    p = proposer_factory(llm_samples=2, llm_max_requests=3)
    problem = make_problem()
    assert len(p.propose(problem, [], 2)) == 2
    assert len(p.propose(problem, [], 2)) == 1  # only one request left
    assert p.propose(problem, [], 2) == []
    assert len(server.requests) == 3 and "request budget" in p.failures[-1].reason
    # a different signature has its own budget
    server.push(answer(GOOD))
    assert len(p.propose(make_problem(D=16), [], 1)) == 1


def test_token_budget(server, proposer_factory):
    problem = make_problem()
    probe = proposer_factory()
    prompt_tokens = len(probe.build_prompt(problem, [])) // llm_mod.CHARS_PER_TOKEN + 1
    server.push(answer(GOOD))
    # room for the prompt but not for an answer of MIN_ANSWER_TOKENS: no request at all
    p = proposer_factory(llm_max_total_tokens=prompt_tokens + 500, llm_max_tokens=100_000)
    assert p.propose(problem, [], 1) == []
    assert len(server.requests) == 0 and "token budget" in p.failures[-1].reason
    p2 = proposer_factory(llm_max_total_tokens=prompt_tokens + 5000, llm_max_tokens=100_000)
    assert len(p2.propose(problem, [], 1)) == 1
    assert server.requests[0].body["max_tokens"] <= 5000  # capped by what is left of the budget
    assert p2.usage(problem)["tokens"] > 0


def test_time_budget(server, proposer_factory):
    p = proposer_factory(budget_s=1.0)
    assert p.propose(make_problem(), [], 1) == []
    assert "time budget" in p.failures[-1].reason and not server.requests


def test_cuda_answer_on_cpu_problem_is_refused(server, proposer_factory):
    server.push(answer('#include "r1attn_shim.h"\nextern "C" int r1attn_forward() { return 0; }\n', lang="cuda"))
    p = proposer_factory()
    assert p.propose(make_problem(), [], 1) == []
    assert "CPU interpreter" in p.failures[-1].reason


def test_endpoint_down_is_a_failure_not_an_exception():
    s = Settings(llm_base_url="http://127.0.0.1:9/v1", llm_api_key="x", llm_request_timeout_s=5.0)
    p = LLMProposer(s, max_retries=0)
    try:
        assert p.propose(make_problem(), [], 1) == []
        assert "APIConnectionError" in p.failures[-1].reason
    finally:
        p.close()


def test_cheat_candidate_is_rejected_by_static_check(server, proposer_factory):
    from torch_r1attn.verify.static import check_source

    server.push(answer(CHEAT))
    cands = proposer_factory().propose(make_problem(), [], 1)
    assert len(cands) == 1
    assert check_source(cands[0].source, cands[0].language)  # non-empty: rejected
    assert check_source(GOOD, "triton") == []


# ----------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_search_loop_end_to_end_cpu(server, cache_dir):
    """Scripted rounds through the real loop, verifier and cache under the CPU interpreter:
    round 1: a compile error, wrong numerics, a cheat, a truncated answer;
    round 2: the fixed kernel (the verifier's compile error must be in its prompt);
    the correct kernel ends up cached."""
    from torch_r1attn.cache import KernelCache
    from torch_r1attn.search.loop import run_search

    server.push(
        answer(BROKEN, reasoning_field="reasoning_content"),
        answer(WRONG, reasoning_field="reasoning"),
        answer(CHEAT, reasoning_field=None),
        answer(GOOD, finish_reason="length"),
        answer(GOOD, reasoning="The NameError: m_neww is a typo.", reasoning_field=None),
    )
    s = make_settings(server, llm_samples=4, llm_concurrency=2, llm_max_requests=5, rounds=2, proposer="llm",
                      workers=2, max_candidates=8, budget_s=600.0, verify_timeout_s=240.0)
    problem = make_problem()
    cache = KernelCache(root=cache_dir)
    p = LLMProposer(s)
    try:
        res = run_search(problem, [p], settings=s, cache=cache)
    finally:
        p.close()
    assert len(server.requests) == 5
    verdicts = {fb.candidate.source.strip(): fb for fb in res.history}
    assert len(verdicts) == 4, [fb.text for fb in res.history]
    assert not verdicts[BROKEN.strip()].ok
    assert not verdicts[WRONG.strip()].ok
    assert not verdicts[CHEAT.strip()].ok
    assert verdicts[GOOD.strip()].ok, verdicts[GOOD.strip()].text
    # the verifier's message about the compile error reached the second round's prompt
    broken_fb = verdicts[BROKEN.strip()].text.strip()
    second = server.requests[4].prompt
    assert broken_fb.splitlines()[0] in second and "m_neww" in second
    assert "finish_reason=length" in second
    assert res.winner is not None and res.winner.proposer == "llm"
    assert res.winner.source.strip() == GOOD.strip()
    entry = cache.lookup(problem.spec)
    assert entry is not None and not entry.negative
    assert Path(entry.source_path).read_text().strip() == GOOD.strip()
    assert entry.meta["provenance"]["model"] == "deepseek-ai/deepseek-r1"


@pytest.mark.gpu
def test_search_on_gpu_cuda_and_triton_candidates(server, cache_dir):
    """One scripted run on the GPU: the CUDA seed and the Triton kernel are both built,
    verified and timed; the faster correct one is cached."""
    from torch_r1attn import cuda_build
    from torch_r1attn.cache import KernelCache
    from torch_r1attn.search.loop import run_search

    if cuda_build.find_nvcc() is None:
        pytest.skip("nvcc not found on this machine: CUDA candidates cannot be built")
    problem = make_problem(V.causal(), device="cuda", dtype=torch.float16, D=64, S=1024, B=2, Hq=8, Hkv=2,
                           small=False)
    server.push(answer(cuda_build.seed_source(problem), lang="cuda"), answer(GOOD))
    s = make_settings(server, llm_samples=2, rounds=1, proposer="llm", workers=2, max_candidates=4,
                      budget_s=600.0)
    cache = KernelCache(root=cache_dir)
    p = LLMProposer(s)
    try:
        assert p.cuda_allowed(problem)
        res = run_search(problem, [p], settings=s, cache=cache)
    finally:
        p.close()
    assert "```cuda" in server.requests[0].prompt  # CUDA is offered on the GPU
    by_lang = {fb.candidate.language: fb for fb in res.history}
    assert set(by_lang) == {"cuda", "triton"}, [fb.text for fb in res.history]
    for lang, fb in by_lang.items():
        assert fb.ok, f"{lang}: {fb.text}"
        assert fb.time_ms is not None and fb.time_ms > 0 and fb.best_baseline_ms is not None
    assert by_lang["triton"].time_ms < by_lang["cuda"].time_ms  # the tiled kernel beats the seed
    assert res.entry is not None
