"""Bad: dereferences a null pointer (segfault). Needs ctypes, which the static check refuses,
so the test runs it with static checks off to prove the isolation. Expected: verdict 'crash'."""

import ctypes

SUPPORTS = {"dtypes": ["fp16", "bf16", "fp32"], "head_dims": [16, 32, 64, 128], "gqa": "any",
            "devices": ["cuda", "cpu"]}


def forward(q, k, v, out, scale, **variant_tensors):
    ctypes.string_at(0)
