"""``torch_r1attn.attention``: the functional front end, with SDPA's signature and semantics.

Validation happens here, before anything reaches a kernel, and every error names the argument.
The call is then turned into an :class:`~torch_r1attn.spec.AttentionSpec` and handed to
:mod:`torch_r1attn.dispatch`.
"""

from __future__ import annotations

import math

import torch

from . import dispatch, hotpath
from .spec import length_bucket
from . import variants as V
from .variants import Variant

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    variant: Variant | None = None,
    *,
    on_miss: str | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention with structured variants and generated kernels.

    Drop-in for ``F.scaled_dot_product_attention``: same positional order, same meaning.

    Args:
        query: ``(B, Hq, Sq, D)``.
        key:   ``(B, Hkv, Sk, D)``; ``Hq`` must be a multiple of ``Hkv`` when ``enable_gqa``.
        value: ``(B, Hkv, Sk, Dv)``; ``Dv`` may differ from ``D``. Head dims up to 256.
        attn_mask: SDPA's dense mask, broadcastable to ``(B, Hq, Sq, Sk)``: bool (True = attend)
            or additive float (same dtype as ``query``, or float32). Combined (AND / added last)
            with ``variant``.
        dropout_p: SDPA's dropout; > 0 runs on SDPA (generated kernels are inference kernels).
        is_causal: SDPA's top-left causal mask (``q_idx >= kv_idx``); same as
            ``variant=variants.causal()``. Not allowed together with ``attn_mask`` (as in SDPA).
            For KV-cache decoding use ``variants.causal(align="bottom_right")``.
        scale: softmax scale, default ``1/sqrt(D)``.
        enable_gqa: allow ``Hq != Hkv`` (grouped-query attention), as in SDPA.
        variant: a :class:`~torch_r1attn.variants.Variant`, e.g.
            ``variants.sliding_window(4096) + variants.softcap(50.0)``.
        on_miss: override ``R1ATTN_ON_MISS`` for this call: ``background`` | ``sync`` | ``off``.

    Returns:
        ``(B, Hq, Sq, Dv)`` in ``query.dtype``. Rows that no key may attend to are 0.

    Causal alignment when ``Sq != Sk`` (``x`` = attends), for ``Sq=2, Sk=4``::

        top_left (is_causal, SDPA)      bottom_right (decode / chunked prefill)
            x . . .                         x x x .
            x x . .                         x x x x
    """
    # The C++ fast path first (the same question _attention asks its other callers, asked here so
    # that a hit costs no second Python call layer)
    hot = _hot_call
    if hot is not None and attn_mask is None and not _is_compiling():
        out = hot(query, key, value, variant, is_causal, enable_gqa, scale, dropout_p, False)
        if out is not None and out is not Ellipsis:
            return out
        return _attention(query, key, value, None, dropout_p, is_causal, scale, enable_gqa, variant, on_miss,
                          hot_miss=out is None)
    return _attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, variant, on_miss)


def _attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
               variant=None, on_miss=None, bshd_out: bool = False, hot_miss: bool | None = None) -> torch.Tensor:
    """:func:`attention`; ``bshd_out`` (integrations that transpose the result to (B, S, H, Dv))
    lets a kernel write that layout directly (see :func:`dispatch.forward`). ``hot_miss``: the C++
    fast path was asked and had no entry (True), declined (False), or was not asked (None: ask it
    here)."""
    if hot_miss is None and _hot_call is not None and attn_mask is None and not _is_compiling():
        out = _hot_call(query, key, value, variant, is_causal, enable_gqa, scale, dropout_p, bshd_out)
        if out is not None and out is not Ellipsis:
            return out
        hot_miss = out is None
    # Fast path: a call shaped like an earlier one re-uses its validated variant, its default
    # scale and its dispatch-table key (all pure functions of these fields; variants are
    # immutable). Validation + key building cost ~8 us per call on the CPU; this lookup ~1 us.
    # Once the signature runs a loaded kernel, the memo also holds dispatch's hot runner and a
    # repeat call goes straight to it (the cache-hit dispatch cost: benchmarks/NOTES.md).
    fk = memo = None
    if attn_mask is None and type(query) is _Tensor and type(key) is _Tensor and type(value) is _Tensor:
        compiling = _is_compiling()
        if not compiling:
            fk = (variant, query.shape, key.shape, value.shape, query.dtype, key.dtype, value.dtype, query.device,
                  key.device, value.device, is_causal, enable_gqa)
            memo = _validated.get(fk)
            exact = memo is not None
            if memo is None and query.dim() == 4 and key.dim() == 4 and value.dim() == 4:
                memo = _length_hit(fk, query, key, value)
            if memo is not None and type(dropout_p) is float and dropout_p == 0.0:  # on_miss: only on a miss
                run = memo.run_bshd if bshd_out else memo.run
                if run and (scale is None or (type(scale) is float and _NEG_INF < scale < _INF)):
                    out = run(query, key, value, memo.default_scale if scale is None else scale)
                    if out is not None:
                        if hot_miss and (exact or memo.variant.length_free):
                            # a repeat: the C++ path takes the next one (by length bucket when the
                            # variant's checks ignore the lengths, as in a decode loop)
                            _put_hot(query, key, value, variant, is_causal, enable_gqa, bshd_out, memo, run)
                        return out
    else:
        compiling = _is_compiling()
    if memo is None:
        v = _validate(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, variant)
        # no table key while tracing: bucketing a symbolic length would guard on it (recompiles)
        memo = _Memo(v, 1.0 / math.sqrt(query.shape[-1]), None if compiling else dispatch.table_key(query, key, value, v))
        if fk is not None and _small(v):
            if len(_validated) >= 512:
                _validated.clear()
            _validated[fk] = memo
            memo.kept = True
            if query.dim() == 4 and key.dim() == 4 and value.dim() == 4:
                if len(_by_length) >= 512:
                    _by_length.clear()
                _by_length[_length_key(fk)] = memo
    elif scale is not None or not (type(dropout_p) is float and dropout_p == 0.0):
        _check_scalars(scale, dropout_p)  # the memo skips validation: not these per-call scalars
    variant = memo.variant
    enable_gqa = bool(enable_gqa)  # 1 and True share a memo; SDPA (a fallback) takes a bool only
    scale = memo.default_scale if scale is None else float(scale)
    if compiling:  # dispatch is not traceable: one opaque op in the graph
        from .ops import attention_op

        return attention_op(query, key, value, variant, scale, enable_gqa, float(dropout_p), on_miss)
    out = dispatch.forward(query, key, value, variant, scale, enable_gqa, float(dropout_p), on_miss, memo.tkey,
                           bshd_out)
    if memo.kept and (memo.run_bshd if bshd_out else memo.run) is None and memo.tkey is not None:
        # the entry may have settled on a kernel (now, or when a background search finished);
        # False: it never will, stop asking
        run = dispatch.hot_runner(memo.tkey, variant, bshd_out, enable_gqa)
        if bshd_out:
            memo.run_bshd = run
        else:
            memo.run = run
        if run and _hot_call is None:
            hotpath.ensure()  # a signature settled: build / load the C++ fast path (background, once)
    return out


def _put_hot(query, key, value, variant, is_causal, enable_gqa, bshd_out, memo, run) -> None:
    """Register a settled runner with the C++ fast path, under the key of this call's arguments
    (the user's ``variant`` object and flags, as the Python memo's key has them)."""
    native = getattr(run, "native", None)
    if native is None:  # a fallback verdict: the C++ path calls the runner as it is
        kind, fn, tensors, alloc, check_layout = 1, run, None, 0, False
    else:
        kind = 0
        fn, tensors, alloc, check_layout = native
    hotpath.put(query, key, value, variant, is_causal, enable_gqa, bshd_out, memo.default_scale, kind, fn,
                tensors, alloc, check_layout, memo.variant.length_free)


_hot_call = None  # the C++ fast path's call(), once hotpath has loaded it


def _set_hot(mod) -> None:
    global _hot_call
    _hot_call = None if mod is None else mod.call


hotpath.on_ready(_set_hot)


class _Memo:
    """What a validated call resolved to: its variant, default scale, dispatch-table key, and
    (once the entry runs a loaded kernel) dispatch's hot runners for the plain and the
    (B, S, H, D)-output call. Shared by every call with the same memo key."""

    # run*: None = ask dispatch again, False = never; kept: in the memo (a memo not kept, e.g. for
    # a variant holding a big mask, is rebuilt every call and gets no runner)
    __slots__ = ("variant", "default_scale", "tkey", "run", "run_bshd", "kept")

    def __init__(self, variant: Variant, default_scale: float, tkey: tuple | None):
        self.variant, self.default_scale, self.tkey = variant, default_scale, tkey
        self.run = self.run_bshd = None
        self.kept = False


_Tensor = torch.Tensor
_INF, _NEG_INF = float("inf"), float("-inf")
_validated: dict[tuple, _Memo] = {}
_MEMO_TENSOR_BYTES = 1 << 20
# Decoding grows Sk by one per step, so the exact-shape memo above misses every step. This second
# memo is keyed like the dispatch table, by length *buckets*: a hit re-runs only the checks that
# depend on the exact lengths (key/value length agree, the variant's own validate_call). CPU: a
# decode step went 11.5 -> ~5 us of host time per call.
_by_length: dict[tuple, _Memo] = {}


def _length_key(fk: tuple) -> tuple:
    qs, ks, vs = fk[1], fk[2], fk[3]
    return (fk[0], qs[0], qs[1], qs[3], length_bucket(qs[2]), ks[0], ks[1], ks[3], length_bucket(ks[2]),
            vs[0], vs[1], vs[3]) + fk[4:]


def _length_hit(fk: tuple, q, k, v) -> "_Memo | None":
    Sq, Sk = q.shape[2], k.shape[2]
    if Sq < 1 or Sk < 1 or v.shape[2] != Sk:
        return None  # the full validation says what is wrong
    hit = _by_length.get(_length_key(fk))
    if hit is None:
        return None
    hit.variant.validate_call(q.shape[0], q.shape[1], Sq, Sk, q.device)
    return hit


def _clear_memos() -> None:
    _validated.clear()
    _by_length.clear()
    hotpath.clear()


dispatch.on_reset(_clear_memos)  # the hot runners hold table entries that reset() forgets


def _small(variant: Variant) -> bool:
    """Memoise only variants whose tensors are small: the memo keeps its variants alive, and a
    model that builds a dense mask per forward would otherwise pin up to 512 of them."""
    return sum(t.untyped_storage().nbytes() for t in variant.tensors().values()) <= _MEMO_TENSOR_BYTES


_is_compiling = torch.compiler.is_compiling


def _check_scalars(scale, dropout_p) -> None:
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")


def _validate(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, variant) -> Variant:
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, S, D), got {t.dim()} dims {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"query, key, value dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"query, key, value are on different devices: {q.device}, {k.device}, {v.device}")
    B, Hq, Sq, D = q.shape
    Bk, Hkv, Sk, Dk = k.shape
    Bv, Hv, Sv, Dv = v.shape
    if Bk != B or Bv != B:
        raise ValueError(f"batch sizes differ: query {B}, key {Bk}, value {Bv}")
    if Hv != Hkv:
        raise ValueError(f"key has {Hkv} heads but value has {Hv}")
    if Sv != Sk:
        raise ValueError(f"key has length {Sk} but value has length {Sv}")
    if Dk != D:
        raise ValueError(f"query head dim {D} != key head dim {Dk}")
    if min(B, Hq, Hkv, Sq, Sk, D, Dv) == 0:
        raise ValueError(f"empty tensor: query {tuple(q.shape)}, key {tuple(k.shape)}, value {tuple(v.shape)}")
    if D > MAX_HEAD_DIM or Dv > MAX_HEAD_DIM:
        raise ValueError(f"head dims up to {MAX_HEAD_DIM} are supported, got D={D}, Dv={Dv}")
    if Hq != Hkv:
        if not enable_gqa:
            raise ValueError(
                f"query has {Hq} heads and key/value have {Hkv}: pass enable_gqa=True for grouped-query attention"
            )
        if Hq % Hkv:
            raise ValueError(f"enable_gqa: query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    _check_scalars(scale, dropout_p)
    if variant is None:
        variant = V.Variant()
    elif not isinstance(variant, Variant):
        raise TypeError(f"variant must be a torch_r1attn.variants.Variant, got {type(variant).__name__}")
    if is_causal:
        if attn_mask is not None:
            raise ValueError("attn_mask and is_causal=True cannot be used together (as in SDPA)")
        variant = V.causal() + variant
    if attn_mask is not None:
        variant = variant.with_parts(_dense_part(attn_mask, q, B, Hq, Sq, Sk))
    variant = variant.to(q.device)
    variant.validate_call(B, Hq, Sq, Sk, q.device)
    return variant


def _dense_part(m, q, B, Hq, Sq, Sk):
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"attn_mask must be a tensor or None, got {type(m).__name__}")
    if m.device != q.device:
        raise ValueError(f"attn_mask is on {m.device}, query is on {q.device}")
    V._check_bcast("attn_mask", m, B, Hq, Sq, Sk)
    if m.dtype == torch.bool:
        return V.DenseMask(m)
    if m.dtype.is_floating_point:
        if m.dtype not in (q.dtype, torch.float32):
            raise TypeError(f"additive attn_mask must be bool, float32 or {q.dtype}, got {m.dtype}")
        return V.DenseBias(m)
    raise TypeError(f"attn_mask must be bool or floating, got {m.dtype}")
