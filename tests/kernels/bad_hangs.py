"""Bad: never returns (an infinite Python loop in forward).
Expected: verdict 'timeout' (the worker's process group is killed after the limit)."""

import torch

SUPPORTS = {"dtypes": ["fp16", "bf16", "fp32"], "head_dims": [16, 32, 64, 128], "gqa": "any",
            "devices": ["cuda", "cpu"]}


def forward(q, k, v, out, scale, **variant_tensors):
    n = 0
    while True:
        n += 1
