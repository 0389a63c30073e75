"""FA3-structured Hopper candidates, written in Gluon (``triton.experimental.gluon``).

The Triton template's dense loop runs one warpgroup per 64 query rows and overlaps a tile's
softmax with tensor-core work only through a second CTA on the SM (session 9's read of Triton
3.6's sm90 code). This module writes FlashAttention-3's structure instead, with Gluon's explicit
layouts, shared memory, mbarriers, TMA and warp specialisation:

* one CTA per (128 query rows, batch x head); a **producer** warp TMA-loads Q once, then K and V
  tiles into a ``NUM_STAGES`` ring of shared-memory stages (per stage: K-ready and V-ready
  transaction barriers, an empty barrier that both consumers release);
* two **consumer** warpgroups of 64 rows each (``setmaxnreg`` 240 registers; the producer 24):
  ``S = Q K^T`` by async ``wgmma`` from shared memory, online softmax in registers (exp2 domain),
  ``O += P V`` with P from registers; tile n's ``Q K^T`` is issued together with tile n-1's
  ``P V`` so the two warpgroups' softmaxes run under each other's MMAs;
* ``PINGPONG`` (a knob) orders the two warpgroups' MMA issue strictly (FA3's inter-warpgroup
  schedule, from two mbarriers: Gluon 3.6 has no named barriers).

Variants: causal masks, the causal sliding window, prefix-LM (keys before the prefix end visible
to every row: a causal mask whose diagonal never goes below the prefix), ALiBi (a key-only term
``slope * j``: ALiBi's ``-slope * q_pos`` is constant along a row and softmax drops it) and
their combinations, at any
``Sq``/``Sk`` in either alignment, GQA, head dim 64 or 128 (``Dv == D``), fp16 / bf16. Key tiles
wholly outside the mask are never visited; the per-element mask runs only on boundary tiles.
A query block with no visible key (a bottom-right call with ``Sq > Sk`` and no prefix) runs one
fully masked tile and writes zeros, the reference's convention. (A top-left window with
``Sq > Sk + W`` can also visit one wholly masked tile for such a block: zeros, correct.)

Hopper only (``wgmma``/``setmaxnreg`` need sm_90a): :func:`applies` asks the device, and the
generated module refuses anything else. Known limit: the 2-D TMA descriptors span every head, so
the keys past ``Sk`` in a head's last tile are the next head's rows; they are masked to ``p = 0``,
but a NaN or inf there would still reach this head through ``0 * inf`` in P.V (rank-3
descriptors, zero-filled past ``Sk``, would remove it). It cannot run on the CPU (no interpreter for Gluon), so
the CPU tests check the generated module's shape (static check, knobs, applicability) and the GPU
tests (``pytest -m gpu``) its numbers. Layouts: (B, H, S, D) contiguous tensors go straight to TMA
descriptors; any other layout is copied to that first (correct, slower: the transformers layout
would need a descriptor per layout, not written yet).
"""

from __future__ import annotations

from typing import Any

import torch

from .. import variants as V
from ..problem import Problem
from .base import module_head, supports_for

__all__ = ["applies", "normalize", "round_one", "generate_source", "estimated_gpu_ms", "KNOBS", "MIN_GPU_MS"]

# knob -> allowed values; the first is the default
# (own names: the templates proposer's failure statistics must not mix them with the Triton knobs)
KNOBS: dict[str, tuple] = {"block_n": (128, 64), "stages": (3, 2, 4), "pingpong": (False, True)}
_SMEM_BYTES = 232448  # H100/H200 shared memory per block (opt-in maximum)


def _parts(problem: Problem):
    """(window size or 0, prefix length or 0, the ALiBi part or None) when the variant is a causal
    mask, a sliding window or a prefix-LM mask, with optional ALiBi; None otherwise. A prefix-LM
    part ANDed with a causal or sliding-window mask adds nothing (those already hide every key
    after the query), so its prefix is dropped there."""
    parts = problem.variant.canonical_parts
    window, prefix, alibi, masked, causal = 0, None, None, False, False
    for p in parts:
        if isinstance(p, V.Causal):
            masked = causal = True
        elif isinstance(p, V.SlidingWindow):  # several windows: their AND is the smallest
            masked, causal, window = True, True, (min(window, p.size) if window else p.size)
        elif isinstance(p, V.PrefixLM):  # several prefixes: their AND is the shortest (0 included)
            masked, prefix = True, (p.prefix_len if prefix is None else min(prefix, p.prefix_len))
        elif isinstance(p, V.Alibi) and alibi is None:
            alibi = p
        else:
            return None
    # under a causal part the prefix adds nothing; past 2**30 it is full attention for any length
    # this kernel takes, and the tile arithmetic stays in int32
    prefix = 0 if (causal or prefix is None) else min(prefix, 1 << 30)
    return (window, prefix, alibi) if masked else None


