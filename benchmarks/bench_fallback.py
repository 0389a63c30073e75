"""Which built-in path each variant falls back to, and what it costs against plain SDPA with a
dense mask/bias (the path a user without this library would write).

    python benchmarks/bench_fallback.py [--shape B4_H32_S4096_D128 ...] [--quick]

Writes ``$OUT/fallback_<gpu>.json`` and ``.md`` (default ``benchmarks/results/``). R1Attention
runs with ``on_miss=off`` and an empty cache, so every call goes to the fallback.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

os.environ.setdefault("R1ATTN_CACHE_DIR", tempfile.mkdtemp(prefix="r1attn-bench-"))
os.environ["R1ATTN_ON_MISS"] = "off"

import torch_r1attn as r1  # noqa: E402
from torch_r1attn import fallback  # noqa: E402

from benchmarks.common import SHAPES, bench, environment, make_inputs, out_dir, suite, write_json  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", action="append", choices=list(SHAPES))
    ap.add_argument("--quick", action="store_true", help="shorter timing (CI smoke / tiny GPUs)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_fallback needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    for shape_name in args.shape or ["B4_H32_S4096_D128"]:
        B, H, S, D = SHAPES[shape_name]
        for c in suite(B, H, S, D):
            sets = make_inputs(c, n_sets=2)
            path, reason = fallback.choose(c.variant, torch.device("cuda"))
            r1_fn = lambda q, k, v: r1.attention(q, k, v, enable_gqa=c.enable_gqa, variant=c.variant)  # noqa: E731
            r1_fn(*sets[0])
            row = {"shape": shape_name, "variant": c.name, "fallback": path, "reason": reason,
                   "r1_fallback_ms": bench(r1_fn, sets, rep_ms=100 if args.quick else 400)}
            if fallback.sdpa_expressible(c.variant):
                mask = fallback.materialize(c.variant, c.B, c.Hq, c.Sq, c.Sk, torch.bfloat16, "cuda")
                sd = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=c.enable_gqa)  # noqa: E731
                row["sdpa_dense_ms"] = bench(sd, sets, rep_ms=100 if args.quick else 400)
                row["ratio_vs_sdpa_dense"] = row["sdpa_dense_ms"] / row["r1_fallback_ms"]
            rows.append(row)
            print(f"{shape_name} {c.name:24s} {path:5s} {row['r1_fallback_ms']:.3f} ms "
                  f"sdpa+dense {row.get('sdpa_dense_ms', float('nan')):.3f} ms", flush=True)
            del sets
            torch.cuda.empty_cache()
    env = environment()
    od = out_dir()
    tag = env.get("gpu", "gpu").replace(" ", "_")
    write_json(od / f"fallback_{tag}.json", {"env": env, "rows": rows})
    lines = [f"# Fallback choice per variant ({env.get('gpu')}, torch {env['torch']}, triton {env['triton']}, {env['date']})",
             "", "| shape | variant | fallback | reason | fallback ms | SDPA+dense ms | speed-up vs SDPA+dense |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        sd = r.get("sdpa_dense_ms")
        lines.append(f"| {r['shape']} | {r['variant']} | {r['fallback']} | {r['reason']} | {r['r1_fallback_ms']:.3f} | "
                     f"{'%.3f' % sd if sd else '—'} | {'%.2fx' % r['ratio_vs_sdpa_dense'] if sd else '—'} |")
    (od / f"fallback_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
