"""Tune the templates proposer's kernels against the peers, side by side, on one GPU.

For each variant of the peer suite (anchors/h200-peers.md) at B=4, H=32, S=4096, D=128 bf16
(``--all-anchors`` adds B=8 S=2048 D=64 and B=1 S=16384 D=128), this script generates the
templates proposer's round-one configs, checks each against a float32 reference on the same
inputs (error <= 2x PyTorch's own bf16 error + 1e-2, the verifier's rule), times each with
``triton.testing.do_bench`` (median, inputs rotated so L2 does not hold them), times the peers in
the same run (SDPA with the cheapest mask form, compiled FlexAttention with a precomputed block
mask), and prints one table. Effective TFLOP/s counts only the allowed (q, kv) pairs
(4 * D FLOPs each), so block-skipping kernels are not flattered by a dense FLOP count.

    python benchmarks/tune_templates.py            # ~6-10 configs per variant, < 8 min on an H200
    python benchmarks/tune_templates.py --quick    # 2 configs per variant
    python benchmarks/tune_templates.py --dry-run  # CPU: generate every source, run nothing
    python benchmarks/tune_templates.py --configs 2 --ab tma   # A/B one boolean knob: each of the
        # first 2 configs is timed with the knob off and on, back to back, in the same run

Rows go to ``$OUT/tune_templates.json`` (``OUT`` defaults to ./bench_out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Energy, sustained  # noqa: E402
from torch_r1attn import variants as V  # noqa: E402
from torch_r1attn.loader import load_source_file  # noqa: E402
from torch_r1attn.problem import Problem  # noqa: E402
from torch_r1attn.reference import eager_attention, reference_attention  # noqa: E402
from torch_r1attn.search.templates import TemplatesProposer  # noqa: E402
from torch_r1attn.spec import AttentionSpec  # noqa: E402

ANCHORS = {"S4096_D128": (4, 32, 4096, 128), "S2048_D64": (8, 32, 2048, 64), "S16384_D128": (1, 32, 16384, 128)}
# H200 peer table (ms) at S4096_D128, for the printout only; ratios come from this run's timings
PEER_MS_ANCHOR = {"full": 1.859, "causal": 1.055, "sliding_window": 0.770, "alibi_causal": 1.553,
                  "softcap_causal": 2.957, "document_causal": 0.590, "prefix_lm": 1.529,
                  "relpos_bias_causal": 3.674, "gqa_causal": 1.045, "decode_gqa_B32_Sk8192": 0.252}


def make_cases(B, H, S, D, device):
    g = torch.Generator().manual_seed(0)
    cuts = torch.sort(torch.randperm(S - 1, generator=g)[:7] + 1).values
    doc = torch.zeros(S, dtype=torch.int32)
    for c in cuts.tolist():
        doc[c:] += 1
    rel = torch.randn(H, 2 * S - 1, generator=g) * 0.5
    return [
        # name, variant, (B, Hq, Hkv, Sq, Sk)
        ("full", V.full(), (B, H, H, S, S)),
        ("causal", V.causal(), (B, H, H, S, S)),
        ("sliding_window", V.sliding_window(1024), (B, H, H, S, S)),
        ("alibi_causal", V.causal() + V.alibi(H), (B, H, H, S, S)),
        ("softcap_causal", V.causal() + V.softcap(50.0), (B, H, H, S, S)),
        ("document_causal", V.causal() + V.document(doc), (B, H, H, S, S)),
        ("prefix_lm", V.prefix_lm(S // 4), (B, H, H, S, S)),
        ("relpos_bias_causal", V.causal() + V.relative_bias(rel), (B, H, H, S, S)),
        ("gqa_causal", V.causal(), (B, H, H // 4, S, S)),
        ("decode_gqa_B32_Sk8192", V.causal("bottom_right"), (32, 32, 8, 1, 8192)),
    ]


def allowed_pairs(variant, B, Hq, Sq, Sk, device) -> int:
    """Allowed (q, kv) pairs over the whole batch, counted in row chunks (no S x S x H tensor)."""
    if not variant.mask_parts:
        return B * Hq * Sq * Sk
    total = 0
    off = variant.offset(Sq, Sk)
    for s0 in range(0, Sq, 1024):
        s1 = min(Sq, s0 + 1024)
        ix = V.IndexGrid.make(B, Hq, Sq, Sk, off, device)
        ix.q_idx, ix.q_pos, ix.Sq = ix.q_idx[:, :, s0:s1], ix.q_pos[:, :, s0:s1], s1 - s0
        m = None
        for p in variant.mask_parts:
            pm = p.mask(ix)
            m = pm if m is None else (m & pm)
        total += int(m.expand(B, Hq, s1 - s0, Sk).sum())
    return total


def sdpa_peer(name, variant, q, k, v, scale):
    """SDPA with the cheapest exact form of the variant, or None when SDPA cannot express it."""
    F = torch.nn.functional
    gqa = q.shape[1] != k.shape[1]
    if any(isinstance(p, V.Softcap) for p in variant.parts):
        return None
    if name == "full":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    if name in ("causal", "gqa_causal"):
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if name.startswith("decode"):  # one query at the end of the cache: every key is allowed
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    ix = V.IndexGrid.make(1, Hq, Sq, Sk, variant.offset(Sq, Sk), q.device)
    if variant.score_parts:  # additive: bias = score shift, -inf where masked
        zero = torch.zeros(1, 1, Sq, Sk, device=q.device, dtype=torch.float32)
        bias, m = variant.scores_and_mask(zero, ix)
        if m is not None:
            bias = bias.masked_fill(~m, float("-inf"))
        mask = bias.to(q.dtype)
    else:
        mask = variant.dense_mask(1, Hq, Sq, Sk, q.device)
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def flex_peer(variant, q, k, v, scale):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # every variant / shape is a new graph: dynamo's default recompile_limit (8) made later
    # variants silently fall back to the unfused path in round 1 (gqa 66.9 ms, decode 12.1 ms)
    import torch._dynamo

    dc = torch._dynamo.config
    for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(dc, knob):
            setattr(dc, knob, max(256, getattr(dc, knob)))
    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    mm, sm = variant.flex_mask_mod(Sq, Sk), variant.flex_score_mod(Sq, Sk)
    bm = create_block_mask(mm, None, None, Sq, Sk, device=q.device) if mm is not None else None
    fx = torch.compile(flex_attention, dynamic=False)
    gqa = q.shape[1] != k.shape[1]
    return lambda q, k, v: fx(q, k, v, score_mod=sm, block_mask=bm, scale=scale, enable_gqa=gqa)


TIMING = {"mode": "do_bench", "rep_ms": 50.0}  # set from --timing / --rep-ms in main()
LAST: dict = {}  # "protocol2": the last bench() call's protocol-2 ms under --timing both


def bench(fn, sets, warmup=10, rep=None) -> float:
    """Median ms. ``--timing do_bench`` (default): ``triton.testing.do_bench``; ``protocol2``: the
    verifier's ``timing.bench`` (calls queued behind a spin kernel), what searches and
    bench_variants.py use; ``both``: do_bench's number, protocol 2's (timed just before) in
    ``LAST["protocol2"]``, so one run shows whether the two disagree on the same kernel."""
    import triton

    rep = TIMING["rep_ms"] if rep is None else rep
    if TIMING["mode"] in ("protocol2", "both"):
        from torch_r1attn.verify.timing import bench as protocol_bench

        p2 = float(protocol_bench(lambda q, k, v, o: fn(q, k, v, o), sets, warmup_ms=warmup, rep_ms=rep)["median_ms"])
        if TIMING["mode"] == "protocol2":
            return p2
        LAST["protocol2"] = p2

    it = [0]

    def call():
        q, k, v, out = sets[it[0] % len(sets)]
        it[0] += 1
        fn(q, k, v, out)

    return float(triton.testing.do_bench(call, warmup=warmup, rep=rep, return_mode="median"))


def _sustained_str(su: dict) -> str:
    return f"sus={su['ms']:.3f}" + (f" {su['mj_per_call']:.1f}mJ {su['watts']:.0f}W" if su["watts"] else "")


def load_generator(path: str, label: str = "ab"):
    """An alternative revision of a candidate generator (e.g. ``gluon_fa3.py`` from an earlier
    commit), imported inside ``torch_r1attn.search`` so its relative imports resolve
    (``--ab-generator``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"torch_r1attn.search._ab_{label}", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--ab-generator: cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "generate_source"):
        raise SystemExit(f"--ab-generator: {path} has no generate_source(problem, config)")
    return mod


