"""The verifier on the CPU (Triton interpreter): bad candidates are rejected for the right reason,
the test process survives every one of them, and a correct kernel passes.

Shapes are tiny and the protocol is :meth:`Protocol.quick` so the whole file runs in about a
minute on two cores; the protocol's defaults (more seeds, distributions, every edge shape) are
what the search uses.
"""

import json
import os
import time

import pytest
import torch

from torch_r1attn import variants as V
from torch_r1attn.config import Settings
from torch_r1attn.problem import Problem
from tests.kernels import kernel_source
from torch_r1attn.search.base import Candidate, Feedback
from torch_r1attn.spec import AttentionSpec, length_bucket
from torch_r1attn.verify import Protocol, VerifierPool, VerifyResult, verify
from torch_r1attn.verify import check as C
from torch_r1attn.verify.result import make_feedback

BLOCK = 16  # the fixture kernels' CPU block size


def src(name: str, causal: bool = False, bottom_right: bool = False) -> str:
    s = kernel_source(name)
    if causal:
        s = s.replace("CAUSAL = False", "CAUSAL = True", 1)
    if bottom_right:
        s = s.replace("BOTTOM_RIGHT = False", "BOTTOM_RIGHT = True", 1)
    return s


def make_problem(variant=None, dtype="fp16", d=32, dv=32, gqa=2, sq=32, sk=32,
                 edges=((17, 17), (1, 31))) -> Problem:
    variant = variant or V.causal()
    spec = AttentionSpec(dtype, d, dv, gqa, variant.key, length_bucket(sq), length_bucket(sk))
    hkv = 2
    return Problem(spec=spec, variant=variant, shape=(1, hkv * gqa, hkv, sq, sk), device="cpu",
                   edge_shapes=[(1, hkv * gqa, hkv, a, b) for a, b in edges])


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(1, protocol=Protocol.quick(), timeout_s=120) as p:
        yield p


@pytest.fixture(scope="module")
def causal_problem():
    return make_problem()


def failing(r: VerifyResult) -> str:
    f = r.failed_checks
    return f[0].name if f else ""


# ------------------------------------------------------------------------------ correct kernels
def test_good_kernel_passes(pool, causal_problem):
    r = pool.verify(Candidate(src("good_attention.py", causal=True)), causal_problem)
    assert r.verdict == "pass", r.feedback
    assert r.ok and r.compiled
    assert not r.timing_meaningful and r.time_ms is None and r.speedup is None and not r.wins
    names = {c.name for c in r.checks}
    assert {"values", "written", "inputs_unchanged", "deterministic", "consecutive_calls", "stream_order"} <= names
    assert all(c.passed for c in r.checks)
    # where the time went: every phase the job went through, each a share of the wall time
    assert {"worker", "inputs", "import", "first_call", "trials", "write", "judge"} <= set(r.phases), r.phases
    assert all(v >= 0 for v in r.phases.values())
    assert sum(r.phases.values()) <= r.seconds + 0.05
    assert r.to_dict()["phases"] == r.phases


def test_phase_buckets():
    from torch_r1attn.verify.worker import _phase_bucket

    assert _phase_bucket("trial 0 (normal#0 1x4x33x33) call 1") == "first_call"
    assert _phase_bucket("trial 0 (normal#0 1x4x33x33) call 2") == "trials"
    assert _phase_bucket("trial 3 (edge spikes 1x4x1x7) call 1") == "trials"
    assert _phase_bucket("submit") == "inputs" and _phase_bucket("load") == "import"
    assert _phase_bucket("timing") == "timing" and _phase_bucket("recheck after timing") == "recheck"
    assert _phase_bucket("write outputs") == "write" and _phase_bucket("something new") == "other"


@pytest.mark.parametrize("dtype, gqa, d, dv, sq, sk", [
    ("fp32", 1, 16, 16, 32, 32),
    ("fp16", 4, 64, 32, 16, 48),
])
def test_good_kernel_passes_full(pool, dtype, gqa, d, dv, sq, sk):
    p = make_problem(V.full(), dtype=dtype, d=d, dv=dv, gqa=gqa, sq=sq, sk=sk, edges=((9, 33),))
    r = pool.verify(Candidate(src("good_attention.py")), p)
    assert r.verdict == "pass", r.feedback


