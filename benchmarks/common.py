"""Shared pieces of the benchmark scripts: the peer variant suite, shapes, timing, FLOP counting.

The suite mirrors ``anchors/h200-peers.md`` exactly (same variants, same parameters) so ratios
can be read against that table: sliding window 1024 (causal); ALiBi slopes 2^(-8(h+1)/H)
(causal); soft-cap 50 (causal); 8 random packed documents (causal); prefix-LM prefix S/4;
relative bias table indexed by k−q (causal); GQA 32/8 (causal); decode = 1 query, 8192 keys,
batch 32, 8 kv heads.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from torch_r1attn import variants as V

SHAPES = {  # name -> (B, H, S, D)
    "B4_H32_S4096_D128": (4, 32, 4096, 128),
    "B8_H32_S2048_D64": (8, 32, 2048, 64),
    "B1_H32_S16384_D128": (1, 32, 16384, 128),
}


@dataclass
class Case:
    name: str
    B: int
    Hq: int
    Hkv: int
    Sq: int
    Sk: int
    D: int
    variant: V.Variant

    @property
    def enable_gqa(self) -> bool:
        return self.Hq != self.Hkv


def packed_docs(S: int, n: int, seed: int = 0, device="cuda") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cuts = torch.sort(torch.randperm(S - 1, generator=g)[: n - 1] + 1).values
    ids = torch.zeros(S, dtype=torch.int32)
    for c in cuts.tolist():
        ids[c:] += 1
    return ids.to(device)


def suite(B: int, H: int, S: int, D: int, device="cuda", only: list[str] | None = None) -> list[Case]:
    g = torch.Generator().manual_seed(0)
    R = S  # relative-bias table covers every distance
    cases = {
        "full": lambda: Case("full", B, H, H, S, S, D, V.full()),
        "causal": lambda: Case("causal", B, H, H, S, S, D, V.causal()),
        "sliding_window": lambda: Case("sliding_window", B, H, H, S, S, D, V.sliding_window(1024)),
        "alibi_causal": lambda: Case("alibi_causal", B, H, H, S, S, D, V.causal() + V.alibi(H)),
        "softcap_causal": lambda: Case("softcap_causal", B, H, H, S, S, D, V.causal() + V.softcap(50.0)),
        "document_causal": lambda: Case("document_causal", B, H, H, S, S, D,
                                        V.causal() + V.document(packed_docs(S, 8, device=device))),
        "prefix_lm": lambda: Case("prefix_lm", B, H, H, S, S, D, V.prefix_lm(S // 4)),
        "relpos_bias_causal": lambda: Case("relpos_bias_causal", B, H, H, S, S, D,
                                           V.causal() + V.relative_bias(torch.randn(H, 2 * R - 1, generator=g) * 0.5)),
        "gqa_causal": lambda: Case("gqa_causal", B, H, 8, S, S, D, V.causal()),
        "decode_gqa_B32_Sk8192": lambda: Case("decode_gqa_B32_Sk8192", 32, 32, 8, 1, 8192, D,
                                              V.causal("bottom_right")),
    }
    names = only or list(cases)
    out = []
    for n in names:
        c = cases[n]()
        c.variant = c.variant.to(device)
        out.append(c)
    return out


def make_inputs(c: Case, dtype=torch.bfloat16, device="cuda", n_sets: int = 1, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    sets = []
    for _ in range(n_sets):
        q = torch.randn(c.B, c.Hq, c.Sq, c.D, device=device, dtype=dtype, generator=g)
        k = torch.randn(c.B, c.Hkv, c.Sk, c.D, device=device, dtype=dtype, generator=g)
        v = torch.randn(c.B, c.Hkv, c.Sk, c.D, device=device, dtype=dtype, generator=g)
        sets.append((q, k, v))
    return sets


def allowed_fraction(c: Case) -> float:
    """Fraction of (q, kv) pairs the variant's mask allows (1.0 for full), from one (b, h) slice."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m = c.variant.dense_mask(1, 1, c.Sq, c.Sk, device)
    if m is None:
        return 1.0
    return float(m.float().mean())


