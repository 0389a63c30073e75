"""The built-in proposer: Triton flash-attention kernels specialised to one signature.

:func:`generate_source` turns a :class:`~torch_r1attn.problem.Problem` and a *config* (the knobs
below) into a complete kernel module following the kernel contract of :mod:`torch_r1attn.loader`.
The variant's parts become code through :mod:`torch_r1attn.search.codegen`.

Two kernel families:

* **prefill** (FA2-style, one program per (query block, batch x query head)): the kv loop is
  split into masked boundary blocks and unmasked interior blocks using each part's block-range
  rule (causal / sliding window / prefix-LM analytically, documents from a per-query-block range
  table built on the device), so only boundary blocks pay for masking and blocks that hold no
  allowed pair are never visited. GQA reads kv head ``h // gqa`` (K/V are not repeated).
* **decode** (``sq_bucket <= 16``): split-KV. One program per (row block, batch x kv head,
  split) packs every GQA query head of one kv head (x Sq rows) into the M dimension, so K/V are
  read once per kv head; a combine kernel merges the splits by log-sum-exp.

Knobs (keys of ``config``)::

    path             "prefill" | "decode" | "compose" (prefix-LM from SDPA calls, :mod:`.compose`;
                     takes no other knob) | "fa3" (FA3-structured Gluon kernel for Hopper,
                     :mod:`.gluon_fa3`; takes only its own knobs ``block_n``, ``stages``, ``pingpong``)
    BLOCK_M, BLOCK_N tile sizes (powers of two, 16..256)
    num_warps, num_stages
    exp2             online softmax in base 2 (scale * log2(e) folded into the score multiply)
    fold_scale       multiply q by the score scale once instead of every score tile
    split_loop       separate masked / unmasked kv loops (off: one masked loop)
    branch_mask      with split_loop: one kv loop whose boundary tiles take the mask under a
                     per-tile branch (one software pipeline per program instead of three:
                     fewer pipeline fills/drains where a program has few tiles)
    reverse_m        launch the heaviest query blocks first (causal-like masks)
    fast_tanh        tanh.approx.f32 inline asm (CUDA only; soft-cap and traced tanh)
    tma              Hopper tensor descriptors (``tl.make_tensor_descriptor``) for Q/K/V/O
    warp_specialize  ``tl.range(..., warp_specialize=True)`` on the kv loop
    pipeline_qk      the fully-allowed run issues tile j+1's Q·K^T before tile j's softmax
                     (FA3's intra-warpgroup overlap written out; needs split_loop, no branch_mask,
                     no warp_specialize).
                     Measured 36-65% slower on the H200 (session 6): the search does not try it
    rel_vec          relative bias (prefill): read the table through four aligned copies written
                     by a prep kernel, so bias tiles load as 16-byte vectors (off: the scalar
                     Toeplitz gather straight from the caller's table)
    rel_asm          with rel_vec (CUDA): 0 = tl.load (then a shared-memory trip into the score
                     tile's layout), 1 / 2 = inline-asm loads of 1 / 2 fp32 straight in that layout
    num_splits       decode: kv splits (0 = enough to fill the GPU twice)
    maxnreg          registers per thread the compiler may use (0 = its own choice, up to 255):
                     a lower cap lets more CTAs share an SM's 64K registers (M128 w8 at 128: two
                     CTAs, 16 warps, where the default 252 allows one), at the price of spills

The Hopper knobs and ``fast_tanh`` default off on the CPU and are searched on CUDA only
(``fast_tanh`` is refused on the CPU: the interpreter cannot run inline asm; ``tma`` and
``warp_specialize`` may be asked for explicitly, the interpreter runs them, which the tests use). :class:`TemplatesProposer` proposes a deterministic spread of configs first
(best guesses first), then neighbours of the fastest correct ones, never repeating a config.
"""

from __future__ import annotations

import logging
from typing import Any

from .. import variants as V
from ..problem import Problem
from . import compose, gluon_fa3
from .base import Candidate, Feedback, module_head, supports_for
from .codegen import HELPERS, LOG2E, Ctx, Untraceable, VariantCode, variant_code

log = logging.getLogger(__name__)

__all__ = ["TemplatesProposer", "generate_source", "default_config", "normalize_config", "Untraceable"]

_POW2 = (16, 32, 64, 128, 256)
KNOB_VALUES: dict[str, tuple] = {
    "path": ("prefill", "decode", "compose", "fa3"),
    "BLOCK_M": _POW2,
    "BLOCK_N": _POW2,
    "num_warps": (2, 4, 8),
    "num_stages": (1, 2, 3, 4, 5),
    "exp2": (True, False),
    "fold_scale": (False, True),
    "split_loop": (True, False),
    "branch_mask": (False, True),
    "reverse_m": (True, False),
    "fast_tanh": (True, False),
    "tma": (False, True),
    "warp_specialize": (False, True),
    "pipeline_qk": (False, True),
    "rel_vec": (True, False),
    "rel_asm": (0, 1, 2),
    "num_splits": (0, 1, 2, 4, 8, 16, 32),
    "maxnreg": (0, 128, 168, 192, 232),
}
_CUDA_ONLY = ("fast_tanh", "tma", "warp_specialize", "rel_asm", "maxnreg")
# knobs only an explicit config turns on (tune_templates --ab); the neighbour search leaves them
# alone. pipeline_qk: 36-65% slower on every variant at S4096 D128 on the H200 (session 6,
# results/tune_templates_H200_session6_pipeline_qk*): Triton waits for the early Q.K^T where it is
# issued, so the loop pays for two live score tiles and gets no overlap. Kept for later Triton
# versions, whose scheduling may change that; re-measure with `run_h200.sh step=probe`.
_EXPLICIT_ONLY = ("pipeline_qk",)


# ------------------------------------------------------------------------------------ configs
def _is_cpu(problem: Problem) -> bool:
    return str(problem.device).startswith("cpu")


def _pow2_at_least(n: int, lo: int = 16) -> int:
    p = lo
    while p < n:
        p *= 2
    return p


def _causal_like(variant: V.Variant) -> bool:
    return any(isinstance(p, (V.Causal, V.SlidingWindow, V.PrefixLM)) for p in variant.parts)


def _uses_tanh(variant: V.Variant) -> bool:
    return any(isinstance(p, (V.Softcap, V.ScoreMod, V.MaskMod)) or type(p).__name__ == "_OpaqueCallablePart"
               for p in variant.parts)


