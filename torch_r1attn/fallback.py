"""The fastest correct built-in path for a variant on the current device.

Three paths, all differentiable:

* ``sdpa``  — ``F.scaled_dot_product_attention`` with the cheapest form of the variant:
  ``is_causal=True`` for top-left causal, ``causal_lower_right`` for bottom-right causal, else a
  boolean mask / additive bias materialised once at its smallest broadcast shape and memoised
  (keyed by the variant tensors' identity and version, so a new ``doc_ids`` rebuilds it).
  Expresses every variant whose score parts are additive (ALiBi, relative bias, dense bias).
* ``flex``  — compiled FlexAttention with a memoised block mask. Expresses everything.
* ``eager`` — :func:`torch_r1attn.reference.eager_attention` in float32. Expresses everything.

Choice (``R1ATTN_FALLBACK=auto``), from the H200 peer table (anchors/h200-peers.md, bf16,
B=4 H=32 S=4096 D=128): cuDNN SDPA wins full (1.86 ms vs Flex 2.39), causal, GQA and decode;
FlexAttention wins whenever block sparsity or a score function matters: sliding window (0.77 vs
3.36), document (0.59 vs 3.39), prefix-LM (1.53 vs 3.36), ALiBi (1.55 vs 3.66), and soft-cap,
which SDPA cannot express at all. Causal relative bias: the anchor table has cuDNN ahead (3.67
vs Flex 7.23), but with *our* Flex form of the bias (a clamped table gather, variants.py) Flex
measured 3.14 ms vs SDPA+dense bias 3.54 / 3.64 ms in two runs on the H200
(benchmarks/results/tune_templates_H200_round1.json, variants_H200_S4096.json), so Flex. On the CPU, SDPA when it can
express the variant, else eager (compiling Flex on the CPU costs more than it saves at the
sizes run there).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable

import torch
import torch.nn.functional as F

from .reference import eager_attention
from .variants import (
    Alibi, Causal, DenseBias, DenseMask, Document, MaskMod, PrefixLM, RelativeBias, ScoreMod,
    IndexGrid, SlidingWindow, Softcap, Variant,
)

log = logging.getLogger(__name__)

_ADDITIVE = (Alibi, RelativeBias, DenseBias)
_STRUCTURED = (SlidingWindow, Document, PrefixLM, MaskMod)


def sdpa_expressible(variant: Variant) -> bool:
    return all(not isinstance(p, (Softcap, ScoreMod)) for p in variant.parts)


def choose(variant: Variant, device: torch.device, preference: str = "auto") -> tuple[str, str]:
    """``(path, reason)`` for this variant on this device."""
    can_sdpa = sdpa_expressible(variant)
    if preference == "sdpa":
        if can_sdpa:
            return "sdpa", "R1ATTN_FALLBACK=sdpa"
        preference = "auto"
    if preference in ("flex", "eager"):
        if preference == "flex" and device.type != "cuda":
            return "eager", "R1ATTN_FALLBACK=flex but FlexAttention is only used on CUDA"
        return preference, f"R1ATTN_FALLBACK={preference}"
    if device.type != "cuda":
        if can_sdpa:
            return "sdpa", "cpu: SDPA expresses this variant"
        return "eager", "cpu: SDPA cannot express a non-additive score part"
    if not can_sdpa:
        return "flex", "SDPA cannot express a non-additive score part (soft-cap / score_mod)"
    kinds = {type(p) for p in variant.parts}
    if kinds & set(_STRUCTURED):
        return "flex", "block-sparse mask: FlexAttention skips masked blocks (SDPA computes all)"
    if Alibi in kinds:
        return "flex", "ALiBi: FlexAttention's fused bias and causal block skipping beat SDPA+dense bias"
    if RelativeBias in kinds and Causal in kinds:
        return "flex", "causal relative bias: FlexAttention's fused table gather + causal skipping beat SDPA+dense bias"
    return "sdpa", "SDPA (cuDNN/flash) covers full, causal and dense mask/bias variants fastest"


class _LRU(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get_or(self, key, make: Callable):
        if key in self:
            self.move_to_end(key)
            return self[key]
        val = make()
        self[key] = val
        if len(self) > self.size:
            self.popitem(last=False)
        return val


_dense_memo = _LRU(16)
_block_mask_memo = _LRU(32)
_compiled_flex = None


def _tensor_identity(variant: Variant) -> tuple:
    return tuple((n, id(t), t._version, tuple(t.shape)) for n, t in variant.tensors().items())


def _variant_identity(variant: Variant) -> tuple:
    """Identity of a variant's runtime content: key, tensor identities, and callable identities."""
    fns = tuple(id(p.fn) for p in variant.parts if isinstance(p, (MaskMod, ScoreMod)))
    return (variant.key, _tensor_identity(variant), fns)