def test_fully_masked_rows_must_be_zero(pool):
    # bottom-right causal with Sq > Sk: the first Sq - Sk query rows see no key at all
    p = make_problem(V.causal("bottom_right"), sq=32, sk=32, edges=((33, 17),))
    good = src("good_attention.py", causal=True, bottom_right=True)
    r = pool.verify(Candidate(good), p)
    assert r.verdict == "pass", r.feedback
    assert "all 0" in r.check("masked_rows").detail
    # the same kernel without the "no allowed key -> 0" guard divides 0 by 0 on those rows
    nan_rows = good.replace("l_safe = tl.where(l_i == 0.0, 1.0, l_i)", "l_safe = l_i")
    r = pool.verify(Candidate(nan_rows), p)
    assert r.verdict == "fail" and failing(r) == "masked_rows", r.feedback
    assert "must be 0" in r.check("masked_rows").detail


# ----------------------------------------------------------------------------- wrong kernels
def test_wrong_math(pool, causal_problem):
    r = pool.verify(Candidate(src("bad_wrong_math.py", causal=True)), causal_problem)
    assert r.verdict == "fail" and failing(r) == "values", r.feedback
    w = r.check("values").data["worst"]
    assert set(w) >= {"pos", "got", "ref", "err", "bound"} and w["err"] > w["bound"]
    assert "at (b,h,q,d)=" in r.feedback  # the worst element reaches the next prompt


def test_partial_write(pool, causal_problem):
    r = pool.verify(Candidate(src("bad_partial_write.py", causal=True)), causal_problem)
    assert r.verdict == "fail" and failing(r) == "written", r.feedback
    assert "NaN" in r.check("written").detail


def test_mutates_input(pool, causal_problem):
    r = pool.verify(Candidate(src("bad_mutates_input.py", causal=True)), causal_problem)
    assert r.verdict == "fail" and failing(r) == "inputs_unchanged", r.feedback
    assert r.check("inputs_unchanged").data["worst"]["input"] == "k"
    assert r.check("values").passed  # its output is right: only the mutation check can see it


def test_correct_on_normal_inputs_only(pool, causal_problem):
    r = pool.verify(Candidate(src("bad_clamps_inputs.py", causal=True)), causal_problem)
    assert r.verdict == "fail" and failing(r) == "values", r.feedback
    failed = r.check("values").data["failed_trials"]
    assert failed and all(not t.startswith("normal#") for t in failed), failed  # N(0,1) itself passes


def test_correct_only_at_block_multiples(pool, causal_problem):
    r = pool.verify(Candidate(src("bad_block_multiple_only.py", causal=True)), causal_problem)
    assert r.verdict == "fail" and failing(r) == "values", r.feedback
    failed = r.check("values").data["failed_trials"]
    assert failed and all(t.startswith("edge") for t in failed), failed  # Sk=32 (a multiple) passes
    assert all(int(t.split("Sk")[-1]) % BLOCK for t in failed)


def test_assumes_contiguous_layout(pool, causal_problem):
    """The contract says strides are arbitrary, and transformers hands over (B, S, H, D)-strided
    views: a kernel that only works on contiguous tensors must not pass."""
    r = pool.verify(Candidate(src("bad_assumes_contiguous.py", causal=True)), causal_problem)
    assert r.verdict == "fail" and failing(r) == "values", r.feedback
    assert "[B,S,H,D strides]" in r.feedback


def test_nondeterministic(pool, causal_problem):
    cand = Candidate(src("bad_nondeterministic.py", causal=True))
    r = pool.verify(cand, causal_problem)
    assert r.verdict == "rejected" and "_STATE" in r.reason  # the counter is hidden state
    r = pool.verify(cand, causal_problem, static=False)
    # the counter lives across trials too, so later trials may see a nudged first call; the
    # nudge is within the error bound, so only the bitwise determinism check can see it
    assert r.verdict == "fail" and failing(r) == "deterministic", r.feedback
    assert r.check("values").passed


