"""``r1attn prewarm | demo | doctor``: the command-line tools (``register(subparsers)``).

* ``prewarm`` — derive every signature a model hits (:mod:`torch_r1attn.prewarm`) and search
  them with one worker per GPU (:func:`torch_r1attn.schedule.run_jobs`), then print the summary.
* ``demo`` — the README's main job on the built-in templates: on a GPU, a few variants at a
  modest shape and the speed-up table; on a CPU, a tiny problem under Triton's interpreter with
  each candidate's verdict (about a minute on two cores).
* ``doctor`` — versions, GPU, cache directory and permissions, LLM endpoint (GET /models, 3 s
  timeout), and the fallback each common variant gets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prewarm", help="search every signature a model will hit")
    src = p.add_argument_group("model (a config, or sizes)")
    src.add_argument("--config", help="config.json path (or a directory holding one)")
    src.add_argument("--model-type", help="transformers model type, e.g. llama, mistral, qwen2, gemma2")
    src.add_argument("--hidden-size", type=int)
    src.add_argument("--heads", type=int, help="attention heads")
    src.add_argument("--kv-heads", type=int, help="key/value heads (default: --heads)")
    src.add_argument("--layers", type=int, default=1)
    src.add_argument("--head-dim", type=int)
    src.add_argument("--sliding-window", type=int)
    src.add_argument("--softcap", type=float, help="attention logit soft-cap")
    src.add_argument("--layer-types", help="comma list of sliding_attention/full_attention per layer")
    p.add_argument("--seq-lens", default="2048", help="comma list of prompt/context lengths")
    p.add_argument("--batch-sizes", default="1", help="comma list of batch sizes")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--no-decode", action="store_true", help="prefill signatures only")
    p.add_argument("--padded", action="store_true", help="also padded batches (a key-padding row)")
    p.add_argument("--proposer", choices=["templates", "llm", "all"], help="default: R1ATTN_PROPOSER")
    p.add_argument("--budget", type=float, help="search seconds per signature (default: R1ATTN_BUDGET_S)")
    p.add_argument("--gpus", default="all", help="'all', 'none' or e.g. '0,1' (one search worker per GPU)")
    p.add_argument("--dry-run", action="store_true", help="list the signatures, search nothing")
    p.set_defaults(func=cmd_prewarm)

    d = sub.add_parser("demo", help="search a few variants and show what the loop does")
    d.add_argument("--fresh", action="store_true", help="use a temporary cache (search even if cached)")
    d.set_defaults(func=cmd_demo)

    doc = sub.add_parser("doctor", help="check the environment: GPU, versions, cache, LLM endpoint, fallbacks")
    doc.add_argument("--json", action="store_true", help="machine-readable output")
    doc.set_defaults(func=cmd_doctor)


# ------------------------------------------------------------------------------------ prewarm
def _int_list(name: str, text: str) -> list[int]:
    try:
        out = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{name} must be a comma list of integers, got {text!r}") from None
    if not out:
        raise ValueError(f"--{name} is empty")
    return out


def _model_config(args) -> Any:
    from .prewarm import config_from_args

    if args.config:
        if args.model_type:
            raise ValueError("give --config or --model-type with sizes, not both")
        return args.config
    if not args.model_type:
        raise ValueError("give --config PATH, or --model-type with --hidden-size and --heads")
    if not args.heads or not (args.hidden_size or args.head_dim):
        raise ValueError("--model-type needs --heads and --hidden-size (or --head-dim)")
    types = [t.strip() for t in args.layer_types.split(",")] if args.layer_types else None
    return config_from_args(args.model_type, args.hidden_size or args.heads * args.head_dim, args.heads,
                            args.kv_heads, args.layers, args.head_dim, args.sliding_window, args.softcap, types)


def cmd_prewarm(args) -> int:
    from . import schedule
    from .config import settings
    from .prewarm import signatures_from_config

    sigs = signatures_from_config(_model_config(args), _int_list("seq-lens", args.seq_lens),
                                  _int_list("batch-sizes", args.batch_sizes), args.dtype,
                                  decode=not args.no_decode, padded=args.padded)
    if args.dry_run:
        print(f"{len(sigs)} signature(s):")
        for s in sigs:
            print(f"  {s.spec.uri}    ({s.label})")
        return 0
    changes: dict[str, Any] = {}
    if args.proposer:
        changes["proposer"] = args.proposer
    if args.budget is not None:
        changes["budget_s"] = args.budget
    s = settings().replace(**changes)
    jobs = [schedule.PrewarmJob.from_variant(sig.spec, sig.variant, sig.label) for sig in sigs]
    t0 = time.monotonic()
    results = schedule.run_jobs(jobs, schedule.parse_gpus(args.gpus), settings=s, progress=True)
    print(schedule.summary_table(results))
    print(f"prewarm: {len(results)} signature(s) in {time.monotonic() - t0:.1f} s")
    from . import hotpath

    # the C++ cache-hit fast path: built here, once, so a process that loads these kernels
    # later only loads it (R1ATTN_HOTPATH=off skips it)
    if hotpath.ensure(block=True):
        print("prewarm: C++ cache-hit fast path ready")
    return 1 if any(r.status == "failed" for r in results) else 0


# --------------------------------------------------------------------------------------- demo
_DEMO_ENV = "R1ATTN_DEMO_CHILD"


def cmd_demo(args) -> int:
    import torch

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton reads TRITON_INTERPRET at import and when kernels are defined (here, and in
        # every verifier worker): setting it now would be too late for whatever already imported
        # triton, so run the demo in a child that has it from the start.
        if os.environ.get(_DEMO_ENV):
            raise RuntimeError("r1attn demo: the child process still lacks TRITON_INTERPRET=1")
        env = dict(os.environ, TRITON_INTERPRET="1", **{_DEMO_ENV: "1"})
        cmd = [sys.executable, "-m", "torch_r1attn.cli", "demo"] + (["--fresh"] if args.fresh else [])
        return subprocess.call(cmd, env=env)
    if args.fresh:
        with tempfile.TemporaryDirectory(prefix="r1attn-demo-") as d:
            os.chmod(d, 0o700)
            return _demo(d)
    return _demo(None)


def _demo(cache_dir: str | None) -> int:
    import torch

    from . import variants as V
    from .config import set_settings, settings
    from .search import tuner
    from .spec import AttentionSpec

    gpu = torch.cuda.is_available()
    s = settings()
    if cache_dir:
        s = s.replace(cache_dir=cache_dir)
    if gpu:
        B, H, S, D, dtype = 2, 16, 2048, 128, torch.bfloat16
        cases = [("causal", V.causal()), ("sliding window 512", V.sliding_window(512)),
                 ("soft-cap 50", V.causal() + V.softcap(50.0))]
    else:
        # the interpreter runs a 32x32 tile in ~seconds; keep the search to a handful of candidates
        B, H, S, D, dtype = 1, 2, 32, 16, torch.float32
        cases = [("causal", V.causal()), ("sliding window 8", V.sliding_window(8))]
        s = s.replace(proposer="templates", max_candidates=min(s.max_candidates, 3), rounds=1,
                      samples=min(s.samples, 3), budget_s=min(s.budget_s, 25.0), workers=min(s.workers, 2))
    old = settings()
    set_settings(s)
    try:
        from . import cache as cache_mod

        if cache_dir and hasattr(cache_mod, "reset_default_cache"):
            cache_mod.reset_default_cache()
        print(f"r1attn demo on {'GPU ' + torch.cuda.get_device_name() if gpu else 'CPU (Triton interpreter)'}: "
              f"B={B} H={H} S={S} D={D} {str(dtype).replace('torch.', '')}, proposer={s.proposer}")
        rows = []
        for name, variant in cases:
            q = torch.empty(B, H, S, D, dtype=dtype, device="meta")
            spec = AttentionSpec.from_call(q, q, q, variant.key)
            res = tuner.search_now(spec, variant, s)
            print(f"\n[{name}] {spec.uri}")
            if not res.history:
                print("  (no candidates this run: " + (getattr(res, "reason", "") or "cached verdict") + ")")
            for fb in res.history:
                c = fb.candidate
                verdict = "ok  " if fb.ok else "FAIL"
                timing = f"{fb.time_ms:.3f} ms" if fb.time_ms else "-"
                first = [" | ".join(ln.strip() for ln in (fb.text or "").strip().splitlines()[:3])]
                print(f"  {verdict} {c.proposer:<9} {_cfg(c.config):<48} {timing:>10}  {first[0][:160]}")
            rows.append((name, res))
        print("\nsummary")
        print(f"  {'variant':<22} {'winner':<10} {'speed-up':>9} {'best peer':<22} {'seconds':>8}")
        for name, res in rows:
            win = "kernel" if res.winner is not None or (res.entry is not None and not res.negative) else "fallback"
            sp = f"{res.speedup:.2f}x" if res.speedup else "-"
            peer = res.best_baseline or "-"
            print(f"  {name:<22} {win:<10} {sp:>9} {peer:<22} {res.seconds:>8.1f}")
        if not gpu:
            print("\n(on the CPU timings are the interpreter's and mean nothing; run on a GPU for speed-ups)")
        return 0
    finally:
        set_settings(old)
        if cache_dir:
            from . import cache as cache_mod

            if hasattr(cache_mod, "reset_default_cache"):
                cache_mod.reset_default_cache()


def _cfg(cfg: dict) -> str:
    keys = [k for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages") if k in cfg]
    text = " ".join(f"{k}={cfg[k]}" for k in keys) or ",".join(f"{k}={v}" for k, v in list(cfg.items())[:4])
    return text[:48]


# ------------------------------------------------------------------------------------- doctor
def doctor_report() -> dict[str, Any]:
    """Everything ``r1attn doctor`` prints, as a dict (never raises for an environment problem:
    each check reports its own error)."""
    import torch

    from . import __version__, fallback
    from . import variants as V
    from .config import settings

    rep: dict[str, Any] = {"torch_r1attn": __version__, "python": platform.python_version(),
                           "torch": torch.__version__, "cuda_runtime": torch.version.cuda}
    try:
        import triton

        rep["triton"] = triton.__version__
    except ImportError as e:
        rep["triton"] = f"not importable ({e})"
    rep["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "")
    try:
        import transformers

        rep["transformers"] = transformers.__version__
    except ImportError:
        rep["transformers"] = "not installed"
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": p.name, "cc": f"{p.major}.{p.minor}",
                         "memory_gib": round(p.total_memory / 2**30, 1)})
    rep["gpus"] = gpus
    rep["driver"] = _driver_version()
    try:
        s = settings()
        rep["settings_error"] = None
    except ValueError as e:
        from .config import Settings

        s = Settings()
        rep["settings_error"] = str(e)
    rep["on_miss"], rep["proposer"], rep["fallback_setting"] = s.on_miss, s.proposer, s.fallback
    rep["cache"] = _cache_check(s)
    from . import hotpath

    try:
        lib = hotpath._library(hotpath.build_dir(s.cache_dir))
        built = str(lib) if lib.is_file() else None
    except Exception as e:  # noqa: BLE001 - doctor reports every failure instead of dying on it
        built = None
        rep["hotpath_error"] = f"{type(e).__name__}: {e}"
    rep["hotpath"] = {"setting": s.hotpath, "built": built, **hotpath.status()}
    rep["llm"] = _llm_check(s)
    dev = torch.device("cuda" if gpus else "cpu")
    common = {"full": V.full(), "causal": V.causal(), "decode (causal@br)": V.causal(align="bottom_right"),
              "sliding window": V.sliding_window(4096), "soft-cap": V.causal() + V.softcap(50.0),
              "document": V.causal() + V.document(torch.zeros(8, dtype=torch.int32)), "alibi": V.alibi(8)}
    rep["fallbacks"] = {}
    for name, v in common.items():
        path, why = fallback.choose(v, dev, s.fallback)
        rep["fallbacks"][name] = {"path": path, "reason": why}
    return rep


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _cache_check(s) -> dict[str, Any]:
    info: dict[str, Any] = {"path": None, "exists": False, "writable": False, "mode": None, "problem": None}
    try:
        from . import cache as cache_mod

        root = str(cache_mod.KernelCache(root=s.cache_dir).root) if s.cache_dir is None else s.cache_dir
    except Exception as e:  # noqa: BLE001 - doctor reports every failure instead of dying on it
        root = s.cache_dir
        info["problem"] = f"{type(e).__name__}: {e}"
    info["path"] = root
    if root and os.path.isdir(root):
        st = os.stat(root)
        info["exists"] = True
        info["mode"] = oct(stat.S_IMODE(st.st_mode))
        info["writable"] = os.access(root, os.W_OK)
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            info["problem"] = "writable by other users: the cache refuses it (chmod go-w)"
        elif hasattr(os, "getuid") and st.st_uid != os.getuid():
            info["problem"] = "owned by another user"
        elif not info["writable"]:
            info["problem"] = "not writable"
    elif root:
        parent = os.path.dirname(os.path.abspath(root))
        info["writable"] = os.access(parent, os.W_OK)
        if not info["writable"] and info["problem"] is None:
            info["problem"] = f"does not exist and {parent} is not writable"
    return info


def _llm_check(s, timeout: float = 3.0) -> dict[str, Any]:
    url = s.llm_base_url
    info: dict[str, Any] = {"base_url": url, "model": s.llm_model, "api_key": bool(s.resolved_llm_api_key),
                            "reachable": None, "detail": None}
    if not url:
        info["detail"] = "R1ATTN_LLM_BASE_URL not set: the llm proposer is off"
        return info
    req = urllib.request.Request(url.rstrip("/") + "/models", method="GET")
    if s.resolved_llm_api_key:
        req.add_header("Authorization", f"Bearer {s.resolved_llm_api_key}")
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read(1 << 20)
        info["reachable"] = True
        try:
            ids = [m.get("id") for m in json.loads(body).get("data", [])]
            info["detail"] = f"{len(ids)} model(s); {s.llm_model!r} " + ("listed" if s.llm_model in ids else "NOT listed")
        except (ValueError, AttributeError):
            info["detail"] = "reachable, /models answer is not the OpenAI format"
    except urllib.error.HTTPError as e:
        info["reachable"] = True
        info["detail"] = f"HTTP {e.code} from /models" + (" (check the API key)" if e.code in (401, 403) else "")
    except (urllib.error.URLError, OSError, ValueError) as e:
        info["reachable"] = False
        info["detail"] = f"unreachable after {time.monotonic() - t0:.1f} s: {getattr(e, 'reason', e)}"
    return info


def cmd_doctor(args) -> int:
    rep = doctor_report()
    if args.json:
        print(json.dumps(rep, indent=2, default=str))
        return 0
    ok = lambda b: "ok" if b else "!!"  # noqa: E731
    print(f"torch_r1attn {rep['torch_r1attn']}  python {rep['python']}")
    print(f"torch {rep['torch']}  triton {rep['triton']}  CUDA runtime {rep['cuda_runtime'] or 'none'}  "
          f"transformers {rep['transformers']}")
    if rep["gpus"]:
        for g in rep["gpus"]:
            print(f"GPU {g['index']}: {g['name']} (sm {g['cc']}, {g['memory_gib']} GiB)")
        print(f"driver: {rep['driver'] or 'unknown'}")
    else:
        interp = "on" if rep["triton_interpret"] == "1" else "off"
        print(f"GPU: none (CPU only; generated kernels run only under TRITON_INTERPRET=1, now {interp})")
    if rep["settings_error"]:
        print(f"[!!] settings: {rep['settings_error']}")
    print(f"settings: on_miss={rep['on_miss']} proposer={rep['proposer']} fallback={rep['fallback_setting']}")
    c = rep["cache"]
    print(f"[{ok(c['problem'] is None)}] cache: {c['path']} (exists={c['exists']}, mode={c['mode']}, "
          f"writable={c['writable']})" + (f": {c['problem']}" if c["problem"] else ""))
    llm = rep["llm"]
    if llm["base_url"]:
        print(f"[{ok(llm['reachable'])}] llm: {llm['base_url']} model={llm['model']} key={'set' if llm['api_key'] else 'unset'}"
              f": {llm['detail']}")
    else:
        print(f"[--] llm: {llm['detail']}")
    h = rep["hotpath"]
    if h["setting"] == "off":
        print("[--] C++ fast path: off (R1ATTN_HOTPATH=off); repeat calls take the Python path")
    elif h["built"]:
        print(f"[ok] C++ fast path: built ({h['built']})")
    elif h["compiler"]:
        print(f"[--] C++ fast path: not built yet; builds once with {h['compiler']} (in the background when a "
              "signature first settles, or during r1attn prewarm)")
    else:
        print("[!!] C++ fast path: no C++ compiler (set CXX or install g++); repeat calls take the Python path")
    print("fallback per variant (until a kernel is cached, or when none wins):")
    for name, f in rep["fallbacks"].items():
        print(f"  {name:<20} {f['path']:<6} {f['reason']}")
    return 0
