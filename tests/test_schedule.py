"""Prewarm scheduling (``torch_r1attn.schedule``): one worker per GPU, a shared queue.

Most tests drive :func:`run_jobs` with ``tests/fake_sched_worker.py`` (same protocol, no torch,
env knobs to crash/hang/misbehave), on fake GPU indices: the scheduler never touches CUDA itself,
it only pins ``CUDA_VISIBLE_DEVICES``. Two tests run the library's own worker loop in a real
subprocess (junk on stdout; a cached signature); one GPU test runs real searches on every GPU.
"""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from torch_r1attn import schedule
from torch_r1attn import variants as V
from torch_r1attn.config import Settings
from torch_r1attn.problem import variant_to_recipe
from torch_r1attn.schedule import JobResult, PrewarmJob, parse_gpus, run_jobs, summary_table
from torch_r1attn.spec import AttentionSpec, length_bucket

FAKE = [sys.executable, str(Path(__file__).with_name("fake_sched_worker.py"))]


def make_job(label: str, head_dim: int = 64, variant: V.Variant | None = None) -> PrewarmJob:
    variant = variant or V.causal()
    spec = AttentionSpec("fp16", head_dim, head_dim, 1, variant.key, 64, 64, example=(1, 2, 2, 48, 48))
    recipe, tensors = variant_to_recipe(variant)
    return PrewarmJob(spec=spec, variant_recipe=recipe, variant_tensors=tensors, label=label)


def distinct_jobs(n: int, prefix: str = "j") -> list[PrewarmJob]:
    return [make_job(f"{prefix}{i}", head_dim=16 + i) for i in range(n)]


@pytest.fixture
def fake_env(tmp_path, monkeypatch):
    """A state dir for the fake worker and a clean slate of FAKE_* knobs; returns a setter."""
    state = tmp_path / "fake-state"
    state.mkdir()
    for k in list(os.environ):
        if k.startswith("FAKE_"):
            monkeypatch.delenv(k)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("FAKE_STATE_DIR", str(state))

    def setenv(**kw):
        for k, v in kw.items():
            monkeypatch.setenv(f"FAKE_{k}", str(v))
        return state

    setenv.state = state
    return setenv


def attempts(state: Path) -> list[tuple[str, str]]:
    f = state / "attempts.log"
    if not f.exists():
        return []
    return [tuple(line.split()[:2]) for line in f.read_text().splitlines()]


def field(winner: str, name: str) -> str:
    return dict(kv.split("=", 1) for kv in winner.split())[name]


# ------------------------------------------------------------------------------------- parse_gpus
@pytest.mark.parametrize("arg, visible, want", [
    (None, 4, [0, 1, 2, 3]),
    ("all", 4, [0, 1, 2, 3]),
    (" ALL ", 2, [0, 1]),
    ("all", 0, []),
    ("0,2", 4, [0, 2]),
    (" 3 , 1 ", 4, [3, 1]),
    ("0", 1, [0]),
    ("none", 4, []),
    ("cpu", 0, []),
])
def test_parse_gpus(monkeypatch, arg, visible, want):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert parse_gpus(arg) == want


@pytest.mark.parametrize("arg, visible, match", [
    ("", 4, "empty"),
    ("   ", 4, "empty"),
    ("0,0", 4, "listed twice"),
    ("1, 2, 1", 4, "listed twice"),
    ("4", 4, "GPU 4 is not visible"),
    ("0", 0, "no GPU is visible"),
    ("-1", 4, "not a GPU index"),
    ("0,", 4, "not a GPU index"),
    ("1.5", 4, "not a GPU index"),
    ("gpu0", 4, "not a GPU index"),
    ("0;1", 4, "not a GPU index"),
])
def test_parse_gpus_rejects(monkeypatch, arg, visible, match):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    with pytest.raises(ValueError, match=match):
        parse_gpus(arg)


def test_parse_gpus_type_error():
    with pytest.raises(TypeError, match="--gpus"):
        parse_gpus([0, 1])


