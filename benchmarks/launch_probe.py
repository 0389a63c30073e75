"""Host cost of launching a generated kernel three ways (GPU), to decide whether a bound launcher
pays:

  wrapper  the kernel module's ``forward`` as the loader sets it up: our checks + grid + the
           bound launcher (torch_r1attn.launch; what the bench calls "direct")
  wrapper_jit  the same ``forward`` with bound launches off (Triton's ``JITFunction``)
  jit      Triton's ``JITFunction`` launch alone, with the arguments the wrapper built
  bound    the ``CompiledKernel`` that launch returned, called with the bound argument list
           (``compiled[grid](*args)``: no binding, specialisation or kernel-cache lookup)

Each path writes the output once first and the three outputs must agree bit for bit; then host
µs per call, 15 interleaved rounds. Writes ``$OUT/launch_probe_<variant>.json``.

    python benchmarks/launch_probe.py --variant sliding_window --s 129 --d 128
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {
    "causal": lambda V: V.causal(),
    "sliding_window": lambda V: V.sliding_window(1024),
    "softcap_causal": lambda V: V.causal() + V.softcap(50.0),
}


class _Capture:
    """Stands in for one ``@triton.jit`` function of the module: records each launch (grid,
    arguments, the CompiledKernel it returned) and runs it."""

    def __init__(self, name, jit, log):
        self.name, self.jit, self.log = name, jit, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            compiled = self.jit[grid](*args, **kwargs)
            self.log.append((self.jit, grid, args, kwargs, compiled))
            return compiled

        return launch


def capture_launches(fn, args: tuple, kwargs: dict) -> list[tuple]:
    """Run ``fn(*args, **kwargs)`` once with every Triton launch of its module recorded:
    ``[(jit_fn, grid, args, kwargs, compiled_kernel)]``; the module is restored afterwards."""
    from benchmarks.common import launchers_replaced

    log: list[tuple] = []
    with launchers_replaced(fn, lambda n, j: _Capture(n, j, log)):
        fn(*args, **kwargs)
    return log


def bound_arguments(jit, args: tuple, kwargs: dict) -> list:
    """The argument list Triton's launcher hands the compiled kernel: every parameter of the
    kernel in signature order, constexprs included, defaults applied (launch options such as
    num_warps are not parameters)."""
    sig = inspect.signature(jit.fn)
    ba = sig.bind(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
    ba.apply_defaults()
    return list(ba.arguments.values())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", choices=list(VARIANTS), default="sliding_window")
    ap.add_argument("--b", type=int, default=1)
    ap.add_argument("--h", type=int, default=2)
    ap.add_argument("--s", type=int, default=129)
    ap.add_argument("--d", type=int, default=128)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("launch_probe needs a CUDA GPU (Triton's interpreter has no compiled kernel to bind)", file=sys.stderr)
        return 2
    from benchmarks.common import interleaved_host_us
    from torch_r1attn.launch import grid3
    from torch_r1attn import variants as V
    from torch_r1attn.loader import load_source_file
    from torch_r1attn.problem import Problem
    from torch_r1attn.search.templates import generate_source
    from torch_r1attn.spec import AttentionSpec

    var = VARIANTS[args.variant](V).to("cuda")
    B, H, S, D = args.b, args.h, args.s, args.d
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    spec = AttentionSpec.from_call(q, k, v, var.key)
    prob = Problem(spec=spec, variant=var, shape=(B, H, H, S, S), device="cuda")
    path = Path(tempfile.mkdtemp(prefix="launch_probe_")) / "kernel.py"
    path.write_text(generate_source(prob))
    # the loader's bound launches on (the module under test) and off (the same source through
    # Triton's JITFunction, as before torch_r1attn.launch)
    prev = os.environ.get("R1ATTN_BOUND_LAUNCH")
    try:
        os.environ["R1ATTN_BOUND_LAUNCH"] = "1"
        kern = load_source_file(path)
        os.environ["R1ATTN_BOUND_LAUNCH"] = "0"
        kern_jit = load_source_file(path)
    finally:
        if prev is None:
            os.environ.pop("R1ATTN_BOUND_LAUNCH", None)
        else:
            os.environ["R1ATTN_BOUND_LAUNCH"] = prev
    scale, tens = 1 / math.sqrt(D), var.tensors()
    outs = {n: torch.full_like(q, float("nan")) for n in ("wrapper", "jit", "bound")}

    log = capture_launches(kern.fn, (q, k, v, outs["wrapper"], scale), tens)
    if any(c is None for *_, c in log):
        print("a launch returned no compiled kernel", file=sys.stderr)
        return 2

    def with_out(a: tuple, out) -> tuple:  # the launch arguments with the wrapper's out swapped
        return tuple(out if x is outs["wrapper"] else x for x in a)

    # Triton's own JITFunction (the loader puts a BoundLauncher in front of it: "wrapper" is our
    # forward through that, "jit" the launch as it was before)
    jit_calls = {n: [(getattr(j, "jit", j), grid, with_out(a, outs[n]), kw) for j, grid, a, kw, _ in log] for n in outs}
    bound_calls = {n: [(c[grid3(grid)], bound_arguments(j, with_out(a, outs[n]), kw)) for j, grid, a, kw, c in log]
                   for n in outs}
    for j, grid, a, kw in jit_calls["jit"]:
        j[grid](*a, **kw)
    for run, ba in bound_calls["bound"]:
        run(*ba)
    torch.cuda.synchronize()
    same = {n: bool(torch.equal(outs[n], outs["wrapper"])) for n in ("jit", "bound")}

    out = outs["wrapper"]

    def via_jit():
        for j, grid, a, kw in jit_calls["wrapper"]:
            j[grid](*a, **kw)

    def via_bound():
        for run, ba in bound_calls["wrapper"]:
            run(*ba)

    kern_jit.fn(q, k, v, outs["jit"], scale, **tens)  # compiles (or loads) the JIT-path module's kernel
    fns = {"wrapper": lambda: kern.fn(q, k, v, out, scale, **tens), "jit": via_jit, "bound": via_bound,
           "wrapper_jit": lambda: kern_jit.fn(q, k, v, out, scale, **tens)}
    m = interleaved_host_us(fns, rounds=15, calls=300, sync=torch.cuda.synchronize,
                            pairs=[("wrapper", "jit"), ("jit", "bound"), ("wrapper_jit", "wrapper")])
    from torch_r1attn.launch import BoundLauncher

    n_bound = sum(o.bound_launches for o in kern.fn.__globals__.values() if isinstance(o, BoundLauncher))
    res = {"variant": args.variant, "shape": [B, H, S, D], "launches": len(log), "outputs_equal": same,
           "wrapper_us": round(m["wrapper"]["median"], 2), "jit_us": round(m["jit"]["median"], 2),
           "bound_us": round(m["bound"]["median"], 2), "our_wrapper_over_jit_us": round(m["wrapper-jit"]["median"], 2),
           "triton_binding_over_bound_us": round(m["jit-bound"]["median"], 2),
           "wrapper_through_jitfunction_us": round(m["wrapper_jit"]["median"], 2),
           "bound_launcher_saves_us": round(m["wrapper_jit-wrapper"]["median"], 2),
           "wrapper_bound_launches": n_bound,
           "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": __import__("triton").__version__}
    od = Path(os.environ.get("OUT") or "benchmarks/results")
    od.mkdir(parents=True, exist_ok=True)
    (od / f"launch_probe_{args.variant}.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res))
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