def test_drifts_after_first_calls(pool, causal_problem):
    cand = Candidate(src("bad_drifts.py", causal=True))
    assert pool.verify(cand, causal_problem).verdict == "rejected"
    r = pool.verify(cand, causal_problem, static=False)
    # the first trial's third call is where it starts to drift (later trials are then wrong too)
    assert r.verdict == "fail", r.feedback
    cc = r.check("consecutive_calls")
    assert not cc.passed and cc.data["worst"]["call"] == 3 and cc.data["failed_trials"][0].startswith("normal#0")
    assert r.check("deterministic").passed  # calls 1 and 2 agree: only the later calls expose it


@pytest.mark.parametrize("ret, verdict, needle", [
    ("out", "pass", None),
    ("out.clone()", "pass", None),                       # a fresh tensor holding the result
    ("q", "error", "shares memory with an input"),       # the input itself, same shape here
    ("out[:, :, :1]", "error", "of shape"),
    ("1", "error", "returned int"),
    ("torch.empty_like(out)", "fail", None),             # a fresh tensor the kernel never wrote
], ids=["out", "fresh-copy", "an-input", "wrong-shape", "not-a-tensor", "unwritten"])
def test_returned_outputs(pool, causal_problem, ret, verdict, needle):
    """The contract lets forward return its result instead of writing out (composed modules);
    what it returns is checked like out would be, and must not be an input."""
    good = src("good_attention.py", causal=True)
    tail = "IEEE=q.dtype == torch.float32)\n"
    assert good.count(tail) == 1
    r = pool.verify(Candidate(good.replace(tail, tail + f"    return {ret}\n")), causal_problem)
    assert r.verdict == verdict, r.feedback
    if needle:
        assert needle in r.feedback, r.feedback


@pytest.mark.parametrize("name, needle", [
    ("bad_sdpa_cheat.py", "scaled_dot_product_attention"),
    ("bad_try_except.py", "try/except"),
])
def test_static_rejections(pool, causal_problem, name, needle):
    r = pool.verify(Candidate(src(name)), causal_problem)
    assert r.verdict == "rejected" and not r.ok and not r.compiled
    assert failing(r) == "static" and needle in r.check("static").detail, r.feedback


def test_compile_error(pool, causal_problem):
    bad = src("good_attention.py", causal=True).replace("m_i = tl.full(", "m_i = tl.no_such_function(", 1)
    r = pool.verify(Candidate(bad), causal_problem)
    assert r.verdict == "error" and not r.compiled, r.feedback
    assert failing(r) == "run" and "no_such_function" in r.feedback


def test_import_error(pool, causal_problem):
    r = pool.verify(Candidate("import torch\nSUPPORTS = {'dtypes': ['fp16']}\nx = torch.empty(1).shape[5]\n"
                              "def forward(q, k, v, out, scale):\n    pass\n"), causal_problem)
    assert r.verdict == "error" and not r.compiled and failing(r) == "load", r.feedback
    assert "IndexError" in r.feedback


def test_unsupported_dtype_fails(pool, causal_problem):
    s = src("good_attention.py", causal=True).replace('"dtypes": ["fp16", "bf16", "fp32"]', '"dtypes": ["bf16"]')
    r = pool.verify(Candidate(s), causal_problem)
    assert r.verdict == "fail" and failing(r) == "supports", r.feedback


# ---------------------------------------------------------------------- isolation of faults
@pytest.mark.slow
def test_hang_is_killed_by_timeout(causal_problem):
    with VerifierPool(1, protocol=Protocol.quick(), timeout_s=4) as p:
        w = p._take("cpu")
        pid = w.proc.pid
        p._give_back(w)
        t0 = time.monotonic()
        r = p.verify(Candidate(src("bad_hangs.py")), causal_problem)
        assert time.monotonic() - t0 < 30
        assert r.verdict == "timeout" and not r.ok, r.feedback
        assert "trial 0" in r.reason  # says where it hung
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)  # the whole process group is gone
        # the pool replaces the worker and carries on
        assert p.verify(Candidate(src("good_attention.py", causal=True)), causal_problem).verdict == "pass"