# ------------------------------------------------------------------------------- argument checks
def test_run_jobs_rejects_bad_arguments(fake_env):
    job = make_job("a")
    with pytest.raises(TypeError, match=r"jobs\[1\]"):
        run_jobs([job, "nope"], [0], worker_cmd=FAKE, progress=False)
    with pytest.raises(ValueError, match="listed twice"):
        run_jobs([job], [0, 0], worker_cmd=FAKE, progress=False)
    with pytest.raises(ValueError, match="not a GPU index"):
        run_jobs([job], [-1], worker_cmd=FAKE, progress=False)
    with pytest.raises(TypeError, match="list of GPU indices"):
        run_jobs([job], "0,1", worker_cmd=FAKE, progress=False)
    with pytest.raises(ValueError, match="max_requeue"):
        run_jobs([job], [0], worker_cmd=FAKE, progress=False, max_requeue=-1)
    bad = PrewarmJob(job.spec, {"parts": [object()]}, {}, "bad")
    with pytest.raises(TypeError, match="JSON"):
        run_jobs([bad], [0], worker_cmd=FAKE, progress=False)
    with pytest.raises(TypeError, match="not tensors"):
        run_jobs([PrewarmJob(job.spec, job.variant_recipe, {"x": [1]}, "t")], [0], worker_cmd=FAKE, progress=False)
    assert attempts(fake_env.state) == []  # nothing was started for malformed input
    # no jobs: no worker is started (the command does not even exist)
    assert run_jobs([], [0, 1], worker_cmd=["/nonexistent/worker"], progress=False) == []


def test_prewarm_job_from_variant():
    v = V.document(torch.tensor([0, 0, 1, 1, 1]))
    spec = AttentionSpec("fp16", 32, 32, 1, v.key, 8, 8)
    job = PrewarmJob.from_variant(spec, v, "doc")
    assert job.variant_recipe["key"] == "doc" and list(job.variant_tensors) == ["p0.doc_ids"]
    with pytest.raises(ValueError, match="does not match"):
        PrewarmJob.from_variant(spec, V.causal(), "wrong")


def test_settings_env_round_trips():
    s = Settings(budget_s=7.5, max_candidates=3, proposer="all", win_margin=0.05, cache_dir="/tmp/x",
                 llm_base_url="http://127.0.0.1:1/v1")
    env = schedule.settings_env(s)
    assert env["R1ATTN_BUDGET_S"] == "7.5" and "R1ATTN_LLM_API_KEY" not in env
    assert Settings.from_env(env) == s


# --------------------------------------------------------------------------------- scheduling
def test_three_gpus_twelve_jobs(fake_env):
    fake_env(SLEEP_S=0.15)
    jobs = distinct_jobs(12)
    results = run_jobs(jobs, [0, 1, 2], settings=Settings(budget_s=7.5), worker_cmd=FAKE, progress=False)
    assert [r.job.label for r in results] == [j.label for j in jobs]
    assert all(r.status == "kernel" and r.error is None for r in results), summary_table(results)
    assert {r.gpu for r in results} == {"0", "1", "2"}  # spread across every GPU
    for r in results:
        # each job ran in a worker pinned to its own GPU, with the caller's settings, on real kernels
        assert field(r.winner, "cvd") == r.gpu
        assert field(r.winner, "interp") == "<unset>"
        assert field(r.winner, "budget") == "7.5"
        assert field(r.winner, "label") == r.job.label
        assert r.speedup == 1.5 and r.best_baseline == "sdpa_flash" and r.seconds > 0
    assert sorted(a[0] for a in attempts(fake_env.state)) == sorted(j.label for j in jobs)  # each once


