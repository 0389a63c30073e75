"""HuggingFace transformers integration: ``attn_implementation="r1attn"``.

One call, :func:`register`, adds two entries under the name ``"r1attn"``:

* an **attention function** (``AttentionInterface.register``) with transformers' signature
  ``fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
  sliding_window=None, softcap=None, **kwargs) -> (out (B, S, H, D), None)``;
* a **mask function** (``AttentionMaskInterface.register``) that, instead of a dense 4-D mask,
  hands the attention function a :class:`StructuredMask` — a :class:`Variant` of mask parts
  (top-left or bottom-right causal, sliding window, key padding as a ``(B, 1, 1, Sk)`` bool
  row, packed documents from position ids) — so kernels can skip masked blocks. Whatever it does
  not recognise becomes transformers' own dense boolean mask (always correct, just slower).

Nothing is model-specific. Per-layer behaviour comes from what transformers already passes:
the mask of the layer's type (Gemma-2 alternates ``sliding_attention`` / ``full_attention``
layers via ``config.layer_types``), ``softcap`` (``config.attn_logit_softcapping``, also read
from ``module.config`` when a model does not pass it), ``scaling`` (else ``module.scaling``).

How masks are recognised. transformers builds a mask as a composition of its own mask_mod
closures (``and_masks(sliding_window_overlay(w), causal_mask_function)``, packed-sequence and
padding functions) and calls the registered mask function with it plus ``q_offset`` /
``kv_offset`` and the 2-D padding mask. Outside ``torch.compile`` we read those closures
(``__qualname__`` + closure cells, only for functions defined in ``transformers.masking_utils``).
Under ``torch.compile`` dynamo cannot read ``__closure__``, so only patterns identifiable by
identity and keyword arguments are structured: ``mask_function is causal_mask_function`` (full
layers), and the sliding-window creator's call (``local_size`` equal to
``config.sliding_window``, no packing/custom overlays, i.e. ``allow_is_causal_skip`` and not
``use_vmap``). Everything else under compile is dense.

Alignment: transformers' causal rule is ``kv_offset + j <= q_offset + i``. With
``q_offset - kv_offset == 0`` that is our ``top_left``; with ``== Sk - Sq`` (KV-cache decoding,
also a sliding-window cache that keeps the last keys) it is ``bottom_right``; anything else
(e.g. a static cache longer than what was written) is dense.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from .. import variants as V
from ..functional import _attention
from ..variants import Variant

log = logging.getLogger(__name__)

NAME = "r1attn"
_MU = "transformers.masking_utils"


class StructuredMask:
    """What the ``r1attn`` mask function hands the ``r1attn`` attention function.

    ``variant``: the mask parts (no score parts); ``q_length`` / ``kv_length``: the sizes the
    mask was made for (checked against the call). ``dense`` is True when the variant holds
    transformers' dense mask (a pattern we could not structure)."""

    def __init__(self, variant: Variant, q_length: int, kv_length: int, dense: bool = False):
        self.variant = variant
        self.q_length = q_length
        self.kv_length = kv_length
        self.dense = dense

    def __repr__(self) -> str:
        return f"StructuredMask({self.variant.key}, q={self.q_length}, kv={self.kv_length}, dense={self.dense})"


# ---------------------------------------------------------------------------- mask recognition
def _qual(fn) -> str:
    return getattr(fn, "__qualname__", "") if getattr(fn, "__module__", None) == _MU else ""


def _cells(fn) -> dict[str, Any]:
    code, clo = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is None or not clo:
        return {}
    return {n: c.cell_contents for n, c in zip(code.co_freevars, clo)}


def _flatten_and(fn) -> list | None:
    """The conjunction ``fn`` is made of, as a flat list of leaf mask functions (None: not an AND
    tree of transformers functions)."""
    from transformers import masking_utils as mu

    if fn is mu.causal_mask_function:
        return [fn]
    q = _qual(fn)
    if q == "and_masks.<locals>.and_mask":
        out = []
        for f in _cells(fn).get("mask_functions", ()):
            sub = _flatten_and(f)
            if sub is None:
                return None
            out += sub
        return out
    if q:
        return [fn]
    return None


