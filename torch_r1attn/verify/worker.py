"""Isolated candidate runs: the worker process (``python -m torch_r1attn.verify.worker``) and
the parent's handle on it (:class:`WorkerProcess`).

Why a fresh interpreter per worker (not ``fork``): each worker gets its own CUDA context, so a
candidate's illegal memory access (a *sticky* error that poisons the whole context) or a
segfault dies with the worker, and the caller's process and context are unharmed. Each worker
leads its own session/process group (``start_new_session=True``), so a hang is killed with
everything it spawned (``os.killpg``).

Protocol. The parent writes a job directory (the candidate source, ``job.json``) next to a
problem directory shared by jobs of one problem (``inputs.safetensors``, ``problem.json``); it
sends ``job <path>`` on the worker's stdin. The worker answers with JSON lines on a private
pipe (the original stdout, which it duplicates and then points fd 1 at stderr, so a candidate's
prints cannot forge a message):

    {"ev": "ready"}                          once, after imports (and ceilings, on the GPU: measuring
                                             them, the worker first asks for the exclusive lock)
    {"ev": "phase", "phase": "..."}          progress, so a timeout can say where it hung
    {"ev": "lock", "mode": "shared"|"exclusive"}   asks for the device; parent answers "ok"
    {"ev": "done", "fatal": bool}            results are in the job directory

Results: ``out.safetensors`` (every call's ``out`` read in stream order, the last call's ``out``
after a device sync, every input as it is after the run, the re-check after timing) and
``result.json`` (how far it got, exceptions, timings). The worker judges nothing: the verdict is
computed by the parent (:mod:`.check`) from these raw tensors.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 300.0  # importing torch+triton and measuring ceilings on a cold machine


class WorkerDied(RuntimeError):
    """The worker exited or closed its pipe without finishing the job."""


class WorkerTimeout(RuntimeError):
    """The worker did not answer within the wall-clock limit."""


def _package_root() -> str:
    return str(Path(__file__).resolve().parents[2])


def _phase_bucket(phase: str) -> str:
    """The report's name for a worker phase ("trial 2 (edge ...) call 1" -> "trials"; the first
    call of the first trial is "first_call": a Triton kernel compiles there)."""
    if phase.startswith("trial"):
        return "first_call" if phase.startswith("trial 0 ") and phase.endswith(" call 1") else "trials"
    return {"submit": "inputs", "load": "import", "timing setup": "timing_setup", "timing": "timing",
            "recheck after timing": "recheck", "write outputs": "write"}.get(phase, "other")


class WorkerProcess:
    """The parent's handle on one worker subprocess."""

    def __init__(self, log_path: Path, device: str, env: dict[str, str] | None = None,
                 ceilings_path: Path | None = None):
        self.log_path = Path(log_path)
        self.device = device
        e = dict(os.environ if env is None else env)
        root = _package_root()
        e["PYTHONPATH"] = root + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
        if not device.startswith("cuda"):
            e["TRITON_INTERPRET"] = "1"  # Triton kernels only run on the CPU under the interpreter
        e["PYTHONUNBUFFERED"] = "1"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "torch_r1attn.verify.worker", device]
            + ([str(ceilings_path)] if ceilings_path else []),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=e,
            start_new_session=True, cwd=str(self.log_path.parent),
        )
        self._buf = b""
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)
        self.ready = False
        self.faulted = False
        self.jobs = 0
        self.last_phase = "startup"
        # seconds per phase of the last job (compile, trials, timing, recheck, write, lock_wait):
        # where a verification spends its time, for the search report and the logs
        self.last_phases: dict[str, float] = {}

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None and not self.faulted

    def log_offset(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_tail(self, since: int = 0, limit: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                data = f.read()
        except OSError:
            return ""
        return data[-limit:].decode("utf-8", "replace")

    def _readline(self, deadline: float) -> dict[str, Any]:
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerTimeout(f"no answer within the time limit (last phase: {self.last_phase})")
            if not self._sel.select(timeout=min(left, 1.0)):
                if self.proc.poll() is not None:
                    raise WorkerDied(self._death())
                continue
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                self.proc.wait(timeout=10)
                raise WorkerDied(self._death())
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except ValueError:
            raise WorkerDied(f"garbled message from worker: {line[:200]!r}") from None
        if not isinstance(msg, dict):
            raise WorkerDied(f"garbled message from worker: {line[:200]!r}")
        return msg

    def _death(self) -> str:
        rc = self.proc.poll()
        if rc is None:
            return f"worker closed its pipe (last phase: {self.last_phase})"
        if rc < 0:
            try:
                sig = signal.Signals(-rc).name
            except ValueError:
                sig = str(-rc)
            return f"worker killed by signal {sig} (last phase: {self.last_phase})"
        return f"worker exited with status {rc} before reporting (last phase: {self.last_phase})"

    def _send(self, text: str) -> None:
        try:
            self.proc.stdin.write(text.encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise WorkerDied(f"cannot talk to worker ({e}); {self._death()}") from None

    def _grant(self, msg: dict, held: Callable[[], None] | None,
               acquire: Callable[[str], Callable[[], None]] | None,
               default_mode: str) -> tuple[Callable[[], None] | None, float]:
        """Answer a worker's ``lock`` request: drop the lock it ``held``, take the one it asks for
        (``acquire(mode)``; none when ``acquire`` is None), tell it ``ok``. Returns the new release
        function and the seconds spent waiting, which do not count against the job's limit."""
        if held is not None:
            held()
        t0 = time.monotonic()
        release = acquire(str(msg.get("mode", default_mode))) if acquire is not None else None
        waited = time.monotonic() - t0
        self._send("ok")
        return release, waited

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S,
                   acquire: Callable[[str], Callable[[], None]] | None = None) -> None:
        """Wait for the worker's ``ready``. A worker that must measure the device ceilings first
        asks for the device (``lock``): ``acquire(mode)`` grants it (the pool's device lock, so
        no other worker of the pool runs on the GPU while it measures), held until ``ready``;
        time spent waiting for it does not count against ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        release: Callable[[], None] | None = None
        try:
            while True:
                msg = self._readline(deadline)
                if msg.get("ev") == "lock":
                    held, release = release, None  # released in _grant, even if acquiring fails
                    release, waited = self._grant(msg, held, acquire, "exclusive")
                    deadline += waited
                    continue
                if msg.get("ev") != "ready":
                    raise WorkerDied(f"worker did not start: {msg}")
                break
        finally:
            if release is not None:
                release()
        self.ready = True
        self.last_phase = "idle"

    def run_job(self, job_dir: Path, timeout_s: float, acquire: Callable[[str], Callable[[], None]]) -> dict:
        """Run one job; returns the worker's ``done`` message.

        ``acquire(mode)`` blocks until the device may be used in ``mode`` and returns the
        release function; time spent waiting for it does not count against ``timeout_s``.

        Raises:
            WorkerTimeout: the job ran past ``timeout_s`` (the caller kills the worker).
            WorkerDied: the worker died or closed its pipe (crash, ``os._exit``).
        """
        if not self.ready:
            self.wait_ready(acquire=acquire)
        self.jobs += 1
        self.last_phase = "submit"
        deadline = time.monotonic() + timeout_s
        release: Callable[[], None] | None = None
        phases: dict[str, float] = {}
        self.last_phases = phases
        mark = time.monotonic()

        def charge(now: float) -> None:
            nonlocal mark
            b = _phase_bucket(self.last_phase)
            phases[b] = phases.get(b, 0.0) + (now - mark)
            mark = now

        self._send(f"job {job_dir}")
        try:
            while True:
                msg = self._readline(deadline)
                ev = msg.get("ev")
                if ev == "phase":
                    charge(time.monotonic())
                    self.last_phase = str(msg.get("phase"))[:200]
                elif ev == "lock":
                    charge(time.monotonic())
                    held, release = release, None  # released in _grant, even if acquiring fails
                    release, waited = self._grant(msg, held, acquire, "shared")
                    mark = time.monotonic()
                    phases["lock_wait"] = phases.get("lock_wait", 0.0) + waited
                    deadline += waited
                elif ev == "done":
                    charge(time.monotonic())
                    if msg.get("fatal"):
                        self.faulted = True
                    self.last_phase = "idle"
                    return msg
        finally:
            if release is not None:
                release()

    def kill(self) -> None:
        """Kill the worker's whole process group (it leads its own session) and reap it."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            log.warning("verifier worker %d did not die after SIGKILL", self.proc.pid)
        self._close_files()

    def request_quit(self) -> None:
        """Ask the worker to quit without waiting (several then exit side by side)."""
        if self.proc.poll() is None:
            try:
                self._send("quit")
            except WorkerDied:
                pass

    def close(self, timeout_s: float = 5.0) -> None:
        """Ask the worker to quit; kill it if it has not within ``timeout_s``."""
        self.request_quit()
        try:
            self.proc.wait(timeout=max(0.0, timeout_s))
        except subprocess.TimeoutExpired:
            pass
        self.kill()

    def _close_files(self) -> None:
        try:
            self._sel.close()
        except (OSError, ValueError, KeyError):
            pass
        for f in (self.proc.stdin, self.proc.stdout, self._log):
            try:
                if f:
                    f.close()
            except OSError:
                pass


# ======================================================================= the worker process
class _Worker:
    def __init__(self, device: str, proto) -> None:
        self.device = device
        self.proto = proto
        self.cuda = device.startswith("cuda")
        self.ceilings: dict | None = None
        # problem dir -> (baselines_ms, notes). Baselines are timed once per worker and problem on
        # the same fixed-seed inputs every candidate is timed on: re-timing them per candidate
        # cost ~5 s each on the H200 (compiled Flex + 3 SDPA backends) and measured the same
        # numbers to within 1% (repeat test in tests/test_verify_gpu.py). A fresh worker (the
        # winner's re-verification) times them again.
        self.baseline_cache: dict[str, tuple[dict, list]] = {}

    def send(self, **msg) -> None:
        self.proto.write(json.dumps(msg) + "\n")
        self.proto.flush()

    def phase(self, p: str) -> None:
        self.send(ev="phase", phase=p)

    def lock(self, mode: str) -> None:
        self.send(ev="lock", mode=mode)
        line = sys.stdin.readline()
        if line.strip() != "ok":
            raise SystemExit(0)  # the parent is gone

    def sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()

    def run(self, job_dir: Path) -> bool:
        """Run one job; True when the process must exit afterwards (a fault poisoned it)."""
        import torch
        from safetensors.torch import load_file, save_file

        job = json.loads((job_dir / "job.json").read_text())
        pdir = Path(job["problem_dir"])
        pmeta = json.loads((pdir / "problem.json").read_text())
        report: dict[str, Any] = {"trials_done": 0, "stage": "load", "recheck_expected": False, "notes": []}
        outs: dict[str, torch.Tensor] = {}
        fatal = False
        self.lock("shared")
        try:
            inputs = load_file(str(pdir / "inputs.safetensors"))
            from ..loader import load_source_file

            self.phase("load")
            try:
                kern = load_source_file(job["candidate"], job["language"], job.get("name_hint", "candidate"))
            except BaseException as e:  # noqa: BLE001 - whatever the import does is the candidate's fault
                report.update(stage="load", error=_excerpt(e), error_type=type(e).__name__)
                return self._finish(job_dir, report, outs, save_file)
            report["stage"] = "run"
            dev = torch.device(self.device)
            first_call = True
            from .check import as_layout

            for i, t in enumerate(pmeta["trials"]):
                layout = t.get("layout", "bhsd")
                q, k, v = (as_layout(inputs[f"t{i}.{r}"].to(dev), layout) for r in "qkv")
                vt = {n: inputs[f"t{i}.vt.{n}"].to(dev) for n in t["tensors"]}
                why = kern.unsupported(q, k, v)
                if why is not None:
                    report.update(unsupported=f"{t['name']}: SUPPORTS excludes this call ({why})")
                    break
                out = None
                for j in range(int(t["calls"])):
                    self.phase(f"trial {i} ({t['name']}) call {j + 1}")
                    out = as_layout(torch.full(q.shape[:-1] + (v.shape[-1],), float("nan"), dtype=q.dtype,
                                               device=dev), layout)
                    try:
                        out = kern(q, k, v, out, float(t["scale"]), **vt)  # out, or what it returned
                        # read out in stream order (no sync first): side-stream work shows here
                        outs[f"t{i}.c{j}"] = out.clone()
                        self.sync()
                    except BaseException as e:  # noqa: BLE001
                        report.update(error=_excerpt(e), error_type=type(e).__name__, error_trial=t["name"],
                                      first_call=first_call)
                        fatal = _is_fatal(e)
                        return self._finish(job_dir, report, outs, save_file, fatal)
                    first_call = False
                outs[f"t{i}.final"] = out
                for r, x in (("q", q), ("k", k), ("v", v), *vt.items()):
                    outs[f"t{i}.in.{r}"] = x
                report["trials_done"] = i + 1
            else:
                if job.get("timing") and self.cuda:
                    report["stage"] = "timing"
                    report["recheck_expected"] = bool(job.get("recheck", True))
                    try:
                        # inputs, rotation copies and the baselines' first calls (FlexAttention
                        # compiles there) under the shared lock: other workers' trials go on;
                        # the exclusive lock only for the timed loops
                        self.phase("timing setup")
                        ctx = self._timing_setup(kern, pmeta, job)
                        self.lock("exclusive")
                        self.phase("timing")
                        report["timing"] = self._time(ctx)
                    except BaseException as e:  # noqa: BLE001
                        report.update(error=_excerpt(e), error_type=type(e).__name__, error_trial="timing")
                        fatal = _is_fatal(e)
                        return self._finish(job_dir, report, outs, save_file, fatal)
                    self.lock("shared")
                    if job.get("recheck", True):
                        self.phase("recheck after timing")
                        t = pmeta["trials"][0]
                        q, k, v = (inputs[f"t0.{r}"].to(dev) for r in "qkv")
                        vt = {n: inputs[f"t0.vt.{n}"].to(dev) for n in t["tensors"]}
                        out = torch.full(q.shape[:-1] + (v.shape[-1],), float("nan"), dtype=q.dtype, device=dev)
                        try:
                            out = kern(q, k, v, out, float(t["scale"]), **vt)
                            self.sync()
                        except BaseException as e:  # noqa: BLE001
                            report.update(error=_excerpt(e), error_type=type(e).__name__, error_trial="recheck")
                            fatal = _is_fatal(e)
                            return self._finish(job_dir, report, outs, save_file, fatal)
                        outs["recheck"] = out
                report["stage"] = "done"
            return self._finish(job_dir, report, outs, save_file)
        except BaseException as e:  # noqa: BLE001 - worker-side failure outside the candidate's calls
            report.update(error=_excerpt(e), error_type=type(e).__name__)
            return self._finish(job_dir, report, {}, save_file, _is_fatal(e))

    def _finish(self, job_dir: Path, report: dict, outs: dict, save_file, fatal: bool = False) -> bool:
        report["fatal"] = fatal
        self.phase("write outputs")
        if outs and not fatal:
            cpu = {n: t.detach().to("cpu").contiguous() for n, t in outs.items()}
            save_file(cpu, str(job_dir / "out.safetensors"))
        (job_dir / "result.json").write_text(json.dumps(report))
        return fatal

    def _timing_setup(self, kern, pmeta: dict, job: dict) -> dict:
        """Everything timing needs that may share the GPU: the timing inputs and their rotation
        copies and, when this job times the baselines, each baseline run once (compiled)."""
        from ..problem import Problem, variant_from_recipe, variant_has_opaque
        from ..spec import AttentionSpec
        from . import timing
        from .check import random_qkv

        from safetensors.torch import load_file

        pdir = Path(job["problem_dir"])
        rt = load_file(str(pdir / "recipe.safetensors")) if (pdir / "recipe.safetensors").exists() else {}
        spec = AttentionSpec.from_dict(pmeta["spec"])
        variant = variant_from_recipe(pmeta["recipe"], rt, device="cpu")
        shape = tuple(pmeta["shape"])
        prob = Problem(spec=spec, variant=variant, shape=shape, device=self.device)
        tv = prob.timing_variant(int(pmeta["timing_seed"]), device=self.device)
        vt = {n: t.contiguous() for n, t in tv.tensors().items()}
        q, k, v = (x.to(self.device) for x in random_qkv(shape, spec.torch_dtype, "normal", int(pmeta["timing_seed"]),
                                                          spec.head_dim_v, spec.head_dim))
        scale = float(pmeta["scale"])
        ctx: dict[str, Any] = {"bench": pmeta["bench"], "pdir": str(pdir),
                               "baselines": bool(job.get("baselines", True))}
        why = kern.unsupported(q, k, v)
        if why is not None:
            ctx["unsupported"] = f"timing shape {shape}: SUPPORTS excludes it ({why})"
            return ctx
        set_bytes = sum(x.numel() * x.element_size() for x in (q, k, v)) + q.numel() // q.shape[-1] * v.shape[-1] * q.element_size()
        sets = timing.make_timing_sets(q, k, v, timing.rotation_count(set_bytes, int(pmeta["rotate_bytes"])))

        def cand(qq, kk, vv, oo):
            return kern(qq, kk, vv, oo, scale, **vt)

        ctx.update(sets=sets, cand=cand)
        if ctx["baselines"]:
            flex_here = not variant_has_opaque(tv)
            ctx["flex_in_parent"] = not flex_here
            if str(pdir) not in self.baseline_cache:
                ctx["runners"], ctx["base_notes"] = timing.baseline_runners(sets, tv, scale, flex=flex_here)
        self.sync()
        return ctx

    def _time(self, ctx: dict) -> dict:
        """The timed loops: the candidate, then (when asked) the baselines. Holds the device."""
        from . import timing

        if "unsupported" in ctx:
            return {"unsupported": ctx["unsupported"]}
        sets, bk = ctx["sets"], ctx["bench"]
        res = timing.bench(ctx["cand"], sets, **bk)
        self.sync()
        report = {"time_ms": res["median_ms"], "p20_ms": res["p20_ms"], "p80_ms": res["p80_ms"],
                  "reps": res["reps"], "n_sets": len(sets)}
        if ctx["baselines"]:
            cached = self.baseline_cache.get(ctx["pdir"])
            if cached is None:
                base_notes = list(ctx["base_notes"])
                cached = self.baseline_cache[ctx["pdir"]] = (timing.time_runners(ctx["runners"], sets, bk, base_notes),
                                                              base_notes)
            base, notes = cached[0], list(cached[1])
            if ctx["flex_in_parent"]:
                notes.append("flex: the variant's callable is not importable in the worker")
                report["flex_in_parent"] = True
            report["baselines_ms"] = base
            report["notes"] = notes
        return report


def _is_fatal(e: BaseException) -> bool:
    """A CUDA error is sticky: the context is unusable afterwards, so the worker must go."""
    from .timing import is_sticky_cuda_error

    return is_sticky_cuda_error(e)


def _excerpt(e: BaseException, limit: int = 2500) -> str:
    """The exception with the frames that matter (the candidate's), bounded."""
    tb = traceback.format_exception(type(e), e, e.__traceback__)
    text = "".join(tb[-8:])
    return text if len(text) <= limit else "..." + text[-limit:]


def main(argv: list[str]) -> int:
    device = argv[1] if len(argv) > 1 else "cpu"
    # private protocol pipe; fd 1 (what a candidate's print writes to) goes to the log instead
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="[worker %(process)d] %(message)s")
    import torch  # noqa: F401 - imported before the candidate so its cost is not charged to it

    import triton  # noqa: F401

    from safetensors.torch import save_file  # noqa: F401

    w = _Worker(device, proto)
    if w.cuda:
        torch.cuda.init()
        if len(argv) > 2:  # measured before any candidate is loaded, so none can tamper with it
            from ..spec import device_fingerprint
            from . import timing

            path, name = Path(argv[2]), device_fingerprint()["device"]
            w.ceilings = timing.load_ceilings(path, name)
            if w.ceilings is None:
                # measured with the GPU to ourselves: other workers' checks and timings would
                # make the ceilings look low, and correct fast kernels "implausible"
                w.lock("exclusive")
                w.ceilings = timing.load_or_measure_ceilings(path, name)
    w.send(ev="ready", pid=os.getpid())
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "quit" or not cmd:
            break
        if cmd != "job":
            continue
        fatal = w.run(Path(arg))
        w.send(ev="done", fatal=fatal)
        if fatal:
            os._exit(3)  # a poisoned CUDA context cannot be trusted for the next candidate
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
