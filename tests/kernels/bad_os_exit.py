"""Bad: ends the process with status 0 from inside forward (so nothing is reported).
Needs os (statically refused); run with static checks off. Expected: verdict 'crash'."""

import os

SUPPORTS = {"dtypes": ["fp16", "bf16", "fp32"], "head_dims": [16, 32, 64, 128], "gqa": "any",
            "devices": ["cuda", "cpu"]}


def forward(q, k, v, out, scale, **variant_tensors):
    os._exit(0)