def _describe_eager(fn) -> dict | None:
    """``{"causal": bool, "window": int|None, "docs": Tensor|None}`` for a transformers mask_mod,
    or None when it is anything else. Positions remapped for packing are fine: within one
    document packed positions increase by one per token, so causal/window on the remapped
    positions equals causal/window on raw indices AND same-document."""
    from transformers import masking_utils as mu

    leaves = _flatten_and(fn)
    if leaves is None:
        return None
    desc: dict[str, Any] = {"causal": False, "window": None, "docs": None}
    for f in leaves:
        q = _qual(f)
        if f is mu.causal_mask_function:
            desc["causal"] = True
        elif q == "sliding_window_overlay.<locals>.inner_mask":
            w = _cells(f).get("sliding_window")
            if not isinstance(w, int) or isinstance(w, bool) or w < 1:
                return None
            desc["window"] = w if desc["window"] is None else min(w, desc["window"])
        elif q == "packed_sequence_mask_function.<locals>.inner_mask":
            t = _cells(f).get("packed_sequence_mask")
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or desc["docs"] is not None:
                return None
            desc["docs"] = t
        elif q == "remap_positions_for_packed_sequence.<locals>.inner_mask":
            inner = _describe_eager(_cells(f).get("mask_function"))
            if inner is None or inner["docs"] is not None:
                return None
            desc["causal"] |= inner["causal"]
            if inner["window"] is not None:
                desc["window"] = inner["window"] if desc["window"] is None else min(inner["window"], desc["window"])
        else:
            return None
    if desc["window"] is not None and not desc["causal"]:
        return None  # a bare overlay is not a causal window
    if desc["docs"] is not None and not desc["causal"]:
        return None
    return desc


def _describe_compiling(fn, kwargs: dict) -> dict | None:
    from transformers import masking_utils as mu

    if fn is mu.causal_mask_function:
        return {"causal": True, "window": None, "docs": None}
    cfg = kwargs.get("config")
    local = kwargs.get("local_size")
    if (_qual(fn) == "and_masks.<locals>.and_mask" and local is not None and cfg is not None
            and kwargs.get("allow_is_causal_skip", False) and not kwargs.get("use_vmap", False)
            and getattr(cfg, "sliding_window", None) == local
            and getattr(cfg, "attention_chunk_size", None) is None and getattr(cfg, "is_causal", True)):
        return {"causal": True, "window": int(local), "docs": None}
    return None


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def r1attn_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                mask_function: Callable | None = None, attention_mask: torch.Tensor | None = None,
                **kwargs) -> StructuredMask:
    """transformers mask-interface function: a :class:`StructuredMask` (see module docstring).

    ``attention_mask`` is the 2-D padding mask ``(B, >= kv_offset + kv_length)`` (True = keep)."""
    from transformers import masking_utils as mu

    if mask_function is None:
        mask_function = mu.causal_mask_function
    device = kwargs.get("device", attention_mask.device if attention_mask is not None else "cpu")
    desc = None
    if not (isinstance(q_offset, torch.Tensor) or isinstance(kv_offset, torch.Tensor)):
        desc = _describe_compiling(mask_function, kwargs) if _compiling() else _describe_eager(mask_function)
    align = None
    if desc is not None:
        off = q_offset - kv_offset
        if off == 0:
            align = "top_left"
        elif off == kv_length - q_length:
            align = "bottom_right"
    if desc is None or align is None:
        return _dense(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, kwargs)

    pad = None
    if attention_mask is not None:
        pad = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)[:, kv_offset:kv_offset + kv_length]
        # an all-ones row is no mask; under compile that test would be data-dependent, so keep it
        if not _compiling() and bool(pad.all()):
            pad = None
    if desc["docs"] is None and pad is None:
        # tensor-free: one shared Variant object per pattern, so every layer of every forward
        # hits functional.attention's per-call-shape memo (a new object there costs a full
        # validation: ~28 us per layer on the CPU, ~130 us on the H200's host)
        return StructuredMask(_shared_variant(desc["window"], desc["causal"], align), q_length, kv_length)
    parts: list[V.Part] = []
    if desc["window"] is not None:
        parts.append(V.SlidingWindow(desc["window"]))
    elif desc["causal"]:
        parts.append(V.Causal())
    if desc["docs"] is not None:
        docs = desc["docs"]
        if docs.shape[-1] < kv_length or docs.shape[-1] < q_length + (kv_length - q_length if align == "bottom_right" else 0):
            return _dense(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, kwargs)
        parts.append(V.Document(docs.to(device)))
    if pad is not None:
        parts.append(V.DenseMask(pad.to(device=device, dtype=torch.bool).view(batch_size, 1, 1, kv_length)))
    return StructuredMask(Variant(parts, align), q_length, kv_length)


_shared: dict[tuple, Variant] = {}


def _shared_variant(window: int | None, causal: bool, align: str) -> Variant:
    k = (window, causal, align)
    v = _shared.get(k)
    if v is None:
        parts = [V.SlidingWindow(window)] if window is not None else ([V.Causal()] if causal else [])
        v = _shared[k] = Variant(parts, align)
    return v


