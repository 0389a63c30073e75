"""Where the composed prefix-LM's time goes (search.compose), per anchor shape, on one GPU.

Times, under the verifier's protocol 2 (benchmarks.common.bench_gpu), each piece of the composed
module and the module itself: SDPA's causal call, the prefix square, the copy into the caller's
buffer, the whole module into ``out``, and the same without the final copy (the causal output
kept, only the prefix rows copied into it: what a contract that let a kernel return its output
would cost). Prints one line per shape and writes ``compose_probe.json`` under ``$OUT``.

    python benchmarks/compose_probe.py [--shape B4_H32_S4096_D128 ...]
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from benchmarks.common import SHAPES, bench_gpu, environment, out_dir, write_json


def probe(B: int, H: int, S: int, D: int, rep_ms: float) -> dict:
    P = S // 4
    g = torch.Generator(device="cuda").manual_seed(0)
    sets = [tuple(torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
            for _ in range(3)]
    outs = [torch.empty_like(s[0]) for s in sets]
    scale = D ** -0.5

    def causal(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

    def square(q, k, v):
        return F.scaled_dot_product_attention(q[:, :, :P], k[:, :, :P], v[:, :, :P], scale=scale)

    def copy(q, k, v):
        out = outs[0]
        out.copy_(q)
        return out

    def module(q, k, v):  # what search.compose writes
        out = outs[0]
        c = causal(q, k, v)
        h = square(q, k, v)
        out[:, :, P:].copy_(c[:, :, P:])
        out[:, :, :P].copy_(h)
        return out

    def returned(q, k, v):  # the causal output kept: only the prefix rows copied
        c = causal(q, k, v)
        c[:, :, :P].copy_(square(q, k, v))
        return c

    ref = module(*sets[0]).clone()
    torch.testing.assert_close(returned(*sets[0]), ref, rtol=0, atol=0)
    row = {"B": B, "H": H, "S": S, "D": D, "P": P}
    for name, fn in (("causal", causal), ("square", square), ("copy", copy), ("module", module),
                     ("returned", returned)):
        row[name] = bench_gpu(fn, sets, rep_ms=rep_ms)
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", action="append", choices=list(SHAPES))
    ap.add_argument("--rep-ms", type=float, default=100.0)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("compose_probe needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    for name in args.shape or list(SHAPES):
        r = probe(*SHAPES[name], rep_ms=args.rep_ms)
        rows.append({"shape": name, **r})
        print(f"{name} P={r['P']}: causal {r['causal']:.3f}  square {r['square']:.3f}  copy {r['copy']:.3f}  "
              f"module {r['module']:.3f}  returned {r['returned']:.3f} ms", flush=True)
    write_json(out_dir() / "compose_probe.json", {"env": environment(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
