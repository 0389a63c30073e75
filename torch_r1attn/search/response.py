"""Turning a reasoning model's streamed answer into a candidate kernel source (or a reason why not).

Reasoning models put their chain of thought in one of three places, depending on the server:

* a ``reasoning_content`` delta field (DeepSeek's API, vLLM/SGLang with a reasoning parser);
* a ``reasoning`` delta field (OpenRouter, some NIM deployments);
* inline in ``content`` between ``<think>`` and ``</think>`` — and R1's chat template pre-fills
  the opening tag, so the content often *starts* with reasoning and has only a lone ``</think>``.

:class:`StreamAccumulator` collects all of them from the chunks; :func:`parse_answer` splits the
answer from the reasoning and takes the code from the last complete fenced block. Every way an
answer can be unusable (cut at ``max_tokens``, empty, no code, code that does not parse) becomes
a :class:`ParsedAnswer` with ``ok=False`` and a ``reason`` — never an exception — so the search
just gets fewer candidates and the next prompt can say what went wrong.
"""

from __future__ import annotations

import ast
import re
import threading
from dataclasses import dataclass, field
from typing import Any

# fence info string -> kernel language
FENCE_LANGUAGES = {
    "python": "triton", "py": "triton", "python3": "triton", "triton": "triton",
    "cuda": "cuda", "cu": "cuda", "cpp": "cuda", "c++": "cuda", "cxx": "cuda", "cc": "cuda", "c": "cuda",
}

_THINK_OPEN = "<think>"
_THINK_CLOSE = "</think>"
# CPython 3.11's parser is not thread-safe ("AST constructor recursion depth mismatch" when two
# threads parse at once, cpython#106905); answers are parsed in the proposer's request threads.
_AST_LOCK = threading.Lock()
_FENCE = re.compile(r"^[ \t]{0,3}(`{3,}|~{3,})[ \t]*([^\s`]*)[^`\n]*$")


@dataclass
class CodeBlock:
    info: str  # the fence's language tag, lower-cased ("" when unlabelled)
    code: str


@dataclass
class ParsedAnswer:
    """The outcome of one model answer. ``ok`` means ``code`` is worth verifying."""

    ok: bool
    code: str = ""
    language: str = ""  # "triton" | "cuda" ("" when not ok)
    reason: str = ""  # why not ok (shown to the model in the next prompt)
    answer: str = ""  # the text after the reasoning
    reasoning: str = ""
    finish_reason: str | None = None


@dataclass
class StreamAccumulator:
    """Collects a ``chat.completions`` stream: reasoning, answer content, finish reason, usage.

    :meth:`feed` takes SDK chunk objects or plain dicts (the same JSON), so it works with any
    client; missing fields are simply absent (servers differ in what they send).
    """

    reasoning_parts: list[str] = field(default_factory=list)
    content_parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    chunks: int = 0

    def feed(self, chunk: Any) -> None:
        self.chunks += 1
        usage = _get(chunk, "usage")
        if usage:
            self.usage = usage_dict(usage)
        for choice in _get(chunk, "choices") or ():
            if (_get(choice, "index") or 0) != 0:
                continue
            delta = _get(choice, "delta")
            if delta is not None:
                for name in ("reasoning_content", "reasoning"):
                    r = _get(delta, name)
                    if isinstance(r, str) and r:
                        self.reasoning_parts.append(r)
                c = _get(delta, "content")
                if isinstance(c, str) and c:
                    self.content_parts.append(c)
            fr = _get(choice, "finish_reason")
            if fr:
                self.finish_reason = fr

    @property
    def content(self) -> str:
        return "".join(self.content_parts)

    @property
    def reasoning(self) -> str:
        return "".join(self.reasoning_parts)

    def parse(self) -> ParsedAnswer:
        return parse_answer(self.content, self.reasoning, self.finish_reason)


def _get(obj: Any, name: str) -> Any:
    if isinstance(obj, dict):
        return obj.get(name)
    v = getattr(obj, name, None)
    if v is None:
        # pydantic models keep fields they do not declare (reasoning_content) in model_extra
        extra = getattr(obj, "model_extra", None)
        if isinstance(extra, dict):
            v = extra.get(name)
    return v


def usage_dict(usage: Any) -> dict[str, int]:
    """``{"prompt_tokens", "completion_tokens", "total_tokens", "reasoning_tokens"}`` as reported."""
    out: dict[str, int] = {}
    for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
        v = _get(usage, name)
        if isinstance(v, int):
            out[name] = v
    details = _get(usage, "completion_tokens_details")
    r = _get(details, "reasoning_tokens") if details is not None else None
    if isinstance(r, int):
        out["reasoning_tokens"] = r
    return out


