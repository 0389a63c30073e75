"""Bad: returns the reference through PyTorch's SDPA instead of a kernel.
Expected: static check (torch.nn.functional / scaled_dot_product_attention)."""

import torch
import torch.nn.functional as F

SUPPORTS = {"dtypes": ["fp16", "bf16", "fp32"], "head_dims": [16, 32, 64, 128], "gqa": "any",
            "devices": ["cuda", "cpu"]}


def forward(q, k, v, out, scale, **variant_tensors):
    out.copy_(F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=q.shape[1] != k.shape[1]))
