"""The correctness protocol, parent side: make the trials, compute references, judge outputs.

Everything here runs in the *caller's* process, never in the candidate's: the worker only runs
the candidate and hands back raw outputs and its inputs as they were after the run
(:mod:`.worker`). The rules (DESIGN.md, "Correctness protocol"):

* reference: the variant's eager math in float64 (float32 on the GPU for big shapes);
* bound: ``max|out - ref| <= 2 * max|torch_same_dtype - ref| + atol(dtype)`` (flash-attention's
  rule), where ``torch_same_dtype`` is :func:`~torch_r1attn.reference.eager_attention` computed
  in the input dtype;
* ``out`` is NaN-poisoned before every call: an element left NaN was not written;
* inputs (q, k, v and every variant tensor) are compared bit for bit before/after;
* several seeds and distributions (N(0,1), U(-1,1), 8·N(0,1), N(0,1) with a few spikes), on the
  problem's shape (batch/heads trimmed) and the bucket's edge shapes;
* fully masked rows must be exactly 0 (what SDPA and FlexAttention give on every device);
* determinism (two calls, same bits); consecutive calls (a later call must repeat the first
  call's bits — catches kernels that drift); stream order (``out`` read on the current stream
  right after the call equals ``out`` after a device-wide sync — catches side-stream work);
  a re-check after timing.

One check name covers all trials; its ``data["failed_trials"]`` names the trials that failed,
``data["worst"]`` the worst element of the first failure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from .. import variants as V
from ..problem import Problem, Shape
from ..reference import eager_attention, reference_attention
from .result import CheckResult

DISTRIBUTIONS = ("normal", "uniform", "normal_x8", "spikes")

# Absolute slack on top of "2x PyTorch's own error": one ulp-ish of an O(1) output per dtype.
ATOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 2e-5, torch.float64: 1e-10}

# Order in which checks are reported (the first failing one leads the feedback).
CHECK_ORDER = ("static", "load", "supports", "run", "inputs_unchanged", "stream_order", "written",
               "masked_rows", "values", "strided_layouts", "deterministic", "consecutive_calls",
               "recheck_after_timing", "plausible_speed")

# Above this many score elements the reference runs in float32 (on the GPU) instead of float64.
_FP64_LIMIT = 1 << 27


def tolerance(dtype: torch.dtype, baseline_err: float, ref_scale: float = 1.0, factor: float = 2.0) -> float:
    """The one error bound: ``factor * baseline_err + atol(dtype) * max(1, ref_scale)``.

    ``ref_scale`` is the reference's largest magnitude: on 8x-scaled inputs a softmax can be
    one-hot, PyTorch's own error is then exactly 0, and the outputs are ~16 — where one fp16 ulp
    is 0.016 — so a fixed atol would fail kernels that are right to the last ulp.

    Raises:
        TypeError: ``dtype`` is not a floating dtype the protocol knows.
    """
    if dtype not in ATOL:
        raise TypeError(f"no tolerance for dtype {dtype}")
    return factor * baseline_err + ATOL[dtype] * max(1.0, ref_scale)


@dataclass(frozen=True)
class Protocol:
    """How thorough the correctness check is, and how timing is done. The defaults are the
    protocol; tests shrink it (:meth:`quick`) to stay fast under the Triton interpreter."""

    distributions: tuple[str, ...] = DISTRIBUTIONS
    seeds: int = 2  # trials per distribution on the problem's (trimmed) shape
    max_edge_shapes: int | None = None  # None: every edge shape of the problem
    calls: int = 3  # consecutive calls on the first trial (determinism + drift); >= 2
    check_kv_heads: int = 2  # the main correctness shape keeps this many kv heads (x gqa q heads)
    check_batch: int = 2
    masked_rows_trial: bool = True  # a trial with fully masked rows when the variant allows one
    recheck_after_timing: bool = True
    # timing (GPU only)
    warmup_ms: float = 25.0
    rep_ms: float = 150.0
    min_reps: int = 20
    max_reps: int = 500
    rotate_bytes: int = 256 << 20  # rotate input copies until this many bytes (> L2)
    ceiling_slack: float = 0.10  # reject speeds over the measured ceilings by more than this
    seed: int = 1234

    def __post_init__(self) -> None:
        bad = [d for d in self.distributions if d not in DISTRIBUTIONS]
        if bad or not self.distributions:
            raise ValueError(f"distributions must be a non-empty subset of {DISTRIBUTIONS}, got {self.distributions}")
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        if self.calls < 2:
            raise ValueError(f"calls must be >= 2 (determinism needs two runs), got {self.calls}")
        if self.max_edge_shapes is not None and self.max_edge_shapes < 0:
            raise ValueError(f"max_edge_shapes must be >= 0 or None, got {self.max_edge_shapes}")

    @classmethod
    def quick(cls, **kw) -> "Protocol":
        """A small protocol for CPU tests: two distributions, one seed, two edge shapes."""
        base = dict(distributions=("normal", "normal_x8"), seeds=1, max_edge_shapes=2, calls=3)
        base.update(kw)
        return cls(**base)

    def replace(self, **kw) -> "Protocol":
        return replace(self, **kw)


@dataclass
class Trial:
    """One correctness run: inputs (CPU, problem dtype), the variant (for the reference) and its
    kernel-named tensors."""

    name: str
    shape: Shape
    dist: str
    seed: int
    calls: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    variant: V.Variant
    tensors: dict[str, torch.Tensor]
    scale: float
    ref: torch.Tensor | None = None  # float64/float32 reference
    base_err: float = 0.0  # PyTorch's own same-dtype error
    dead_rows: torch.Tensor | None = field(default=None, repr=False)  # bool (B, H, Sq) or None
    # "bhsd": contiguous (B, H, S, D) tensors; "bshd": the same values laid out as (B, S, H, D) in
    # memory and handed over as (B, H, S, D) views (what transformers passes after its
    # projections, and the layout dispatch gives ``out`` in that path). The contract says strides
    # are arbitrary; this trial holds a kernel to it for q, k, v *and* out.
    layout: str = "bhsd"


def random_qkv(shape: Shape, dtype: torch.dtype, dist: str, seed: int, dv: int, d: int):
    """q, k, v on the CPU for ``shape = (B, Hq, Hkv, Sq, Sk)``, drawn from ``dist``.

    Raises:
        ValueError: unknown distribution.
    """
    B, Hq, Hkv, Sq, Sk = shape
    g = torch.Generator().manual_seed(seed)

    def draw(*s):
        if dist == "normal":
            x = torch.randn(*s, generator=g)
        elif dist == "uniform":
            x = torch.rand(*s, generator=g) * 2 - 1
        elif dist == "normal_x8":
            x = torch.randn(*s, generator=g) * 8
        elif dist == "spikes":
            # a few large entries, as in real activations with outlier channels; 16 is far from
            # fp16 overflow (scores stay < ~1e4 for D <= 256)
            x = torch.randn(*s, generator=g)
            n = max(1, x.numel() // 500)
            idx = torch.randint(0, x.numel(), (n,), generator=g)
            sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
            x.view(-1)[idx] = sign * (8 + 8 * torch.rand(n, generator=g))
        else:
            raise ValueError(f"unknown distribution {dist!r} (expected one of {DISTRIBUTIONS})")
        return x.to(dtype)

    return draw(B, Hq, Sq, d), draw(B, Hkv, Sk, d), draw(B, Hkv, Sk, dv)


def check_shape(problem: Problem, protocol: Protocol) -> Shape:
    """The problem's shape with batch and heads trimmed (lengths kept): the main correctness shape."""
    B, Hq, Hkv, Sq, Sk = problem.shape
    g = max(1, Hq // Hkv)
    hkv = max(1, min(Hkv, protocol.check_kv_heads))
    return (max(1, min(B, protocol.check_batch)), hkv * g, hkv, Sq, Sk)


def _callers_layout(problem: Problem, shape: Shape) -> V.Variant | None:
    """The caller's own variant (on the CPU) when it has data-dependent tensors (documents, dense
    masks or biases) that fit ``shape``; the other trials draw random layouts of the same kind."""
    variant = problem.variant
    if not any(isinstance(p, (V.Document, V.DenseMask, V.DenseBias)) for p in variant.parts):
        return None
    B, Hq, _, Sq, Sk = shape
    return variant.to("cpu") if variant.fits(B, Hq, Sq, Sk) else None


def _with_dead_rows(variant: V.Variant) -> V.Variant | None:
    """The same variant with some rows fully masked, when a dense mask/bias part allows it."""
    parts, changed = [], False
    for p in variant.parts:
        if isinstance(p, V.DenseMask) and not changed:
            m = p.mask_tensor.clone()
            if m.shape[-2] > 1:
                m[..., 0, :] = False
                m[..., -1, :] = False
            else:
                m.view(-1, *m.shape[-2:])[0] = False
            parts.append(V.DenseMask(m))
            changed = True
        elif isinstance(p, V.DenseBias) and not changed:
            b = p.bias.clone()
            if b.shape[-2] > 1:
                b[..., 0, :] = float("-inf")
            else:
                b.view(-1, *b.shape[-2:])[0] = float("-inf")
            parts.append(V.DenseBias(b))
            changed = True
        else:
            parts.append(p)
    return V.Variant(parts, variant._align) if changed else None


def make_trials(problem: Problem, protocol: Protocol, scale: float | None = None) -> list[Trial]:
    """Every trial of the protocol for ``problem`` (inputs only; see :func:`prepare_references`)."""
    spec = problem.spec
    scale = (1.0 / math.sqrt(spec.head_dim)) if scale is None else float(scale)
    dtype = problem.dtype
    d, dv = spec.head_dim, spec.head_dim_v
    trials: list[Trial] = []
    seed = protocol.seed

    def add(name, shape, dist, s, calls, variant=None, layout="bhsd"):
        q, k, v = random_qkv(shape, dtype, dist, s, dv, d)
        var = variant if variant is not None else problem.variant_for(shape, s, device="cpu")
        trials.append(Trial(name=name, shape=tuple(shape), dist=dist, seed=s, calls=calls, q=q, k=k, v=v,
                            variant=var, tensors={n: t.contiguous() for n, t in var.tensors().items()},
                            scale=scale, layout=layout))

    main = check_shape(problem, protocol)
    for dist in protocol.distributions:
        for i in range(protocol.seeds):
            seed += 1
            layout = "bshd" if len(trials) == 1 else "bhsd"  # the second main trial
            add(f"{dist}#{i} {_fmt(main)}" + (" [B,S,H,D strides]" if layout == "bshd" else ""), main, dist, seed,
                protocol.calls if not trials else 1, layout=layout)
    callers = _callers_layout(problem, main)
    if callers is not None:  # timing runs on the caller's layout: correctness covers it too
        seed += 1
        add(f"caller's layout {_fmt(main)}", main, protocol.distributions[0], seed, 1, callers)
    edges = list(problem.edge_shapes)
    if protocol.max_edge_shapes is not None:
        edges = edges[: protocol.max_edge_shapes]
    for j, shp in enumerate(edges):
        seed += 1
        dist = protocol.distributions[j % len(protocol.distributions)]
        add(f"edge {dist} {_fmt(shp)}", shp, dist, seed, 1)
    if protocol.masked_rows_trial:
        seed += 1
        dead = _with_dead_rows(problem.variant_for(main, seed, device="cpu"))
        if dead is not None:
            add(f"masked-rows {_fmt(main)}", main, protocol.distributions[0], seed, 1, dead)
    return trials


def as_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` (B, H, S, D) with the same values, in ``layout``'s memory order (see Trial.layout)."""
    if layout == "bhsd":
        return x.contiguous()
    if layout == "bshd":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    raise ValueError(f"unknown layout {layout!r}")


def _fmt(shape: Shape) -> str:
    B, Hq, Hkv, Sq, Sk = shape
    return f"B{B} Hq{Hq} Hkv{Hkv} Sq{Sq} Sk{Sk}"


def reference_device(problem: Problem) -> torch.device:
    if str(problem.device).startswith("cuda") and torch.cuda.is_available():
        return torch.device(problem.device)
    return torch.device("cpu")


def prepare_references(trials: list[Trial], device: torch.device | str = "cpu") -> None:
    """Fill each trial's reference, PyTorch's own same-dtype error, and its fully-masked rows."""
    device = torch.device(device)
    for t in trials:
        q, k, v = (x.to(device) for x in (t.q, t.k, t.v))
        var = t.variant.to(device)
        B, Hq, _, Sq, Sk = t.shape
        rdt = torch.float64 if B * Hq * Sq * Sk <= _FP64_LIMIT else torch.float32
        ref = reference_attention(q, k, v, var, t.scale, dtype=rdt)
        base = eager_attention(q, k, v, var, t.scale, compute_dtype=q.dtype)
        live = _live_rows(var, B, Hq, Sq, Sk, device)
        t.dead_rows = None if live is None or bool(live.all()) else (~live).cpu()
        diff = (base.double() - ref.double()).abs()
        if t.dead_rows is not None:
            diff = diff[~t.dead_rows.to(device)]
        t.base_err = float(diff.max()) if diff.numel() else 0.0
        if not math.isfinite(t.base_err):
            # PyTorch's own low-precision path overflowed: the bound falls back to atol-relative
            # ref rounding (the candidate is then held to the dtype's rounding of the reference)
            t.base_err = float((ref.to(q.dtype).double() - ref.double()).abs().max())
        t.ref = ref.cpu()


def _live_rows(variant: V.Variant, B, H, Sq, Sk, device) -> torch.Tensor | None:
    """(B, H, Sq) bool: rows with at least one allowed key (None: every row is live)."""
    m = variant.dense_mask(B, H, Sq, Sk, device)
    live = None if m is None else m.expand(B, H, Sq, Sk).any(-1)
    for p in variant.score_parts:  # an additive -inf bias can mask too
        if isinstance(p, V.DenseBias):
            fin = torch.isfinite(V._as4d(p.bias.to(device))).expand(B, H, Sq, Sk).any(-1)
            live = fin if live is None else live & fin
    return live


def allowed_pairs(variant: V.Variant, B: int, H: int, Sq: int, Sk: int, device="cpu") -> int:
    """How many (b, h, q, kv) score entries the variant's mask allows (effective-FLOP counting)."""
    m = variant.dense_mask(B, H, Sq, Sk, device)
    if m is None:
        return B * H * Sq * Sk
    return int(m.sum()) * (B * H * Sq * Sk // m.numel())


# --------------------------------------------------------------------------------- judging
def _bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view for bitwise comparison (NaN == NaN when the bits match)."""
    ity = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(ity)


def _first_pos(mask: torch.Tensor) -> tuple[int, ...] | None:
    nz = mask.nonzero()
    return tuple(int(x) for x in nz[0]) if nz.numel() else None


def _bit_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[int, tuple | None, float]:
    """(elements that differ in bits, first differing position, max |a-b| over finite values)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return a.numel(), None, float("inf")
    if b.device != a.device:  # a score_mod's captured tensor stays on the caller's GPU; outputs come back on the CPU
        b = b.to(a.device)
    ne = _bits(a) != _bits(b)
    n = int(ne.sum())
    if not n:
        return 0, None, 0.0
    d = (a.double() - b.double()).abs()
    d = d[torch.isfinite(d)]
    return n, _first_pos(ne), float(d.max()) if d.numel() else float("inf")


@dataclass
class _Agg:
    name: str
    failed: list[str] = field(default_factory=list)
    first_detail: str = ""
    worst: dict = field(default_factory=dict)
    ok_note: str = ""
    ran: bool = False

    def fail(self, trial: str, detail: str, worst: dict | None = None) -> None:
        if not self.failed:
            self.first_detail = f"{trial}: {detail}"
            self.worst = worst or {}
        self.failed.append(trial)

    def result(self) -> CheckResult:
        if self.failed:
            more = f" (failed in {len(self.failed)} trials)" if len(self.failed) > 1 else ""
            return CheckResult(self.name, False, self.first_detail + more,
                               {"failed_trials": self.failed, "worst": self.worst})
        return CheckResult(self.name, True, self.ok_note or "ok", {})


def value_error(out: torch.Tensor, trial: Trial) -> tuple[float, float, dict]:
    """(max error on live rows, bound, worst element) of ``out`` against the trial's reference."""
    ref = trial.ref.double()
    err = (out.double() - ref).abs()
    err = torch.where(torch.isnan(err), torch.full_like(err, float("inf")), err)
    if trial.dead_rows is not None:
        err = err.masked_fill(trial.dead_rows.unsqueeze(-1), 0.0)
    bound = tolerance(out.dtype, trial.base_err, float(ref.abs().max()) if ref.numel() else 1.0)
    flat = int(err.argmax())
    pos = tuple(int(x) for x in torch.unravel_index(torch.tensor(flat), err.shape))
    worst = {"pos": pos, "got": float(out.double().reshape(-1)[flat]), "ref": float(ref.reshape(-1)[flat]),
             "err": float(err.reshape(-1)[flat]), "bound": bound, "baseline_err": trial.base_err}
    return float(err.max()), bound, worst


def _worst_text(w: dict) -> str:
    return (f"max error {w['err']:.3g} > bound {w['bound']:.3g} (2 x torch's own {w['baseline_err']:.3g} + atol) "
            f"at (b,h,q,d)={w['pos']}: got {w['got']:.6g}, expected {w['ref']:.6g}")


def judge(trials: list[Trial], outputs: dict[str, torch.Tensor], report: dict) -> list[CheckResult]:
    """Checks for the worker's raw outputs.

    ``outputs`` holds ``t{i}.c{j}`` (call ``j``'s ``out`` read in stream order), ``t{i}.final``
    (the last call's ``out`` after a device-wide sync), ``t{i}.in.{name}`` (inputs after the run)
    and ``recheck`` (trial 0 after timing); ``report`` is the worker's JSON (how far it got).
    """
    names = ("inputs_unchanged", "stream_order", "written", "masked_rows", "values", "deterministic",
             "consecutive_calls", "recheck_after_timing")
    agg = {n: _Agg(n) for n in names}
    done = int(report.get("trials_done", 0))
    worst_ratio = 0.0
    dead_trials = 0
    for i, t in enumerate(trials[:done]):
        calls = [outputs.get(f"t{i}.c{j}") for j in range(t.calls)]
        if any(c is None for c in calls):
            agg["written"].fail(t.name, "the worker returned no output for this trial")
            continue
        first = calls[0]
        # inputs, bit for bit
        for role, orig in (("q", t.q), ("k", t.k), ("v", t.v), *t.tensors.items()):
            after = outputs.get(f"t{i}.in.{role}")
            if after is None:
                agg["inputs_unchanged"].fail(t.name, f"input {role} was not returned by the worker")
                break
            n, pos, dmax = _bit_diff(after, orig)
            if n:
                agg["inputs_unchanged"].fail(
                    t.name, f"input {role} was modified: {n} of {orig.numel()} elements changed "
                    f"(first at {pos}, max change {dmax:.3g})", {"input": role, "pos": pos})
                break
        agg["inputs_unchanged"].ran = True
        # stream order: out read right after the call (current stream) vs after a device sync
        final = outputs.get(f"t{i}.final")
        if final is not None:
            n, pos, dmax = _bit_diff(calls[-1], final)
            if n:
                agg["stream_order"].fail(
                    t.name, f"out read on the current stream right after forward differs from out after a "
                    f"device-wide sync in {n} elements (first at {pos}): the kernel's work is not ordered "
                    "on the current stream (side stream?)", {"pos": pos})
        # every element written (NaN poison), except where the row is fully masked
        nan = torch.isnan(first)
        live_nan = nan if t.dead_rows is None else nan & ~t.dead_rows.unsqueeze(-1)
        if bool(live_nan.any()):
            pos = _first_pos(live_nan)
            agg["written"].fail(t.name, f"{int(live_nan.sum())} of {first.numel()} elements of out are still NaN "
                                f"after the call (first at (b,h,q,d)={pos}): out must be fully written "
                                "(or the kernel produced NaN)", {"pos": pos})
        # fully masked rows: exactly 0, as SDPA/FlexAttention give
        if t.dead_rows is not None:
            dead_trials += 1
            rows = first[t.dead_rows]
            bad = ~(rows == 0)
            if bool(bad.any()):
                r_idx = t.dead_rows.nonzero()[int(bad.any(-1).nonzero()[0])]
                val = float(rows[bad][0])
                agg["masked_rows"].fail(t.name, f"fully masked row (b,h,q)={tuple(int(x) for x in r_idx)} must be 0 "
                                        f"(as the SDPA/Flex fallback gives), got {val:.6g}")
        # values
        err, bound, worst = value_error(first, t)
        if err > bound:
            agg["values"].fail(t.name, f"[{t.dist}] " + _worst_text(worst), worst)
        elif bound > 0:
            worst_ratio = max(worst_ratio, err / bound)
        # determinism and drift
        n, pos, dmax = _bit_diff(calls[1], first) if len(calls) > 1 else (0, None, 0.0)
        if n:
            agg["deterministic"].fail(t.name, f"two calls on the same inputs differ in {n} elements "
                                      f"(first at {pos}, max diff {dmax:.3g})", {"pos": pos})
        for j in range(2, len(calls)):
            n, pos, dmax = _bit_diff(calls[j], first)
            if n:
                e2, b2, _ = value_error(calls[j], t)
                agg["consecutive_calls"].fail(
                    t.name, f"call {j + 1} of {len(calls)} differs from call 1 in {n} elements (first at {pos}, "
                    f"max diff {dmax:.3g}; error {e2:.3g} vs bound {b2:.3g}): the kernel drifts over calls",
                    {"call": j + 1, "pos": pos})
                break
    agg["values"].ok_note = f"{done} trials, worst error at {worst_ratio:.2f} of the bound"
    agg["masked_rows"].ok_note = (f"{dead_trials} trials with fully masked rows, all 0" if dead_trials
                                  else "no trial has fully masked rows")
    rc = outputs.get("recheck")
    if rc is not None and trials and trials[0].ref is not None:
        n, pos, dmax = _bit_diff(rc, outputs.get("t0.c0", rc))
        err, bound, worst = value_error(rc, trials[0])
        if n or err > bound:
            agg["recheck_after_timing"].fail(
                trials[0].name, f"after timing the output differs from the first call in {n} elements "
                f"(max diff {dmax:.3g}); " + (_worst_text(worst) if err > bound else "still within the bound"), worst)
    elif report.get("recheck_expected"):
        agg["recheck_after_timing"].fail("recheck", "the worker did not return the re-check output")
    else:
        agg["recheck_after_timing"].ok_note = "not run (no timing phase)"
    results = [agg[n].result() for n in names]
    strided = [t.name for t in trials[:done] if t.layout != "bhsd"]
    if strided:
        # named on its own so a cache entry records it: dispatch hands (B, S, H, D)-laid-out
        # outputs only to kernels whose entry lists this check
        bad = sorted({tr for a in agg.values() for tr in a.failed if tr in strided})
        results.append(CheckResult("strided_layouts", not bad,
                                   f"failed on {bad}" if bad else f"q, k, v and out as (B, S, H, D)-strided views: {strided}",
                                   {"failed_trials": bad} if bad else {}))
    return results


def sort_checks(checks: list[CheckResult]) -> list[CheckResult]:
    order = {n: i for i, n in enumerate(CHECK_ORDER)}
    return sorted(checks, key=lambda c: order.get(c.name, len(order)))
