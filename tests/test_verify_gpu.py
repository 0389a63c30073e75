"""The verifier on the GPU (H200): timing report, repeatability, faults that only a GPU has.

Run with ``pytest -m gpu tests/test_verify_gpu.py -s`` to see the timing tables.
"""

import logging

import pytest
import torch

from torch_r1attn import variants as V
from torch_r1attn.problem import Problem
from tests.kernels import kernel_source
from torch_r1attn.search.base import Candidate
from torch_r1attn.spec import AttentionSpec
from torch_r1attn.verify import Protocol, VerifierPool, timing_table

pytestmark = pytest.mark.gpu
log = logging.getLogger(__name__)

# Repeated verification of one kernel must agree this closely (median of >= 20 timed calls,
# L2 flushed, inputs rotated). 10% is the bound the issue asks for.
NOISE_BOUND = 0.10


def src(name: str, causal: bool = False) -> str:
    s = kernel_source(name)
    return s.replace("CAUSAL = False", "CAUSAL = True", 1) if causal else s


def gpu_problem(variant, dtype="bf16", B=2, H=16, S=2048, D=128, gqa=1) -> Problem:
    spec = AttentionSpec(dtype, D, D, gqa, variant.key, S, S, example=(B, H, H // gqa, S, S))
    return Problem.from_spec(spec, variant, device="cuda")


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(1, protocol=Protocol(max_edge_shapes=4), timeout_s=300) as p:
        yield p


@pytest.mark.parametrize("variant", [V.full(), V.causal()], ids=["full", "causal"])
def test_good_kernel_report(pool, variant):
    p = gpu_problem(variant)
    r = pool.verify(Candidate(src("good_attention.py", causal=not variant.is_full)), p)
    print(f"\n{variant.key}: {r.verdict} ({r.reason})\n{timing_table(r)}\nnotes: {r.notes}")
    assert r.verdict == "pass", r.feedback
    assert r.timing_meaningful and r.time_ms and r.time_ms > 0
    assert {"sdpa_cudnn", "sdpa_flash", "flex"} & set(r.baselines_ms), r.baselines_ms
    assert all(ms > 0 for ms in r.baselines_ms.values())
    assert r.best_baseline in r.baselines_ms and r.speedup == pytest.approx(r.best_baseline_ms / r.time_ms)
    ps = r.check("plausible_speed")
    assert ps is not None and ps.passed, r.feedback
    assert r.check("recheck_after_timing").passed
    assert 1.0 < r.effective_tflops < ps.data["ceilings"]["matmul_bf16_tflops"] * 1.1


def test_repeated_verification_agrees(pool):
    p = gpu_problem(V.causal())
    cand = Candidate(src("good_attention.py", causal=True))
    a, b = pool.verify(cand, p), pool.verify(cand, p)
    assert a.verdict == b.verdict == "pass"
    print(f"\nrepeat: {a.time_ms:.4f} ms vs {b.time_ms:.4f} ms; baselines {a.baselines_ms} vs {b.baselines_ms}")
    assert abs(a.time_ms - b.time_ms) / min(a.time_ms, b.time_ms) < NOISE_BOUND
    for name in set(a.baselines_ms) & set(b.baselines_ms):
        x, y = a.baselines_ms[name], b.baselines_ms[name]
        assert abs(x - y) / min(x, y) < NOISE_BOUND, (name, x, y)


def test_illegal_memory_access_is_contained(pool):
    p = gpu_problem(V.causal(), B=1, H=4, S=256, D=64)
    r = pool.verify(Candidate(src("bad_illegal_memory.py", causal=True)), p)
    assert r.verdict == "crash" and not r.ok, r.feedback
    # this process's CUDA context is unharmed, and the pool carries on with a fresh worker
    x = torch.ones(1024, device="cuda")
    assert x.sum().item() == 1024.0
    torch.cuda.synchronize()
    assert pool.verify(Candidate(src("good_attention.py", causal=True)), p).verdict == "pass"


def test_side_stream_is_rejected(pool):
    p = gpu_problem(V.causal())
    cand = Candidate(src("bad_side_stream.py", causal=True))
    r = pool.verify(cand, p)
    assert r.verdict == "rejected" and "Stream" in r.check("static").detail
    r = pool.verify(cand, p, static=False)
    print(f"\nside stream, static off: {r.verdict}: {r.reason}")
    assert r.verdict in ("fail", "rejected"), r.feedback
    assert {c.name for c in r.failed_checks} & {"stream_order", "written", "values", "plausible_speed"}


def test_mutation_and_partial_write_on_gpu(pool):
    p = gpu_problem(V.causal(), dtype="fp16", B=1, H=8, S=1024, D=64)
    r = pool.verify(Candidate(src("bad_mutates_input.py", causal=True)), p)
    assert r.verdict == "fail" and r.failed_checks[0].name == "inputs_unchanged", r.feedback
    r = pool.verify(Candidate(src("bad_partial_write.py", causal=True)), p)
    assert r.verdict == "fail" and r.failed_checks[0].name == "written", r.feedback


def test_flex_baseline_in_parent_for_unimportable_callable(pool):
    from torch_r1attn.verify import _time_flex_in_parent

    p = gpu_problem(V.mask_mod(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx), B=1, H=8, S=1024, D=64)
    prep = pool._prepare(p)
    ms, note = _time_flex_in_parent(prep, pool.protocol, pool._device_lock)
    assert ms is not None and ms > 0, note
    assert "parent" in note


def test_template_kernel_with_a_captured_tensor_is_timed(pool):
    """A score_mod that captures a tensor: the worker rebuilds it on the CPU and must move it to
    the GPU for timing (Variant.to on the rebuilt, non-dataclass part raised TypeError before)."""
    from torch_r1attn.search.templates import TemplatesProposer

    tab = torch.randn(8, device="cuda") * 0.1

    def head_bias(score, b, h, q_idx, kv_idx):
        return score + tab[h]

    p = gpu_problem(V.causal() + V.score_mod(head_bias), B=1, H=8, S=1024, D=64)
    (cand,) = TemplatesProposer().propose(p, [], 1)
    r = pool.verify(cand, p)
    assert r.verdict == "pass" and r.timing_meaningful and r.time_ms, r.feedback


def test_ceilings_are_measured_alone_while_workers_are_busy(cache_dir):
    """Regression (H200, session 3): a worker that started while others checked and timed
    measured the matmul ceiling at 269 instead of ~700 TFLOP/s, and every fast correct kernel
    was rejected as "implausible". Workers now measure under the pool's exclusive lock."""
    from torch_r1attn.spec import device_fingerprint, fingerprint_name
    from torch_r1attn.verify import timing

    path = timing.ceilings_path(fingerprint_name(device_fingerprint()))
    assert not path.exists()
    p = gpu_problem(V.causal(), B=2, H=16, S=2048)
    cand = Candidate(src("good_attention.py", causal=True))
    with VerifierPool(3, protocol=Protocol(max_edge_shapes=2), timeout_s=300) as pool:
        rs = pool.verify_many([cand, cand, cand], p)  # workers start and run side by side
        fresh = pool.verify(cand, p, fresh=True)  # the spare, started while the others ran
    assert all(r.verdict == "pass" for r in rs), [r.feedback for r in rs]
    assert fresh.verdict == "pass", fresh.feedback
    stored = timing.load_ceilings(path, device_fingerprint()["device"])
    solo = timing.measure_ceilings()
    print(f"\nceilings: stored {stored['matmul_bf16_tflops']:.0f} TFLOP/s, solo {solo['matmul_bf16_tflops']:.0f}")
    assert stored["matmul_bf16_tflops"] > 0.85 * solo["matmul_bf16_tflops"], (stored, solo)


def test_one_job_of_a_wave_times_the_baselines():
    """A fresh pool's first wave: one job times (and compiles Flex for) the baselines while the
    others go on; every result of the wave still carries them and its speed-up."""
    p = gpu_problem(V.full(), S=1024)
    cands = [Candidate(src("good_attention.py") + f"\n# copy {i}\n") for i in range(3)]
    with VerifierPool(3, protocol=Protocol(max_edge_shapes=2), timeout_s=300) as pool3:
        rs = pool3.verify_many(cands, p)
    for r in rs:
        print(f"\n{r.seconds:.1f}s phases: {r.phases}")
    assert all(r.verdict == "pass" for r in rs), [r.feedback for r in rs]
    filled = [r for r in rs if any("another job" in n or "timed earlier" in n for n in r.notes)]
    assert len(filled) == len(rs) - 1, [r.notes for r in rs]
    base = rs[0].baselines_ms
    assert {"sdpa_cudnn", "sdpa_flash", "flex"} & set(base), base
    assert all(r.baselines_ms == base for r in rs)
    assert all(r.speedup == pytest.approx(r.best_baseline_ms / r.time_ms) for r in rs)


def test_bench_times_the_kernel_not_the_host_launch():
    """A call whose host side is slow (here 300 us of busy host work before a ~10 us kernel, as a
    Python launch on a loaded host) must time as the kernel: the GPU is held while reps queue."""
    import time

    from torch_r1attn.verify.timing import bench

    a = torch.randn(512, 512, device="cuda", dtype=torch.bfloat16)
    c = torch.empty_like(a)
    sets = [(a, a, c, None)]

    def fast(x, y, out, _):
        torch.mm(x, y, out=out)

    def slow_host(x, y, out, _):
        t = time.perf_counter()
        while time.perf_counter() - t < 3e-4:
            pass
        torch.mm(x, y, out=out)

    t_fast = bench(fast, sets)["median_ms"]
    t_slow = bench(slow_host, sets)["median_ms"]
    print(f"\nkernel alone {t_fast * 1e3:.1f} us, behind 300 us of host work {t_slow * 1e3:.1f} us")
    assert t_fast < 0.1
    assert t_slow < 1.3 * t_fast + 0.005, (t_fast, t_slow)


@pytest.mark.gpu
def test_flex_still_times_when_sdpa_inputs_do_not_fit(monkeypatch):
    """The S=16384 relative-bias failure of session 5, forced: SDPA's dense bias cannot be built,
    Flex is timed anyway and SDPA is left out with a note."""
    from torch_r1attn import fallback
    from torch_r1attn.verify import timing

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory (forced)")

    monkeypatch.setattr(fallback, "sdpa_inputs", oom)
    q, k, v = (torch.randn(1, 4, 256, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    # ALiBi (SDPA needs its dense bias): Flex's own compile of relative bias at D=64 asks for more
    # shared memory than the H200 has (240 KiB; session 6), which is Flex's failure, not ours
    var = (V.causal() + V.alibi(4)).to("cuda")
    base, notes = timing.time_baselines([(q, k, v, torch.empty_like(q))], var, 0.125,
                                        {"warmup_ms": 5, "rep_ms": 20})
    assert set(base) == {"flex"} and base["flex"] > 0, notes
    assert any("SDPA left out" in n for n in notes)