@pytest.mark.parametrize("name, needle", [("bad_segfault.py", "SIGSEGV"), ("bad_os_exit.py", "status 0")])
def test_crash_is_contained(pool, causal_problem, name, needle):
    cand = Candidate(src(name))
    r = pool.verify(cand, causal_problem)
    assert r.verdict == "rejected"  # ctypes / os: refused statically ...
    r = pool.verify(cand, causal_problem, static=False)  # ... and contained when run anyway
    assert r.verdict == "crash" and not r.ok and needle in r.reason, r.reason
    # this process is unharmed and the pool's next worker works
    assert torch.ones(3).sum().item() == 3.0
    assert pool.verify(Candidate(src("good_attention.py", causal=True)), causal_problem).verdict == "pass"


def test_print_cannot_forge_protocol(pool, causal_problem):
    forged = src("good_attention.py", causal=True).replace(
        "def forward(q, k, v, out, scale, **variant_tensors):",
        "def forward(q, k, v, out, scale, **variant_tensors):\n    print('{\"ev\": \"done\", \"fatal\": false}')")
    r = pool.verify(Candidate(forged), causal_problem)
    assert r.verdict == "pass", r.feedback  # the print went to the log, not the protocol pipe


# ------------------------------------------------------------------------------ pool and API
@pytest.mark.slow
def test_verify_many_and_reverify_fresh(causal_problem):
    cands = [Candidate(src("good_attention.py", causal=True)), Candidate(src("bad_wrong_math.py", causal=True)),
             Candidate(src("bad_partial_write.py", causal=True))]
    with VerifierPool(2, protocol=Protocol.quick(), timeout_s=120) as p:
        rs = p.verify_many(cands, causal_problem)
        assert [r.verdict for r in rs] == ["pass", "fail", "fail"]
        assert [failing(r) for r in rs[1:]] == ["values", "written"]
        idle = {w.proc.pid for w in p._idle}
        spare = p._spare["cpu"]  # started during verify_many, has run nothing
        assert spare.jobs == 0 and spare.proc.pid not in idle
        r = p.reverify_fresh(cands[0], causal_problem)
        assert r.verdict == "pass"
        assert "cpu" not in p._spare and spare.proc.poll() is not None  # it ran the winner, then closed
        assert {w.proc.pid for w in p._idle} == idle  # the fresh worker was not kept
        p.verify_many(cands[:1], causal_problem)
        nxt = p._spare["cpu"]
    assert nxt.proc.wait(timeout=10) is not None  # closing the pool ends the unused spare too