def split_reasoning(content: str) -> tuple[str, str]:
    """``(reasoning, answer)`` from content that may carry ``<think>`` tags.

    * ``<think>R</think>A`` -> ``(R, A)``
    * ``R</think>A`` (opening tag pre-filled by the chat template) -> ``(R, A)``
    * ``<think>R`` with no closing tag (cut while thinking) -> ``(R, "")``
    * no tags -> ``("", content)``
    """
    text = content.lstrip()
    close = text.find(_THINK_CLOSE)  # the first one ends the reasoning (vLLM's R1 parser agrees)
    if close >= 0:
        reasoning, answer = text[:close], text[close + len(_THINK_CLOSE):]
        if reasoning.startswith(_THINK_OPEN):
            reasoning = reasoning[len(_THINK_OPEN):]
        return reasoning.strip(), answer.strip()
    if text.startswith(_THINK_OPEN):
        return text[len(_THINK_OPEN):].strip(), ""
    return "", content.strip()


def code_blocks(text: str) -> list[CodeBlock]:
    """Every *complete* fenced block (CommonMark rules: a closing fence uses the opening's
    character, at least as many of them, and nothing else on the line). An unclosed block at the
    end — an answer cut mid-code — is not returned."""
    blocks: list[CodeBlock] = []
    open_fence: str | None = None
    info = ""
    body: list[str] = []
    for line in text.splitlines():
        if open_fence is None:
            m = _FENCE.match(line)
            if m:
                open_fence, info, body = m.group(1), m.group(2).lower(), []
            continue
        stripped = line.strip()
        if stripped and set(stripped) == {open_fence[0]} and len(stripped) >= len(open_fence):
            blocks.append(CodeBlock(info, "\n".join(body)))
            open_fence = None
        else:
            body.append(line)
    return blocks


def _block_language(b: CodeBlock) -> str | None:
    if b.info:
        return FENCE_LANGUAGES.get(b.info)
    # unlabelled: decide from the content
    if "__global__" in b.code or 'extern "C"' in b.code:
        return "cuda"
    if re.search(r"^\s*(def|import|from)\s", b.code, re.M):
        return "triton"
    return None


def _defines_entry(code: str, language: str) -> bool:
    if language == "cuda":
        return "r1attn_forward" in code
    return re.search(r"^def\s+forward\s*\(", code, re.M) is not None


def pick_code(answer: str) -> tuple[str, str] | None:
    """``(code, language)`` from the answer: the last complete fenced block in a kernel language.

    Models often end with a short usage example after the kernel, so among the blocks in a kernel
    language the last one that defines the entry point (``def forward`` / ``r1attn_forward``)
    wins; when none does, the last one in a kernel language is returned (verification will then
    say "defines no forward", which is the feedback the model needs).
    """
    typed = [(b, lang) for b in code_blocks(answer) if (lang := _block_language(b))]
    if not typed:
        return None
    with_entry = [(b, lang) for b, lang in typed if _defines_entry(b.code, lang)]
    b, lang = (with_entry or typed)[-1]
    return b.code.strip("\n") + "\n", lang


def parse_answer(content: str, reasoning: str = "", finish_reason: str | None = None) -> ParsedAnswer:
    """Reasoning + answer + code from one finished stream. Never raises on bad model output."""
    inline_reasoning, answer = split_reasoning(content or "")
    reasoning = "\n".join(x for x in ((reasoning or "").strip(), inline_reasoning) if x)
    res = ParsedAnswer(ok=False, answer=answer, reasoning=reasoning, finish_reason=finish_reason)
    if finish_reason == "length":
        where = "while reasoning, before any answer" if not answer else "in the answer"
        res.reason = (f"the answer was cut at the max_tokens limit (finish_reason=length) {where}; "
                      "reason more briefly and give the complete kernel")
        return res
    if finish_reason not in (None, "stop", "eos", "end_turn"):
        res.reason = f"the answer ended with finish_reason={finish_reason!r}"
        return res
    if not answer:
        res.reason = "the answer was empty (reasoning only, no final answer with code)"
        return res
    picked = pick_code(answer)
    if picked is None:
        res.reason = ("the answer has no complete fenced code block in Python/Triton (```python) "
                      "or CUDA (```cuda)")
        return res
    code, language = picked
    if language == "triton":
        try:
            with _AST_LOCK:
                ast.parse(code)
        except SyntaxError as e:
            res.reason = f"the Python code does not parse: line {e.lineno}: {e.msg}"
            return res
    elif "r1attn_forward" not in code:
        res.reason = 'the CUDA code does not define extern "C" int r1attn_forward(...)'
        return res
    res.ok, res.code, res.language = True, code, language
    return res