def _gluon_available() -> bool:
    """Whether this Triton has the Gluon Hopper API the module imports (Triton >= 3.5)."""
    try:
        from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma  # noqa: F401
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return True


def _is_hopper(device) -> bool:
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        return torch.cuda.get_device_capability(dev) == (9, 0)
    except (RuntimeError, AssertionError):
        return False


# The module's host cost per call: 199 us on the H200's host in session 11's bench (62 in the
# wrapper, 137 in Gluon's launcher with four tensor descriptors); 77-82 us in session 12's (23-25
# in the wrapper, layouts built once), against 29-45 us for a Triton template. The
# search times GPU work only, so below about this much GPU work a call would be host-bound and
# the kernel a regression in a real model's loop: smaller problems keep the Triton template.
MIN_GPU_MS = 0.25
_EST_TFLOPS = 480.0  # what this kernel sustains on an H200 (session 12's bench: 459-549 effective)


def estimated_gpu_ms(problem: Problem) -> float:
    """GPU time of ``problem``'s representative shape at :data:`_EST_TFLOPS` (the FLOPs of the
    visible (q, k) pairs: a window's ``min(W, Sk)`` keys per row, causal's half, plus half the
    prefix square for prefix-LM)."""
    B, Hq, _, Sq, Sk = problem.shape
    window, prefix, _ = _parts(problem) or (0, 0, None)
    pre = min(prefix, Sk)
    pairs = Sq * min(window, Sk) if window else Sq * Sk / 2 + pre * pre / 2
    return B * Hq * pairs * 4 * problem.spec.head_dim / (_EST_TFLOPS * 1e12) * 1e3


def applies(problem: Problem) -> bool:
    """True when this module can write a kernel for ``problem``: prefill, fp16/bf16, D == Dv in
    (64, 128), a causal, sliding-window or prefix-LM mask with optional ALiBi (plain causal is left to cuDNN),
    enough work to hide its host cost (:data:`MIN_GPU_MS`), and a Hopper (sm_90) device."""
    spec = problem.spec
    form = _parts(problem)
    if form is None or form == (0, 0, None):
        return False
    if spec.dtype not in ("fp16", "bf16") or spec.head_dim != spec.head_dim_v or spec.head_dim not in (64, 128):
        return False
    if spec.sq_bucket <= 16 or estimated_gpu_ms(problem) < MIN_GPU_MS:
        return False
    return _is_hopper(problem.device) and _gluon_available()


def _smem(cfg: dict[str, Any], d: int) -> int:
    q = 2 * 64 * d * 2
    return q + cfg["stages"] * 2 * cfg["block_n"] * d * 2 + 1024


def normalize(problem: Problem, config: dict[str, Any] | None) -> dict[str, Any]:
    """``{"path": "fa3", ...}`` with every knob set; ValueError for an unknown knob, a value out of
    range, a ring that does not fit shared memory, or a problem :func:`applies` refuses."""
    if not applies(problem):
        raise ValueError(f"template path 'fa3' does not fit {problem.variant.key} at {problem.shape} on "
                         f"{problem.device} (causal / sliding window / prefix-LM / ALiBi, fp16 or bf16, D 64 or 128, "
                         f"prefill, "
                         f">= {MIN_GPU_MS} ms of GPU work, sm_90)")
    cfg: dict[str, Any] = {"path": "fa3", **{k: v[0] for k, v in KNOBS.items()}}
    for k, val in (config or {}).items():
        if k == "path":
            continue
        if k not in KNOBS:
            raise ValueError(f"template path 'fa3' takes knobs {sorted(KNOBS)}, not {k!r}")
        if val not in KNOBS[k] or type(val) is not type(KNOBS[k][0]):  # 128.0 or 1 for True: refused
            raise ValueError(f"fa3 knob {k}={val!r} is not one of {KNOBS[k]}")
        cfg[k] = val
    need = _smem(cfg, problem.spec.head_dim)
    if need > _SMEM_BYTES:
        raise ValueError(f"fa3 config {cfg} needs {need} bytes of shared memory (the SM has {_SMEM_BYTES})")
    return cfg