def test_pinning_follows_the_parents_own_cuda_visible_devices(fake_env, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    results = run_jobs(distinct_jobs(6), [0, 1], worker_cmd=FAKE, progress=False)
    assert {(r.gpu, field(r.winner, "cvd")) for r in results} <= {("0", "5"), ("1", "7")}
    assert all(r.status == "kernel" for r in results)


def test_crash_requeues_once_on_another_gpu(fake_env):
    fake_env(SLEEP_S=0.1, CRASH_ONCE="j4")
    results = run_jobs(distinct_jobs(9), [0, 1, 2], worker_cmd=FAKE, progress=False)
    assert all(r.status == "kernel" for r in results), summary_table(results)
    tries = [cvd for label, cvd in attempts(fake_env.state) if label == "j4"]
    assert len(tries) == 2
    r4 = next(r for r in results if r.job.label == "j4")
    assert r4.gpu == tries[1] != tries[0]  # completed by another GPU's worker
    assert len(attempts(fake_env.state)) == 10  # every other job ran exactly once


@pytest.mark.parametrize("max_requeue", [0, 1, 2])
def test_job_that_kills_every_worker_fails_after_requeues(fake_env, max_requeue):
    fake_env(CRASH_ALWAYS="j1")
    results = run_jobs(distinct_jobs(5), [0, 1, 2], worker_cmd=FAKE, progress=False, max_requeue=max_requeue)
    bad = results[1]
    assert bad.status == "failed" and bad.winner is None
    assert f"{max_requeue + 1} attempt(s) failed" in bad.error and "SIGKILL" in bad.error
    tries = [cvd for label, cvd in attempts(fake_env.state) if label == "j1"]
    assert len(tries) == max_requeue + 1
    assert len(set(tries)) == len(tries)  # each retry went to a GPU it had not killed yet
    assert all(r.status == "kernel" for i, r in enumerate(results) if i != 1), summary_table(results)


def test_requeued_job_waits_for_another_gpu_rather_than_rerun_where_it_died(fake_env):
    # j0 takes one GPU for 1.5 s; j1 kills the other GPU's worker. The restarted worker is idle
    # long before j0 finishes, yet j1 must go to the GPU it has not crashed.
    fake_env(SLOW="j0:1.5", CRASH_ONCE="j1")
    results = run_jobs(distinct_jobs(2), [0, 1], worker_cmd=FAKE, progress=False)
    assert [r.status for r in results] == ["kernel", "kernel"]
    log = attempts(fake_env.state)
    first_j1, last_j1 = [cvd for label, cvd in log if label == "j1"]
    assert first_j1 != last_j1 == results[1].gpu == results[0].gpu


def test_crash_with_one_gpu_is_retried_by_a_restarted_worker(fake_env):
    fake_env(CRASH_ONCE="j0")
    results = run_jobs(distinct_jobs(3), [0], worker_cmd=FAKE, progress=False)
    assert [r.status for r in results] == ["kernel"] * 3
    assert [a for a in attempts(fake_env.state) if a[0] == "j0"] == [("j0", "0"), ("j0", "0")]
    workers = [l for l in (fake_env.state / "pids.log").read_text().splitlines() if l.startswith("worker")]
    assert len(workers) == 2


def test_duplicate_signature_is_searched_once_reported_twice(fake_env):
    a, c = make_job("a", head_dim=32), make_job("c", head_dim=48)
    b = make_job("b", head_dim=32)  # same spec as "a" under another label
    assert a.spec.hash == b.spec.hash
    seen = []

    def on_result(r):
        seen.append(r.job.label)
        if r.job.label == "c":
            raise RuntimeError("a broken callback is logged, not raised")

    results = run_jobs([a, b, c, a], [0, 1], worker_cmd=FAKE, progress=False, on_result=on_result)
    assert [r.job.label for r in results] == ["a", "b", "c", "a"]
    assert sorted(seen) == ["a", "a", "b", "c"]  # every job, as its search ended
    assert sorted(x[0] for x in attempts(fake_env.state)) == ["a", "c"]
    ra, rb = results[0], results[1]
    assert ra.status == rb.status == "kernel" and ra.winner == rb.winner and ra.gpu == rb.gpu
    table = summary_table(results)
    assert "\nb " in table and "total: 4 job(s): 4 kernel" in table


def test_variant_tensors_reach_the_worker(fake_env):
    job = make_job("doc", variant=V.document(torch.tensor([0] * 20 + [1] * 44)))
    assert job.variant_tensors
    (r,) = run_jobs([job], [0], worker_cmd=FAKE, progress=False)
    assert r.status == "kernel", r.error  # the fake reports "failed" when the tensors file is missing


@pytest.mark.parametrize("gpus, want_gpu, want_cvd, want_interp", [
    ([0], "0", "0", "<unset>"),
    ([], "cpu", "", "1"),
])
def test_one_gpu_and_cpu_share_the_code_path(fake_env, monkeypatch, gpus, want_gpu, want_cvd, want_interp):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # inherited; a GPU worker must not time the interpreter
    calls = []
    orig = schedule._Scheduler.run

    def spy(self):
        calls.append([s.name for s in self.slots])
        return orig(self)

    monkeypatch.setattr(schedule._Scheduler, "run", spy)
    results = run_jobs(distinct_jobs(3), gpus, worker_cmd=FAKE, progress=False)
    assert calls == [[want_gpu]]
    for r in results:
        assert r.status == "kernel" and r.gpu == want_gpu
        assert field(r.winner, "cvd") == want_cvd and field(r.winner, "interp") == want_interp


def test_parallel_workers_beat_serial_time(fake_env):
    fake_env(SLEEP_S=0.5)
    t0 = time.monotonic()
    results = run_jobs(distinct_jobs(8), [0, 1, 2, 3], worker_cmd=FAKE, progress=False)
    elapsed = time.monotonic() - t0
    serial = 8 * 0.5
    assert all(r.status == "kernel" for r in results)
    assert elapsed < 0.6 * serial, f"{elapsed:.2f} s for 8 x 0.5 s jobs on 4 workers"
    assert len({r.gpu for r in results}) == 4


def test_hung_worker_is_killed_and_its_job_fails(fake_env, monkeypatch):
    fake_env(HANG="j0")
    monkeypatch.setattr(schedule, "_JOB_TIMEOUT_SLACK_S", 0.6)
    s = Settings(budget_s=0.1, verify_timeout_s=0.1)  # deadline: 0.1 + 2 * 0.1 + 0.6 = 0.9 s
    results = run_jobs(distinct_jobs(3), [0, 1], settings=s, worker_cmd=FAKE, progress=False)
    assert results[0].status == "failed" and "timed out after" in results[0].error
    assert len([a for a in attempts(fake_env.state) if a[0] == "j0"]) == 2
    assert [r.status for r in results[1:]] == ["kernel", "kernel"]


def test_worker_that_cannot_start_takes_its_gpu_out(fake_env):
    fake_env(FATAL_CVD="1", DIE_AT_START_CVD="2")
    results = run_jobs(distinct_jobs(6), [0, 1, 2], worker_cmd=FAKE, progress=False)
    assert all(r.status == "kernel" and r.gpu == "0" for r in results), summary_table(results)


def test_no_worker_can_start_every_job_fails_with_the_reason(fake_env):
    fake_env(FATAL_CVD="0", DIE_AT_START_CVD="1")
    results = run_jobs(distinct_jobs(3), [0, 1], worker_cmd=FAKE, progress=False)
    for r in results:
        assert r.status == "failed"
        assert "fake fatal on cvd 0" in r.error and "exit code 5" in r.error
        assert "dying before hello" in r.error  # the tail of the worker's log
    assert attempts(fake_env.state) == []


def test_junk_lines_on_the_protocol_are_ignored(fake_env, caplog):
    fake_env(JUNK="1", NEGATIVE="j1")
    results = run_jobs(distinct_jobs(2), [0], worker_cmd=FAKE, progress=False)
    assert [r.status for r in results] == ["kernel", "negative"]
    assert results[1].speedup == 0.9 and results[1].winner is None
    assert "non-protocol line" in caplog.text


def test_progress_without_tqdm_logs_each_job_and_a_heartbeat(fake_env, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes `import tqdm...` raise ImportError
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    monkeypatch.setattr(schedule, "_HEARTBEAT_S", 0.2)
    fake_env(SLOW="j0:0.8")
    caplog.set_level("INFO", logger="torch_r1attn.schedule")
    run_jobs(distinct_jobs(2), [0], worker_cmd=FAKE, progress=True)
    assert "[1/2] j0: kernel 1.50x vs sdpa_flash on gpu 0" in caplog.text
    assert "[2/2] j1: kernel" in caplog.text
    assert "0/2 done; running: 0:j0" in caplog.text


def test_progress_bar_with_tqdm(fake_env, capsys):
    pytest.importorskip("tqdm")
    run_jobs(distinct_jobs(3), [0, 1], worker_cmd=FAKE, progress=True)
    err = capsys.readouterr().err
    assert "prewarm" in err and "3/3" in err


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_keyboard_interrupt_kills_worker_process_groups(fake_env, monkeypatch):
    state = fake_env(SLEEP_S=30, GRANDCHILD="1")
    orig = schedule._Scheduler._check_deadlines

    def interrupt_once_busy(self):
        orig(self)
        if sum(w.state == "busy" for w in self.workers) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(schedule._Scheduler, "_check_deadlines", interrupt_once_busy)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_jobs(distinct_jobs(4), [0, 1], worker_cmd=FAKE, progress=False)
    assert time.monotonic() - t0 < 20
    pids = [int(l.split()[1]) for l in (state / "pids.log").read_text().splitlines()]
    assert len(pids) == 4  # two workers, each with a grandchild
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if _alive(p)]


# ------------------------------------------------------------------------------- summary table
def test_summary_table():
    j = make_job
    results = [
        JobResult(j("attn.prefill", 16), "0", "kernel", 1.42, "sdpa_cudnn", 41.0, None, "abc templates BLOCK_M=128"),
        JobResult(j("attn.decode", 32), "1", "negative", 0.97, "sdpa_flash", 12.5, None, None),
        JobResult(j("attn.local", 48), "0", "cached", None, None, 0.4, None, "def llm"),
        JobResult(j("attn.doc", 64), "1", "failed", None, None, 3.0, "2 attempt(s) failed:\nworker died", None),
        JobResult(j("attn.decode2", 32), "1", "negative", 0.97, "sdpa_flash", 12.5, None, None),  # decode's twin
    ]
    t = summary_table(results)
    lines = t.splitlines()
    assert lines[0].split() == ["label", "gpu", "status", "speedup", "baseline", "seconds", "winner", "/", "error"]
    assert lines[2].split()[:6] == ["attn.prefill", "0", "kernel", "1.42x", "sdpa_cudnn", "41.0"]
    assert lines[3].split()[:6] == ["attn.decode", "1", "negative", "0.97x", "sdpa_flash", "12.5"]
    assert "2 attempt(s) failed: worker died" in lines[5]
    assert "gpu 0: 2 job(s) (1 kernel, 1 cached), 41.4 s" in t
    assert "gpu 1: 3 job(s) (2 negative, 1 failed), 15.5 s" in t  # the duplicate's time counted once
    assert t.endswith("total: 5 job(s): 1 kernel, 2 negative, 1 cached, 1 failed")
    assert summary_table([]) == "no prewarm jobs"
    cpu = summary_table([JobResult(j("x"), "cpu", "kernel", float("nan"), None, 1.0, None, None)])
    assert "cpu: 1 job(s) (1 kernel)" in cpu and " - " in cpu.splitlines()[2]


# ----------------------------------------------------------------------- the library's own worker
_LOOP_WORKER = textwrap.dedent("""
    import os, sys
    from torch_r1attn import schedule

    def startup():
        print("chatter on stdout at startup")
        return {"device": "test-loop"}

    def handle(msg):
        print("library print while searching", msg["label"])
        os.write(1, b"C-level write without newline")
        if msg["label"] == "boom":
            raise RuntimeError("kernel exploded")
        return {"status": "kernel", "speedup": 2.0, "best_baseline": "eager", "winner": "w-" + msg["label"]}

    sys.exit(schedule._worker_loop(handle, startup))
""")


@pytest.mark.slow
def test_worker_loop_keeps_stdout_noise_off_the_protocol(fake_env, caplog, monkeypatch):
    # a corrupted result line would be lost: a short job deadline turns that into a failure, not a hang
    monkeypatch.setattr(schedule, "_JOB_TIMEOUT_SLACK_S", 20.0)
    s = Settings(budget_s=1.0, verify_timeout_s=1.0)
    jobs = [make_job("x", 16), make_job("boom", 32), make_job("y", 48)]
    results = run_jobs(jobs, [], settings=s, worker_cmd=[sys.executable, "-c", _LOOP_WORKER], progress=False)
    assert [(r.status, r.winner) for r in results[::2]] == [("kernel", "w-x"), ("kernel", "w-y")]
    assert results[1].status == "failed" and results[1].error == "RuntimeError: kernel exploded"
    assert "non-protocol line" not in caplog.text


@pytest.mark.slow
def test_real_worker_reports_cached_entries(cache_dir):
    cache = pytest.importorskip("torch_r1attn.cache", reason="torch_r1attn.cache is not available yet")
    from torch_r1attn.spec import device_fingerprint

    # the CPU worker sees no GPU even on a GPU host, so it reads the CPU shard of the cache
    versions = {k: device_fingerprint()[k] for k in ("torch", "triton", "cuda")}
    c = cache.KernelCache(root=cache_dir, fingerprint={**versions, "device": "cpu-interpreter", "cc": "none"})
    neg = make_job("neg", 16)
    c.store_negative(neg.spec, {"reason": "test", "best_baseline": "sdpa_math"})
    var = V.causal()
    pos = make_job("pos", 32, var)
    q, k, v = (torch.randn(1, 2, 8, 32, dtype=torch.float16) for _ in range(3))
    c.store(pos.spec, "def forward(q, k, v, out, scale):\n    out.copy_(q)\n", "triton",
            {"config": {"BLOCK_M": 16, "num_warps": 4},
             "measurements": {"time_ms": 1.0, "baselines_ms": {"sdpa_flash": 1.3, "eager": 4.0}, "speedup": 1.3},
             "provenance": {"proposer": "templates", "candidate_hash": "0123456789abcdef"}},
            cache.make_check_case(q, k, v, var, 32 ** -0.5))
    results = run_jobs([neg, pos], [], progress=False)  # the real default worker command
    by = {r.job.label: r for r in results}
    assert by["neg"].status == "cached" and by["neg"].gpu == "cpu", by["neg"].error
    assert by["neg"].best_baseline == "sdpa_math" and by["neg"].winner is None
    assert by["pos"].status == "cached", by["pos"].error
    assert by["pos"].speedup == 1.3 and by["pos"].best_baseline == "sdpa_flash"
    assert by["pos"].winner == "0123456789abcdef templates BLOCK_M=16,num_warps=4"


@pytest.mark.slow
def test_real_worker_searches_on_cpu_then_reports_cached(cache_dir):
    """The whole path on the CPU: interpreter-mode worker, templates search, cache, then a hit."""
    # two signatures in one worker: its verifier pool (and the spare fresh worker) serve both
    job, other = make_job("causal", 32), make_job("sliding", 32, V.sliding_window(8))
    s = Settings(budget_s=60.0, max_candidates=2, rounds=1, samples=2, workers=1, cache_dir=str(cache_dir))
    first, first_other = run_jobs([job, other], [], settings=s, progress=False)
    for r in (first, first_other):
        assert r.status in ("kernel", "negative"), r.error
        assert r.gpu == "cpu" and r.error is None
    (second,) = run_jobs([job], [], settings=s, progress=False)
    assert second.status == "cached", second.error
    if first.status == "kernel":
        assert second.winner.split()[0] == first.winner.split()[0]  # the same candidate, from the cache


# ------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.slow
def test_prewarm_on_every_gpu(cache_dir):
    """Real searches, one worker per visible GPU; a second run finds everything cached."""
    gpus = parse_gpus("all")
    sigs = [
        ("causal", V.causal(), (4, 32, 8, 2048, 2048)),
        ("sliding", V.sliding_window(512), (4, 32, 8, 2048, 2048)),
        ("softcap", V.causal() + V.softcap(50.0), (2, 32, 32, 1024, 1024)),
        ("decode", V.causal("bottom_right"), (8, 32, 8, 1, 4096)),
    ]
    jobs = []
    for label, var, (B, Hq, Hkv, Sq, Sk) in sigs:
        spec = AttentionSpec("bf16", 128, 128, Hq // Hkv, var.key, length_bucket(Sq), length_bucket(Sk),
                             example=(B, Hq, Hkv, Sq, Sk))
        jobs.append(PrewarmJob.from_variant(spec, var, label))
    # short searches: this tests the scheduler (placement, results, the cached second run), not speed
    s = Settings(budget_s=5.0, samples=2, rounds=1, max_candidates=2, cache_dir=str(cache_dir))
    t0 = time.monotonic()
    results = run_jobs(jobs, gpus, settings=s, progress=False)
    print(summary_table(results), f"\n{time.monotonic() - t0:.1f} s on {len(gpus)} GPU(s)")
    assert all(r.status in ("kernel", "negative") for r in results), summary_table(results)
    assert {r.gpu for r in results} <= {str(g) for g in gpus}
    if len(gpus) > 1:
        assert len({r.gpu for r in results}) > 1
    again = run_jobs(jobs, gpus, settings=s, progress=False)
    assert [r.status for r in again] == ["cached"] * len(jobs), summary_table(again)
