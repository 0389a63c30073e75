import triton
import triton.language as tl

# A correct flash-attention forward (full or top-left causal), the kind of kernel the scripted
# LLM "writes" in the tests. It follows the kernel contract exactly: forward() only reads
# shapes/strides and launches; every element of out is written; no input is touched.
IS_CAUSAL = True

SUPPORTS = {
    "dtypes": ["fp16"],
    "head_dims": [16, 32, 64, 128],
    "head_dims_v": [16, 32, 64, 128],
    "gqa": "any",
    "devices": ["cuda", "cpu"],
}


@triton.jit
def _attn_fwd(
    Q, K, V, O, scale,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
    H, GROUP, SQ, SK, D, DV,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < SQ) & (offs_d[None, :] < D), other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    hi = SK
    if CAUSAL:
        hi = tl.minimum(SK, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(K + b * skb + hk * skh + cols[None, :] * skn + offs_d[:, None] * skd,
                    mask=(cols[None, :] < SK) & (offs_d[:, None] < D), other=0.0)
        s = tl.dot(q, k) * scale
        valid = (cols[None, :] < SK) & (offs_m[:, None] >= 0)
        if CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * svb + hk * svh + cols[:, None] * svn + offs_dv[None, :] * svd,
                    mask=(cols[:, None] < SK) & (offs_dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod,
             o.to(O.dtype.element_ty), mask=(offs_m[:, None] < SQ) & (offs_dv[None, :] < DV))


def forward(q, k, v, out, scale, **variant_tensors):
    B, H, SQ, D = q.shape
    HKV, SK, DV = k.shape[1], k.shape[2], v.shape[3]
    block_m = 64 if q.is_cuda else 16
    block_n = 64 if q.is_cuda else 16
    grid = (triton.cdiv(SQ, block_m), B * H)
    _attn_fwd[grid](
        q, k, v, out, scale,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        H, H // HKV, SQ, SK, D, DV,
        CAUSAL=IS_CAUSAL, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_DV=max(16, triton.next_power_of_2(DV)),
    )
