"""``R1Attention``: the ``nn.Module`` front end (a thin wrapper over :func:`attention`)."""

from __future__ import annotations

import torch
from torch import nn

from .functional import attention
from .variants import Variant


class R1Attention(nn.Module):
    """Drop-in module for ``F.scaled_dot_product_attention`` with a fixed variant.

    >>> attn = R1Attention(variants.sliding_window(4096) + variants.softcap(50.0))
    >>> out = attn(q, k, v)                       # (B, Hq, Sq, D) -> (B, Hq, Sq, Dv)

    ``forward`` takes SDPA's arguments; a per-call ``variant`` composes with the module's
    (``module variant + call variant``). ``on_miss`` overrides ``R1ATTN_ON_MISS`` for this module.
    Has no parameters: variant tensors (ALiBi slopes, bias tables) stay owned by the caller.
    """

    def __init__(self, variant: Variant | None = None, *, scale: float | None = None,
                 enable_gqa: bool = False, on_miss: str | None = None):
        super().__init__()
        if variant is not None and not isinstance(variant, Variant):
            raise TypeError(f"variant must be a torch_r1attn.variants.Variant, got {type(variant).__name__}")
        if on_miss is not None and on_miss not in ("background", "sync", "off"):
            raise ValueError(f"on_miss must be background, sync or off, got {on_miss!r}")
        self.variant = variant
        self.scale = scale
        self.enable_gqa = enable_gqa
        self.on_miss = on_miss

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                scale: float | None = None, enable_gqa: bool | None = None,
                variant: Variant | None = None) -> torch.Tensor:
        v = self.variant
        if variant is not None:
            v = variant if v is None else v + variant
        return attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p if self.training else 0.0,
            is_causal=is_causal, scale=self.scale if scale is None else scale,
            enable_gqa=self.enable_gqa if enable_gqa is None else enable_gqa, variant=v, on_miss=self.on_miss,
        )

    def extra_repr(self) -> str:
        return f"variant={self.variant.key if self.variant else 'full'}"