def materialize(variant: Variant, B: int, H: int, Sq: int, Sk: int, dtype, device) -> torch.Tensor | None:
    """The variant as one SDPA ``attn_mask``: bool when it only masks, else an additive bias in
    ``dtype`` with ``-inf`` where masked. Smallest broadcast shape. Needs an SDPA-expressible variant."""
    if not sdpa_expressible(variant):
        raise ValueError(f"variant {variant.key} has a non-additive score part; SDPA cannot express it")
    m = variant.dense_mask(B, H, Sq, Sk, device)
    if not variant.score_parts:
        return m
    ix = IndexGrid.make(B, H, Sq, Sk, variant.offset(Sq, Sk), device)
    bias, _ = variant.scores_and_mask(torch.zeros((1, 1, 1, 1), dtype=torch.float32, device=device), ix)
    if m is not None:
        bias = bias.masked_fill(~m, float("-inf"))
    return bias.to(dtype)


def sdpa_inputs(variant: Variant, B: int, H: int, Sq: int, Sk: int, dtype, device):
    """``(attn_mask, is_causal)`` for SDPA; the mask is memoised per variant content and shape."""
    parts = variant.parts
    if not parts:
        return None, False
    if len(parts) == 1 and isinstance(parts[0], Causal):
        if variant.align == "top_left" or Sq == Sk:
            return None, True
        if variant.offset(Sq, Sk) >= Sk - 1:
            # bottom-right and every row sees every key (decode, Sq=1): no mask at all. Measured on
            # the H200 (B=32, Hq=32, Hkv=8, Sk=8192, bf16): causal_lower_right 0.415 ms (flash) vs
            # a dense bool mask 0.256 ms (cuDNN); no mask lets cuDNN run its unmasked kernel.
            return None, False
        # otherwise fall through to a materialised bool mask: cuDNN takes it, CausalBias does not
    if len(parts) == 1 and isinstance(parts[0], DenseMask):
        return parts[0].mask_tensor, False
    if len(parts) == 1 and isinstance(parts[0], DenseBias) and parts[0].bias.dtype == dtype:
        return parts[0].bias, False

    def build():
        return materialize(variant, B, H, Sq, Sk, dtype, device)

    key = (_variant_identity(variant), B, H, Sq, Sk, dtype, str(device))
    return _dense_memo.get_or(key, build), False


def run_sdpa(q, k, v, variant: Variant, scale: float, enable_gqa: bool, dropout_p: float = 0.0):
    B, H, Sq, _ = q.shape
    mask, is_causal = sdpa_inputs(variant, B, H, Sq, k.shape[2], q.dtype, q.device)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa, dropout_p=dropout_p
    )


def run_flex(q, k, v, variant: Variant, scale: float, enable_gqa: bool):
    global _compiled_flex
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _compiled_flex is None:
        # Every (shape, score_mod, mask) signature is one more compiled graph of flex_attention;
        # dynamo's default limit (8) would silently drop to the unfused path (full score matrix).
        # Raised once, at first use (never at import), and said so.
        dyn = torch._dynamo.config
        name = "recompile_limit" if hasattr(dyn, "recompile_limit") else "cache_size_limit"
        if getattr(dyn, name) < 128:
            log.info("raising torch._dynamo.config.%s %d -> 128 for compiled FlexAttention", name, getattr(dyn, name))
            setattr(dyn, name, 128)
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    B, H, Sq, _ = q.shape
    Sk = k.shape[2]
    mm = variant.flex_mask_mod(Sq, Sk)
    block_mask = None
    if mm is not None:
        per_b = any(isinstance(p, (DenseMask, MaskMod)) or (isinstance(p, Document) and p.doc_ids.dim() == 2)
                    for p in variant.mask_parts)
        per_h = any(isinstance(p, (DenseMask, MaskMod)) for p in variant.mask_parts)
        key = (_variant_identity(variant), B if per_b else None, H if per_h else None, Sq, Sk, str(q.device))
        block_mask = _block_mask_memo.get_or(
            key,
            lambda: create_block_mask(mm, B if per_b else None, H if per_h else None, Sq, Sk, device=q.device),
        )
    return _compiled_flex(
        q, k, v, score_mod=variant.flex_score_mod(Sq, Sk), block_mask=block_mask, scale=scale,
        enable_gqa=enable_gqa,
    )


def run_eager(q, k, v, variant: Variant, scale: float):
    return eager_attention(q, k, v, variant, scale).to(q.dtype)


def run(path: str, q, k, v, variant: Variant, scale: float, enable_gqa: bool, dropout_p: float = 0.0):
    if path == "sdpa":
        return run_sdpa(q, k, v, variant, scale, enable_gqa, dropout_p)
    if path == "flex":
        return run_flex(q, k, v, variant, scale, enable_gqa)
    return run_eager(q, k, v, variant, scale)
