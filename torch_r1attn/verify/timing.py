"""The timing protocol: honest medians for the candidate and every baseline, and the device's
speed ceilings that expose implausible (cheating) candidates.

* Each call is bracketed by CUDA events on the current stream, after a 256 MiB L2 flush; inputs
  rotate over several copies (so neither L2 nor a pointer-keyed cache holds them); a warm-up of
  ``warmup_ms`` runs first; the median of ``rep_ms`` worth of calls (``min_reps``..``max_reps``)
  is reported, with the 20th/80th percentiles; the device is synchronised at the end.
* Baselines: every SDPA backend that accepts the call (cuDNN, flash, memory-efficient), forced
  one at a time with ``torch.nn.attention.sdpa_kernel`` and given the cheapest mask form from
  :func:`torch_r1attn.fallback.sdpa_inputs`; and compiled FlexAttention
  (:func:`torch_r1attn.fallback.run_flex`). Same inputs, same process, same protocol.
* Ceilings, measured once per device and cached in a small JSON file: bf16 ``torch.matmul``
  TFLOP/s (8192³, best of three medians) and device-to-device copy bandwidth. They are measured
  with the GPU to themselves: a verifier worker asks its pool for the exclusive device lock first,
  and a file lock keeps two processes from measuring at once. (Measured while other workers ran,
  the H200's matmul ceiling once came out at 269 instead of ~700 TFLOP/s, and every fast correct
  kernel was rejected as "implausible".) A candidate whose effective TFLOP/s
  (counting only the ``(q, kv)`` pairs its mask allows) or whose minimum traffic rate exceeds a
  ceiling by more than ``Protocol.ceiling_slack`` is rejected: no real attention kernel beats
  cuBLAS at its own GEMM by 10 %, so such a time means work was skipped or hidden.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

log = logging.getLogger(__name__)

SDPA_BACKENDS = ("cudnn", "flash", "efficient")
CEILINGS_VERSION = 2  # 2: measured alone (version 1 files may hold a contended, too-low value)


def bench(fn: Callable[..., object], arg_sets: Sequence[tuple], *, warmup_ms: float = 25.0, rep_ms: float = 150.0,
          min_reps: int = 20, max_reps: int = 500, flush_bytes: int = 256 << 20) -> dict[str, float]:
    """Median time of ``fn(*arg_sets[i % len(arg_sets)])`` in ms on the current CUDA device.

    Raises:
        RuntimeError: CUDA is not available.
        ValueError: ``arg_sets`` is empty.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("bench needs a CUDA device (timings on the CPU are not meaningful)")
    if not arg_sets:
        raise ValueError("bench needs at least one argument set")
    flush = torch.empty(flush_bytes // 4, dtype=torch.int32, device="cuda")
    n_sets = len(arg_sets)
    torch.cuda.synchronize()
    # estimate one call's time (includes first-call compilation, which the warm-up must absorb)
    fn(*arg_sets[0])
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for i in range(5):
        fn(*arg_sets[i % n_sets])
    e.record()
    torch.cuda.synchronize()
    est = max(s.elapsed_time(e) / 5, 1e-3)
    n_warm = max(1, int(warmup_ms / est))
    n_rep = max(min_reps, min(max_reps, int(rep_ms / est)))
    t_host = time.perf_counter()
    for i in range(n_warm):
        fn(*arg_sets[i % n_sets])
    host_ms = (time.perf_counter() - t_host) * 1e3 / n_warm  # the host's cost of one launch
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    # The GPU is held (a spin kernel) while the host queues a chunk of reps, so each timed call is
    # already queued when the flush before it ends: the events time the kernel, not the host's
    # launch latency. Without this a 30 us kernel measured 58-166 us on a loaded host (H200,
    # session 4: Triton's Python launch is 30-50 us and varies with the other workers' compiles).
    for c0 in range(0, n_rep, HOLD_CHUNK):
        c1 = min(n_rep, c0 + HOLD_CHUNK)
        hold_gpu_ms(2.0 * (c1 - c0) * (host_ms + 0.02) + 0.5)
        for i in range(c0, c1):
            flush.zero_()
            starts[i].record()
            fn(*arg_sets[i % n_sets])
            ends[i].record()
    torch.cuda.synchronize()
    times = sorted(a.elapsed_time(b) for a, b in zip(starts, ends))
    q = statistics.quantiles(times, n=5) if len(times) >= 5 else [times[0]] * 4
    return {"median_ms": statistics.median(times), "p20_ms": q[0], "p80_ms": q[-1], "reps": float(n_rep)}


HOLD_CHUNK = 32  # timed reps queued behind one hold (each is a flush, two events and the call)
_cycles_per_ms: dict[int, float] = {}


def hold_gpu_ms(ms: float) -> None:
    """Queue a kernel that keeps the current CUDA stream busy for about ``ms`` milliseconds (no
    host wait): work queued after it starts back to back once it ends. Capped at 200 ms."""
    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is None or ms <= 0:
        return
    dev = torch.cuda.current_device()
    rate = _cycles_per_ms.get(dev)
    if rate is None:  # calibrate once per device: spin cycles per millisecond
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        sleep(2_000_000)
        e.record()
        torch.cuda.synchronize()
        rate = _cycles_per_ms[dev] = 2_000_000 / max(s.elapsed_time(e), 1e-3)
    sleep(int(min(ms, 200.0) * rate))


def rotation_count(set_bytes: int, rotate_bytes: int, max_sets: int = 8) -> int:
    """How many input copies to rotate so that together they exceed ``rotate_bytes``."""
    if set_bytes <= 0:
        return 1
    return int(max(1, min(max_sets, math.ceil(rotate_bytes / set_bytes))))


def make_timing_sets(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_sets: int) -> list[tuple]:
    """``n_sets`` independent copies of (q, k, v, out); the first set is the originals."""
    sets = []
    for i in range(n_sets):
        qi, ki, vi = (q, k, v) if i == 0 else (q.clone(), k.clone(), v.clone())
        out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
        sets.append((qi, ki, vi, out))
    return sets


def is_sticky_cuda_error(e: BaseException) -> bool:
    """A CUDA error is sticky: the context is unusable afterwards (nothing after it in this
    process can be trusted), so it is never swallowed as "this baseline failed"."""
    s = str(e)
    if "CUDA error" in s or "illegal memory access" in s or "device-side assert" in s:
        return True
    accel = getattr(torch, "AcceleratorError", None)
    if accel is not None and isinstance(e, accel):
        return True
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        try:
            torch.cuda.synchronize()
        except RuntimeError:
            return True
    return False


def baseline_runners(sets: list[tuple], variant, scale: float, *, flex: bool = True,
                     sdpa: bool = True) -> tuple[dict[str, Callable[..., object]], list[str]]:
    """Every baseline that accepts the call, each already run once on ``sets[0]`` (so compiled:
    FlexAttention's first call compiles it for this shape, several seconds of CPU work).

    Split from the timing so that a worker compiles while other workers may use the GPU and
    takes the exclusive device lock only to time. Returns ``({name: fn(q, k, v, out)}, notes)``;
    a backend that refuses the call is left out with a note saying why.
    """
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from .. import fallback

    q, k, v, _ = sets[0]
    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    gqa = Hq != k.shape[1]
    runners: dict[str, Callable[..., object]] = {}
    notes: list[str] = []
    if sdpa and not fallback.sdpa_expressible(variant):
        notes.append("SDPA cannot express this variant (non-additive score part)")
        sdpa = False
    if sdpa:
        try:
            mask, is_causal = fallback.sdpa_inputs(variant, B, Hq, Sq, Sk, q.dtype, q.device)
        except Exception as e:  # noqa: BLE001 - e.g. a dense bias of B*H*Sq*Sk elements that does not fit
            if is_sticky_cuda_error(e):
                raise
            notes.append(f"SDPA left out: its dense mask/bias could not be built for this shape "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
            sdpa = False
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    if sdpa:
        backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                    "efficient": SDPBackend.EFFICIENT_ATTENTION}
        for name in SDPA_BACKENDS:
            be = backends[name]

            def run(qq, kk, vv, _o, be=be):
                with sdpa_kernel([be]):
                    return F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, is_causal=is_causal,
                                                          scale=scale, enable_gqa=gqa)

            try:
                run(*sets[0])
                torch.cuda.synchronize()
            except RuntimeError as e:  # "No available kernel": this backend does not take the call
                if is_sticky_cuda_error(e):
                    raise
                notes.append(f"sdpa_{name} does not accept this call ({str(e).splitlines()[0][:120]})")
                continue
            runners[f"sdpa_{name}"] = run
    if flex:
        def run_flex(qq, kk, vv, _o):
            return fallback.run_flex(qq, kk, vv, variant, scale, gqa)

        try:
            run_flex(*sets[0])
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
            if is_sticky_cuda_error(e):
                raise
            notes.append(f"flex failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
        else:
            runners["flex"] = run_flex
    return runners, notes


def time_runners(runners: dict[str, Callable[..., object]], sets: list[tuple], bench_kw: dict,
                 notes: list[str] | None = None) -> dict[str, float]:
    """``{name: median_ms}`` of :func:`baseline_runners`' output (the caller holds the device).
    A baseline that fails while timed (out of memory, say) is left out, with a note in ``notes``:
    a baseline's failure is never the candidate's."""
    out: dict[str, float] = {}
    for name, fn in runners.items():
        try:
            out[name] = bench(fn, sets, **bench_kw)["median_ms"]
        except Exception as e:  # noqa: BLE001 - reported; the other baselines still count
            if is_sticky_cuda_error(e):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # an out-of-memory baseline: room for the next one
            log.warning("baseline %s failed while timed: %s: %s", name, type(e).__name__, e)
            if notes is not None:
                notes.append(f"{name} left out: failed while timed ({type(e).__name__})")
    return out


def time_baselines(sets: list[tuple], variant, scale: float, bench_kw: dict, *, flex: bool = True,
                   sdpa: bool = True) -> tuple[dict[str, float], list[str]]:
    """Time every SDPA backend that accepts the call, and compiled FlexAttention.

    Returns ``({name: median_ms}, notes)``; a backend that refuses the call is left out with a
    note saying why.
    """
    runners, notes = baseline_runners(sets, variant, scale, flex=flex, sdpa=sdpa)
    return time_runners(runners, sets, bench_kw, notes), notes


# ----------------------------------------------------------------------------------- ceilings
def ceilings_path(fingerprint_name: str) -> Path:
    """Where this device's ceilings are cached (next to the kernel cache)."""
    from ..config import settings

    root = settings().cache_dir
    if not root:
        try:
            import platformdirs

            root = platformdirs.user_cache_dir("torch_r1attn")
        except ImportError:  # the GPU machine has no platformdirs
            root = os.path.join(os.path.expanduser("~"), ".cache", "torch_r1attn")
    return Path(root) / "ceilings" / f"{fingerprint_name}.json"


def measure_ceilings() -> dict[str, float]:
    """bf16 matmul TFLOP/s and device copy GB/s on the current device (about two seconds). The
    best of three medians each: interference only ever makes a ceiling look lower."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    kw = dict(warmup_ms=50, rep_ms=200, min_reps=10, max_reps=100)
    mm = min(bench(lambda: torch.matmul(a, b, out=c), [()], **kw)["median_ms"] for _ in range(3))
    del a, b, c
    nbytes = 1 << 30
    src = torch.empty(nbytes // 2, device="cuda", dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    cp = min(bench(lambda: dst.copy_(src), [()], **kw)["median_ms"] for _ in range(3))
    tflops = 2 * n ** 3 / (mm * 1e-3) / 1e12
    gbps = 2 * nbytes / (cp * 1e-3) / 1e9
    return {"matmul_bf16_tflops": tflops, "copy_gbps": gbps}


def load_ceilings(path: Path, device_name: str) -> dict[str, float] | None:
    """The ceilings cached at ``path`` for this device and protocol version, else None."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(d, dict) and d.get("version") == CEILINGS_VERSION and d.get("device") == device_name:
        return d
    return None


def load_or_measure_ceilings(path: Path, device_name: str) -> dict[str, float]:
    """Ceilings from ``path`` if present and for this device, else measured and written there
    (atomically, under a file lock: concurrent processes measure once, not at the same time).
    The caller keeps its own GPU work off the device meanwhile (the verifier's exclusive lock)."""
    d = load_ceilings(path, device_name)
    if d is not None:
        return d
    from filelock import FileLock, Timeout

    lock = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path) + ".lock", timeout=120)
        lock.acquire()
    except (OSError, Timeout) as e:  # measure anyway: a missing lock costs accuracy, not safety
        log.warning("could not lock %s (%s); measuring the device ceilings without it", path, e)
        lock = None
    try:
        d = load_ceilings(path, device_name)  # another process measured while we waited
        if d is not None:
            return d
        d = {"version": CEILINGS_VERSION, "device": device_name, **measure_ceilings()}
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".ceil-")
            with os.fdopen(fd, "w") as f:
                json.dump(d, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            log.warning("could not cache device ceilings at %s (%s); measuring again next time", path, e)
    finally:
        if lock is not None:
            lock.release()
    log.info("device ceilings for %s: %.0f TFLOP/s bf16 matmul, %.0f GB/s copy", device_name,
             d["matmul_bf16_tflops"], d["copy_gbps"])
    return d


def plausibility(time_ms: float, flops: float, min_bytes: float, ceilings: dict[str, float],
                 slack: float) -> tuple[bool, str, float]:
    """``(plausible, explanation, effective TFLOP/s)`` of a measured time against the ceilings."""
    eff_tflops = flops / (time_ms * 1e-3) / 1e12 if time_ms > 0 else float("inf")
    eff_gbps = min_bytes / (time_ms * 1e-3) / 1e9 if time_ms > 0 else float("inf")
    cap_t, cap_b = ceilings["matmul_bf16_tflops"], ceilings["copy_gbps"]
    if eff_tflops > cap_t * (1 + slack):
        return False, (f"implausible speed: {eff_tflops:.0f} effective TFLOP/s exceeds the measured bf16 matmul "
                       f"ceiling {cap_t:.0f} by more than {slack:.0%} (work skipped or hidden?)"), eff_tflops
    if eff_gbps > cap_b * (1 + slack):
        return False, (f"implausible speed: it must move at least {min_bytes / 1e6:.1f} MB, i.e. {eff_gbps:.0f} GB/s, "
                       f"over the measured copy bandwidth {cap_b:.0f} GB/s by more than {slack:.0%}"), eff_tflops
    return True, (f"{eff_tflops:.1f} effective TFLOP/s ({eff_tflops / cap_t:.0%} of the matmul ceiling "
                  f"{cap_t:.0f})"), eff_tflops