def needed_block_fraction(c: Case, block: int = 128) -> float:
    """DESIGN.md's "FLOPs of the unmasked blocks actually needed": the share of (q, kv) pairs that
    lie in ``block`` x ``block`` tiles holding at least one allowed pair (FlexAttention's default
    block-mask granularity; edge tiles count their real size), from one (b, h) slice. 1.0 for full."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m = c.variant.dense_mask(1, 1, c.Sq, c.Sk, device)
    if m is None:
        return 1.0
    nq, nk = -(-c.Sq // block), -(-c.Sk // block)
    padded = torch.zeros(nq * block, nk * block, dtype=torch.bool, device=m.device)
    padded[:c.Sq, :c.Sk] = m.reshape(c.Sq, c.Sk)
    need = padded.view(nq, block, nk, block).any(dim=3).any(dim=1)  # (nq, nk)
    # each needed tile back at element size, cropped to the real lengths
    pairs = need.repeat_interleave(block, 0).repeat_interleave(block, 1)[:c.Sq, :c.Sk]
    return float(pairs.float().mean())


def effective_tflops(c: Case, ms: float, frac: float) -> float:
    flops = 2 * c.B * c.Hq * c.Sq * c.Sk * (c.D + c.D) * frac
    return flops / (ms * 1e-3) / 1e12


def interleaved_host_us(fns: dict[str, Callable[[], object]], rounds: int = 15, calls: int = 300,
                        sync: Callable[[], None] | None = None, warmup: int = 50,
                        pairs: list[tuple[str, str]] | None = None) -> dict[str, dict[str, float]]:
    """Host µs per call of each of ``fns``, measured in ``rounds`` interleaved rounds (the order
    rotates every round) of ``calls`` calls each, so a slow spell of the host (another process
    compiling, say) lands on every function alike instead of on whichever ran then.

    Returns ``{name: {"median": µs, "p20": µs, "p80": µs}}`` over the rounds, plus ``"a-b"`` for
    each of ``pairs`` (default: every name against the first): the median of the per-round
    differences, which cancels the drift that a difference of medians keeps."""
    import statistics
    import time as _time

    names = list(fns)
    if not names or rounds < 1 or calls < 1:
        raise ValueError("interleaved_host_us needs at least one function, one round and one call")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if sync:
        sync()
    per: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            fn = fns[n]
            t0 = _time.perf_counter()
            for _ in range(calls):
                fn()
            per[n].append((_time.perf_counter() - t0) / calls * 1e6)
            if sync:
                sync()  # the GPU's queue drained: the next function starts from the same state

    def q(xs: list[float]) -> dict[str, float]:
        qs = statistics.quantiles(xs, n=5) if len(xs) >= 5 else [min(xs)] * 4
        return {"median": statistics.median(xs), "p20": qs[0], "p80": qs[-1]}

    out = {n: q(per[n]) for n in names}
    for a, b in pairs if pairs is not None else [(n, names[0]) for n in names[1:]]:
        out[f"{a}-{b}"] = q([x - y for x, y in zip(per[a], per[b])])
    return out


def triton_launchers(g: dict) -> dict:
    """The kernels a kernel module's host code launches: its :class:`~torch_r1attn.launch.BoundLauncher`
    objects (a module the loader imported) or its ``@triton.jit`` kernels (one imported without
    them). Device-side helpers are left out: replacing one while Triton compiles the kernel that
    calls it breaks the compile (Triton deep-copies the globals a kernel reads; session 7)."""
    from torch_r1attn.launch import BoundLauncher, host_launched

    bound = {n: o for n, o in g.items() if isinstance(o, BoundLauncher)}
    return bound or host_launched(g)


@contextlib.contextmanager
def launchers_replaced(fn: Callable, make: Callable[[str, object], object]):
    """Every Triton launcher in ``fn``'s module replaced by ``make(name, launcher)`` inside the
    block, restored afterwards (also on error). Yields the originals ``{name: launcher}``."""
    g = getattr(fn, "__globals__", None)
    if g is None:
        raise TypeError("needs a kernel module's function (its forward)")
    jitted = triton_launchers(g)
    if not jitted:
        raise ValueError("no Triton kernel launcher found in the kernel module")
    try:
        g.update({n: make(n, j) for n, j in jitted.items()})
        yield jitted
    finally:
        g.update(jitted)


def wrapper_host_us(fn: Callable, args: tuple, kwargs: dict | None = None, rounds: int = 15,
                    calls: int = 300) -> float:
    """Host µs per call of a loaded kernel's own Python (its generated ``forward``: checks, grid,
    argument packing) with every Triton launch in its module replaced by a no-op, so that
    ``direct - this`` is what Triton's launcher costs."""

    class _NoLaunch:
        def __getitem__(self, grid):
            return _no_launch

    def _no_launch(*a, **k):
        return None

    kw = kwargs or {}
    with launchers_replaced(fn, lambda n, j: _NoLaunch()):
        return interleaved_host_us({"wrapper": lambda: fn(*args, **kw)}, rounds=rounds, calls=calls)["wrapper"]["median"]


