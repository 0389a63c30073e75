"""Reference attention: the variant's eager math in float64 (or float32 for big shapes).

This is what every kernel and every fallback is checked against. It never calls SDPA or
FlexAttention: a reference that shares code with the thing under test proves nothing.

Fully masked rows produce 0 (what SDPA's math/flash/efficient paths and FlexAttention do in
current torch); :func:`eager_attention` is also the last-resort fallback, run in the input dtype's
upcast and cast back.
"""

from __future__ import annotations

import torch

from .variants import IndexGrid, Variant


def _expand_kv(k: torch.Tensor, Hq: int) -> torch.Tensor:
    Hkv = k.shape[1]
    return k if Hkv == Hq else k.repeat_interleave(Hq // Hkv, dim=1)


def eager_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    variant: Variant,
    scale: float,
    compute_dtype: torch.dtype | None = None,
    q_chunk: int | None = None,
) -> torch.Tensor:
    """Attention by the definition, in ``compute_dtype`` (default: float32, or float64 when the
    inputs are float64). Returns ``compute_dtype``; rows chunked by ``q_chunk`` to bound memory."""
    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    cd = compute_dtype or (torch.float64 if q.dtype == torch.float64 else torch.float32)
    qc, kc, vc = q.to(cd), _expand_kv(k, Hq).to(cd), _expand_kv(v, Hq).to(cd)
    off = variant.offset(Sq, Sk)
    vt = variant
    chunk = q_chunk or Sq
    outs = []
    for s0 in range(0, Sq, chunk):
        s1 = min(Sq, s0 + chunk)
        ix = IndexGrid.make(B, Hq, Sq, Sk, off, q.device)
        # restrict the row indices to this chunk (keep absolute positions)
        ix.q_idx = ix.q_idx[:, :, s0:s1]
        ix.q_pos = ix.q_pos[:, :, s0:s1]
        ix.Sq = s1 - s0
        s = torch.matmul(qc[:, :, s0:s1], kc.transpose(-1, -2)) * scale
        s, m = vt.scores_and_mask(s, ix)
        # a score_mod that adds a captured float32 tensor promotes bf16/fp16 scores to float32;
        # P @ V needs one dtype (compute_dtype, as documented)
        s = s.to(cd)
        if m is not None:
            s = s.masked_fill(~m, float("-inf"))
        row_max = s.amax(dim=-1, keepdim=True)
        dead = torch.isneginf(row_max)
        p = torch.exp(s - torch.where(dead, torch.zeros_like(row_max), row_max))
        denom = p.sum(dim=-1, keepdim=True)
        p = p / torch.where(dead, torch.ones_like(denom), denom)
        outs.append(torch.matmul(p, vc))
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: Variant, scale: float, dtype=torch.float64
) -> torch.Tensor:
    """The checking reference: float64 by default (pass float32 for big shapes on the GPU)."""
    n = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]
    chunk = None
    if n * (8 if dtype == torch.float64 else 4) > (1 << 30):  # keep the score tile under ~1 GiB
        chunk = max(1, (1 << 30) // (q.shape[0] * q.shape[1] * k.shape[2] * 8))
    return eager_attention(q, k, v, variant, scale, compute_dtype=dtype, q_chunk=chunk)
