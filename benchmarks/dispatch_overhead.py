"""Cache-hit dispatch cost: host µs per ``r1.attention`` call over launching the cached kernel
directly, on a host-bound call (one batch, few heads, short lengths in a cached bucket).

    python benchmarks/dispatch_overhead.py --variant softcap_causal --hq 2 --hkv 1 --s 129 --d 256

Needs the signature's kernel in the cache (``r1attn prewarm`` first); prints and writes
``$OUT/dispatch_overhead_<variant>.json``. The same measurement runs inside bench_variants.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {
    "causal": lambda V: V.causal(),
    "softcap_causal": lambda V: V.causal() + V.softcap(50.0),
    "sw_softcap": lambda V: V.sliding_window(1024) + V.softcap(50.0),
    "sliding_window": lambda V: V.sliding_window(1024),
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", choices=list(VARIANTS), required=True)
    ap.add_argument("--b", type=int, default=1)
    ap.add_argument("--hq", type=int, default=2)
    ap.add_argument("--hkv", type=int, default=1)
    ap.add_argument("--s", type=int, default=129)
    ap.add_argument("--d", type=int, default=128)
    args = ap.parse_args()
    os.environ["R1ATTN_ON_MISS"] = "off"
    import torch

    if not torch.cuda.is_available():
        print("dispatch_overhead needs a CUDA GPU", file=sys.stderr)
        return 2
    from torch_r1attn import config, variants as V
    from benchmarks.bench_variants import dispatch_overhead
    from benchmarks.common import Case

    config.set_settings(None)
    c = Case(args.variant, args.b, args.hq, args.hkv, args.s, args.s, args.d, VARIANTS[args.variant](V))
    res = dispatch_overhead(c) or {"variant": args.variant, "error": "no cached kernel for this signature"}
    out = Path(os.environ.get("OUT") or "benchmarks/results")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"dispatch_overhead_{args.variant}.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
