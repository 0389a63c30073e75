"""The LLM proposer: a reasoning model (DeepSeek-R1 by default) behind any OpenAI-compatible
endpoint (NVIDIA NIM, vLLM, SGLang, DeepSeek's API) writes candidate kernels.

Each round it builds one prompt (package data in ``search/prompts/``) and asks for
``min(n, llm_samples)`` independent answers, streamed, at most ``llm_concurrency`` at a time::

    problem + reference math (generated from the variant's parts) + callables' source
    + kernel contract and rules (mirroring the static checker) + hardware
    + best kernel so far with its timings + the verifier's feedback on the last round
        -> model (streamed; reasoning + answer) -> response.parse_answer -> Candidate

Following DeepSeek's guidance for R1 there is no system prompt: every instruction is in the
user turn, temperature 0.6, top_p 0.95.

Robustness (the proposer never raises into the search; a failure means fewer candidates, and
the reason is logged, kept in :attr:`LLMProposer.failures` and shown in the next prompt):

* the ``openai`` SDK does connection/read timeouts and retries; with ``max_retries > 0`` it
  honours ``Retry-After`` on 429/503 (up to 2 minutes) and backs off exponentially otherwise;
* a wall-clock deadline per answer (``llm_request_timeout_s``, capped by what is left of
  ``budget_s``): a watchdog timer closes the stream, which ends a stream that trickles bytes
  forever (a per-read timeout never fires on those). A read blocked on a silent socket is ended
  by the SDK's read timeout, set to the same deadline, and the round stops waiting for it after
  the deadline plus a short grace;
* budget caps per signature: requests (``llm_max_requests``), tokens (``llm_max_total_tokens``,
  from reported usage, else estimated at 4 characters per token), time (``budget_s`` from the
  first proposal for the signature).

``openai`` is imported lazily (only this proposer needs it; the GPU test machine may lack it).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import re
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from .. import variants as V
from ..config import Settings, settings as current_settings
from ..problem import Problem, default_scale
from .base import Candidate, Feedback
from .response import StreamAccumulator, parse_answer

log = logging.getLogger(__name__)

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
TOP_P = 0.95  # DeepSeek's recommended sampling for R1 (with temperature 0.6)
CHARS_PER_TOKEN = 4  # estimate when the server reports no usage
MIN_ANSWER_TOKENS = 1024  # below this a kernel cannot fit; do not start the request
GRACE_S = 5.0  # how long past the deadline a round waits for a request to notice its cut
MAX_SOURCE_CHARS = 24_000  # longest kernel source quoted in a prompt
MAX_FEEDBACK_ITEMS = 8

_logged_off = False


# ------------------------------------------------------------------------------------ templates
def render(name: str, **values: str) -> str:
    """Fill ``{{key}}`` placeholders of ``prompts/<name>.md``. Raises KeyError naming a placeholder
    that has no value (a template/code mismatch is a bug, not something to paper over)."""
    text = (PROMPTS_DIR / f"{name}.md").read_text()

    def sub(m: re.Match) -> str:
        key = m.group(1)
        if key not in values:
            raise KeyError(f"prompt template {name}.md needs a value for {{{{{key}}}}}")
        return values[key]

    return re.sub(r"\{\{(\w+)\}\}", sub, text)


# ---------------------------------------------------------------------------- reference source
def _callable_source(fn: Any) -> str | None:
    if fn is None:
        return None
    try:
        return textwrap.dedent(inspect.getsource(fn)).rstrip()
    except (OSError, TypeError):
        return None


def reference_source(variant: V.Variant) -> tuple[str, str]:
    """``(reference_py, callables_md)``: the variant's math as a runnable PyTorch function
    ``reference(q, k, v, scale, **variant_tensors)`` (tensor arguments named as the kernel gets
    them), generated from its canonical parts; and a section with the source of any
    ``score_mod``/``mask_mod`` callable. Raises TypeError for a part type it does not know."""
    parts = variant.canonical_parts
    tensor_names = list(variant.tensors())
    score_lines: list[str] = []
    mask_lines: list[str] = []
    callables: list[str] = []
    for i, p in enumerate(parts):
        pre = f"p{i}_"
        if isinstance(p, V.Causal):
            mask_lines.append("allowed &= kv_idx <= q_pos")
        elif isinstance(p, V.SlidingWindow):
            mask_lines.append(f"allowed &= (q_pos - kv_idx >= 0) & (q_pos - kv_idx < {p.size})"
                              f"  # window of {p.size} keys incl. itself")
        elif isinstance(p, V.PrefixLM):
            mask_lines.append(f"allowed &= (kv_idx < {p.prefix_len}) | (kv_idx <= q_pos)")
        elif isinstance(p, V.Document):
            n = f"{pre}doc_ids"
            if p.doc_ids.dim() == 1:
                mask_lines.append(f"allowed &= {n}[q_pos] == {n}[kv_idx]  # {n}: int (L,), L >= max(Sk, Sq + offset)")
            else:
                mask_lines.append(f"allowed &= {n}[b, q_pos] == {n}[b, kv_idx]  # {n}: int (B, L)")
        elif isinstance(p, V.DenseMask):
            mask_lines.append(f"allowed &= {pre}attn_mask  # bool, {tuple(p.mask_tensor.shape)}-like, "
                              "broadcasts to (B, Hq, Sq, Sk); True = attend")
        elif isinstance(p, V.Alibi):
            score_lines.append(f"s = s + {pre}alibi_slopes.float().view(1, -1, 1, 1) * (kv_idx - q_pos)"
                               "  # slopes: (Hq,)")
        elif isinstance(p, V.Softcap):
            cap = float(p.cap)
            score_lines.append(f"s = {cap!r} * torch.tanh(s / {cap!r})")
        elif isinstance(p, V.RelativeBias):
            n, R = f"{pre}rel_table", p.radius
            score_lines.append(f"rel = ((kv_idx - q_pos).clamp({-R}, {R}) + {R})[0, 0]  # (Sq, Sk) index into the table")
            score_lines.append(f"s = s + {n}.float()[:, rel].unsqueeze(0)  # {n}: ({p.table.shape[0]}, {2 * R + 1})")
        elif isinstance(p, V.DenseBias):
            score_lines.append(f"s = s + {pre}attn_bias.float()  # additive, broadcasts to (B, Hq, Sq, Sk)")
        elif isinstance(p, (V.ScoreMod, V.MaskMod)) or type(p).__name__ == "_OpaqueCallablePart":
            is_score = p.kind == "score"
            fname = f"{'score_mod' if is_score else 'mask_mod'}_{i}"
            if is_score:
                score_lines.append(f"s = {fname}(s, b, h, q_idx, kv_idx)  # raw q_idx, as FlexAttention passes it")
            else:
                mask_lines.append(f"allowed &= {fname}(b, h, q_idx, kv_idx)  # raw q_idx, as FlexAttention passes it")
            src = _callable_source(getattr(p, "fn", None))
            caps = {n[len(pre):]: n for n in p.tensors(pre)}
            cap_note = "".join(f"\n- captured tensor `{orig}` arrives as `{kname}` in `**variant_tensors`"
                               for orig, kname in caps.items())
            body = f"```python\n{src}\n```" if src else "(its source is not available in this process)"
            callables.append(f"`{fname}` is the user's callable (key `{p.key}`), to be translated into your "
                             f"kernel:\n{body}{cap_note}")
        else:
            raise TypeError(f"no reference source for variant part {type(p).__name__}")
    offset = "Sk - Sq  # bottom-right alignment" if variant.align == "bottom_right" else "0  # top-left alignment"
    args = "".join(f", {n}" for n in tensor_names)
    lines = [
        f"def reference(q, k, v, scale{args}):",
        "    # q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv) -> out (B, Hq, Sq, Dv)",
        "    B, Hq, Sq, D = q.shape",
        "    Hkv, Sk = k.shape[1], k.shape[2]",
        "    k = k.repeat_interleave(Hq // Hkv, dim=1)  # GQA: query head h reads kv head h // (Hq // Hkv)",
        "    v = v.repeat_interleave(Hq // Hkv, dim=1)",
        f"    offset = {offset}",
        "    dev = q.device",
        "    b = torch.arange(B, device=dev).view(B, 1, 1, 1)",
        "    h = torch.arange(Hq, device=dev).view(1, Hq, 1, 1)",
        "    q_idx = torch.arange(Sq, device=dev).view(1, 1, Sq, 1)",
        "    kv_idx = torch.arange(Sk, device=dev).view(1, 1, 1, Sk)",
        "    q_pos = q_idx + offset",
        "    s = scale * (q.float() @ k.float().transpose(-1, -2))  # (B, Hq, Sq, Sk)",
        *("    " + x for x in score_lines),
        "    allowed = torch.ones(s.shape, dtype=torch.bool, device=dev)",
        *("    " + x for x in mask_lines),
        "    s = s.masked_fill(~allowed, float('-inf'))",
        "    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row with no allowed key gives 0",
        "    return (p @ v.float()).to(q.dtype)",
    ]
    section = "".join(f"\n{c}\n" for c in callables)
    return "\n".join(lines), section


# -------------------------------------------------------------------------------- prompt parts
def hardware_summary(device: str) -> str:
    """GPU name, SMs, memory and toolchain versions, from torch.cuda when the problem is on CUDA."""
    import triton

    tv = f"Triton {triton.__version__}, PyTorch {torch.__version__.split('+')[0]}"
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        smem = getattr(p, "shared_memory_per_block_optin", None)
        l2 = getattr(p, "L2_cache_size", None)
        bits = [f"{p.name} (compute capability {p.major}.{p.minor}, sm_{p.major}{p.minor})",
                f"{p.multi_processor_count} SMs", f"{p.total_memory / 2**30:.0f} GiB memory"]
        if smem:
            bits.append(f"{smem // 1024} KiB shared memory per block (opt-in)")
        if l2:
            bits.append(f"{l2 // 2**20} MiB L2")
        from ..cuda_build import nvcc_version

        nv = nvcc_version()
        return (f"- GPU: {', '.join(bits)}\n- {tv}, CUDA {torch.version.cuda}"
                + (f", nvcc {nv}" if nv else ", no nvcc (Triton only)"))
    return (f"- CPU interpreter: no GPU here; Triton kernels run on the CPU under TRITON_INTERPRET=1, so "
            f"timings are not meaningful and only correctness counts. The interpreter computes bf16 "
            f"`tl.dot` wrongly; keep fp16/fp32 operands.\n- {tv}")


def describe_problem(problem: Problem) -> str:
    sp = problem.spec
    B, Hq, Hkv, Sq, Sk = problem.shape
    edges = ", ".join(f"(B={b}, Hq={hq}, Hkv={hk}, Sq={sq}, Sk={sk})" for b, hq, hk, sq, sk in problem.edge_shapes)
    tensors = problem.variant.tensors()
    tdesc = "".join(f"\n  - `{n}`: {tuple(t.shape)} {str(t.dtype).replace('torch.', '')} (shape varies with the call)"
                    for n, t in tensors.items())
    return "\n".join([
        f"- Signature: `{sp.uri}`",
        f"- dtype {sp.dtype}; head dim D={sp.head_dim} (q, k), Dv={sp.head_dim_v} (v, out); "
        f"GQA ratio Hq/Hkv={sp.gqa}",
        f"- Variant `{sp.variant}`, causal alignment {problem.variant.align}",
        f"- Timed shape (B, Hq, Hkv, Sq, Sk) = {(B, Hq, Hkv, Sq, Sk)}; scale = 1/sqrt(D) = {default_scale(sp):.6g} "
        "(but use the `scale` argument)",
        f"- Sequence lengths vary within the bucket: Sq <= {sp.sq_bucket}, Sk <= {sp.sk_bucket}; correctness is "
        f"also checked at {edges or 'the timed shape'}. Any B and head count (with the same GQA ratio) must work.",
        "- Variant tensors passed to `forward` as keyword arguments:" + (tdesc or " none."),
    ])


def _fmt_ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f} ms"


def _timing_line(fb: Feedback) -> str:
    if fb.time_ms is None:
        return "correct; no meaningful timing here (CPU interpreter)"
    sp = f"{fb.speedup:.3f}x" if fb.speedup is not None else "n/a"
    return (f"{_fmt_ms(fb.time_ms)} vs the best baseline {fb.best_baseline or '?'} at "
            f"{_fmt_ms(fb.best_baseline_ms)}: speed-up {sp} (needs > 1 to win)")


def best_so_far(history: list[Feedback]) -> Feedback | None:
    """The fastest correct candidate; without timings, the latest correct one."""
    ok = [fb for fb in history if fb.ok]
    timed = [fb for fb in ok if fb.time_ms is not None]
    if timed:
        return min(timed, key=lambda fb: fb.time_ms)
    return ok[-1] if ok else None


def _quote(source: str, language: str) -> str:
    src = source if len(source) <= MAX_SOURCE_CHARS else source[:MAX_SOURCE_CHARS] + "\n... (truncated)"
    return f"```{'python' if language == 'triton' else 'cuda'}\n{src.rstrip()}\n```"


def _starting_point(problem: Problem) -> str | None:
    """The templates proposer's default kernel for the problem, as a starting point."""
    try:
        from .templates import default_config, generate_source

        return generate_source(problem, default_config(problem))
    except Exception as e:  # noqa: BLE001 - a missing/failed template only drops an optional prompt section
        log.info("llm prompt: no template starting point for %s (%s: %s)", problem.spec.uri, type(e).__name__, e)
        return None