def round_one(problem: Problem) -> list[dict[str, Any]]:
    """The configs the templates proposer offers first, best guess first (H200, session 11,
    S4096 D128, protocol 2 at rep 300 ms: 128-key tiles with 3 stages and ping-pong fastest on
    sliding window (0.597 ms; 0.606 without ping-pong) and ALiBi (1.207; 1.244), and the winner
    of all four fa3 searches at S4096 / S16384; 2 stages 13-19% slower)."""
    if not applies(problem):
        return []
    out = []
    for c in ({"pingpong": True}, {}, {"block_n": 64, "stages": 4}):
        try:
            out.append(normalize(problem, c))
        except ValueError:
            continue
    return out


_BODY = r'''

@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty,
              q_row, kv_row, lo, hi, BLOCK_M_WG: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr):
    # Q of both consumer warpgroups, on one barrier
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem.index(0))
    tma.async_copy_global_to_shared(q_desc, [q_row + BLOCK_M_WG, 0], q_bar, q_smem.index(1))
    for it in range(hi - lo):
        s = it % NUM_STAGES
        ph = (it // NUM_STAGES) & 1
        mbarrier.wait(kv_empty.index(s), ph ^ 1)  # a fresh barrier passes parity 1 at once
        row = kv_row + (lo + it) * BLOCK_N
        mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [row, 0], k_ready.index(s), k_smem.index(s))
        mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [row, 0], v_ready.index(s), v_smem.index(s))


@gluon.jit
def _softmax_tile(qk, m_i, l_i, n, qpos, cols0, bias0, col_ref, seq_k, qk_scale, slope,
                  BLOCK_N: gl.constexpr, WINDOW: gl.constexpr, PREFIX: gl.constexpr, ALIBI: gl.constexpr,
                  SCALE_MAX: gl.constexpr, MASKED: gl.constexpr):
    """One online-softmax step on a score tile (fp32, the wgmma accumulator layout), exp2 domain.
    Returns (p, m_new, l_new, alpha)."""
    if ALIBI:
        # key-only ALiBi (slope pre-multiplied by log2 e): the in-tile part slope * j0 is a
        # loop-invariant column vector (one FMA per element, no int->float per tile); the tile's
        # offset slope * (n * BLOCK_N - col_ref) is one scalar, folded into the row max instead of
        # added to every element. Relative to a per-CTA column near the diagonal: the offset of
        # the tiles that matter is small, and any per-row constant cancels in softmax.
        qk = qk * qk_scale + gl.expand_dims(bias0, 0)
        shift = slope * (n * BLOCK_N - col_ref).to(gl.float32)
    elif not SCALE_MAX:
        qk = qk * qk_scale
    if MASKED:
        c2 = gl.expand_dims(n * BLOCK_N + cols0, 0)
        p2 = gl.expand_dims(qpos, 1)
        if PREFIX > 0:
            keep = ((c2 <= p2) | (c2 < PREFIX)) & (c2 < seq_k)
        else:
            keep = (c2 <= p2) & (c2 < seq_k)
        if WINDOW > 0:
            keep = keep & (c2 > p2 - WINDOW)
        qk = gl.where(keep, qk, float("-inf"))
    if SCALE_MAX:
        # scale > 0: the row max of the raw scores, scaled once per row; one FMA per element
        m_new = gl.maximum(m_i, gl.max(qk, 1) * qk_scale)
        p = gl.exp2(qk * qk_scale - gl.expand_dims(m_new, 1))
    elif ALIBI:
        m_new = gl.maximum(m_i, gl.max(qk, 1) + shift)
        p = gl.exp2(qk - gl.expand_dims(m_new - shift, 1))
    else:
        m_new = gl.maximum(m_i, gl.max(qk, 1))
        p = gl.exp2(qk - gl.expand_dims(m_new, 1))
    alpha = gl.exp2(m_i - m_new)
    l_new = l_i * alpha + gl.sum(p, 1)
    return p, m_new, l_new, alpha


@gluon.jit
def _after_softmax_wait(l_i):
    """Returns ``l_i`` unchanged, after a wgmma wait that depends on it. ptxas schedules the P.V
    wait by its own latency model and put it above the softmax's exp2s (SASS, Triton 3.6: every
    exp2 after it), so the softmax no longer ran under its own warpgroup's P.V. A wait predicated on
    the row sums (true for every value a sum of exp2s can hold, NaN included: the predicate is
    false only for the bit pattern 0xffffffff) cannot move above them, and ptxas keeps the real
    wait after it. Correctness never depends on it: the real wait follows."""
    return gl.inline_asm_elementwise(
        "{ .reg .pred pw; setp.ne.b32 pw, $1, -1; @pw wgmma.wait_group.sync.aligned 0; mov.b32 $0, $1; }",
        "=r,r", [l_i], dtype=gl.float32, is_pure=False, pack=1)


@gluon.jit
def _kv_loop(acc, p_op, alpha, m_i, l_i, n_start, n_end, lo, q_smem, k_smem, v_smem, k_ready, v_ready, kv_empty,
             pp_bars, qpos, cols0, bias0, col_ref, seq_k, qk_scale, slope, zero_s,
             WG: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, WINDOW: gl.constexpr,
             PREFIX: gl.constexpr, ALIBI: gl.constexpr, SCALE_MAX: gl.constexpr, PINGPONG: gl.constexpr,
             MASKED: gl.constexpr):
    """Key tiles [n_start, n_end): tile n's Q.K^T and tile n-1's P.V in flight together, tile n's
    softmax under tile n-1's P.V (FA3's order: O is rescaled by tile n-1's alpha before that P.V is
    issued, so the only work after the P.V wait is the conversion of P into the next operand)."""
    p_layout: gl.constexpr = p_op.type.layout
    row_o: gl.constexpr = gl.SliceLayout(1, acc.type.layout)
    for n in range(n_start, n_end):
        it = n - lo
        s = it % NUM_STAGES
        ph = (it // NUM_STAGES) & 1
        ps = (it - 1) % NUM_STAGES
        pph = ((it - 1) // NUM_STAGES) & 1
        # release tile it-2's K/V stage (its P.V was waited for at the end of the last iteration).
        # Here, not right after that wait: the arrive comes with a warpgroup bar.sync, which ptxas
        # hoists, and the P.V wait with it, above the softmax's exp2s (SASS, Triton 3.6): the
        # softmax would no longer run under its own warpgroup's P.V.
        mbarrier.arrive(kv_empty.index((it + NUM_STAGES - 2) % NUM_STAGES), count=1, pred=it >= 2)
        if PINGPONG:
            # turn-taking for MMA issue: WG0's block t waits for WG1's arrival t-1, WG1's for WG0's t
            if WG == 0:
                mbarrier.wait(pp_bars.index(0), (it - 1) & 1)
            else:
                mbarrier.wait(pp_bars.index(1), it & 1)
        mbarrier.wait(k_ready.index(s), ph)
        qk = warpgroup_mma(q_smem, k_smem.index(s).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
        mbarrier.wait(v_ready.index(ps), pph)
        acc = warpgroup_mma(p_op, v_smem.index(ps), acc, is_async=True)
        if PINGPONG:
            mbarrier.arrive(pp_bars.index(1 - WG), count=1)
        qk = warpgroup_mma_wait(1, deps=(qk, ))
        p, m_i, l_i, alpha = _softmax_tile(qk, m_i, l_i, n, qpos, cols0, bias0, col_ref, seq_k, qk_scale, slope,
                                           BLOCK_N, WINDOW, PREFIX, ALIBI, SCALE_MAX, MASKED)
        l_i = _after_softmax_wait(l_i)
        acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))
        p_op = gl.convert_layout(p.to(k_smem.dtype), p_layout)
    return acc, p_op, alpha, m_i, l_i


@gluon.jit
def _consumer(q_smem_all, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, pp_bars,
              o_desc, out_ptr, slopes_ptr, qk_scale, off_bh, head, q_start, seq_q, seq_k, offset,
              lo, hi, lo_full, hi_full,
              WG: gl.constexpr, BLOCK_M_WG: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr,
              NUM_STAGES: gl.constexpr, WINDOW: gl.constexpr, PREFIX: gl.constexpr, ALIBI: gl.constexpr,
              SCALE_MAX: gl.constexpr, EVEN_M: gl.constexpr, PINGPONG: gl.constexpr):
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    col_o: gl.constexpr = gl.SliceLayout(0, o_layout)

    q_smem = q_smem_all.index(WG)
    m0 = q_start + WG * BLOCK_M_WG
    qpos = m0 + gl.arange(0, BLOCK_M_WG, layout=row_s) + offset
    cols0 = gl.arange(0, BLOCK_N, layout=col_s)
    # ALiBi's reference column, near the visible keys (Sq >> Sk: no large offsets to cancel); any
    # per-CTA constant cancels in softmax. (Rows at negative positions that see a prefix put it far
    # below 0: fp32 rounding of the tile offset, ~7e-5 relative at -1e5; clamping it at 0 is the fix,
    # not yet run on the GPU.)
    col_ref = gl.minimum(q_start + offset, seq_k - 1)
    if ALIBI:
        slope = gl.load(slopes_ptr + head).to(gl.float32) * 1.4426950408889634
    else:
        slope = 0.0
    bias0 = slope * cols0.to(gl.float32)  # ALiBi's in-tile column term (unused otherwise)
    # finite start: a row masked so far never computes (-inf) - (-inf)
    m_i = gl.full([BLOCK_M_WG], -1.0e30, gl.float32, layout=row_s)
    l_i = gl.zeros([BLOCK_M_WG], gl.float32, layout=row_s)
    acc = gl.zeros([BLOCK_M_WG, HEAD_D], gl.float32, layout=o_layout)
    zero_s = gl.zeros([BLOCK_M_WG, BLOCK_N], gl.float32, layout=s_layout)
    n_tiles = hi - lo
    mbarrier.wait(q_bar, 0)

    # prologue: tile lo (always masked)
    if PINGPONG:
        if WG == 1:
            mbarrier.wait(pp_bars.index(1), 0)
    mbarrier.wait(k_ready.index(0), 0)
    qk = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    if PINGPONG:
        mbarrier.arrive(pp_bars.index(1 - WG), count=1)
    qk = warpgroup_mma_wait(0, deps=(qk, ))
    p, m_i, l_i, alpha = _softmax_tile(qk, m_i, l_i, lo, qpos, cols0, bias0, col_ref, seq_k, qk_scale, slope,
                                       BLOCK_N, WINDOW, PREFIX, ALIBI, SCALE_MAX, True)
    p_op = gl.convert_layout(p.to(k_smem.dtype), p_layout)

    # [lo+1, lo_full) masked, [.., hi_full) unmasked, [.., hi) masked
    t1 = gl.maximum(lo + 1, lo_full)
    t2 = gl.maximum(lo + 1, hi_full)
    acc, p_op, alpha, m_i, l_i = _kv_loop(acc, p_op, alpha, m_i, l_i, lo + 1, lo_full, lo, q_smem, k_smem, v_smem,
                                          k_ready, v_ready, kv_empty, pp_bars, qpos, cols0, bias0, col_ref, seq_k,
                                          qk_scale, slope, zero_s, WG, BLOCK_N, NUM_STAGES, WINDOW, PREFIX, ALIBI,
                                          SCALE_MAX, PINGPONG, True)
    acc, p_op, alpha, m_i, l_i = _kv_loop(acc, p_op, alpha, m_i, l_i, t1, hi_full, lo, q_smem, k_smem, v_smem,
                                          k_ready, v_ready, kv_empty, pp_bars, qpos, cols0, bias0, col_ref, seq_k,
                                          qk_scale, slope, zero_s, WG, BLOCK_N, NUM_STAGES, WINDOW, PREFIX, ALIBI,
                                          SCALE_MAX, PINGPONG, False)
    acc, p_op, alpha, m_i, l_i = _kv_loop(acc, p_op, alpha, m_i, l_i, t2, hi, lo, q_smem, k_smem, v_smem,
                                          k_ready, v_ready, kv_empty, pp_bars, qpos, cols0, bias0, col_ref, seq_k,
                                          qk_scale, slope, zero_s, WG, BLOCK_N, NUM_STAGES, WINDOW, PREFIX, ALIBI,
                                          SCALE_MAX, PINGPONG, True)

    # epilogue: the last tile's P.V
    ps = (n_tiles - 1) % NUM_STAGES
    pph = ((n_tiles - 1) // NUM_STAGES) & 1
    mbarrier.arrive(kv_empty.index((n_tiles + NUM_STAGES - 2) % NUM_STAGES), count=1, pred=n_tiles >= 2)
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
    mbarrier.wait(v_ready.index(ps), pph)
    acc = warpgroup_mma(p_op, v_smem.index(ps), acc, is_async=True)
    acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))
    mbarrier.arrive(kv_empty.index(ps), count=1)

    l_o = gl.convert_layout(l_i, row_o)
    l_o = gl.where(l_o == 0.0, 1.0, l_o)  # a row with no visible key: 0, the reference's convention
    o = (acc / gl.expand_dims(l_o, 1)).to(k_smem.dtype)
    if EVEN_M:
        q_smem.store(o)  # this warpgroup's Q buffer stages the output
        fence_async_shared()
        tma.async_copy_shared_to_global(o_desc, [off_bh * seq_q + m0, 0], q_smem)
        tma.store_wait(0)
    else:
        rows_o = m0 + gl.arange(0, BLOCK_M_WG, layout=row_o)
        cols_o = gl.arange(0, HEAD_D, layout=col_o)
        base = out_ptr + off_bh.to(gl.int64) * seq_q * HEAD_D
        offs = gl.expand_dims(rows_o, 1) * HEAD_D + gl.expand_dims(cols_o, 0)
        mask = gl.expand_dims(rows_o < seq_q, 1) & gl.expand_dims(cols_o < HEAD_D, 0)
        gl.store(base + offs, o, mask=mask)


@gluon.jit
def _fa3_fwd(q_desc, k_desc, v_desc, o_desc, out_ptr, slopes_ptr, qk_scale, seq_q, seq_k, offset, H,
             GQA_G: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr,
             NUM_STAGES: gl.constexpr, WINDOW: gl.constexpr, PREFIX: gl.constexpr, ALIBI: gl.constexpr,
             SCALE_MAX: gl.constexpr, EVEN_M: gl.constexpr, PINGPONG: gl.constexpr):
    BLOCK_M_WG: gl.constexpr = BLOCK_M // 2
    # one flat grid, query blocks fastest: the CTAs that run at the same time are the query blocks
    # of a few heads, which share those heads' K/V in L2 (with heads fastest, every CTA read its
    # K/V from HBM: ~4.4 GB per causal call at S4096, the kernel was bandwidth-bound), heaviest
    # query block of each head first
    n_m = (seq_q + BLOCK_M - 1) // BLOCK_M
    pid = gl.program_id(0)
    off_bh = pid // n_m
    pid_m = n_m - 1 - pid % n_m
    head = off_bh % H
    kv_bh = (off_bh // H) * (H // GQA_G) + head // GQA_G
    q_start = pid_m * BLOCK_M

    # key tiles [lo, hi); fully visible [lo_full, hi_full) (every key <= every row's position or
    # < PREFIX, < seq_k, and inside every row's window). Positions may be negative (bottom-right, Sq > Sk).
    n_kv = (seq_k + BLOCK_N - 1) // BLOCK_N
    qmin = q_start + offset
    qmax = q_start + BLOCK_M - 1 + offset
    # prefix-LM: keys < PREFIX are visible to every row, so a row sees up to max(position, PREFIX - 1)
    hi = gl.minimum((gl.maximum(gl.maximum(qmax + 1, PREFIX), 0) + BLOCK_N - 1) // BLOCK_N, n_kv)
    hi_full = gl.minimum(gl.maximum(gl.maximum(qmin + 1, PREFIX), 0) // BLOCK_N, seq_k // BLOCK_N)
    if WINDOW > 0:
        lo = gl.maximum(qmin - WINDOW + 1, 0) // BLOCK_N
        lo_full = (gl.maximum(qmax - WINDOW + 1, 0) + BLOCK_N - 1) // BLOCK_N
    else:
        lo = qmin * 0
        lo_full = qmin * 0
    # no visible key at all: run tile 0 fully masked (zeros out), never an empty pipeline
    empty = hi <= lo
    lo = gl.where(empty, 0, lo)
    hi = gl.where(empty, 1, hi)
    hi_full = gl.where(empty, 0, hi_full)
    lo_full = gl.where(empty, 0, lo_full)
    lo_full = gl.minimum(lo_full, hi)
    hi_full = gl.maximum(gl.minimum(hi_full, hi), lo_full)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2, BLOCK_M_WG, HEAD_D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [NUM_STAGES, BLOCK_N, HEAD_D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [NUM_STAGES, BLOCK_N, HEAD_D], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    pp_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=2)  # one release per consumer warpgroup
    for i in gl.static_range(2):
        mbarrier.init(pp_bars.index(i), count=1)
    fence_async_shared()

    q_row = off_bh * seq_q + q_start
    kv_row = kv_bh * seq_k
    gl.warp_specialize(
        [
            (_consumer, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, pp_bars, o_desc, out_ptr,
                         slopes_ptr, qk_scale, off_bh, head, q_start, seq_q, seq_k, offset, lo, hi, lo_full, hi_full,
                         0, BLOCK_M_WG, BLOCK_N, HEAD_D, NUM_STAGES, WINDOW, PREFIX, ALIBI, SCALE_MAX, EVEN_M,
                         PINGPONG)),
            (_consumer, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, pp_bars, o_desc, out_ptr,
                         slopes_ptr, qk_scale, off_bh, head, q_start, seq_q, seq_k, offset, lo, hi, lo_full, hi_full,
                         1, BLOCK_M_WG, BLOCK_N, HEAD_D, NUM_STAGES, WINDOW, PREFIX, ALIBI, SCALE_MAX, EVEN_M,
                         PINGPONG)),
            (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, q_row,
                         kv_row, lo, hi, BLOCK_M_WG, BLOCK_N, NUM_STAGES)),
        ],
        [4, 1],
        [240, 24],
    )


def _tma_ready(t):
    """t itself when (B, H, S, D) contiguous from a 16-byte aligned start, else a contiguous copy."""
    if not t.is_contiguous():
        return t.contiguous()  # new storage: aligned
    return t if t.storage_offset() % 8 == 0 else t.clone()


# shared-memory layouts of the TMA tiles, built once (12 us each on the host per call otherwise)
_GDT = gl.bfloat16 if DTYPE is torch.bfloat16 else gl.float16
_Q_LAYOUT = gl.NVMMASharedLayout.get_default_for([BLOCK_M // 2, HEAD_DIM], _GDT)
_KV_LAYOUT = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], _GDT)


def _desc(t2, rows, layout):
    return TensorDescriptor(t2, [t2.shape[0], t2.shape[1]], [t2.stride(0), 1], [rows, HEAD_DIM],
                            layout)


def _plan(q, k, v, out, scale, variant_tensors):
    """The launch of one call, without launching: (grid, arguments, constexprs, the output tensor)
    (host-side only, so the CPU tests check it)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or out.dim() != 4:
        raise ValueError("q, k, v, out must be 4-D (B, H, S, D)")
    B, H, Sq, D = q.shape
    HKV, Sk = k.shape[1], k.shape[2]
    if tuple(k.shape) != (B, HKV, Sk, D) or tuple(v.shape) != (B, HKV, Sk, D) or tuple(out.shape) != (B, H, Sq, D):
        raise ValueError(f"shapes q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)} out {tuple(out.shape)} "
                         f"do not fit this kernel (Dv == D)")
    if D != HEAD_DIM or H != HKV * GQA:
        raise ValueError(f"this kernel is built for head dim {HEAD_DIM} and {GQA} query heads per kv head, "
                         f"got {D} and {H}/{HKV}")
    if q.dtype is not DTYPE or k.dtype is not DTYPE or v.dtype is not DTYPE or out.dtype is not DTYPE:
        raise TypeError(f"this kernel is built for {DTYPE}, got {q.dtype}/{k.dtype}/{v.dtype}/{out.dtype}")
    if Sq == 0 or Sk == 0 or B * H == 0:
        raise ValueError("empty attention call")
    dev = q.device
    if k.device != dev or v.device != dev or out.device != dev:
        raise ValueError(f"q, k, v, out must be on one device, got {dev}/{k.device}/{v.device}/{out.device}")
    if ALIBI_KEY and variant_tensors[ALIBI_KEY].device != dev:
        raise ValueError(f"alibi slopes are on {variant_tensors[ALIBI_KEY].device}, queries on {dev}")
    qc, kc, vc = _tma_ready(q), _tma_ready(k), _tma_ready(v)
    oc = out if (out.is_contiguous() and out.storage_offset() % 8 == 0) else torch.empty_like(qc)
    if ALIBI_KEY:
        slopes = variant_tensors[ALIBI_KEY]
    else:
        slopes = qc  # never read (ALIBI off)
    offset = Sk - Sq if ALIGN_BOTTOM_RIGHT else 0
    qk_scale = float(scale) * 1.4426950408889634
    q_desc = _desc(qc.view(B * H * Sq, D), BLOCK_M // 2, _Q_LAYOUT)
    o_desc = _desc(oc.view(B * H * Sq, D), BLOCK_M // 2, _Q_LAYOUT)
    k_desc = _desc(kc.view(B * HKV * Sk, D), BLOCK_N, _KV_LAYOUT)
    v_desc = _desc(vc.view(B * HKV * Sk, D), BLOCK_N, _KV_LAYOUT)
    grid = (B * H * -(-Sq // BLOCK_M),)  # flat, query blocks fastest (the kernel decodes pid)
    args = (q_desc, k_desc, v_desc, o_desc, oc, slopes, qk_scale, Sq, Sk, offset, H)
    consts = dict(GQA_G=GQA, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HEAD_D=D, NUM_STAGES=NUM_STAGES, WINDOW=WINDOW,
                  PREFIX=PREFIX, ALIBI=bool(ALIBI_KEY), SCALE_MAX=(qk_scale > 0 and not ALIBI_KEY),
                  EVEN_M=(Sq % BLOCK_M == 0), PINGPONG=PINGPONG)
    return grid, args, consts, oc


def forward(q, k, v, out, scale, **variant_tensors):
    """Writes attention of (q, k, v) into out (see SUPPORTS); when out is not (B, H, S, D) contiguous
    and aligned, returns the result in a new contiguous tensor instead (the loader's contract)."""
    if q.device.type != "cuda":
        raise ValueError("this kernel runs on CUDA (Hopper) only")
    grid, args, consts, oc = _plan(q, k, v, out, scale, variant_tensors)
    _fa3_fwd[grid](*args, **consts, num_warps=4)
    return None if oc is out else oc
'''


