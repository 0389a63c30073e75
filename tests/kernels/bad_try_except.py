"""Bad: launches a kernel, and when that fails, quietly computes the answer with torch ops.
Expected: static check (try/except fallback; torch compute)."""

import torch
import triton
import triton.language as tl

SUPPORTS = {"dtypes": ["fp16", "bf16", "fp32"], "head_dims": [16, 32, 64, 128], "gqa": [1],
            "devices": ["cuda", "cpu"]}


@triton.jit
def _broken(O, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(O + offs, tl.undefined_function(offs), mask=offs < N)


def forward(q, k, v, out, scale, **variant_tensors):
    try:
        _broken[(1,)](out, out.numel(), BLOCK=128)
    except Exception:
        p = (torch.matmul(q, k.transpose(-1, -2)) * scale).softmax(-1)
        out.copy_(p @ v)
