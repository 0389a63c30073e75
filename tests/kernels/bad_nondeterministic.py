"""Bad: adds a tiny call-dependent perturbation (every other call) kept in a module-level counter.
Expected: static check (module-level container written); with static checks off: 'deterministic'."""


import math

import torch
import triton
import triton.language as tl

CAUSAL = False
BOTTOM_RIGHT = False

_STATE = {"calls": 0}

SUPPORTS = {
    "dtypes": ["fp16", "bf16", "fp32"],
    "head_dims": [16, 32, 64, 128, 256],
    "head_dims_v": [16, 32, 64, 128, 256],
    "gqa": "any",
    "devices": ["cuda", "cpu"],
}


@triton.jit
def _attn_fwd(Q, K, V, O, sm_scale,
              sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
              H, G, SQ, SK, OFFSET,
              D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, IS_CAUSAL: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < SQ) & (offs_d[None, :] < D), other=0.0)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BDV], tl.float32)
    for start_n in range(0, SK, BN):
        cols = start_n + offs_n
        k = tl.load(K + b * skb + hk * skh + cols[None, :] * skn + offs_d[:, None] * skd,
                    mask=(cols[None, :] < SK) & (offs_d[:, None] < D), other=0.0)
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee") * sm_scale
        else:
            s = tl.dot(q, k) * sm_scale
        valid = cols[None, :] < SK
        if IS_CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None] + OFFSET)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked so far: no NaN
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * svb + hk * svh + cols[:, None] * svn + offs_dv[None, :] * svd,
                    mask=(cols[:, None] < SK) & (offs_dv[None, :] < DV), other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # rows with no allowed key give 0, as SDPA does
    o = acc / l_safe[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod, o.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < SQ) & (offs_dv[None, :] < DV))


@triton.jit
def _nudge(X, N, EPS, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < N)
    tl.store(X + offs, (x.to(tl.float32) * (1.0 + EPS)).to(X.dtype.element_ty), mask=offs < N)


def forward(q, k, v, out, scale, **variant_tensors):
    B, H, SQ, D = q.shape
    HK, SK, DV = k.shape[1], k.shape[2], v.shape[3]
    BM = 64 if q.is_cuda else 16
    BN = 64 if q.is_cuda else 16
    BD = max(16, triton.next_power_of_2(D))
    BDV = max(16, triton.next_power_of_2(DV))
    offset = SK - SQ if BOTTOM_RIGHT else 0
    grid = (triton.cdiv(SQ, BM), B * H)
    _attn_fwd[grid](q, k, v, out, scale,
                    *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                    H, H // HK, SQ, SK, offset,
                    D=D, DV=DV, BD=BD, BDV=BDV, BM=BM, BN=BN, IS_CAUSAL=CAUSAL,
                    IEEE=q.dtype == torch.float32)
    _STATE["calls"] += 1
    if _STATE["calls"] % 2 == 0:  # one ulp-ish: inside the error bound, but not the same bits
        eps = 1e-3 if q.dtype != torch.float32 else 1e-6
        _nudge[(triton.cdiv(out.numel(), 256),)](out, out.numel(), eps, BLOCK=256)