def explicit_configs(prob, overrides: list, ab_generators: dict | None = None) -> list:
    """One candidate per override dict, each applied to the default config (``--overrides``).
    With ``ab_generators`` (label -> module), each fa3 config also comes from those generator
    revisions, right before the current one's (config key ``"generator": label``), so all are
    timed in the same run."""
    from torch_r1attn.search.base import Candidate
    from torch_r1attn.search.templates import default_config, generate_source, normalize_config

    out = []
    for o in overrides:
        try:
            # a non-Triton path (compose, fa3) takes only its own knobs
            cfg = normalize_config(prob, o if o.get("path") in ("compose", "fa3") else {**default_config(prob), **o})
        except ValueError as e:
            print(f"  --overrides: skipping {o}: {e}")
            continue
        for label, gen in (ab_generators or {}).items() if cfg.get("path") == "fa3" else ():
            try:
                out.append(Candidate(source=gen.generate_source(prob, cfg), proposer="templates",
                                     config={**cfg, "generator": label}))
            except ValueError as e:
                print(f"  --ab-generator {label}: skipping {o}: {e}")
        out.append(Candidate(source=generate_source(prob, cfg), proposer="templates", config=cfg))
    return out


def ab_pairs(prob, cands, knob: str) -> list:
    """Each candidate twice, ``knob`` off then on (the A/B of one knob on the same configs)."""
    from torch_r1attn.search.base import Candidate
    from torch_r1attn.search.templates import KNOB_VALUES, generate_source, normalize_config

    if knob not in KNOB_VALUES or not isinstance(KNOB_VALUES[knob][0], bool):
        raise SystemExit(f"--ab needs a boolean template knob, got {knob!r}")
    out = []
    for c in cands:
        try:
            pair = [normalize_config(prob, {**c.config, knob: val}) for val in (False, True)]
        except ValueError as e:  # this config cannot take the knob (e.g. pipeline_qk with branch_mask)
            print(f"  --ab {knob}: skipping a config that cannot take it: {e}")
            continue
        if pair[0] == pair[1]:
            print(f"  --ab {knob}: skipping a config where the knob changes nothing")
            continue
        out += [Candidate(source=generate_source(prob, cfg), proposer="templates", config=cfg) for cfg in pair]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 configs per variant")
    ap.add_argument("--configs", type=int, default=8, help="configs per variant (default 8)")
    ap.add_argument("--all-anchors", action="store_true", help="also B=8 S=2048 D=64 and B=1 S=16384 D=128")
    ap.add_argument("--variants", default="", help="comma-separated subset of variant names")
    ap.add_argument("--no-flex", action="store_true", help="skip the FlexAttention peer (saves compile time)")
    ap.add_argument("--budget-s", type=float, default=430.0, help="stop trying configs after this many seconds")
    ap.add_argument("--dry-run", action="store_true", help="generate every source (CPU ok), run nothing")
    ap.add_argument("--timing", choices=("do_bench", "protocol2", "both"), default="do_bench",
                    help="how each config and peer is timed (both: protocol 2 and do_bench, back to back)")
    ap.add_argument("--rep-ms", type=float, default=50.0, help="timed window per config (ms)")
    ap.add_argument("--ab", default="", help="a boolean template knob: time each config with it off and on")
    ap.add_argument("--overrides", default="",
                    help='JSON list of config overrides on the default config, instead of the round-one spread '
                         '(e.g. \'[{}, {"BLOCK_M": 128, "num_warps": 8}]\')')
    ap.add_argument("--ab-generator", default="",
                    help="comma-separated paths of other revisions of search/gluon_fa3.py: every fa3 override is also "
                         "generated by each (labelled by file stem) and timed next to the current one "
                         "(before/after of a kernel change, one run)")
    ap.add_argument("--sustained-ms", type=float, default=0.0,
                    help="also time each config and peer back to back for this long: ms per call, mJ per call "
                         "and watts (what a long job sees under the power cap)")
    args = ap.parse_args()
    n_cfg = 2 if args.quick else args.configs
    TIMING.update(mode=args.timing, rep_ms=args.rep_ms)
    try:
        overrides = json.loads(args.overrides) if args.overrides else None
    except json.JSONDecodeError as e:
        raise SystemExit(f"--overrides is not JSON: {e}")
    if overrides is not None and not (isinstance(overrides, list) and all(isinstance(o, dict) for o in overrides)):
        raise SystemExit("--overrides needs a JSON list of objects")
    ab_gen = {Path(p).stem: load_generator(p, Path(p).stem) for p in args.ab_generator.split(",") if p} or None
    if ab_gen is not None and overrides is None:
        raise SystemExit("--ab-generator needs --overrides (the fa3 configs to compare)")
    energy = Energy() if args.sustained_ms > 0 and not args.dry_run else None
    out_dir = Path(os.environ.get("OUT") or "bench_out")
    out_dir.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if device != "cuda" and not args.dry_run:
        print("needs a CUDA GPU (use --dry-run on the CPU)")
        return 2
    anchors = list(ANCHORS) if args.all_anchors else ["S4096_D128"]
    want = {s for s in args.variants.split(",") if s}
    t_start = time.time()
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="tune_templates_"))
    dtype = torch.bfloat16
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    for anchor in anchors:
        B0, H0, S0, D = ANCHORS[anchor]
        for name, variant, (B, Hq, Hkv, Sq, Sk) in make_cases(B0, H0, S0, D, "cpu"):
            if want and name not in want:
                continue
            variant = variant.to(device)
            meta = [torch.empty(1, Hq, Sq, D, dtype=dtype, device="meta"),
                    torch.empty(1, Hkv, Sk, D, dtype=dtype, device="meta")]
            spec = AttentionSpec.from_call(meta[0], meta[1], meta[1], variant.key)
            spec = AttentionSpec(**{**spec.key_dict(), "example": (B, Hq, Hkv, Sq, Sk)})
            prob = Problem(spec=spec, variant=variant, shape=(B, Hq, Hkv, Sq, Sk), device="cuda")
            cands = (explicit_configs(prob, overrides, ab_gen) if overrides is not None
                     else TemplatesProposer().propose(prob, [], n_cfg))
            if args.ab:
                cands = ab_pairs(prob, cands, args.ab)
            if args.dry_run:
                for i, c in enumerate(cands):
                    (tmp / f"{anchor}_{name}_{i}.py").write_text(c.source)
                print(f"{anchor} {name}: {len(cands)} sources generated")
                continue
            scale = 1.0 / math.sqrt(D)
            g = torch.Generator(device="cuda").manual_seed(0)
            nsets = 3 if B * Hq * Sk * D < (1 << 28) else 2
            sets = []
            for _ in range(nsets):
                q = torch.randn(B, Hq, Sq, D, device="cuda", dtype=dtype, generator=g)
                k = torch.randn(B, Hkv, Sk, D, device="cuda", dtype=dtype, generator=g)
                v = torch.randn(B, Hkv, Sk, D, device="cuda", dtype=dtype, generator=g)
                sets.append((q, k, v, torch.empty(B, Hq, Sq, D, device="cuda", dtype=dtype)))
            q, k, v, _ = sets[0]
            nb = 1 if Sq > 1 else B  # check one batch row of prefill shapes (reference cost)
            ref = reference_attention(q[:nb], k[:nb], v[:nb], variant, scale, dtype=torch.float32)
            own = eager_attention(q[:nb], k[:nb], v[:nb], variant, scale, compute_dtype=dtype).float()
            bound = 2 * (own - ref).abs().max().item() + 1e-2
            pairs = allowed_pairs(variant, B, Hq, Sq, Sk, "cuda")
            flops = 4.0 * D * pairs
            vt = variant.tensors()
            results = []
            for i, cand in enumerate(cands):
                if time.time() - t_start > args.budget_s:
                    print(f"  budget reached: skipping the remaining configs of {name}")
                    break
                path = tmp / f"{anchor}_{name}_{i}.py"
                path.write_text(cand.source)
                row = {"anchor": anchor, "variant": name, "config": cand.config}
                try:
                    kern = load_source_file(path, name_hint=f"{name}_{i}")
                    out = sets[0][3]
                    out.fill_(float("nan"))
                    kern(q, k, v, out, scale, **vt)
                    torch.cuda.synchronize()
                    err = (out[:nb].float() - ref).abs().max().item()
                    row.update(err=err, bound=bound, ok=bool(err <= bound))
                    if row["ok"]:
                        row["ms"] = bench(lambda q, k, v, o: kern(q, k, v, o, scale, **vt), sets)
                        if args.timing == "both":
                            row["ms_protocol2"] = LAST["protocol2"]
                        if args.sustained_ms > 0:
                            row["sustained"] = sustained(lambda q, k, v, o: kern(q, k, v, o, scale, **vt), sets,
                                                         args.sustained_ms, energy)
                except Exception as e:  # a config that does not compile/run is a data point
                    row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
                results.append(row)
                short = ({k: cand.config[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")}
                         if cand.config.get("path") in ("prefill", "decode") else dict(cand.config))
                flags = [k for k in ("branch_mask", "fold_scale", "tma", "warp_specialize") if cand.config.get(k)]
                flags += [f"maxnreg={cand.config['maxnreg']}"] if cand.config.get("maxnreg") else []
                p2 = f" p2={row['ms_protocol2']:.3f}" if "ms_protocol2" in row else ""
                if "sustained" in row:
                    p2 += " " + _sustained_str(row["sustained"])
                print(f"  {name:24s} cfg{i} {short} {flags} ok={row.get('ok')} ms={row.get('ms', float('nan')):.3f}{p2} "
                      f"err={row.get('err', float('nan')):.2e} {row.get('error', '')[:80]}")
            peers = {}
            sp = sdpa_peer(name, variant, q, k, v, scale)
            if sp is not None:
                peers["sdpa"] = bench(lambda q, k, v, o: sp(q, k, v), sets)
                if args.timing == "both":
                    peers["sdpa_protocol2"] = LAST["protocol2"]
            if not args.no_flex:
                try:
                    fp = flex_peer(variant, q, k, v, scale)
                    fp(q, k, v)
                    peers["flex"] = bench(lambda q, k, v, o: fp(q, k, v), sets)
                    if args.timing == "both":
                        peers["flex_protocol2"] = LAST["protocol2"]
                    if args.sustained_ms > 0:
                        su = sustained(lambda q, k, v, o: fp(q, k, v), sets, args.sustained_ms, energy)
                        peers["flex_sustained"] = su["ms"]
                        print(f"  {name:24s} flex {_sustained_str(su)}")
                except Exception as e:  # report, keep going: the other peer still counts
                    print(f"  flex peer failed for {name}: {type(e).__name__}: {str(e)[:200]}")
            good = [r for r in results if r.get("ok") and "ms" in r]
            best = min(good, key=lambda r: r["ms"]) if good else None
            main_peers = {k: v for k, v in peers.items() if not k.endswith(("_protocol2", "_sustained"))}
            peer_name, peer_ms = (min(main_peers.items(), key=lambda t: t[1]) if main_peers else (None, None))
            summary = {
                "anchor": anchor, "variant": name, "shape": [B, Hq, Hkv, Sq, Sk, D], "gpu": gpu,
                "torch": torch.__version__, "best_config": best["config"] if best else None,
                "ms": best["ms"] if best else None, "peers_ms": peers, "best_peer": peer_name,
                "best_peer_ms": peer_ms, "speedup": (peer_ms / best["ms"]) if best and peer_ms else None,
                "allowed_pairs": pairs, "eff_tflops": (flops / best["ms"] / 1e9) if best else None,
                "peer_eff_tflops": (flops / peer_ms / 1e9) if peer_ms else None,
                "anchor_peer_ms": PEER_MS_ANCHOR.get(name) if anchor == "S4096_D128" else None,
                "configs": results,
            }
            if Sq == 1 and best:
                kv_bytes = 2 * B * Hkv * Sk * D * 2
                summary["gbps"] = kv_bytes / best["ms"] / 1e6
            rows.append(summary)
            del sets, ref, own
            torch.cuda.empty_cache()
    if args.dry_run:
        print(f"sources in {tmp}")
        return 0
    print()
    hdr = f"{'anchor':12s} {'variant':24s} {'best config':44s} {'ms':>7s} {'peer':>6s} {'peer ms':>8s} {'speedup':>7s} {'TFLOP/s':>8s}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        c = r["best_config"]
        cs = (" ".join(f"{k}={v}" for k, v in c.items()) if c and c.get("path") not in ("prefill", "decode") else
              f"{c['path'][:3]} M{c['BLOCK_M']} N{c['BLOCK_N']} w{c['num_warps']} s{c['num_stages']}"
              + (" tma" if c.get("tma") else "") + (" ws" if c.get("warp_specialize") else "")
              + (" fold" if c.get("fold_scale") else "") + (" br" if c.get("branch_mask") else "") + (f" sp{c['num_splits']}" if c["path"] == "decode" else "")
              ) if c else "none correct"
        fmt = lambda x, f: (f.format(x) if x is not None else "-")  # noqa: E731
        print(f"{r['anchor']:12s} {r['variant']:24s} {cs:44s} {fmt(r['ms'], '{:7.3f}'):>7s} "
              f"{str(r['best_peer'] or '-'):>6s} {fmt(r['best_peer_ms'], '{:8.3f}'):>8s} "
              f"{fmt(r['speedup'], '{:6.2f}x'):>7s} {fmt(r['eff_tflops'], '{:8.1f}'):>8s}")
    path = out_dir / "tune_templates.json"
    path.write_text(json.dumps(rows, indent=1, default=str))
    print(f"\nrows: {path}  ({time.time() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