def default_config(problem: Problem) -> dict[str, Any]:
    """A good first guess for ``problem`` (every knob set)."""
    spec = problem.spec
    cpu = _is_cpu(problem)
    decode = spec.sq_bucket <= 16
    d = max(spec.head_dim, spec.head_dim_v)
    cfg: dict[str, Any] = {
        "path": "decode" if decode else "prefill",
        "exp2": True, "fold_scale": False, "split_loop": True, "branch_mask": False,
        "reverse_m": _causal_like(problem.variant),
        "fast_tanh": not cpu, "tma": False, "warp_specialize": False, "pipeline_qk": False, "num_splits": 0,
        "rel_vec": not decode, "rel_asm": 0, "maxnreg": 0,
    }
    if cpu:
        cfg.update(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
        if decode:
            cfg["BLOCK_M"] = min(64, _pow2_at_least(spec.gqa * spec.sq_bucket))
            cfg["num_splits"] = 2
        return cfg
    if decode:
        # rows = every query head of one kv head x Sq; K/V tiles stream from HBM, 128 keys/tile
        # keep enough bytes in flight at D=128 (the decode peer reads 4.2 TB/s)
        cfg.update(BLOCK_M=min(128, _pow2_at_least(spec.gqa * spec.sq_bucket)),
                   BLOCK_N=64 if d > 128 else 128, num_warps=4, num_stages=3)
        return cfg
    kind = _variant_kind(problem.variant)
    if spec.dtype == "fp32":
        cfg.update(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    elif d <= 64:
        cfg.update(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
        if kind != "dense":
            # H200 session 5 (B8 S2048 D64 searches, results/bench_H200_S2048_D64_session5_all.tgz):
            # M64 N64 w4 s4 was first or second of 8 configs on every structured variant; the old
            # first guess M128 N64 w4 s3 never won (sliding window 0.342 vs 0.359 ms, relative
            # bias 0.701 vs 0.847, documents 0.300 vs 0.305)
            cfg.update(BLOCK_M=64, num_stages=4)
    elif d <= 128:
        # Triton tutorial 06 (H100, D=128 fp16): BLOCK_M=128, BLOCK_N=64..128, 8 warps, 3 stages
        # (plain full / causal: SDPA's cuDNN kernel wins there anyway)
        cfg.update(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
        if kind != "dense":
            # H200 rounds 2-3 (benchmarks/NOTES.md): M64 w4 beat M128 w8 on every structured
            # variant (sliding window 0.629 vs 0.702 ms, ALiBi 1.282 vs 1.330, soft-cap 1.370
            # vs 1.460); two 4-warp CTAs fit an SM at s2/s3
            cfg.update(BLOCK_M=64, num_warps=4, num_stages=3)
        if kind == "doc":
            cfg.update(BLOCK_N=32)  # documents: 0.388 ms at N32 vs 0.458 at N64 (round 3)
        if kind == "relbias":
            cfg.update(num_stages=2)  # 2.130 ms at s2 vs 3.220 at s3 (rounds 2-3)
    else:
        cfg.update(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    if kind == "relbias" and spec.dtype != "fp32":
        # relative bias: folded 2.130 ms vs 6.905 ms unfolded at M64 w4 s2 (round 3); round 1
        # (old gather) 2.362 vs 2.921 at M128: fewer live registers next to the bias gather
        cfg["fold_scale"] = True
    if kind == "relbias":
        # H200 session 8 searches (results/*session8*): S4096 D128 M64 N64 w4 s2 tma: rel_asm=2
        # 1.590 ms, aligned copies through tl.load 1.894, the scalar gather 2.054; S2048 D64 s4:
        # the gather (with tma) 0.749, rel_asm=2 0.838, tl.load copies 0.856. Session 9, with tma:
        # rel_asm=1 (one scalar ld.global.nc per element) won at S4096 (1.518 vs 1.580 for pairs)
        # and S16384 (5.359 vs 5.642): the pair form's address checks cost more than they save
        if d <= 64:
            cfg["rel_vec"] = False
        else:
            cfg["rel_asm"] = 1
    return cfg


def normalize_config(problem: Problem, config: dict[str, Any] | None) -> dict[str, Any]:
    """``default_config(problem)`` overridden by ``config``, validated.

    Raises ValueError for an unknown knob, a value outside the knob's range, or a CUDA-only
    knob switched on for a CPU (interpreter) problem."""
    if (config or {}).get("path") == "compose":
        if set(config) != {"path"}:
            raise ValueError(f"template path 'compose' takes no other knob (got {sorted(set(config) - {'path'})})")
        if not compose.applies(problem):
            raise ValueError(f"template path 'compose' does not fit {problem.variant.key} "
                             "(prefix-LM alone, prefix >= 1, prefill)")
        return {"path": "compose"}
    if (config or {}).get("path") == "fa3":
        return gluon_fa3.normalize(problem, config)
    cfg = default_config(problem)
    for k, val in (config or {}).items():
        if k not in KNOB_VALUES:
            raise ValueError(f"unknown template knob {k!r} (known: {sorted(KNOB_VALUES)})")
        if val not in KNOB_VALUES[k] or isinstance(val, bool) != isinstance(KNOB_VALUES[k][0], bool):
            raise ValueError(f"template knob {k}={val!r} is not one of {KNOB_VALUES[k]}")
        cfg[k] = val
    if _is_cpu(problem) and cfg["fast_tanh"]:
        if (config or {}).get("fast_tanh"):
            raise ValueError("template knob fast_tanh=True needs CUDA; the CPU interpreter cannot run inline asm")
        cfg["fast_tanh"] = False
    if cfg["path"] == "decode":
        cfg["tma"] = cfg["warp_specialize"] = False  # the decode kernel gathers rows across heads
    if not cfg["split_loop"]:
        cfg["branch_mask"] = False  # one masked loop has no boundary to branch on
    if cfg["pipeline_qk"] and (not cfg["split_loop"] or cfg["branch_mask"] or cfg["warp_specialize"]):
        if (config or {}).get("pipeline_qk"):
            raise ValueError("template knob pipeline_qk=True needs split_loop=True, branch_mask=False and "
                             "warp_specialize=False (it pipelines the separate fully-allowed loop by hand)")
        cfg["pipeline_qk"] = False
    if cfg["warp_specialize"] and cfg["num_warps"] < 8 and not _is_cpu(problem):
        # Triton 3.6's NVGPUWarpSpecialization pass fails on this kernel below 8 warps ("scf.for op
        # destroyed but still has uses", H200, rounds 1-3 and the 2026-11-29 GPU test run)
        if (config or {}).get("warp_specialize"):
            raise ValueError(f"template knob warp_specialize=True needs num_warps=8 on CUDA "
                             f"(got num_warps={cfg['num_warps']}: Triton's warp-specialization pass fails)")
        cfg["warp_specialize"] = False
    if not _uses_tanh(problem.variant):
        cfg["fast_tanh"] = False  # no tanh in the kernel: keep one canonical config
    if cfg["path"] == "decode" or not any(isinstance(p, V.RelativeBias) for p in problem.variant.canonical_parts):
        cfg["rel_vec"] = False  # only the prefill relative-bias gather has the aligned form
    if cfg["rel_asm"] and not cfg["rel_vec"]:
        if (config or {}).get("rel_asm"):
            raise ValueError("template knob rel_asm needs rel_vec=True (it loads the aligned copies) on a "
                             "relative-bias prefill kernel")
        cfg["rel_asm"] = 0
    if cfg["rel_asm"] and _is_cpu(problem):
        raise ValueError("template knob rel_asm needs CUDA; the CPU interpreter cannot run inline asm")
    return cfg


def _config_key(cfg: dict[str, Any]) -> tuple:
    return tuple(sorted(cfg.items()))


# ------------------------------------------------------------------------------------- source
def _indent(lines: list[str], n: int) -> list[str]:
    return [(" " * n + ln) if ln else ln for ln in lines]


def _score_lines(vc: VariantCode, cfg: dict[str, Any]) -> tuple[list[str], float]:
    """Score-part lines for the tile and the factor the launcher multiplies the scale by.

    With ``exp2``, ``s`` enters base-2 units as early as possible: in the qk multiply when every
    score part is additive (those parts were emitted in base-2 units by ``variant_code``), else
    right after the last non-additive part (folded into a soft-cap's output multiply)."""
    factor = 1.0
    lines: list[str] = []
    cap = vc.softcap_first
    first_score = next((i for i, f in enumerate(vc.fragments) if f.score), None)
    for i, f in enumerate(vc.fragments):
        if not f.score:
            continue
        fl = list(f.score)
        if i == first_score and cap is not None:
            factor = 1.0 / cap  # fold 1/cap into the qk multiply: one multiply fewer per element
            head = f"s = _tanh(s * {1.0 / cap!r}, FAST_TANH) * {cap!r}"
            j = fl.index(head)
            to2 = cfg["exp2"] and i == vc.last_nonadditive and j == len(fl) - 1
            fl[j] = f"s = _tanh(s, FAST_TANH) * {(cap * LOG2E) if to2 else cap!r}"
            lines += fl
            if cfg["exp2"] and i == vc.last_nonadditive and not to2:
                lines.append(f"s = s * {LOG2E!r}")
            continue
        lines += fl
        if cfg["exp2"] and i == vc.last_nonadditive:
            lines.append(f"s = s * {LOG2E!r}")
    if cfg["exp2"] and vc.last_nonadditive < 0:
        factor = LOG2E  # s is born in base-2 units; additive parts were emitted in them
    return lines, factor


def _mask_lines(vc: VariantCode, mode: str) -> list[str]:
    """Per-element mask of a boundary tile. ``mode`` "all": every bound and mask line; "upper":
    tiles at or after the fully-allowed run, where every lower bound holds (kv >= flo)."""
    conds = ["kv_r <= row_ub_c"]
    if mode == "all" and vc.lines("lb"):
        conds.insert(0, "kv_r >= row_lb_c")
    return ["allowed = " + " & ".join(f"({c})" for c in conds)] + vc.lines("mask")


def _ldmask(*ms) -> str:
    ms = [m for m in ms if m]
    return f", mask={' & '.join(f'({m})' for m in ms)}, other=0.0" if ms else ""


def _kv_lines(idx: str) -> list[str]:
    """The tile's key positions (``idx``: its first key) and their bounds."""
    return [f"kv_idx = {idx} + offs_n", "kv_r = kv_idx[None, :]", "kv_ok = kv_idx < Sk", "kv_ok_r = kv_ok[None, :]"]


def _k_lines(kind: str, cfg: dict[str, Any], at: str, rows: str, masked: bool, even_d: bool,
             dst: str = "k") -> list[str]:
    """Load the K tile whose first key is ``at`` (row positions ``rows``) into ``dst``."""
    dm = "" if even_d else "offs_d[None, :] < D"
    in_bounds = "kv_ok[:, None]" if rows == "kv_idx" else f"{rows}[:, None] < Sk"
    plain = (f"{dst} = tl.load(k_base + {rows}[:, None] * skn + offs_d[None, :] * skd"
             f"{_ldmask(in_bounds if masked else '', dm)})")
    if kind == "prefill" and cfg["tma"]:
        return ["if USE_TMA:", f"    {dst} = k_desc.load([{at}, 0])", "else:", "    " + plain]
    return [plain]


def _softmax_pv_lines(kind: str, mode: str, cfg: dict[str, Any], vc: VariantCode, score: list[str],
                      even_dv: bool, prec: str, at: str = "start_n", qk: str = "qk") -> list[str]:
    """From the tile's raw scores ``qk`` (kv_idx set; ``at``: its first key) to the updated
    m_i, l_i and acc."""
    masked = mode != "none"
    ex = "tl.exp2" if cfg["exp2"] else "tl.exp"
    body = ["s = " + qk if cfg["fold_scale"] else f"s = {qk} * qk_mul"]
    body += score
    if mode == "branch":
        # f0 / f1 are uniform per program: the branch does not diverge within a warp
        body += ["if start_n < f0:"] + _indent(_mask_lines(vc, "all") + ['s = tl.where(allowed, s, float("-inf"))'], 4)
        body += ["elif start_n >= f1:"] + _indent(_mask_lines(vc, "upper") + ['s = tl.where(allowed, s, float("-inf"))'], 4)
    elif masked:
        body += _mask_lines(vc, mode)
        body.append('s = tl.where(allowed, s, float("-inf"))')
    body += [
        "m_new = tl.maximum(m_i, tl.max(s, 1))",
        # a row with nothing allowed yet keeps m = -inf; subtract 0 there so p = 0, not NaN
        'm_use = tl.where(m_new == float("-inf"), 0.0, m_new)',
        f"p = {ex}(s - m_use[:, None])",
        f"alpha = {ex}(m_i - m_use)",
        "l_i = l_i * alpha + tl.sum(p, 1)",
        "acc = acc * alpha[:, None]",
    ]
    dvm = "" if even_dv else "offs_dv[None, :] < DV"
    vload = (f"v = tl.load(v_base + kv_idx[:, None] * svn + offs_dv[None, :] * svd"
             f"{_ldmask('kv_ok[:, None]' if masked else '', dvm)})")
    if kind == "prefill" and cfg["tma"]:
        body += ["if USE_TMA:", f"    v = v_desc.load([{at}, 0])", "else:", "    " + vload]
    else:
        body.append(vload)
    body += [f"acc = tl.dot(p.to(v.dtype), v, acc{prec})", "m_i = m_new"]
    return body


def _loop(kind: str, start: str, end: str, mode: str, cfg: dict[str, Any], vc: VariantCode,
          score: list[str], even_d: bool, even_dv: bool, prec: str) -> list[str]:
    masked = mode != "none"
    ws = ", warp_specialize=True" if cfg["warp_specialize"] else ""
    rng = f"tl.range({start}, {end}, BLOCK_N{ws})" if ws else f"range({start}, {end}, BLOCK_N)"
    body = _kv_lines("start_n")
    body += _k_lines(kind, cfg, "start_n", "kv_idx", masked, even_d)
    body.append(f"qk = tl.dot(q, tl.trans(k){prec})")
    body += _softmax_pv_lines(kind, mode, cfg, vc, score, even_dv, prec)
    return [f"for start_n in {rng}:"] + _indent(body, 4)


def _pipelined_interior(kind: str, cfg: dict[str, Any], vc: VariantCode, score: list[str], even_d: bool,
                        even_dv: bool, prec: str) -> list[str]:
    """The fully-allowed run [f0, f1) with the next tile's Q·K^T issued before this tile's
    softmax (FlashAttention-3's intra-warpgroup overlap, written out): the asynchronous wgmma of
    tile j+1 can run while the exp2s of tile j do. Two score tiles are live instead of one."""
    out = ["if f0 < f1:"]
    b = _k_lines(kind, cfg, "f0", "(f0 + offs_n)", False, even_d)
    b.append(f"qk = tl.dot(q, tl.trans(k){prec})")
    loop = _k_lines(kind, cfg, "start_n", "(start_n + offs_n)", False, even_d, dst="k_next")
    loop.append(f"qk_next = tl.dot(q, tl.trans(k_next){prec})")
    loop += ["kv_idx0 = start_n - BLOCK_N"] + _kv_lines("kv_idx0")
    loop += _softmax_pv_lines(kind, "none", cfg, vc, score, even_dv, prec, at="kv_idx0")
    loop.append("qk = qk_next")
    b += ["for start_n in range(f0 + BLOCK_N, f1, BLOCK_N):"] + _indent(loop, 4)
    b += ["kv_idx0 = f1 - BLOCK_N"] + _kv_lines("kv_idx0")
    b += _softmax_pv_lines(kind, "none", cfg, vc, score, even_dv, prec, at="kv_idx0")
    return out + _indent(b, 4)


# Loops: [lo, f0) all masks, [f0, f1) none, [f1, hi) upper bounds only (kv >= f1 > f0 >= flo,
# so every lower bound holds). With no fully-allowed block, [lo, hi) takes all masks: f0 = f1 =
# hi rounded up to BLOCK_N, which runs the same tiles as hi itself (tile starts are multiples of
# BLOCK_N) and lets Triton prove every loop's tile start a multiple of BLOCK_N (vector loads of
# per-key data, e.g. the relative-bias band).
_RANGE_TAIL = [
    "lo = tl.maximum(lo, 0)",
    "hi = tl.minimum(hi, Sk)",
    "flo = tl.maximum(flo, lo)",
    "fhi = tl.minimum(fhi, hi)",
    "lo = (lo // BLOCK_N) * BLOCK_N",
    "f0 = ((flo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N",
    "f1 = (fhi // BLOCK_N) * BLOCK_N",
    "no_full = f1 <= f0",
    "hi_r = ((hi + BLOCK_N - 1) // BLOCK_N) * BLOCK_N",
    "f0 = tl.where(no_full, hi_r, f0)",
    "f1 = tl.where(no_full, hi_r, f1)",
]


def _loops(kind, cfg, vc, score, even_d, even_dv, prec) -> list[str]:
    out = [
        'm_i = tl.full([BLOCK_M], float("-inf"), tl.float32)',
        "l_i = tl.zeros([BLOCK_M], tl.float32)",
        "acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)",
    ]
    if cfg["split_loop"] and cfg["branch_mask"]:
        out += ["# one pipeline; tiles outside the fully-allowed run [f0, f1) take the mask"]
        out += _loop(kind, "lo", "hi", "branch", cfg, vc, score, even_d, even_dv, prec)
    elif cfg["split_loop"]:
        out += ["# boundary blocks before the fully-allowed run (every mask)"]
        out += _loop(kind, "lo", "f0", "all", cfg, vc, score, even_d, even_dv, prec)
        out += ["# fully-allowed interior blocks: no per-element mask"]
        if cfg["pipeline_qk"]:
            out += _pipelined_interior(kind, cfg, vc, score, even_d, even_dv, prec)
        else:
            out += _loop(kind, "f0", "f1", "none", cfg, vc, score, even_d, even_dv, prec)
        out += ["# boundary blocks after it (upper bounds only; includes the kv edge)"]
        out += _loop(kind, "f1", "hi", "upper", cfg, vc, score, even_d, even_dv, prec)
    else:
        out += _loop(kind, "lo", "hi", "all", cfg, vc, score, even_d, even_dv, prec)
    return out


def _row_bounds(vc: VariantCode) -> list[str]:
    """Prologue: the interval mask parts' per-row bounds, folded once per program."""
    def fold(fn: str, xs: list[str]) -> str:
        e = xs[0]
        for x in xs[1:]:
            e = f"{fn}({e}, {x})"
        return e

    out = [f"row_ub_c = ({fold('tl.minimum', vc.lines('ub') + ['Sk - 1'])})" + ("[:, None]" if vc.lines("ub") else "")]
    if vc.lines("lb"):
        out.append(f"row_lb_c = ({fold('tl.maximum', vc.lines('lb'))})[:, None]")
    return out


def _kernel_params(vc: VariantCode) -> str:
    return "".join(f"{p}, " for p in vc.params)


def _constexpr_params(vc: VariantCode) -> str:
    return "".join(f", {name}: tl.constexpr" for name, _ in vc.constexprs)


def _constexpr_args(vc: VariantCode) -> str:
    return "".join(f"{name}={expr}, " for name, expr in vc.constexprs)


def _prefill_kernel(vc, cfg, score, even_d, even_dv, prec) -> list[str]:
    dm = "" if even_d else " & (offs_d[None, :] < D)"
    dvm = "" if even_dv else " & (offs_dv[None, :] < DV)"
    fold = ["q = (q * qk_mul).to(q.dtype)"] if cfg["fold_scale"] else []
    tma = cfg["tma"]
    head = [
        "@triton.jit",
        "def _attn_fwd(Q, K, V, O, qk_mul, sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,",
        "              sob, soh, som, sod, H, Sq, Sk, OFFSET, NUM_M, " + _kernel_params(vc),
        "              GQA: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr,",
        "              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,",
        "              FAST_TANH: tl.constexpr, USE_TMA: tl.constexpr" + _constexpr_params(vc) + "):",
    ]
    b = [
        "pid = tl.program_id(0)",
        "start_m = NUM_M - 1 - pid" if cfg["reverse_m"] else "start_m = pid",
        "off_bh = tl.program_id(1)",
        "off_b = off_bh // H",
        "off_h = off_bh % H",
        "off_hk = off_h // GQA",
        "zero = pid * 0",
        "offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)",
        "offs_n = tl.arange(0, BLOCK_N)",
        "offs_d = tl.arange(0, BLOCK_D)",
        "offs_dv = tl.arange(0, BLOCK_DV)",
        "row_ok = offs_m < Sq",
        "row_ok_c = row_ok[:, None]",
        "q_pos = offs_m + OFFSET",
        "q_pos_c = q_pos[:, None]",
        "q_idx_c = offs_m[:, None]",
        "h_c = off_h",
        "qmin = zero + start_m * BLOCK_M + OFFSET",
        "qmax = tl.minimum(zero + start_m * BLOCK_M + BLOCK_M, Sq) - 1 + OFFSET",
        "_QBLK = start_m",
        "_NQBLK_RT = NUM_M",
        "off_b64 = off_b.to(tl.int64)",
        "q_base = Q + off_b64 * sqb + off_h.to(tl.int64) * sqh",
        "k_base = K + off_b64 * skb + off_hk.to(tl.int64) * skh",
        "v_base = V + off_b64 * svb + off_hk.to(tl.int64) * svh",
        "o_base = O + off_b64 * sob + off_h.to(tl.int64) * soh",
    ]
    qload = f"q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=row_ok_c{dm}, other=0.0)"
    if tma:
        b += [
            "if USE_TMA:",
            "    q_desc = tl.make_tensor_descriptor(q_base, shape=[Sq, D], strides=[sqm, 1], block_shape=[BLOCK_M, BLOCK_D])",
            "    k_desc = tl.make_tensor_descriptor(k_base, shape=[Sk, D], strides=[skn, 1], block_shape=[BLOCK_N, BLOCK_D])",
            "    v_desc = tl.make_tensor_descriptor(v_base, shape=[Sk, DV], strides=[svn, 1], block_shape=[BLOCK_N, BLOCK_DV])",
            "    o_desc = tl.make_tensor_descriptor(o_base, shape=[Sq, DV], strides=[som, 1], block_shape=[BLOCK_M, BLOCK_DV])",
            "    q = q_desc.load([start_m * BLOCK_M, 0])",
            "else:",
            "    " + qload,
        ]
    else:
        b.append(qload)
    b += fold + vc.lines("prologue") + _row_bounds(vc)
    b += ["lo = zero", "hi = zero + Sk", "flo = zero", "fhi = zero + Sk"] + vc.lines("ranges") + _RANGE_TAIL
    b += _loops("prefill", cfg, vc, score, even_d, even_dv, prec)
    b += [
        "l_safe = tl.where(l_i == 0.0, 1.0, l_i)",  # fully-masked rows: acc is 0, output 0
        "o = (acc / l_safe[:, None]).to(O.dtype.element_ty)",
    ]
    ostore = f"tl.store(o_base + offs_m[:, None] * som + offs_dv[None, :] * sod, o, mask=row_ok_c{dvm})"
    if tma:
        b += ["if USE_TMA:", "    o_desc.store([start_m * BLOCK_M, 0], o)", "else:", "    " + ostore]
    else:
        b.append(ostore)
    return head + _indent(b, 4)


def _decode_kernels(vc, cfg, score, even_d, even_dv, prec) -> list[str]:
    dm = "" if even_d else " & (offs_d[None, :] < D)"
    fold = ["q = (q * qk_mul).to(q.dtype)"] if cfg["fold_scale"] else []
    head = [
        "@triton.jit",
        "def _attn_decode(Q, K, V, ACC, LSE, qk_mul, sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,",
        "                 HKV, Sq, Sk, OFFSET, CHUNK, NS, " + _kernel_params(vc),
        "                 GQA: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr,",
        "                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,",
        "                 FAST_TANH: tl.constexpr" + _constexpr_params(vc) + "):",
    ]
    lse = ('lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))' if cfg["exp2"] else
           f'lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log(l_safe)) * {LOG2E!r})')
    b = [
        "pid_m = tl.program_id(0)",
        "off_bk = tl.program_id(1)",
        "split = tl.program_id(2)",
        "zero = pid_m * 0",
        "off_b = off_bk // HKV",
        "off_hk = off_bk % HKV",
        "H = HKV * GQA",
        "# rows = (query head within the kv group, query index): K/V are read once per kv head",
        "rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)",
        "row_ok = rows < GQA * Sq",
        "row_ok_c = row_ok[:, None]",
        "qi = rows % Sq",
        "h_row = off_hk * GQA + rows // Sq",
        "h_c = h_row[:, None]",
        "offs_n = tl.arange(0, BLOCK_N)",
        "offs_d = tl.arange(0, BLOCK_D)",
        "offs_dv = tl.arange(0, BLOCK_DV)",
        "q_pos = qi + OFFSET",
        "q_pos_c = q_pos[:, None]",
        "q_idx_c = qi[:, None]",
        "qmin = zero + OFFSET",
        "qmax = zero + OFFSET + Sq - 1",
        "_QBLK = 0",
        "_NQBLK_RT = 1",
        "off_b64 = off_b.to(tl.int64)",
        f"q = tl.load(Q + off_b64 * sqb + h_row[:, None].to(tl.int64) * sqh + qi[:, None] * sqm + offs_d[None, :] * sqd, mask=row_ok_c{dm}, other=0.0)",
        "k_base = K + off_b64 * skb + off_hk.to(tl.int64) * skh",
        "v_base = V + off_b64 * svb + off_hk.to(tl.int64) * svh",
    ]
    b += fold + vc.lines("prologue") + _row_bounds(vc)
    b += ["lo = zero", "hi = zero + Sk", "flo = zero", "fhi = zero + Sk"] + vc.lines("ranges")
    b += ["lo = tl.maximum(lo, split * CHUNK)", "hi = tl.minimum(hi, split * CHUNK + CHUNK)"] + _RANGE_TAIL
    b += _loops("decode", cfg, vc, score, even_d, even_dv, prec)
    b += [
        "l_safe = tl.where(l_i == 0.0, 1.0, l_i)",
        "o = acc / l_safe[:, None]",
        lse,
        "row_id = (off_b64 * H + h_row) * Sq + qi",
        "tl.store(ACC + (row_id[:, None] * NS + split) * DV + offs_dv[None, :], o, mask=row_ok_c & (offs_dv[None, :] < DV))",
        "tl.store(LSE + row_id * NS + split, lse, mask=row_ok)",
    ]
    combine = [
        "@triton.jit",
        "def _attn_combine(ACC, LSE, O, H, Sq, NS, sob, soh, som, sod, DV: tl.constexpr, BLOCK_S: tl.constexpr,",
        "                  BLOCK_DV: tl.constexpr):",
        "    row = tl.program_id(0).to(tl.int64)",
        "    qi = row % Sq",
        "    bh = row // Sq",
        "    off_h = bh % H",
        "    off_b = bh // H",
        "    offs_s = tl.arange(0, BLOCK_S)",
        "    offs_dv = tl.arange(0, BLOCK_DV)",
        "    s_ok = offs_s < NS",
        '    lse = tl.load(LSE + row * NS + offs_s, mask=s_ok, other=float("-inf"))',
        "    m = tl.max(lse, 0)",
        '    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))',
        "    den = tl.sum(w, 0)",
        "    a = tl.load(ACC + (row * NS + offs_s[:, None]) * DV + offs_dv[None, :],",
        "                mask=s_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)",
        "    o = tl.sum(a * w[:, None], 0) / tl.where(den == 0.0, 1.0, den)",  # no split allowed anything: 0
        "    tl.store(O + off_b * sob + off_h * soh + qi * som + offs_dv * sod, o.to(O.dtype.element_ty),",
        "             mask=offs_dv < DV)",
    ]
    return head + _indent(b, 4) + ["", ""] + combine


_DOC_RANGES = '''
@triton.jit
def _doc_ranges_kernel(DOC, R, sb, sl, Sq, Sk, OFFSET, QBLOCK, LU, BLOCK: tl.constexpr):
    # Per query block: [lo, hi) = keys whose id lies between the block's first and last row ids,
    # [flo, fhi) = keys of the block's single document. Exact when ids are non-decreasing over
    # the used length (packing); otherwise the full range and no fully-allowed run (still correct).
    blk = tl.program_id(0)
    rb = tl.program_id(1)
    nblk = tl.num_programs(0)
    base = DOC + rb.to(tl.int64) * sb
    qmin = blk * QBLOCK + OFFSET
    qmax = tl.minimum(blk * QBLOCK + QBLOCK, Sq) - 1 + OFFSET
    id_a = tl.load(base + qmin * sl)
    id_z = tl.load(base + qmax * sl)
    n_lt = tl.zeros([BLOCK], tl.int32)
    n_le = tl.zeros([BLOCK], tl.int32)
    n_down = tl.zeros([BLOCK], tl.int32)
    for j0 in range(0, LU, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        ok = j < LU
        d = tl.load(base + j * sl, mask=ok, other=0)
        kv = ok & (j < Sk)
        n_lt += (kv & (d < id_a)).to(tl.int32)
        n_le += (kv & (d <= id_z)).to(tl.int32)
        nxt = (j + 1) < LU
        dn = tl.load(base + (j + 1) * sl, mask=nxt, other=0)
        n_down += (nxt & (dn < d)).to(tl.int32)
    lt = tl.sum(n_lt, 0)
    le = tl.sum(n_le, 0)
    mono = tl.sum(n_down, 0) == 0
    lo = tl.where(mono, lt, 0)
    hi = tl.where(mono, le, Sk)
    one_doc = mono & (id_a == id_z)
    out = R + (rb * nblk + blk) * 4
    tl.store(out, lo)
    tl.store(out + 1, hi)
    tl.store(out + 2, tl.where(one_doc, lo, 0))
    tl.store(out + 3, tl.where(one_doc, hi, 0))


def _doc_ranges(d, sb, sl, rows, Sq, Sk, offset, qblock, nblk):
    lu = max(Sk, Sq + offset)
    r = torch.empty((rows, nblk, 4), dtype=torch.int32, device=d.device)
    _doc_ranges_kernel[(nblk, rows)](d, r, sb, sl, Sq, Sk, offset, qblock, lu, BLOCK=min(1024, _next_pow2(lu)))
    return r
'''

_COMMON_HOST = '''
def _need(vt, name, q):
    t = vt.get(name)
    if t is None:
        raise ValueError(f"missing variant tensor {name!r}; this kernel takes {NEEDS}")
    if t.device != q.device:
        raise ValueError(f"variant tensor {name!r} is on {t.device}, queries are on {q.device}")
    return t


def _cdiv(a, b):
    # host integers; triton.cdiv / next_power_of_2 are constexpr functions that cost ~2 us per
    # call on the host (Triton 3.9), several times per launch
    return -(-a // b)


def _next_pow2(n):
    return 1 << (n - 1).bit_length() if n > 1 else 1


def _shapes(q, k, v, out):
    qs, ks, vs, os_ = q.shape, k.shape, v.shape, out.shape
    if len(qs) != 4 or len(ks) != 4 or len(vs) != 4 or len(os_) != 4:
        raise ValueError("q, k, v, out must be 4-D (B, H, S, D)")
    B, H, Sq, D = qs
    Bk, HKV, Sk, Dk = ks
    if vs[0] != Bk or vs[1] != HKV or vs[2] != Sk or Bk != B or Dk != D:
        raise ValueError(f"k {tuple(ks)} / v {tuple(vs)} do not match q {tuple(qs)}")
    if D != HEAD_DIM or vs[3] != HEAD_DIM_V:
        raise ValueError(f"this kernel is built for head dims {HEAD_DIM}/{HEAD_DIM_V}, got {D}/{vs[3]}")
    if H != HKV * GQA:
        raise ValueError(f"this kernel is built for {GQA} query heads per kv head, got {H}/{HKV}")
    if os_ != (B, H, Sq, HEAD_DIM_V):
        raise ValueError(f"out has shape {tuple(os_)}, expected {(B, H, Sq, HEAD_DIM_V)}")
    if q.dtype is not DTYPE or k.dtype is not DTYPE or v.dtype is not DTYPE or out.dtype is not DTYPE:
        raise TypeError(f"this kernel is built for {DTYPE}, got {q.dtype}/{k.dtype}/{v.dtype}/{out.dtype}")
    return B, H, HKV, Sq, Sk
'''

_TMA_HOST = '''
def _tma_alloc(size, alignment, stream):
    # scratch for device-side tensor descriptors (128 bytes per descriptor)
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _tma_ok(*ts):
    # TMA needs a unit last stride and 16-byte aligned base and outer strides
    for t in ts:
        # allocations are 256-byte aligned, so the view's offset decides the base alignment
        if t.stride(3) != 1 or (t.storage_offset() * t.element_size()) % 16:
            return False
        if any((s * t.element_size()) % 16 for s in t.stride()[:3]):
            return False
    return True
'''


def _maxnreg_arg(cfg) -> str:
    return f", maxnreg={cfg['maxnreg']}" if cfg.get("maxnreg") else ""


def _host_prefill(vc: VariantCode, cfg, spec, factor: float, align_br: bool) -> list[str]:
    tma = cfg["tma"]
    b = [
        "B, H, HKV, Sq, Sk = _shapes(q, k, v, out)",
        f"offset = Sk - Sq" if align_br else "offset = 0",
        f"qk_mul = float(scale) * {factor!r}",
        "NUM_M = _cdiv(Sq, BLOCK_M)",
        "_QBLOCK, _NQBLK = BLOCK_M, NUM_M",
    ]
    b += vc.lines("host")
    if tma:
        b += ["use_tma = _tma_ok(q, k, v, out)", "if use_tma:", "    triton.set_allocator(_tma_alloc)"]
    args = "".join(f"{a}, " for a in vc.args)
    b += [
        "_attn_fwd[(NUM_M, B * H)](",
        "    q, k, v, out, qk_mul, *q.stride(), *k.stride(), *v.stride(), *out.stride(),",
        f"    H, Sq, Sk, offset, NUM_M, {args}",
        "    GQA=GQA, D=HEAD_DIM, DV=HEAD_DIM_V, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,",
        f"    BLOCK_DV=BLOCK_DV, FAST_TANH=FAST_TANH, USE_TMA={'use_tma' if tma else 'False'}, {_constexpr_args(vc)}",
        f"    num_warps=NUM_WARPS, num_stages=NUM_STAGES{_maxnreg_arg(cfg)})",
    ]
    return b


def _host_decode(vc: VariantCode, cfg, spec, factor: float, align_br: bool) -> list[str]:
    args = "".join(f"{a}, " for a in vc.args)
    b = [
        "B, H, HKV, Sq, Sk = _shapes(q, k, v, out)",
        "offset = Sk - Sq" if align_br else "offset = 0",
        f"qk_mul = float(scale) * {factor!r}",
        "nm = _cdiv(GQA * Sq, BLOCK_M)",
        "ns = NUM_SPLITS",
        "if ns == 0:",
        "    ns = _cdiv(2 * _num_sms(q.device), B * HKV * nm)",
        "ns = max(1, min(ns, _cdiv(Sk, BLOCK_N)))",
        "chunk = _cdiv(_cdiv(Sk, ns), BLOCK_N) * BLOCK_N",
        "ns = _cdiv(Sk, chunk)",
        "# split-KV partials: small fp32 scratch, merged into out by _attn_combine",
        "acc = torch.empty((B * H * Sq, ns, HEAD_DIM_V), dtype=torch.float32, device=q.device)",
        "lse = torch.empty((B * H * Sq, ns), dtype=torch.float32, device=q.device)",
        "_QBLOCK, _NQBLK = Sq, 1",
    ]
    b += vc.lines("host")
    b += [
        "_attn_decode[(nm, B * HKV, ns)](",
        "    q, k, v, acc, lse, qk_mul, *q.stride(), *k.stride(), *v.stride(),",
        f"    HKV, Sq, Sk, offset, chunk, ns, {args}",
        "    GQA=GQA, D=HEAD_DIM, DV=HEAD_DIM_V, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,",
        f"    BLOCK_DV=BLOCK_DV, FAST_TANH=FAST_TANH, {_constexpr_args(vc)}num_warps=NUM_WARPS, num_stages=NUM_STAGES{_maxnreg_arg(cfg)})",
        "_attn_combine[(B * H * Sq,)](acc, lse, out, H, Sq, ns, *out.stride(), DV=HEAD_DIM_V,",
        "                             BLOCK_S=_next_pow2(ns), BLOCK_DV=BLOCK_DV)",
    ]
    return b


_SMS = '''
def _num_sms(device):
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count
'''


def generate_source(problem: Problem, config: dict[str, Any] | None = None) -> str:
    """A complete kernel module (kernel contract of :mod:`torch_r1attn.loader`) for ``problem``.

    Raises :class:`~torch_r1attn.search.codegen.Untraceable` when a part (a user callable)
    cannot be translated, ValueError for a bad config."""
    cfg = normalize_config(problem, config)
    if cfg["path"] == "compose":
        return compose.generate_source(problem)
    if cfg["path"] == "fa3":
        return gluon_fa3.generate_source(problem, cfg)
    spec = problem.spec
    decode = cfg["path"] == "decode"
    vc = variant_code(problem.variant, Ctx(decode=decode, rel_vec=cfg["rel_vec"], rel_asm=cfg["rel_asm"]),
                      exp2=cfg["exp2"])
    score, factor = _score_lines(vc, cfg)
    D, DV = spec.head_dim, spec.head_dim_v
    BD, BDV = _pow2_at_least(D), _pow2_at_least(DV)
    prec = ', input_precision="ieee"' if spec.dtype == "fp32" else ""
    align_br = problem.variant.align == "bottom_right"
    supports = supports_for(problem, ["cuda"] + (["cpu"] if _is_cpu(problem) else []))
    needs = sorted(problem.variant.tensors())
    torch_dtype = {"fp16": "torch.float16", "bf16": "torch.bfloat16", "fp32": "torch.float32"}[spec.dtype]
    out = module_head(f"torch_r1attn.search.templates ({cfg['path']} template)", problem,
                      ["import torch", "import triton", "import triton.language as tl"], supports, cfg)
    out += [
        f"NEEDS = {tuple(needs)!r}",
        f"DTYPE = {torch_dtype}",
        f"HEAD_DIM, HEAD_DIM_V, GQA = {D}, {DV}, {spec.gqa}",
        f"BLOCK_D, BLOCK_DV = {BD}, {BDV}",
        f"BLOCK_M, BLOCK_N = {cfg['BLOCK_M']}, {cfg['BLOCK_N']}",
        f"NUM_WARPS, NUM_STAGES = {cfg['num_warps']}, {cfg['num_stages']}",
        f"FAST_TANH = {cfg['fast_tanh']}",
        f"NUM_SPLITS = {cfg['num_splits']}",
        HELPERS,
    ]
    out += list(dict.fromkeys(vc.lines("helpers")))  # per-part module-level helpers, once each
    if vc.has_doc:
        out.append(_DOC_RANGES)
    if decode:
        out.append(_SMS)
        out += _decode_kernels(vc, cfg, score, D == BD, DV == BDV, prec)
    else:
        out += _prefill_kernel(vc, cfg, score, D == BD, DV == BDV, prec)
    out += ["", _COMMON_HOST]
    if cfg["tma"] and not decode:
        out.append(_TMA_HOST)
    host = (_host_decode if decode else _host_prefill)(vc, cfg, spec, factor, align_br)
    out += ["", "def forward(q, k, v, out, scale, **variant_tensors):",
            '    """Writes attention of (q, k, v) into out (see SUPPORTS); allocates no output."""']
    out += _indent(host, 4)
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------ proposer
def _spread(problem: Problem) -> list[dict[str, Any]]:
    """Round-one configs, best guesses first (overrides of the default config)."""
    spec = problem.spec
    base = default_config(problem)
    decode = base["path"] == "decode"
    if _is_cpu(problem):
        if decode:
            over = [{}, {"BLOCK_N": 32}, {"num_splits": 1}, {"path": "prefill", "num_splits": 0, "BLOCK_M": 16},
                    {"exp2": False}, {"split_loop": False, "num_splits": 4}]
        else:
            over = [{}, {"BLOCK_M": 32, "BLOCK_N": 16}, {"BLOCK_N": 32}, {"BLOCK_M": 32, "BLOCK_N": 32},
                    {"split_loop": False}, {"exp2": False}, {"fold_scale": True}, {"reverse_m": not base["reverse_m"]}]
    elif decode:
        over = [{}, {"num_splits": 8}, {"num_splits": 16}, {"BLOCK_N": 64}, {"num_stages": 2},
                {"num_splits": 4, "BLOCK_N": 64}, {"num_warps": 8}, {"num_splits": 32}, {"fold_scale": True},
                {"path": "prefill", "BLOCK_M": 64, "BLOCK_N": 64, "num_splits": 0}]
    else:
        d = max(spec.head_dim, spec.head_dim_v)
        if spec.dtype == "fp32":
            over = [{}, {"BLOCK_M": 32}, {"BLOCK_N": 64}, {"num_stages": 3}, {"BLOCK_M": 128, "num_warps": 8},
                    {"num_warps": 8}]
        elif d <= 64:
            over = _spread_d64(problem.variant)
        elif d <= 128:
            over = _spread_d128(problem.variant)
        else:
            over = [{}, {"BLOCK_M": 128, "num_warps": 8}, {"BLOCK_N": 32}, {"tma": True}, {"num_stages": 3},
                    {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}, {"fold_scale": True}]
    out, seen = [], set()
    for o in over:
        try:
            cfg = normalize_config(problem, {**base, **o})
        except ValueError:
            continue
        if _config_key(cfg) not in seen:
            seen.add(_config_key(cfg))
            out.append(cfg)
    return out


def _variant_kind(variant: V.Variant) -> str:
    """Which round-one list fits (D <= 64 and D <= 128): "dense" (full / causal only), "doc",
    "relbias" or "other"."""
    parts = variant.parts
    if any(isinstance(p, V.Document) for p in parts):
        return "doc"
    if any(isinstance(p, (V.RelativeBias, V.DenseBias)) for p in parts):
        return "relbias"
    if all(isinstance(p, V.Causal) for p in parts):
        return "dense"
    return "other"


def _spread_d64(variant: V.Variant) -> list[dict[str, Any]]:
    """Round one at D <= 64 (fp16/bf16), as overrides of :func:`default_config`, best guesses
    first. Plain full / causal keep round 1's list (cuDNN wins them). Structured variants follow
    the H200 session-5 searches at B8 S2048 D64 (8 configs each, protocol 2): from the new
    default M64 N64 w4 s4, M128 N64 w8 s3 won prefix-LM / ALiBi / soft-cap (0.403 / 0.423 /
    0.486 ms), M128 N32 w4 s4 won documents (0.293); M128 N128 w8 and M256 N64 w8 were slow
    everywhere (+10-40%), tma everywhere but relative bias (M128 N64 w4 s3: 0.770 with tma vs
    0.847 without), so they come last (tma second for relative bias)."""
    kind = _variant_kind(variant)
    if kind == "dense":
        return [{}, {"BLOCK_N": 128, "num_warps": 8}, {"BLOCK_M": 64, "num_stages": 4}, {"tma": True},
                {"num_warps": 8}, {"fold_scale": True}, {"BLOCK_N": 32, "num_stages": 4},
                {"warp_specialize": True}, {"BLOCK_M": 256, "num_warps": 8}, {"num_stages": 2}]
    m128w8 = {"BLOCK_M": 128, "num_warps": 8, "num_stages": 3}
    slow = [{"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
            {"BLOCK_M": 256, "num_warps": 8, "num_stages": 3}]
    late = [{"BLOCK_M": 128, "num_stages": 3}, {"tma": True}] + slow
    if kind == "doc":
        return [{}, {"BLOCK_M": 128, "BLOCK_N": 32}, {"BLOCK_N": 32}, m128w8, {"num_stages": 3},
                {"fold_scale": True}] + late
    if kind == "relbias":  # fold_scale is the default for relative bias; tma won here
        # default: the scalar gather (session 8: 0.749 ms with tma vs 0.838 for rel_asm=2 and
        # 0.856 for the copies through tl.load; session 5's winner, without tma, 0.699)
        vec = {"rel_vec": True, "rel_asm": 2}
        return [{}, {"tma": True}, vec, {**vec, "tma": True}, m128w8, {"num_stages": 3}, {"BLOCK_N": 32},
                {"BLOCK_M": 128, "tma": True, "num_stages": 3}, {"BLOCK_M": 128, "num_stages": 3}] + slow
    # M128 N64 w4 s3 second: session 5's bench winners for ALiBi, soft-cap and prefix-LM (0.423 /
    # 0.483 / 0.406 ms); session 8's searches, which did not reach it at budget 20, kept M64 s4 / s3
    # and measured 0.452 / 0.499 / 0.440
    return [{}, {"BLOCK_M": 128, "num_stages": 3}, m128w8, {"BLOCK_N": 32}, {"fold_scale": True},
            {"num_stages": 3}, {**m128w8, "fold_scale": True}] + late


def _spread_d128(variant: V.Variant) -> list[dict[str, Any]]:
    """Round one at 64 < D <= 128 (fp16/bf16), as overrides of :func:`default_config`, best
    guesses first for the variant's kind (measurements: benchmarks/NOTES.md, rounds 1-2).

    Round 1: M128 N64 w8 s3 beat the other M128 configs; tma 5-15% slower; tma+warp_specialize
    at w4 did not compile; M64 w4 s4 (192 KiB smem, one 4-warp CTA per SM) was slow. Round 2:
    M64 w4 s2/s3 won every structured variant; ``branch_mask`` lost 20-35% everywhere (so it is
    left to later rounds); warp_specialize compiled and tied at w8, failed to compile at w4.
    Round 3 (this list's first version): tma at M64 won soft-cap / prefix-LM / relative bias by
    0-3% (within run-to-run noise, which reached 8% between machines), N32 won documents."""
    kind = _variant_kind(variant)
    m128 = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    late = [{"BLOCK_N": 128, "num_stages": 2}, {"num_stages": 4}, {"split_loop": False}]
    if kind == "dense":
        return [{}, {"num_stages": 4}, {"BLOCK_M": 64, "num_warps": 4}, {"warp_specialize": True},
                {"BLOCK_N": 128, "num_stages": 2}, {"fold_scale": True}, {"tma": True},
                {"tma": True, "BLOCK_N": 128, "num_stages": 2}, {"split_loop": False}]
    if kind == "doc":  # default M64 N32 w4 s3
        return [{}, {"num_stages": 2}, {"BLOCK_N": 64, "num_stages": 2}, {"BLOCK_N": 64},
                {"BLOCK_N": 64, "branch_mask": True}, {"tma": True}, m128, {"fold_scale": True}] + late
    if kind == "relbias":  # default M64 N64 w4 s2 fold (unfolded: 3x slower, left to later rounds)
        # default rel_asm=1; session 9 (S4096 / S16384, with tma): 1.518 / 5.359 ms, the winner
        # both times, pairs (rel_asm=2) 1.580 / 5.642, the copies through tl.load 1.892 / 6.551,
        # no tma 2.093 / 7.692; session 8: the scalar gather with tma 2.054
        return [{"tma": True}, {"tma": True, "rel_asm": 2}, {}, {"tma": True, "rel_vec": False},
                {"tma": True, "rel_asm": 0}, {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8},
                {**m128, "tma": True}, {"num_stages": 1}, m128, {"BLOCK_N": 32}, {"BLOCK_N": 128}] + late
    return [{}, {"tma": True}, {"BLOCK_N": 32}, {"fold_scale": True}, {"num_stages": 2}, m128,
            {"BLOCK_N": 32, "num_stages": 4}, {"tma": True, "BLOCK_N": 32}] + late


def _neighbours(problem: Problem, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Configs one knob-step away from ``cfg`` (deterministic order: knob order, down then up)."""
    cpu = _is_cpu(problem)
    out = []
    for k, vals in KNOB_VALUES.items():
        if k == "path" or k in _EXPLICIT_ONLY or (cpu and k in _CUDA_ONLY):
            continue
        if cpu and k in ("BLOCK_M", "BLOCK_N"):
            vals = (16, 32)
        if k in ("num_splits",) and cfg["path"] != "decode":
            continue
        if k in ("tma", "warp_specialize", "reverse_m") and cfg["path"] == "decode":
            continue
        if cfg[k] not in vals:
            continue
        i = vals.index(cfg[k])
        steps = [vals[j] for j in (i - 1, i + 1) if 0 <= j < len(vals)]
        if isinstance(vals[0], bool):
            steps = [not cfg[k]]
        for val in steps:
            step = {**cfg, k: val}
            if k == "rel_vec" and not val:
                step["rel_asm"] = 0  # the asm loads read the aligned copies: off with them
            try:
                out.append(normalize_config(problem, step))
            except ValueError:
                continue
    return out


class TemplatesProposer:
    """The built-in, offline proposer (see the module docstring). Deterministic."""

    name = "templates"

    def propose(self, problem: Problem, history: list[Feedback], n: int) -> list[Candidate]:
        """Up to ``n`` new template candidates.

        Round one (no templates history): the spread of configs, best guesses first. Later
        rounds: neighbours of the fastest correct configs (one knob step away), then any unused
        spread configs; never a config already in ``history``; knob values that only ever
        failed are avoided. Returns ``[]`` when the variant cannot be translated (logged once per
        call with the reason: the signature is left to the LLM proposer / fallback)."""
        if n <= 0:
            return []
        mine = [h for h in history if h.candidate.proposer == self.name and h.candidate.config]
        seen = set()
        for h in mine:
            try:
                seen.add(_config_key(normalize_config(problem, h.candidate.config)))
            except ValueError:
                seen.add(_config_key(h.candidate.config))
        good = [h for h in mine if h.ok]
        # with no correct config yet, nothing tells a bad knob from a broken problem
        bad_values = self._bad_values(mine) if good else set()
        spread = _spread(problem)
        if not mine:
            # a composed form (SDPA's kernels, no compile) first: cheap to check, and where it
            # fits it is the one to beat (prefix-LM: cuDNN causal + the prefix square)
            # then the FA3-structured Gluon kernels where they fit (Hopper; sliding window, ALiBi)
            pool = ([{"path": "compose"}] if compose.applies(problem) else []) + gluon_fa3.round_one(problem) + spread
        else:
            inf = float("inf")
            ranked = sorted(enumerate(good), key=lambda t: (t[1].time_ms if t[1].time_ms is not None else inf, t[0]))
            pool = []
            for _, fb in ranked[:3]:
                try:
                    cfg = normalize_config(problem, fb.candidate.config)
                except ValueError:  # a path that no longer applies (another Triton, the fa3 work gate)
                    continue
                if cfg["path"] not in ("compose", "fa3"):  # compose: no knobs; fa3: its few configs below
                    pool += _neighbours(problem, cfg)
            pool += gluon_fa3.round_one(problem) + spread
        out: list[Candidate] = []
        for cfg in pool:
            key = _config_key(cfg)
            if key in seen or any((k, cfg.get(k)) in bad_values for k in cfg):
                continue
            seen.add(key)
            try:
                src = generate_source(problem, cfg)
            except Untraceable as e:
                log.info("templates: %s cannot be translated to Triton: %s", problem.spec.uri, e.reason)
                return []
            out.append(Candidate(source=src, language="triton", proposer=self.name, config=dict(cfg),
                                 provenance={"template": cfg["path"]}))
            if len(out) >= n:
                break
        return out

    @staticmethod
    def _bad_values(mine: list[Feedback]) -> set[tuple[str, Any]]:
        """(knob, value) pairs seen in >= 2 failed configs and in no correct one."""
        fails: dict[tuple[str, Any], int] = {}
        oks: set[tuple[str, Any]] = set()
        for h in mine:
            for kv in h.candidate.config.items():
                if h.ok:
                    oks.add(kv)
                else:
                    fails[kv] = fails.get(kv, 0) + 1
        return {kv for kv, c in fails.items() if c >= 2 and kv not in oks}

    def close(self) -> None:
        """Nothing to release (no clients, no threads)."""