def generate_source(problem: Problem, config: dict[str, Any] | None = None) -> str:
    """The kernel module (kernel contract of :mod:`torch_r1attn.loader`) for ``problem``."""
    cfg = normalize(problem, config)
    spec = problem.spec
    window, prefix, alibi = _parts(problem)
    alibi_key = None
    if alibi is not None:
        alibi_key = next(n for n in problem.variant.tensors() if n.endswith("alibi_slopes"))
    torch_dtype = {"fp16": "torch.float16", "bf16": "torch.bfloat16"}[spec.dtype]
    head = module_head("torch_r1attn.search.gluon_fa3 (FA3-structured Hopper kernel, Gluon)", problem, [
        "import torch",
        "from triton.experimental import gluon",
        "from triton.experimental.gluon import language as gl",
        "from triton.experimental.gluon.nvidia.hopper import TensorDescriptor",
        "from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,",
        "                                                              warpgroup_mma, warpgroup_mma_wait)",
    ], supports_for(problem, ["cuda"]), cfg)
    head += [
        f"NEEDS = {tuple([alibi_key] if alibi_key else [])!r}",
        f"DTYPE = {torch_dtype}",
        f"HEAD_DIM, GQA = {spec.head_dim}, {spec.gqa}",
        f"BLOCK_M, BLOCK_N, NUM_STAGES, PINGPONG = 128, {cfg['block_n']}, {cfg['stages']}, {cfg['pingpong']}",
        f"WINDOW, PREFIX = {window}, {prefix}",
        f"ALIBI_KEY = {alibi_key!r}",
        f"ALIGN_BOTTOM_RIGHT = {problem.variant.align == 'bottom_right'}",
    ]
    return "\n".join(head) + "\n" + _BODY