def test_verify_function_without_pool(causal_problem):
    r = verify(Candidate(src("good_attention.py", causal=True)), causal_problem, protocol=Protocol.quick(),
               settings=Settings(win_margin=0.05), timeout_s=120)
    assert r.verdict == "pass" and r.win_margin == 0.05
    with pytest.raises(ValueError):
        verify(Candidate("x"), causal_problem, pool=object(), timeout_s=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        verify("not a candidate", causal_problem, protocol=Protocol.quick())  # type: ignore[arg-type]


def test_result_serialisation_and_feedback(pool, causal_problem):
    cand = Candidate(src("bad_wrong_math.py", causal=True))
    r = pool.verify(cand, causal_problem)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["verdict"] == "fail" and d["wins"] is False
    back = VerifyResult.from_dict(d)
    assert back.verdict == r.verdict and back.check("values").data["failed_trials"]
    fb = r.to_feedback(cand)
    assert isinstance(fb, Feedback) and fb.ok is False and fb.text == r.feedback
    assert r.feedback.startswith("verdict: fail") and "first failing check: values" in r.feedback
    assert len(make_feedback(r, max_chars=200)) <= 200


def test_protocol_validation():
    with pytest.raises(ValueError, match="calls"):
        Protocol(calls=1)
    with pytest.raises(ValueError, match="distributions"):
        Protocol(distributions=("cauchy",))
    with pytest.raises(ValueError):
        VerifierPool(0)
    with pytest.raises(ValueError):
        VerifyResult(ok=False, compiled=False, verdict="maybe", reason="")


# --------------------------------------------------------------------------- protocol pieces
def test_trials_cover_distributions_edges_and_calls():
    p = make_problem(V.full(), edges=((1, 1), (17, 33), (31, 9)))
    prot = Protocol(seeds=2, max_edge_shapes=None, calls=4)
    trials = C.make_trials(p, prot)
    assert {t.dist for t in trials} == set(C.DISTRIBUTIONS)
    assert sum(1 for t in trials if not t.name.startswith("edge")) == 2 * len(C.DISTRIBUTIONS)
    assert [t.shape for t in trials if t.name.startswith("edge")] == p.edge_shapes
    assert trials[0].calls == 4 and all(t.calls == 1 for t in trials[1:])
    assert len({t.seed for t in trials}) == len(trials)  # fresh inputs per trial
    again = C.make_trials(p, prot)
    assert all(torch.equal(a.q, b.q) for a, b in zip(trials, again))  # deterministic seeds
    big = [t for t in trials if t.dist == "normal_x8"][0]
    assert big.q.float().abs().max() > 8  # large magnitudes really occur


def test_dense_mask_gets_a_masked_rows_trial():
    mask = torch.rand(1, 1, 32, 32) > 0.3
    p = make_problem(V.Variant((V.DenseMask(mask),)), edges=())
    trials = C.make_trials(p, Protocol.quick())
    dead = [t for t in trials if t.name.startswith("masked-rows")]
    assert len(dead) == 1
    C.prepare_references(dead)
    assert dead[0].dead_rows is not None and dead[0].dead_rows.any()
    assert dead[0].ref[dead[0].dead_rows].abs().max() == 0


def test_tolerance_and_pair_counting():
    assert C.tolerance(torch.float16, 1e-3) == pytest.approx(2e-3 + C.ATOL[torch.float16])
    with pytest.raises(TypeError):
        C.tolerance(torch.int32, 0.0)
    assert C.allowed_pairs(V.full(), 2, 3, 5, 7) == 2 * 3 * 5 * 7
    assert C.allowed_pairs(V.causal(), 1, 1, 4, 4) == 10  # 1 + 2 + 3 + 4
    assert C.allowed_pairs(V.sliding_window(2), 1, 2, 4, 4) == 2 * 7


def test_baselines_are_timed_once_per_problem(pool, monkeypatch):
    """The first timing report's baselines serve every later candidate of the same problem (other
    workers, the fresh re-verification): their jobs do not ask the worker to time them again."""
    prob = make_problem(sq=33, sk=33)
    prep = pool._prepare(prob)
    first = VerifyResult(ok=True, compiled=True, verdict="pass", reason="")
    pool._apply_timing(first, prep, {"time_ms": 1.0, "baselines_ms": {"sdpa_cudnn": 2.0, "flex": 3.0}})
    assert first.speedup == pytest.approx(2.0) and first.best_baseline == "sdpa_cudnn"
    later = VerifyResult(ok=True, compiled=True, verdict="pass", reason="")
    pool._apply_timing(later, prep, {"time_ms": 4.0})  # a worker told not to time baselines
    assert later.baselines_ms == {"sdpa_cudnn": 2.0, "flex": 3.0}
    assert later.speedup == pytest.approx(0.5) and any("timed earlier" in n for n in later.notes)
    # and the next job for this problem is written without the baselines request
    import shutil

    import torch_r1attn.verify as verify_mod

    seen, rmtree = [], shutil.rmtree

    def keep_job(path, *a, **k):
        if (path / "job.json").exists():
            seen.append(json.loads((path / "job.json").read_text()))
        return rmtree(path, *a, **k)

    monkeypatch.setattr(verify_mod.shutil, "rmtree", keep_job)
    r = pool.verify(Candidate(src("good_attention.py", causal=True)), prob, timing=False)
    assert r.ok, r.feedback
    assert [j["baselines"] for j in seen] == [False]


# ------------------------------------------------------------------ device ceilings (protocol)
_FAKE_STARTUP = r"""
import json, os, sys
proto = os.fdopen(os.dup(1), "w", buffering=1)
proto.write(json.dumps({"ev": "lock", "mode": "exclusive"}) + "\n"); proto.flush()
if sys.stdin.readline().strip() != "ok":
    sys.exit(5)
proto.write(json.dumps({"ev": "ready", "pid": os.getpid()}) + "\n"); proto.flush()
sys.stdin.readline()
"""


def test_worker_startup_lock_is_granted_and_released_at_ready(tmp_path, monkeypatch):
    """A worker that must measure the ceilings asks for the exclusive device lock before
    ``ready``; the pool grants it and releases it when ``ready`` arrives (regression: ceilings
    measured while other workers ran came out at a third of the H200's matmul speed)."""
    import subprocess
    import sys

    from torch_r1attn.verify import worker as W

    real_popen = subprocess.Popen

    def fake_popen(cmd, **kw):  # the real WorkerProcess plumbing, a scripted worker behind it
        return real_popen([sys.executable, "-c", _FAKE_STARTUP], **kw)

    monkeypatch.setattr(W.subprocess, "Popen", fake_popen)
    w = W.WorkerProcess(tmp_path / "w.log", "cpu")
    events = []

    def acquire(mode):
        events.append(("acquire", mode))
        return lambda: events.append(("release", mode))

    try:
        w.wait_ready(timeout_s=60, acquire=acquire)
        assert w.ready
        assert events == [("acquire", "exclusive"), ("release", "exclusive")]
    finally:
        w.kill()


def test_ceilings_measured_once_under_a_file_lock(tmp_path, monkeypatch):
    import threading
    import time

    from torch_r1attn.verify import timing

    calls = []

    def slow_measure():
        calls.append(1)
        time.sleep(0.3)
        return {"matmul_bf16_tflops": 700.0, "copy_gbps": 4000.0}

    monkeypatch.setattr(timing, "measure_ceilings", slow_measure)
    path = tmp_path / "ceilings" / "dev.json"
    got = []
    ts = [threading.Thread(target=lambda: got.append(timing.load_or_measure_ceilings(path, "GPU X")))
          for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(calls) == 1 and len(got) == 3
    assert all(g["matmul_bf16_tflops"] == 700.0 and g["version"] == timing.CEILINGS_VERSION for g in got)
    assert timing.load_ceilings(path, "GPU X")["copy_gbps"] == 4000.0
    assert timing.load_ceilings(path, "GPU Y") is None  # another device measures its own


def test_ceilings_of_an_older_protocol_are_measured_again(tmp_path, monkeypatch):
    import json

    from torch_r1attn.verify import timing

    path = tmp_path / "dev.json"
    path.write_text(json.dumps({"version": 1, "device": "GPU X", "matmul_bf16_tflops": 269.0, "copy_gbps": 1.0}))
    monkeypatch.setattr(timing, "measure_ceilings", lambda: {"matmul_bf16_tflops": 700.0, "copy_gbps": 4000.0})
    assert timing.load_or_measure_ceilings(path, "GPU X")["matmul_bf16_tflops"] == 700.0
    path.write_text("{not json")
    assert timing.load_ceilings(path, "GPU X") is None


def test_one_job_at_a_time_times_the_baselines(pool):
    """While a job times the baselines no other job is asked to; when it ends without them the
    next one is; results that lacked them get them, with their speed-up, once they are known."""
    prob = make_problem(sq=33, sk=33)
    prep = pool._prepare(prob)
    assert pool._claim_baselines(prep, 1)
    assert not pool._claim_baselines(prep, 2)  # job 1 is on it
    prep.baselines_job = None  # job 1 ended without baselines (its candidate failed)
    assert pool._claim_baselines(prep, 3)
    waiting = VerifyResult(ok=True, compiled=True, verdict="pass", reason="correct on every trial",
                           timing_meaningful=True, time_ms=2.0)
    assert pool.fill_baselines([waiting], prob) == 0  # nothing known yet: left as it is
    assert waiting.speedup is None
    owner = VerifyResult(ok=True, compiled=True, verdict="pass", reason="")
    pool._apply_timing(owner, prep, {"time_ms": 1.0, "baselines_ms": {"sdpa_flash": 3.0, "flex": 4.0}})
    prep.baselines_job = None
    assert not pool._claim_baselines(prep, 4)  # known now: nobody times them again
    assert pool.fill_baselines([waiting, owner], prob) == 1
    assert waiting.baselines_ms == {"sdpa_flash": 3.0, "flex": 4.0} and waiting.best_baseline == "sdpa_flash"
    assert waiting.speedup == pytest.approx(1.5) and "1.500x" in waiting.reason
    assert any("another job" in n for n in waiting.notes) and "1.5" in waiting.feedback


# ------------------------------------------------------------------ what timing runs on
def _doc_problem(ids: torch.Tensor, sq: int = 40, sk: int = 40) -> Problem:
    return make_problem(V.causal() + V.document(ids), sq=sq, sk=sk)


def test_timing_runs_on_the_callers_documents():
    """Timing uses the caller's own document layout when it fits the timing shape (the blocks a
    kernel visits depend on it); a layout that does not fit gets a random one of the right size."""
    ids = torch.repeat_interleave(torch.arange(8, dtype=torch.int32), 5)  # 8 documents of 5
    p = _doc_problem(ids)
    assert p.timing_variant_is_callers()
    tv = p.timing_variant(97, device="cpu")
    (doc,) = [t for n, t in tv.tensors().items() if "doc" in n]
    assert torch.equal(doc, ids)
    short = _doc_problem(ids[:30])  # shorter than Sk=40: cannot time on it
    assert not short.timing_variant_is_callers()
    (doc2,) = [t for n, t in short.timing_variant(97, device="cpu").tensors().items() if "doc" in n]
    assert doc2.shape[-1] == 40 and not torch.equal(doc2[:30], ids[:30])
    batched = _doc_problem(torch.stack([ids, ids, ids]))  # (B=3, L) for a B=1 shape
    assert not batched.timing_variant_is_callers()


def test_worker_rebuilds_the_callers_timing_variant(pool):
    """The worker rebuilds the problem from problem.json + recipe.safetensors: the variant it
    times on is the caller's, tensor for tensor."""
    from safetensors.torch import load_file

    from torch_r1attn.problem import variant_from_recipe

    ids = torch.repeat_interleave(torch.arange(4, dtype=torch.int32), 10)
    prob = _doc_problem(ids)
    prep = pool._prepare(prob)
    meta = json.loads((prep.dir / "problem.json").read_text())
    rt = load_file(str(prep.dir / "recipe.safetensors"))
    rebuilt = Problem(spec=prob.spec, variant=variant_from_recipe(meta["recipe"], rt, device="cpu"),
                      shape=tuple(meta["shape"]), device="cpu")
    tv = rebuilt.timing_variant(int(meta["timing_seed"]), device="cpu")
    want = prob.timing_variant(int(meta["timing_seed"]), device="cpu").tensors()
    got = tv.tensors()
    assert list(got) == list(want) and all(torch.equal(got[n], want[n]) for n in want)


def test_effective_tflops_count_the_callers_pairs(pool):
    """Plausibility and effective TFLOP/s count the allowed pairs of the layout that was timed."""
    ids = torch.repeat_interleave(torch.arange(8, dtype=torch.int32), 5)
    prob = _doc_problem(ids)
    prep = pool._prepare(prob)
    r = VerifyResult(ok=True, compiled=True, verdict="pass", reason="")
    pool._apply_timing(r, prep, {"time_ms": 1.0, "baselines_ms": {"flex": 2.0}})
    B, Hq, _, Sq, Sk = prob.shape
    pairs = C.allowed_pairs(prob.variant, B, Hq, Sq, Sk)
    assert pairs == B * Hq * 8 * 15  # 8 causal documents of 5: 1+2+3+4+5 pairs each
    want = 2.0 * pairs * (prob.spec.head_dim + prob.spec.head_dim_v) / 1e-3 / 1e12
    assert r.effective_tflops == pytest.approx(want)


# ------------------------------------------------------------------ a baseline's failure is not the candidate's
def test_sdpa_inputs_that_cannot_be_built_leave_sdpa_out(monkeypatch):
    """At B=1 H=32 S=16384 a relative bias's dense SDPA bias is 8.6e9 elements: building it ran
    out of memory inside the baseline job on the H200 and failed the candidate with it (session
    5). Now SDPA is left out with a note and the other baselines still count."""
    from torch_r1attn import fallback
    from torch_r1attn.verify import timing

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 32.00 GiB")

    monkeypatch.setattr(fallback, "sdpa_inputs", oom)
    q = torch.randn(1, 2, 8, 16)
    sets = [(q, q.clone(), q.clone(), torch.empty_like(q))]
    var = V.causal() + V.relative_bias(torch.randn(2, 15))
    runners, notes = timing.baseline_runners(sets, var, 0.25, flex=False)
    assert runners == {}
    assert any("SDPA left out" in n and "OutOfMemoryError" in n for n in notes), notes


def test_a_baseline_failing_while_timed_is_left_out():
    from torch_r1attn.verify import timing

    q = torch.randn(1, 1, 4, 8)
    notes: list[str] = []
    # on the CPU timing.bench itself refuses (no CUDA): every runner fails, none raises out
    out = timing.time_runners({"sdpa_cudnn": lambda *a: None, "flex": lambda *a: None},
                              [(q, q, q, q)], {}, notes)
    assert out == {} and [n.split()[0] for n in notes] == ["sdpa_cudnn", "flex"]


def test_a_rebuilt_callable_part_moves_to_the_timing_device():
    """The worker rebuilds score_mod / mask_mod parts from the recipe on the CPU and moves the
    variant to the GPU for timing; those parts are not dataclasses, and moving one raised
    TypeError, so every candidate of such a signature failed its timing on CUDA."""
    from torch_r1attn.problem import variant_from_recipe, variant_to_recipe

    tab = torch.randn(2)

    def biased(score, b, h, q_idx, kv_idx):
        return score + tab[h]

    for var in (V.causal() + V.score_mod(biased),
                V.mask_mod(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx) + V.document(torch.arange(64) // 8)):
        recipe, rt = variant_to_recipe(var)
        rebuilt = variant_from_recipe(recipe, rt, device="cpu")
        moved = rebuilt.to("meta")
        assert moved.key == var.key
        assert all(t.device.type == "meta" for t in moved.tensors().values()) and moved.tensors()
        assert all(t.device.type == "cpu" for t in rebuilt.tensors().values())  # the original is untouched


def test_baseline_notes_travel_with_the_baselines(pool):
    """Results that get the baselines from the job that timed them get its notes too (e.g. why
    SDPA was left out), so no speed-up is quoted against fewer peers without the reason."""
    prob = make_problem(sq=35, sk=35)
    prep = pool._prepare(prob)
    why = "SDPA left out: its dense mask/bias could not be built for this shape (OutOfMemoryError: x)"
    owner = VerifyResult(ok=True, compiled=True, verdict="pass", reason="")
    pool._apply_timing(owner, prep, {"time_ms": 1.0, "baselines_ms": {"flex": 2.0}, "notes": [why]})
    later = VerifyResult(ok=True, compiled=True, verdict="pass", reason="")
    pool._apply_timing(later, prep, {"time_ms": 1.5})
    waiting = VerifyResult(ok=True, compiled=True, verdict="pass", reason="", timing_meaningful=True, time_ms=1.6)
    assert pool.fill_baselines([waiting], prob) == 1
    for r in (owner, later, waiting):
        assert why in r.notes and r.best_baseline == "flex"


def test_a_sticky_cuda_error_in_a_baseline_is_not_swallowed(monkeypatch):
    from torch_r1attn import fallback
    from torch_r1attn.verify import timing

    def broken(*a, **k):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(fallback, "sdpa_inputs", broken)
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        timing.baseline_runners([(q, q, q, q)], V.causal() + V.relative_bias(torch.randn(2, 15)), 0.25, flex=False)


def test_trials_include_the_callers_layout_when_it_fits():
    """Timing runs on the caller's documents, so one correctness trial does too; variants
    without data-dependent tensors (or whose tensors do not fit the check shape) get none."""
    ids = torch.repeat_interleave(torch.arange(8, dtype=torch.int32), 5)
    trials = C.make_trials(_doc_problem(ids), Protocol.quick())
    mine = [t for t in trials if t.name.startswith("caller's layout")]
    assert len(mine) == 1
    (doc,) = [x for n, x in mine[0].tensors.items() if "doc" in n]
    assert torch.equal(doc, ids)
    assert not any(t.name.startswith("caller's") for t in C.make_trials(make_problem(), Protocol.quick()))
    short = _doc_problem(ids[:30])  # does not fit Sk=40
    assert not any(t.name.startswith("caller's") for t in C.make_trials(short, Protocol.quick()))
