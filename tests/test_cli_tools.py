"""``r1attn prewarm --dry-run``, ``r1attn doctor`` and the prewarm hand-off to the scheduler."""

import http.server
import json
import threading

import pytest

from torch_r1attn import cli, config


@pytest.fixture(autouse=True)
def _isolated(cache_dir, monkeypatch):
    monkeypatch.delenv("R1ATTN_LLM_BASE_URL", raising=False)
    config.set_settings(None)
    yield
    config.set_settings(None)


def test_prewarm_dry_run_lists_signatures(capsys):
    rc = cli.main(["prewarm", "--model-type", "llama", "--hidden-size", "4096", "--heads", "32", "--kv-heads", "8",
                   "--layers", "32", "--seq-lens", "1024,4096", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "4 signature(s)" in out
    assert "attn_bf16_dqk128_dv128_g4_sq1024_sk1024_causal" in out
    assert "attn_bf16_dqk128_dv128_g4_sq1_sk4096_causal@br" in out


def test_prewarm_hands_jobs_to_scheduler(monkeypatch, capsys):
    from torch_r1attn import schedule

    seen = {}

    def fake_run_jobs(jobs, gpus, settings=None, progress=True):
        seen.update(jobs=jobs, gpus=gpus, settings=settings)
        return [schedule.JobResult(job=j, gpu="cpu", status="cached", seconds=0.0) for j in jobs]

    monkeypatch.setattr(schedule, "run_jobs", fake_run_jobs)
    rc = cli.main(["prewarm", "--model-type", "mistral", "--hidden-size", "64", "--heads", "4", "--layers", "2",
                   "--sliding-window", "16", "--seq-lens", "64", "--no-decode", "--budget", "7", "--proposer", "llm",
                   "--gpus", "none"])
    assert rc == 0
    assert [j.spec.variant for j in seen["jobs"]] == ["sw16"]
    assert seen["gpus"] == [] and seen["settings"].budget_s == 7 and seen["settings"].proposer == "llm"
    assert seen["jobs"][0].variant_recipe["parts"] == [{"type": "sliding_window", "size": 16}]
    assert "cached" in capsys.readouterr().out


def test_prewarm_argument_errors(capsys):
    assert cli.main(["prewarm", "--seq-lens", "64", "--dry-run"]) == 2
    assert "--config" in capsys.readouterr().err
    assert cli.main(["prewarm", "--model-type", "llama", "--heads", "4", "--hidden-size", "64",
                     "--seq-lens", "x", "--dry-run"]) == 2


def test_doctor_text(capsys, cache_dir):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "torch " in out and "triton " in out
    assert f"cache: {cache_dir}" in out and "[ok] cache" in out
    assert "R1ATTN_LLM_BASE_URL not set" in out
    assert "soft-cap" in out and "eager" in out  # CPU: SDPA cannot express soft-capping
    assert "[--] C++ fast path: off" in out  # the tests' default (conftest)


def test_doctor_reports_the_fast_path(capsys, cache_dir, monkeypatch, tmp_path):
    from torch_r1attn import config, hotpath

    monkeypatch.setenv("R1ATTN_HOTPATH", "auto")
    config.set_settings(None)
    assert cli.main(["doctor"]) == 0
    assert "C++ fast path: not built yet" in capsys.readouterr().out
    lib = hotpath._library(hotpath.build_dir(cache_dir))
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"")
    assert cli.main(["doctor"]) == 0
    assert f"[ok] C++ fast path: built ({lib})" in capsys.readouterr().out
    monkeypatch.setattr(hotpath, "find_cxx", lambda: None)
    lib.unlink()
    assert cli.main(["doctor"]) == 0
    assert "[!!] C++ fast path: no C++ compiler" in capsys.readouterr().out


def test_doctor_flags_group_writable_cache(capsys, cache_dir):
    cache_dir.chmod(0o777)
    try:
        cli.main(["doctor"])
    finally:
        cache_dir.chmod(0o700)
    assert "writable by other users" in capsys.readouterr().out


class _Models(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body = json.dumps({"data": [{"id": "deepseek-ai/deepseek-r1"}]}).encode()
        self.send_response(200 if self.path.endswith("/models") else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def test_doctor_llm_endpoint(monkeypatch, capsys):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Models)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("R1ATTN_LLM_BASE_URL", f"http://127.0.0.1:{srv.server_port}/v1")
        config.set_settings(None)
        assert cli.main(["doctor", "--json"]) == 0
        rep = json.loads(capsys.readouterr().out)
        assert rep["llm"]["reachable"] is True and "listed" in rep["llm"]["detail"]
    finally:
        srv.shutdown()
        srv.server_close()
    # a closed port: reported unreachable, quickly
    monkeypatch.setenv("R1ATTN_LLM_BASE_URL", f"http://127.0.0.1:{srv.server_port}/v1")
    config.set_settings(None)
    cli.main(["doctor", "--json"])
    rep = json.loads(capsys.readouterr().out)
    assert rep["llm"]["reachable"] is False


@pytest.mark.slow
def test_demo_on_cpu_shows_verdicts(tmp_path):
    """The demo re-executes itself with TRITON_INTERPRET=1 and prints each candidate's verdict."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["R1ATTN_CACHE_DIR"] = str(tmp_path / "c")
    out = subprocess.run([sys.executable, "-m", "torch_r1attn.cli", "demo", "--fresh"], env=env,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "CPU (Triton interpreter)" in out.stdout
    assert "[causal]" in out.stdout and "[sliding window 8]" in out.stdout
    assert "verdict:" in out.stdout and "summary" in out.stdout
