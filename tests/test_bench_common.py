"""The benchmark helpers that run on the CPU: the interleaved host-time measurement."""

import pytest

from benchmarks.common import interleaved_host_us


def test_interleaved_host_us_pairs_rounds_and_orders():
    calls = []

    def cheap():
        calls.append("a")

    def dear():
        calls.append("b")
        sum(range(300))  # a few microseconds more per call than cheap()

    m = interleaved_host_us({"cheap": cheap, "dear": dear}, rounds=6, calls=50, warmup=5)
    assert set(m) == {"cheap", "dear", "dear-cheap"}
    assert m["dear-cheap"]["median"] > 0 and m["dear"]["median"] > m["cheap"]["median"]
    assert m["dear-cheap"]["p20"] <= m["dear-cheap"]["median"] <= m["dear-cheap"]["p80"]
    # the order rotates every round: round 0 runs cheap first, round 1 dear first
    body = calls[10:]  # after the warm-up calls
    assert body[:50] == ["a"] * 50 and body[100:150] == ["b"] * 50


def test_interleaved_host_us_rejects_empty_work():
    with pytest.raises(ValueError, match="at least one"):
        interleaved_host_us({}, rounds=3)


def test_dispatch_overhead_noop_tool_runs_on_the_cpu(tmp_path):
    """`dispatch_overhead.py --noop` (the host's Python path without a GPU, run on the H200 host
    to see how fast it runs our code) keeps working: every path timed, overhead positive."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(repo)}
    p = subprocess.run([sys.executable, str(repo / "benchmarks" / "dispatch_overhead.py"), "--noop",
                        "--variant", "sliding_window", "--s", "33", "--d", "16"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((tmp_path / "dispatch_overhead_noop_sliding_window.json").read_text())
    assert {"direct", "direct_alloc", "r1", "r1-direct", "r1-direct_alloc"} <= set(res)
    assert res["r1"]["median"] > res["direct"]["median"] > 0


def test_wrapper_host_us_stubs_the_launch_and_restores_it(tmp_path):
    """The attribution of a direct launch's host time (our generated wrapper vs Triton's launcher)
    runs the real generated forward with its launches stubbed out, then puts them back."""
    import torch

    from benchmarks.common import wrapper_host_us
    from torch_r1attn import variants as V
    from torch_r1attn.loader import load_source_file
    from torch_r1attn.problem import Problem
    from torch_r1attn.search.templates import generate_source
    from torch_r1attn.spec import AttentionSpec

    q, k, v = (torch.randn(1, 2, 17, 16, dtype=torch.float16) for _ in range(3))
    var = V.causal()
    spec = AttentionSpec.from_call(q, k, v, var.key)
    prob = Problem(spec=spec, variant=var, shape=(1, 2, 2, 17, 17), device="cpu")
    path = tmp_path / "k.py"
    path.write_text(generate_source(prob))
    kern = load_source_file(path)
    out = torch.full_like(q, float("nan"))
    us = wrapper_host_us(kern.fn, (q, k, v, out, 0.25), rounds=3, calls=20)
    assert us > 0 and bool(out.isnan().all())  # nothing launched while stubbed
    kern(q, k, v, out, 0.25)  # the real launch is back
    assert not bool(out.isnan().any())
    with pytest.raises(TypeError):
        wrapper_host_us(object(), ())


def test_launch_probe_captures_and_binds_the_generated_launch(tmp_path):
    """launch_probe's two pieces, under the interpreter: the generated forward's launch is
    captured (and the module restored), and the bound argument list (every kernel parameter in
    order, constexprs included) relaunches it to the same output."""
    import torch

    from benchmarks.launch_probe import bound_arguments, capture_launches
    from torch_r1attn import variants as V
    from torch_r1attn.loader import load_source_file
    from torch_r1attn.problem import Problem
    from torch_r1attn.search.templates import generate_source
    from torch_r1attn.spec import AttentionSpec

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 17, 16, generator=g).to(torch.float16) for _ in range(3))
    var = V.sliding_window(5)
    spec = AttentionSpec.from_call(q, k, v, var.key)
    path = tmp_path / "k.py"
    path.write_text(generate_source(Problem(spec=spec, variant=var, shape=(1, 2, 2, 17, 17), device="cpu")))
    kern = load_source_file(path)
    out = torch.full_like(q, float("nan"))
    from benchmarks.common import triton_launchers

    # only the kernel the host code launches: the device helpers (_tanh, ...) stay as they are,
    # since Triton compiles the kernel while the launch is captured
    assert set(triton_launchers(kern.fn.__globals__)) == {"_attn_fwd"}
    log = capture_launches(kern.fn, (q, k, v, out, 0.25), {})
    assert len(log) == 1 and not bool(out.isnan().any())
    assert type(kern.fn.__globals__["_attn_fwd"]).__name__ != "_Capture"  # restored
    jit, grid, a, kw, _ = log[0]
    ba = bound_arguments(jit, a, kw)
    assert len(ba) == len(__import__("inspect").signature(jit.fn).parameters)
    again = torch.full_like(q, float("nan"))
    jit[grid](*[again if x is out else x for x in ba], num_warps=kw.get("num_warps", 4),
              num_stages=kw.get("num_stages", 1))
    assert torch.equal(again, out)


def test_energy_counter_is_unknown_without_nvml():
    """No NVML (this CPU machine) reads as unknown, never as 0 mJ (which would print 0 W)."""
    from benchmarks.common import Energy

    e = Energy()
    if e._lib is None:
        assert e.read() is None
    else:  # a machine with a GPU driver: the counter only grows
        a = e.read()
        assert a is not None and e.read() >= a


def test_tune_templates_explicit_overrides_and_bad_ones(tmp_path):
    """`tune_templates.py --overrides` builds one candidate per override on the default config
    (dry run on the CPU), names a bad knob value instead of crashing, and refuses non-JSON."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OUT": str(tmp_path)}
    cmd = [sys.executable, str(root / "benchmarks" / "tune_templates.py"), "--dry-run", "--variants", "sliding_window"]
    r = subprocess.run(cmd + ["--overrides", '[{}, {"BLOCK_M": 128, "num_warps": 8}, {"BLOCK_M": 7}]'],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "skipping {'BLOCK_M': 7}" in r.stdout and "sliding_window: 2 sources generated" in r.stdout
    r = subprocess.run(cmd + ["--overrides", "{nope"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0 and "--overrides is not JSON" in r.stderr



@pytest.mark.parametrize("S,block,want_blocks", [(256, 128, 0.75), (300, 128, None), (128, 64, 0.75)])
def test_needed_block_fraction_counts_whole_tiles_with_any_allowed_pair(S, block, want_blocks):
    """DESIGN's effective-FLOP definition (blocks actually needed) against the allowed-pair one:
    causal at S=256 in 128-tiles needs 3 of 4 tiles; an odd length counts the edge tiles' real size."""
    from benchmarks.common import Case, allowed_fraction, needed_block_fraction
    from torch_r1attn import variants as V

    c = Case("causal", 1, 1, 1, S, S, 64, V.causal())
    pairs, blocks = allowed_fraction(c), needed_block_fraction(c, block)
    assert pairs == pytest.approx(S * (S + 1) / 2 / S**2)
    if want_blocks is None:  # 300 = 128 + 128 + 44: every tile on or below the diagonal
        nb = [128, 128, 44]
        want_blocks = sum(nb[i] * nb[j] for i in range(3) for j in range(i + 1)) / S**2
    assert blocks == pytest.approx(want_blocks)
    assert needed_block_fraction(Case("full", 1, 1, 1, S, S, 64, V.full()), block) == 1.0


def test_interleaved_times_alternates_the_order_and_takes_the_median_round():
    """Rounds in alternating order (no path always first after the previous row), each path's
    time the median of its rounds, the rep split across rounds, failures recorded and not retried."""
    from benchmarks.common import interleaved_times

    calls, seen = [], []

    def gpu_timer(fn, sets, rep_ms):
        calls.append((fn.__name__, rep_ms))
        return fn.t.pop(0)

    def wall_timer(fn, sets, rep_ms):
        return 10.0 * fn.t[0] if fn.t else 99.0

    def make(name, ts, fail=False):
        def f(*inputs):
            seen.append(name)
            if fail:
                raise RuntimeError("backend refuses the call")
        f.__name__, f.t = name, list(ts)
        return f

    a, b, bad = make("a", [3.0, 1.0, 2.0]), make("b", [5.0, 7.0, 6.0]), make("bad", [], fail=True)
    out = interleaved_times([("a", a), ("bad", bad), ("b", b)], [()], rep_ms=90.0, rounds=3,
                            gpu_timer=gpu_timer, wall_timer=wall_timer)
    assert [n for n, _ in calls] == ["a", "b", "b", "a", "a", "b"]  # forward, reversed, forward
    assert all(rep == 30.0 for _, rep in calls)
    assert out["gpu"]["a"] == 2.0 and out["gpu"]["b"] == 6.0  # medians, not the first round
    assert out["gpu"]["bad"].startswith("ERR RuntimeError") and "bad" not in out["wall"]
    assert out["gpu_rounds"] == {"a": [3.0, 1.0, 2.0], "b": [5.0, 7.0, 6.0]}
    assert seen.count("bad") == 1  # warmed once, failed, never timed again
    assert set(out["wall"]) == {"a", "b"}