# ------------------------------------------------------------------------------------ proposer
@dataclass
class _SignatureState:
    t0: float
    requests: int = 0
    tokens: int = 0
    rounds: int = 0
    history_seen: int = 0
    failures_seen: int = 0


@dataclass
class Failure:
    """One answer that produced no candidate."""

    reason: str
    spec_uri: str
    sample: int
    provenance: dict[str, Any] = field(default_factory=dict)
    code: str = ""  # unusable code we got (e.g. Python that does not parse), for the next prompt
    from_answer: bool = False  # the model answered (vs. transport/budget); only these go in prompts


@dataclass
class _Outcome:
    candidate: Candidate | None
    failure: Failure | None
    tokens: int


class _Watchdog:
    """Closes a stream when the wall-clock deadline passes (even if bytes keep trickling)."""

    def __init__(self, seconds: float):
        self.fired = False
        self._stream = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def __enter__(self) -> "_Watchdog":
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()

    def attach(self, stream) -> None:
        with self._lock:
            self._stream = stream
            fired = self.fired
        if fired:
            stream.close()

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            stream = self._stream
        if stream is not None:
            stream.close()


class LLMProposer:
    """A :class:`~torch_r1attn.search.base.Proposer` backed by a chat-completions endpoint.

    ``propose`` never raises for endpoint or model failures (it returns fewer candidates and
    records a :class:`Failure`); it raises ``RuntimeError`` only when called after :meth:`close`.
    """

    name = "llm"

    def __init__(self, settings: Settings, client: Any = None, max_retries: int = 2):
        if not settings.llm_base_url and client is None:
            raise ValueError("LLMProposer needs settings.llm_base_url (R1ATTN_LLM_BASE_URL) or a client")
        self.settings = settings
        self.model = settings.llm_model
        self._client = client or _make_client(settings, max_retries)
        self._pool = ThreadPoolExecutor(max_workers=settings.llm_concurrency, thread_name_prefix="r1attn-llm")
        self._states: dict[str, _SignatureState] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.failures: list[Failure] = []
        self.last_prompt: str | None = None
        self.last_response: str | None = None

    # ---- budget
    def _state(self, problem: Problem) -> _SignatureState:
        with self._lock:
            st = self._states.get(problem.spec.hash)
            if st is None:
                st = self._states[problem.spec.hash] = _SignatureState(t0=time.monotonic())
            return st

    def usage(self, problem: Problem) -> dict[str, Any]:
        """Requests and tokens spent on ``problem``'s signature so far."""
        st = self._state(problem)
        return {"requests": st.requests, "tokens": st.tokens, "rounds": st.rounds,
                "seconds": round(time.monotonic() - st.t0, 3)}

    def _fail(self, problem: Problem, reason: str, sample: int = -1, **prov: Any) -> None:
        log.warning("llm proposer (%s) %s: %s", self.model, problem.spec.uri, reason)
        self.failures.append(Failure(reason=reason, spec_uri=problem.spec.uri, sample=sample, provenance=prov))

    # ---- prompt
    def cuda_allowed(self, problem: Problem) -> bool:
        from ..cuda_build import find_nvcc

        return problem.device == "cuda" and find_nvcc() is not None

    def build_prompt(self, problem: Problem, history: list[Feedback], state: _SignatureState | None = None) -> str:
        """The user turn for one round (no system prompt: DeepSeek's advice for R1)."""
        from .. import cuda_build

        sp = problem.spec
        ref, callables = reference_source(problem.variant)
        names = list(problem.variant.tensors())
        tensor_args = (", *, " + ", ".join(names)) if names else ", **variant_tensors"
        import triton

        contract = render(
            "contract_triton", dtype=sp.dtype, head_dim=str(sp.head_dim), head_dim_v=str(sp.head_dim_v),
            gqa=str(sp.gqa), device="cpu" if problem.device == "cpu" else "cuda", tensor_args=tensor_args,
            triton_version=triton.__version__,
        )
        cuda = self.cuda_allowed(problem)
        if cuda:
            seed = cuda_build.seed_source(problem)
            if seed != cuda_build.seed_source():
                note = ("A simple, correct seed kernel for this problem (slow: one thread block per query row). "
                        "Improve it or write your own:")
            else:
                note = ("A simple, correct seed kernel for FULL attention (slow: one thread block per query row). "
                        "It does not implement this variant: add the variant's math (its tensors arrive in "
                        "`extras`, in the order of SUPPORTS[\"variant_tensors\"]) or write your own:")
            contract += "\n\n" + render("contract_cuda", nvcc_cmd=cuda_build.nvcc_command(),
                                        shim=cuda_build.shim_header_text().rstrip(), seed=seed.rstrip(),
                                        seed_note=note)
        best = best_so_far(history)
        if best is not None:
            c = best.candidate
            best_txt = (f"From the {c.proposer} proposer ({c.language}); {_timing_line(best)}. "
                        f"Beat it:\n\n{_quote(c.source, c.language)}")
        else:
            start = _starting_point(problem)
            best_txt = "No correct kernel yet."
            if start:
                best_txt += (" A correct template kernel for this problem (Triton, not yet timed against "
                             f"the baselines) to start from:\n\n{_quote(start, 'triton')}")
        return render(
            "kernel_task", problem=describe_problem(problem), reference=ref, callables=callables,
            languages="Triton by default; CUDA C++ allowed" if cuda else "Triton",
            contract=contract, hardware=hardware_summary(problem.device), best=best_txt,
            feedback=self._feedback_text(problem, history, state),
            cuda_fence=", or ```cuda for a CUDA C++ kernel" if cuda else "",
        )

    def _feedback_text(self, problem: Problem, history: list[Feedback], state: _SignatureState | None) -> str:
        new = history[state.history_seen:] if state else history[-MAX_FEEDBACK_ITEMS:]
        fails = [f for f in self.failures if f.spec_uri == problem.spec.uri]
        new_fails = [f for f in (fails[state.failures_seen:] if state else fails) if f.from_answer]
        if not new and not new_fails:
            return "This is the first round."
        # this proposer's own candidates first: their feedback is what the model can act on
        ordered = sorted(new, key=lambda fb: fb.candidate.proposer != self.name)[:MAX_FEEDBACK_ITEMS]
        out = []
        quoted = 0
        for fb in ordered:
            c = fb.candidate
            head = f"- Candidate {c.hash} ({c.proposer}, {c.language}): "
            head += _timing_line(fb) if fb.ok else "FAILED"
            out.append(f"{head}\n{textwrap.indent(fb.text.strip() or '(no detail)', '  ')}")
            if not fb.ok and c.proposer == self.name and quoted < 2:
                quoted += 1
                out.append(f"  Its source, to fix:\n\n{_quote(c.source, c.language)}")
        for f in new_fails[:MAX_FEEDBACK_ITEMS]:
            out.append(f"- One of your answers gave no usable kernel: {f.reason}")
            if f.code and quoted < 2:
                quoted += 1
                out.append(f"  The code it contained:\n\n```\n{f.code[:MAX_SOURCE_CHARS]}\n```")
        return "\n".join(out)

    # ---- proposing
    def propose(self, problem: Problem, history: list[Feedback], n: int) -> list[Candidate]:
        """Up to ``min(n, llm_samples)`` candidates, fewer when answers fail or budgets run out."""
        if self._closed:
            raise RuntimeError("LLMProposer.propose called after close()")
        s = self.settings
        st = self._state(problem)
        elapsed = time.monotonic() - st.t0
        remaining_s = s.budget_s - elapsed
        if remaining_s <= 1.0:
            self._fail(problem, f"time budget spent ({elapsed:.0f} s of budget_s={s.budget_s:g})")
            return []
        k = min(n, s.llm_samples, s.llm_max_requests - st.requests)
        if k <= 0:
            self._fail(problem, f"request budget spent ({st.requests} of llm_max_requests={s.llm_max_requests})")
            return []
        prompt = self.build_prompt(problem, history, st)
        prompt_tokens = len(prompt) // CHARS_PER_TOKEN + 1
        tokens_left = s.llm_max_total_tokens - st.tokens
        while k > 0 and tokens_left // k - prompt_tokens < MIN_ANSWER_TOKENS:
            k -= 1
        if k <= 0:
            self._fail(problem, f"token budget spent ({st.tokens} of llm_max_total_tokens={s.llm_max_total_tokens})")
            return []
        max_tokens = min(s.llm_max_tokens, tokens_left // k - prompt_tokens)
        st.history_seen = len(history)  # the next prompt reports only what is newer than this one
        st.failures_seen = sum(1 for f in self.failures if f.spec_uri == problem.spec.uri)
        deadline = min(s.llm_request_timeout_s, remaining_s)
        sha = hashlib.sha256(prompt.encode()).hexdigest()
        st.requests += k
        st.rounds += 1
        rnd = st.rounds
        self.last_prompt = prompt
        log.info("llm proposer: %s round %d: %d request(s) to %s (prompt %d chars, max_tokens %d, deadline %.0f s)",
                 problem.spec.uri, rnd, k, self.model, len(prompt), max_tokens, deadline)
        log.debug("llm prompt %s:\n%s", sha[:12], prompt)
        futures = [self._pool.submit(self._one, problem, prompt, sha, max_tokens, deadline, i, rnd) for i in range(k)]
        done, not_done = wait(futures, timeout=deadline + GRACE_S)
        out: list[Candidate] = []
        for i, f in enumerate(futures):
            if f in not_done:
                f.cancel()
                st.tokens += prompt_tokens + max_tokens  # unknown: charge the worst case
                self._fail(problem, f"no answer within the {deadline:.0f} s deadline", i)
                continue
            try:
                res = f.result()
            except Exception as e:  # noqa: BLE001 - a bug in one answer's handling must not lose the others
                log.error("llm proposer: handling sample %d failed", i, exc_info=True)
                self._fail(problem, f"internal error handling the answer: {type(e).__name__}: {e}", i)
                continue
            st.tokens += res.tokens
            if res.candidate is not None:
                out.append(res.candidate)
            elif res.failure is not None:
                self.failures.append(res.failure)
                log.warning("llm proposer (%s) %s: sample %d: %s", self.model, problem.spec.uri, i,
                            res.failure.reason)
        log.info("llm proposer: %s round %d: %d candidate(s) from %d request(s); %d tokens used so far",
                 problem.spec.uri, rnd, len(out), k, st.tokens)
        return out

    def _one(self, problem: Problem, prompt: str, sha: str, max_tokens: int, deadline: float,
             sample: int, rnd: int) -> _Outcome:
        """One streamed request; every failure becomes a :class:`Failure` (never raises)."""
        s = self.settings
        t0 = time.monotonic()
        acc = StreamAccumulator()
        error: str | None = None
        dog = _Watchdog(deadline)
        try:
            with dog:
                stream = self._client.chat.completions.create(
                    model=self.model,
                    messages=[{"role": "user", "content": prompt}],
                    temperature=s.llm_temperature,
                    top_p=TOP_P,
                    max_tokens=max_tokens,
                    stream=True,
                    stream_options={"include_usage": True},
                    timeout=deadline,
                )
                dog.attach(stream)
                try:
                    for chunk in stream:
                        acc.feed(chunk)
                finally:
                    stream.close()
        except Exception as e:  # noqa: BLE001 - SDK/transport errors of every kind end this request, not the search
            error = f"request failed: {type(e).__name__}: {e}"
        seconds = time.monotonic() - t0
        if dog.fired:
            error = f"the answer was cut by the {deadline:.0f} s wall-clock deadline (llm_request_timeout_s)"
        usage = acc.usage
        tokens = usage.get("total_tokens") or (
            len(prompt) + len(acc.reasoning) + len(acc.content)) // CHARS_PER_TOKEN
        prov = {
            "model": self.model,
            "endpoint": urlparse(s.llm_base_url or "").netloc or None,
            "prompt_sha256": sha,
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
            "reasoning_tokens": usage.get("reasoning_tokens"),
            "total_tokens": usage.get("total_tokens"),
            "seconds": round(seconds, 3),
            "finish_reason": acc.finish_reason,
            "reasoning_chars": len(acc.reasoning),
            "round": rnd,
            "sample": sample,
        }
        if error is not None:
            return _Outcome(None, Failure(error, problem.spec.uri, sample, prov), tokens)
        self.last_response = acc.content
        log.debug("llm answer (sample %d, %s, %.1f s, reasoning %d chars):\n%s", sample, acc.finish_reason,
                  seconds, len(acc.reasoning), acc.content)
        parsed = parse_answer(acc.content, acc.reasoning, acc.finish_reason)
        prov["reasoning_chars"] = len(parsed.reasoning)
        if not parsed.ok:
            from .response import pick_code

            picked = pick_code(parsed.answer) if parsed.answer else None
            return _Outcome(None, Failure(parsed.reason, problem.spec.uri, sample, prov,
                                          code=picked[0] if picked else "", from_answer=True), tokens)
        if parsed.language == "cuda" and not self.cuda_allowed(problem):
            why = ("a CUDA kernel cannot run here (" +
                   ("CPU interpreter" if problem.device != "cuda" else "no nvcc") + "); answer in Triton")
            return _Outcome(None, Failure(why, problem.spec.uri, sample, prov, from_answer=True), tokens)
        cand = Candidate(
            source=parsed.code, language=parsed.language, proposer=self.name,
            config={"model": self.model, "temperature": s.llm_temperature, "top_p": TOP_P,
                    "max_tokens": max_tokens, "round": rnd, "sample": sample},
            provenance=prov,
        )
        return _Outcome(cand, None, tokens)

    def close(self) -> None:
        """Stop accepting work. Requests in flight are abandoned, not awaited; their watchdogs and
        read timeouts still end them within ``llm_request_timeout_s``."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        close = getattr(self._client, "close", None)
        if callable(close):
            close()


def _make_client(settings: Settings, max_retries: int):
    import openai  # lazy: only this proposer needs it

    key = settings.resolved_llm_api_key
    if not key:
        # local servers (vLLM, SGLang) accept any key; the SDK refuses to start without one
        log.info("llm proposer: no API key set (R1ATTN_LLM_API_KEY / OPENAI_API_KEY / NVIDIA_API_KEY); "
                 "sending a placeholder")
        key = "not-needed"
    return openai.OpenAI(base_url=settings.llm_base_url, api_key=key, max_retries=max_retries,
                         timeout=settings.llm_request_timeout_s)


def make_llm_proposer(settings: Settings | None = None) -> LLMProposer | None:
    """The LLM proposer, or None (one INFO line, never an error) when no endpoint is configured
    or the ``openai`` package is missing."""
    global _logged_off
    s = settings or current_settings()
    if not s.llm_base_url:
        if not _logged_off:
            _logged_off = True
            log.info("llm proposer off: R1ATTN_LLM_BASE_URL is not set")
        return None
    try:
        import openai  # noqa: F401
    except ImportError:
        log.info("llm proposer off: the openai package is not installed (pip install openai)")
        return None
    return LLMProposer(s)
