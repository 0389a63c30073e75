"""Cache-hit dispatch cost: host µs per ``r1.attention`` call over launching the cached kernel
directly, on a host-bound call (one batch, few heads, short lengths in a cached bucket).

    python benchmarks/dispatch_overhead.py --variant softcap_causal --hq 2 --hkv 1 --s 129 --d 256

Needs the signature's kernel in the cache (``r1attn prewarm`` first); prints and writes
``$OUT/dispatch_overhead_<variant>.json``. The same measurement runs inside bench_variants.py.

``--noop --decode`` times decode steps (a new Sk every call) through the Python path and the C++
fast path. ``--noop`` measures the host's Python path alone, without a GPU: CPU tensors, and the table entry's
kernel replaced by one that does nothing, so ``r1 - direct`` is the front end + dispatch + output
allocation on this host (run it on the GPU machine to see how fast its host runs our code).
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
    ap.add_argument("--noop", action="store_true", help="host path only: CPU tensors, a kernel that does nothing")
    ap.add_argument("--decode", action="store_true",
                    help="with --noop: decode steps (Sq=1, Sk +1 per call inside one bucket), Python path vs C++")
    args = ap.parse_args()
    os.environ["R1ATTN_ON_MISS"] = "off"
    if args.noop:
        os.environ["TRITON_INTERPRET"] = "1"  # lets dispatch take the kernel path for CPU tensors
    import torch

    if args.noop:
        return _noop_decode(args) if args.decode else _noop(args)

    if not torch.cuda.is_available():
        print("dispatch_overhead needs a CUDA GPU", file=sys.stderr)
        return 2
    from torch_r1attn import config, variants as V
    from benchmarks.bench_variants import dispatch_overhead
    from benchmarks.common import Case

    config.set_settings(None)
    c = Case(args.variant, args.b, args.hq, args.hkv, args.s, args.s, args.d, VARIANTS[args.variant](V))
    res = dispatch_overhead(c) or {"variant": args.variant, "error": "no cached kernel for this signature"}
    _write(f"dispatch_overhead_{args.variant}.json", res)
    return 0


class _Noop:
    """A settled table entry's kernel that does nothing: what is left is the host path."""

    def fn(self, q, k, v, out, scale, **tensors):
        return None

    def unsupported(self, q, k, v):
        return None


def _noop_entry(q, k, v, var) -> _Noop:
    """A fresh dispatch table holding a settled no-op kernel entry for this call (as after a cache
    hit); returns the kernel."""
    from torch_r1attn import config, dispatch
    from torch_r1attn.spec import AttentionSpec

    config.set_settings(None)
    dispatch.reset()
    kern = _Noop()
    dispatch._table[dispatch.table_key(q, k, v, var)] = dispatch.Resolved(
        spec=AttentionSpec.from_call(q, k, v, var.key), path="eager", reason="noop", kernel=kern,
        unsupported=None, source="cache-kernel", strided_out=True)
    return kern


def _write(name: str, res: dict) -> None:
    out_dir = Path(os.environ.get("OUT") or "benchmarks/results")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / name).write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


def _noop(args) -> int:
    import math

    import torch

    import torch_r1attn as r1
    from torch_r1attn import hotpath, variants as V
    from benchmarks.common import interleaved_host_us

    var = VARIANTS[args.variant](V)
    q = torch.randn(args.b, args.hq, args.s, args.d)
    k, v = (torch.randn(args.b, args.hkv, args.s, args.d) for _ in range(2))
    gqa = args.hq != args.hkv
    kern = _noop_entry(q, k, v, var)

    native = hotpath.ensure(block=True)  # the C++ fast path, as a long-running process would have it
    for _ in range(3):  # settle the entry, register it with the fast path
        r1.attention(q, k, v, enable_gqa=gqa, variant=var)
    out, tens, scale = torch.empty_like(q), var.tensors(), 1 / math.sqrt(args.d)
    fns = {"direct": lambda: kern.fn(q, k, v, out, scale, **tens),
           "direct_alloc": lambda: kern.fn(q, k, v, torch.empty_like(q), scale, **tens),
           "r1": lambda: r1.attention(q, k, v, enable_gqa=gqa, variant=var)}
    m = interleaved_host_us(fns, rounds=15, calls=3000, pairs=[("r1", "direct"), ("r1", "direct_alloc")])
    res = {"variant": args.variant, "mode": "noop (host Python path only)", "hotpath": hotpath.status(),
           "cpp_fast_path": native,
           **{n: {a: round(b, 3) for a, b in x.items()} for n, x in m.items()}}
    _write(f"dispatch_overhead_noop_{args.variant}.json", res)
    return 0


def _noop_decode(args) -> int:
    """Host µs per decode step with a settled no-op kernel: each call a new Sk (views of one cache,
    Sk from S/2+1 to S, one length bucket), the Python path (its length memo) against the C++
    fast path (bucketed entry), five interleaved runs of 1000 steps each."""
    import statistics
    import time

    import torch

    import torch_r1attn as r1
    from torch_r1attn import functional, hotpath, variants as V

    if not hotpath.ensure(block=True, force=True):
        print(json.dumps({"error": "the C++ fast path did not build", **hotpath.status()}))
        return 1
    mod = hotpath._module
    var = V.causal(align="bottom_right") if args.variant == "causal" else VARIANTS[args.variant](V)
    half = args.s // 2
    q = torch.randn(args.b, args.hq, 1, args.d)
    kc, vc = (torch.randn(args.b, args.hkv, args.s, args.d) for _ in range(2))
    steps = [(kc[:, :, :n], vc[:, :, :n]) for n in range(half + 1, args.s + 1)]
    _noop_entry(q, *steps[0], var)
    gqa = args.hq != args.hkv
    n = min(1000, len(steps))
    runs: dict[str, list[float]] = {}
    for path in ("python", "cpp") * 5:
        functional._set_hot(mod if path == "cpp" else None)
        mod.clear()
        for k, v in steps[:3]:  # settle the runner; register with the C++ path
            r1.attention(q, k, v, enable_gqa=gqa, variant=var)
        t = time.perf_counter()
        for k, v in steps[:n]:
            r1.attention(q, k, v, enable_gqa=gqa, variant=var)
        runs.setdefault(path, []).append((time.perf_counter() - t) / n * 1e6)
    functional._set_hot(mod)
    res = {"variant": args.variant, "mode": "noop decode steps (host path only)", "steps": n,
           "shape": [args.b, args.hq, args.hkv, args.s, args.d],
           **{f"{p}_us_per_step": round(statistics.median(v), 3) for p, v in runs.items()}}
    _write(f"dispatch_overhead_noop_decode_{args.variant}.json", res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