def bench_gpu(fn: Callable, sets: list, warmup_ms: float = 50, rep_ms: float = 300) -> float:
    """Median GPU ms of ``fn(*inputs)`` under the verifier's timing protocol 2
    (:func:`torch_r1attn.verify.timing.bench`): an L2 flush before every rep, inputs rotated, and
    each timed call already queued behind a spin kernel when its flush ends, so the events time
    the GPU work of the call, not the host's Python and launch latency (reported separately as
    the dispatch overhead). Every path of a comparison is timed the same way."""
    from torch_r1attn.verify.timing import bench as protocol_bench

    return float(protocol_bench(fn, sets, warmup_ms=warmup_ms, rep_ms=rep_ms)["median_ms"])


def bench(fn: Callable, sets: list, warmup_ms: float = 100, rep_ms: float = 400) -> float:
    """Median ms of ``fn(*inputs)`` with ``triton.testing.do_bench``, rotating input sets so L2
    does not hold one of them. Its events include the host's launch latency whenever the host
    takes longer to issue the call than the GPU takes to flush L2 (~60 us on the H200): a wall
    time, host included (see :func:`bench_gpu` for the GPU time)."""
    from triton.testing import do_bench

    i = [0]

    def call():
        s = sets[i[0] % len(sets)]
        i[0] += 1
        return fn(*s)

    return float(do_bench(call, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def interleaved_times(paths: list, sets: list, rep_ms: float, rounds: int = 3,
                      gpu_timer: Callable | None = None, wall_timer: Callable | None = None) -> dict:
    """Times every ``(name, fn)`` of ``paths`` (``fn(*inputs)``) in ``rounds`` interleaved rounds,
    the order reversed every other round, ``rep_ms / rounds`` per path per round, with
    ``gpu_timer`` (default :func:`bench_gpu`, protocol 2) and ``wall_timer`` (default
    :func:`bench`). The time of a path is the median of its rounds' medians.

    Why rounds: timed one after another, the first path of a comparison runs in the GPU state the
    previous work left (the previous row's back-to-back windows: hot, clock down) and the last in
    the state the others left. Session 12's bench read cuDNN at 0.96x of itself for the GQA row
    (r1's fallback *is* cuDNN; r1 was timed first). Interleaved, every path sees the same mix; the
    GPU's own spread is not removed (the next run read that row at 0.97x, the same cuDNN kernel
    1.021-1.141 ms across its rounds at 33 ms each: longer rounds narrow it).

    Returns ``{"gpu": {name: ms or "ERR ..."}, "wall": {...}, "gpu_rounds": {name: [ms, ...]}}``;
    a path that raises is recorded as an error and not timed again (the others go on)."""
    gpu_timer = gpu_timer or bench_gpu
    wall_timer = wall_timer or bench
    rounds = max(1, int(rounds))
    per = rep_ms / rounds
    gpu_r: dict = {n: [] for n, _ in paths}
    wall_r: dict = {n: [] for n, _ in paths}
    gpu_err: dict = {}
    wall_err: dict = {}
    for r in range(rounds):
        for name, fn in (paths if r % 2 == 0 else paths[::-1]):
            if name in gpu_err:
                continue
            try:
                if r == 0:  # compile / warm outside the timed windows
                    fn(*sets[0])
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
                gpu_r[name].append(gpu_timer(fn, sets, rep_ms=per))
            except Exception as e:  # noqa: BLE001 - "does not accept the call" is a result
                gpu_err[name] = f"ERR {type(e).__name__}: {str(e)[:80]}"
                continue
            if name in wall_err:
                continue
            try:
                wall_r[name].append(wall_timer(fn, sets, rep_ms=per))
            except Exception as e:  # noqa: BLE001 - the GPU time still stands
                wall_err[name] = f"ERR {type(e).__name__}: {str(e)[:80]}"
    gpu = {n: gpu_err.get(n) or float(statistics.median(gpu_r[n])) for n, _ in paths}
    wall = {n: wall_err.get(n) or float(statistics.median(wall_r[n]))
            for n, _ in paths if n not in gpu_err and (wall_r[n] or n in wall_err)}
    return {"gpu": gpu, "wall": wall, "gpu_rounds": {n: v for n, v in gpu_r.items() if v}}


class Energy:
    """The GPU's energy counter (NVML ``nvmlDeviceGetTotalEnergyConsumption``, mJ since the driver
    loaded) through ctypes, so no pynvml is needed. ``read()`` is None where NVML or the counter
    is missing (CPU machines, old GPUs): callers report energy as unknown, never as zero."""

    def __init__(self, index: int = 0):
        import ctypes

        self._ct, self._lib, self._h = ctypes, None, None
        try:
            lib = ctypes.CDLL("libnvidia-ml.so.1")
            if lib.nvmlInit_v2() != 0:
                return
            h = ctypes.c_void_p()
            if lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.byref(h)) != 0:
                return
            self._lib, self._h = lib, h
            if self.read() is None:
                self._lib = None
        except OSError:
            pass

    def read(self) -> float | None:
        """Millijoules, or None."""
        if self._lib is None:
            return None
        v = self._ct.c_ulonglong()
        if self._lib.nvmlDeviceGetTotalEnergyConsumption(self._h, self._ct.byref(v)) != 0:
            return None
        return float(v.value)


def sustained(fn: Callable, sets: list, window_ms: float = 1000.0, energy: "Energy | None" = None) -> dict:
    """Throughput of ``fn(*inputs)`` run back to back (inputs rotated) for about ``window_ms``:
    ms per call between two events, and the GPU's mJ per call and mean watts over the window when
    ``energy`` can read the counter. Unlike the median of a short window this is what a long job
    sees once the power cap throttles the clock: a kernel that does the same work with more
    energy runs slower here (session 6: 5% slower at 300 ms than at 50 ms)."""
    for s in sets:  # warm (compiles, autotune, caches)
        fn(*s)
    torch.cuda.synchronize()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for i in range(3):
        fn(*sets[i % len(sets)])
    t1.record()
    t1.synchronize()
    n = max(3, int(window_ms / max(t0.elapsed_time(t1) / 3, 1e-3)))
    e0 = energy.read() if energy else None
    t0.record()
    for i in range(n):
        fn(*sets[i % len(sets)])
    t1.record()
    t1.synchronize()
    e1 = energy.read() if energy else None
    ms = t0.elapsed_time(t1)
    out = {"ms": ms / n, "calls": n, "window_ms": ms, "mj_per_call": None, "watts": None}
    if e0 is not None and e1 is not None and e1 > e0:
        out.update(mj_per_call=(e1 - e0) / n, watts=(e1 - e0) / ms)
    return out


def environment() -> dict:
    import triton

    d = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
         "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        d.update(gpu=p.name, sms=p.multi_processor_count, cudnn=torch.backends.cudnn.version())
    return d


def out_dir(default: str = "benchmarks/results") -> Path:
    p = Path(os.environ.get("OUT") or default)
    p.mkdir(parents=True, exist_ok=True)
    return p


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, default=str))