def _dense(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, kwargs):
    from transformers import masking_utils as mu

    kw = {k: v for k, v in kwargs.items() if k in ("use_vmap", "device", "local_size")}
    m = mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     allow_is_causal_skip=False, **kw)
    if not _compiling():
        log.debug("r1attn hf: mask pattern not structured; using the dense mask %s", tuple(m.shape))
    return StructuredMask(Variant([V.DenseMask(m)]), q_length, kv_length, dense=True)


# ------------------------------------------------------------------------- attention function
def _softcap_of(module, softcap) -> float | None:
    if softcap is None:
        softcap = getattr(getattr(module, "config", None), "attn_logit_softcapping", None)
    return float(softcap) if softcap else None


def r1attn_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                             sliding_window: int | None = None, softcap: float | None = None,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function for ``attn_implementation="r1attn"``.

    ``query`` ``(B, Hq, Sq, D)``, ``key``/``value`` ``(B, Hkv, Sk, D)``; returns
    ``((B, Sq, Hq, Dv), None)`` (attention weights are never materialised).

    ``attention_mask``: a :class:`StructuredMask` (from :func:`r1attn_mask`), a dense 4-D bool or
    additive float mask (a model or caller that built its own), or None (then causal, top-left
    for prefill and bottom-right when keys outnumber queries, plus ``sliding_window`` when given,
    unless ``module.is_causal`` is False). Raises ValueError when a StructuredMask was made for
    other lengths than the call's, TypeError for any other mask type.
    """
    if kwargs.get("output_attentions", False) and not _compiling():
        log.warning("r1attn: output_attentions=True is not supported; returning None weights")
    Sq, Sk = query.shape[2], key.shape[2]
    attn_mask = None
    if isinstance(attention_mask, StructuredMask):
        if attention_mask.q_length != Sq or attention_mask.kv_length != Sk:
            raise ValueError(f"r1attn: mask made for (Sq={attention_mask.q_length}, Sk={attention_mask.kv_length}) "
                             f"but the call has (Sq={Sq}, Sk={Sk})")
        variant = attention_mask.variant
    elif attention_mask is None:
        if getattr(module, "is_causal", True) and (Sq > 1 or Sk > 1):
            align = "top_left" if Sq == Sk else "bottom_right"
            variant = _shared_variant(int(sliding_window) if sliding_window else None, True, align)
        else:
            variant = _shared_variant(None, False, "top_left")
    elif isinstance(attention_mask, torch.Tensor):
        attn_mask = attention_mask[:, :, :, :Sk]
        variant = V.full()
    else:
        raise TypeError(f"r1attn: unsupported attention_mask type {type(attention_mask).__name__}")
    cap = _softcap_of(module, softcap)
    if cap is not None:
        variant = _with_softcap(variant, cap)
    if scaling is None:
        scaling = getattr(module, "scaling", None)
    out = _attention(query, key, value, attn_mask=attn_mask, dropout_p=float(dropout) if module.training else 0.0,
                     scale=scaling, enable_gqa=query.shape[1] != key.shape[1], variant=variant, bshd_out=True)
    return out.transpose(1, 2).contiguous(), None  # no copy when the kernel wrote (B, S, H, Dv)


_capped: dict[tuple, tuple[Variant, Variant]] = {}


def _with_softcap(variant: Variant, cap: float) -> Variant:
    """``variant + softcap(cap)``, the same object each time for a tensor-free ``variant`` (the
    per-call memo in functional.attention is keyed by the variant object)."""
    if variant.tensors():
        return variant + V.softcap(cap)
    k = (id(variant), cap)
    hit = _capped.get(k)
    if hit is None or hit[0] is not variant:
        if len(_capped) >= 256:
            _capped.clear()
        hit = _capped[k] = (variant, variant + V.softcap(cap))  # holds variant: its id stays unique
    return hit[1]


# ---------------------------------------------------------------------------------- register
_registered = False


def register(name: str = NAME) -> str:
    """Register the attention and mask functions under ``name`` (idempotent); returns ``name``.

    Afterwards ``from_pretrained(..., attn_implementation="r1attn")``, ``from_config(...)`` and
    ``model.set_attn_implementation("r1attn")`` work. Raises ImportError when transformers (with
    ``AttentionInterface`` / ``AttentionMaskInterface``, >= 4.53) is not installed."""
    global _registered
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:
        raise ImportError("torch_r1attn.integrations.hf needs transformers with AttentionInterface and "
                          f"AttentionMaskInterface (>= 4.53): {e}") from e
    AttentionInterface.register(name, r1attn_attention_forward)
    AttentionMaskInterface.register(name, r1attn_mask)
    if not _registered:
        log.info("r1attn: registered attn_implementation=%r with transformers", name)
    _registered = True
    return name
