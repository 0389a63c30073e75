"""Prewarm scheduling: one search worker per GPU, one shared queue of signatures.

A model has tens of signatures (layer types x prefill/decode x length buckets); searching them one
after another on one GPU takes tens of minutes. :func:`run_jobs` starts one *search worker*
subprocess per GPU, each pinned with ``CUDA_VISIBLE_DEVICES`` (so a candidate and its baselines
are always timed on the same GPU, and the worker's own verifier subprocesses inherit the pin),
and hands signatures to whichever worker is idle (a fast GPU takes more). Every worker writes into
the one cache; the cache's per-key locks make that safe, and each worker computes its own device
fingerprint, so GPUs of different types fill their own shards.

The same code path serves N GPUs, one GPU, and none (the CPU: one worker named ``cpu``, no GPU
visible to it, Triton's interpreter on).

Failure policy:

* a worker that dies (EOF on its result channel, any exit code) or overruns the job deadline has
  its in-flight job re-queued ``max_requeue`` times (default once), preferring another GPU; after
  that the job is reported ``failed`` with every attempt's reason and the run goes on;
* a dead worker is restarted in its slot while work remains; a worker that fails *before* it is
  ready (no ``hello``, a ``fatal`` message, another protocol version), or a slot whose workers die
  :data:`_MAX_CONSECUTIVE_DEATHS` times in a row, takes that slot out of the run; when no slot is
  left the remaining jobs are reported ``failed`` with the reasons;
* jobs with the same ``spec.hash`` are searched once and reported under each label;
* ``KeyboardInterrupt`` (or any error in the parent) kills every worker's process group.

Worker protocol (version :data:`PROTOCOL_VERSION`), JSON lines, one object per line::

    parent -> worker  (stdin)   {"type": "job", "id": 3, "label": "...", "spec": spec.to_dict(),
                                 "variant_recipe": {...}, "tensors_path": "/tmp/.../3.safetensors" | null}
                                 EOF on stdin = finish and exit 0.
    worker -> parent  (stdout)  {"type": "hello", "protocol": 1, "pid": 123, "device": "..."}   once, when ready
                                {"type": "result", "id": 3, "status": "kernel|negative|cached|failed",
                                 "speedup": 1.4 | null, "best_baseline": "..." | null,
                                 "winner": "..." | null, "error": "..." | null}
                                {"type": "fatal", "error": "..."}   cannot work at all, then exits

The real worker (``python -m torch_r1attn.schedule worker``) keeps the protocol on a private
duplicate of its original stdout and points fd 1 at stderr before it says hello, so ``print``
calls or C-level writes from torch/Triton/kernels during a search can never corrupt a result line
(anything written before that, during imports, reaches the parent as a non-protocol line, which it
logs and ignores); it also moves stdin to a private fd so no grandchild can read job lines. Settings reach the workers
as ``R1ATTN_*`` environment variables (see :func:`settings_env`). Each worker's stderr goes to a
log file in the run's private temp directory; when a worker dies, the tail of that log is part of
the job's error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .config import Settings
from .config import settings as current_settings
from .spec import AttentionSpec

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
STATUSES = ("kernel", "negative", "cached", "failed")
CPU_SLOT = "cpu"

# A worker imports torch + triton and may initialise CUDA before its hello: ~2 s on a CPU box,
# up to a minute on a cold GPU node with a slow filesystem. Five minutes means "hung".
_STARTUP_TIMEOUT_S = 300.0
# Added to the job deadline on top of the search's own limits: worker-side cache I/O, building the
# problem, and the winner's re-verification in a fresh verifier process (a cold Triton compile).
_JOB_TIMEOUT_SLACK_S = 600.0
# A slot whose worker dies this many times in a row without finishing a job is taken out of the run.
_MAX_CONSECUTIVE_DEATHS = 3
# After a worker's process exits, how long to wait for its result pipe's EOF (messages it wrote
# before exiting are still in flight) before declaring it dead anyway.
_EXIT_GRACE_S = 2.0
_SHUTDOWN_GRACE_S = 10.0
_HEARTBEAT_S = 30.0
_LOG_TAIL_LINES = 15


# ------------------------------------------------------------------------------------ public API
@dataclass
class PrewarmJob:
    """One signature to prewarm. ``variant_recipe`` / ``variant_tensors`` are what
    :func:`torch_r1attn.problem.variant_to_recipe` returns for the signature's variant."""

    spec: AttentionSpec
    variant_recipe: dict
    variant_tensors: dict[str, torch.Tensor]
    label: str

    @classmethod
    def from_variant(cls, spec: AttentionSpec, variant, label: str) -> "PrewarmJob":
        """Build a job from a live :class:`~torch_r1attn.variants.Variant`.

        Raises ValueError when ``variant``'s key is not ``spec.variant``."""
        from .problem import variant_to_recipe

        if variant.key != spec.variant:
            raise ValueError(f"job {label!r}: variant key {variant.key!r} does not match spec variant {spec.variant!r}")
        recipe, tensors = variant_to_recipe(variant)
        return cls(spec=spec, variant_recipe=recipe, variant_tensors=tensors, label=label)


@dataclass
class JobResult:
    """What happened to one job. ``gpu`` is the GPU index as the caller numbered it (``"0"``),
    or ``"cpu"``; for a failed job, the slot of its last attempt (``""`` if it never ran).
    ``winner`` is ``"<candidate hash> <proposer> <config summary>"`` when a kernel won or was
    already cached. ``seconds`` is the wall time of the job's attempts, measured by the parent."""

    job: PrewarmJob
    gpu: str
    status: str  # "kernel" | "negative" | "cached" | "failed"
    speedup: float | None = None
    best_baseline: str | None = None
    seconds: float = 0.0
    error: str | None = None
    winner: str | None = None


def parse_gpus(arg: str | None) -> list[int]:
    """Parse ``--gpus``: ``None``/``"all"`` -> every visible GPU (``torch.cuda.device_count()``,
    so ``[]`` on a machine without CUDA); ``"none"``/``"cpu"`` -> ``[]`` (one CPU worker);
    ``"0,2"`` -> ``[0, 2]`` (indices as this process sees them, i.e. after any
    ``CUDA_VISIBLE_DEVICES`` of its own).

    Raises TypeError for a non-string, ValueError for an empty list, an entry that is not a
    non-negative integer, a duplicate, or an index that is not visible."""
    if arg is None:
        arg = "all"
    if not isinstance(arg, str):
        raise TypeError(f"--gpus must be a string like 'all' or '0,1', got {type(arg).__name__}")
    text = arg.strip().lower()
    visible = torch.cuda.device_count()
    if text == "all":
        return list(range(visible))
    if text in ("none", "cpu"):
        return []
    if not text:
        raise ValueError("--gpus is empty; use 'all', 'none' or a comma-separated list like '0,1'")
    out: list[int] = []
    for part in text.split(","):
        p = part.strip()
        if not re.fullmatch(r"\d+", p):
            raise ValueError(f"--gpus {arg!r}: {p!r} is not a GPU index (expected 'all', 'none' or e.g. '0,1')")
        i = int(p)
        if i in out:
            raise ValueError(f"--gpus {arg!r}: GPU {i} is listed twice")
        if i >= visible:
            seen = f"indices 0..{visible - 1}" if visible else "no GPU is visible"
            raise ValueError(f"--gpus {arg!r}: GPU {i} is not visible ({visible} visible: {seen})")
        out.append(i)
    return out


def default_worker_cmd() -> list[str]:
    return [sys.executable, "-m", "torch_r1attn.schedule", "worker"]


def settings_env(s: Settings) -> dict[str, str]:
    """``s`` as the ``R1ATTN_*`` variables :meth:`Settings.from_env` reads back to an equal
    object (unset fields are left out, so the worker keeps the default)."""
    env: dict[str, str] = {}
    for f in dataclasses.fields(Settings):
        v = getattr(s, f.name)
        if v is not None:
            env[f.metadata["env"]] = repr(v) if isinstance(v, float) else str(v)
    return env


def run_jobs(jobs: list[PrewarmJob], gpus: list[int] | None = None, *, settings: Settings | None = None,
             progress: bool = True, worker_cmd: list[str] | None = None, max_requeue: int = 1,
             on_result: Callable[[JobResult], None] | None = None) -> list[JobResult]:
    """Prewarm ``jobs`` with one search worker per GPU in ``gpus``; one result per job, in order.

    ``gpus``: indices as :func:`parse_gpus` returns them (``None`` = every visible GPU; ``[]`` =
    one CPU worker under Triton's interpreter). They are not checked against the visible devices
    here (:func:`parse_gpus` does that); a worker pinned to a missing GPU reports ``fatal``.
    ``settings``: passed to the workers as ``R1ATTN_*`` variables (default: this process's).
    ``progress``: a tqdm bar when tqdm is importable, else a log line per job and a heartbeat.
    ``worker_cmd``: the worker command (default ``python -m torch_r1attn.schedule worker``).
    ``max_requeue``: how many times a job whose worker died is tried again.
    ``on_result``: called with each job's result as soon as it is known (a caller that may be cut
    short by a time limit records results as they come); an exception in it is logged, not raised.

    Never raises for a job's failure (that is a ``failed`` result). Raises TypeError/ValueError
    for malformed arguments; re-raises KeyboardInterrupt after killing every worker.
    """
    jobs = list(jobs)
    for i, j in enumerate(jobs):
        if not isinstance(j, PrewarmJob):
            raise TypeError(f"jobs[{i}] must be a PrewarmJob, got {type(j).__name__}")
        if not isinstance(j.spec, AttentionSpec):
            raise TypeError(f"job {j.label!r}: spec must be an AttentionSpec, got {type(j.spec).__name__}")
        if not isinstance(j.variant_recipe, dict):
            raise TypeError(f"job {j.label!r}: variant_recipe must be a dict, got {type(j.variant_recipe).__name__}")
        if not isinstance(j.variant_tensors, dict):
            raise TypeError(f"job {j.label!r}: variant_tensors must be a dict, got {type(j.variant_tensors).__name__}")
        bad = [n for n, t in j.variant_tensors.items() if not isinstance(t, torch.Tensor)]
        if bad:
            raise TypeError(f"job {j.label!r}: variant_tensors {bad} are not tensors")
        try:
            json.dumps(j.variant_recipe)
        except (TypeError, ValueError) as e:
            raise TypeError(f"job {j.label!r}: variant_recipe is not JSON-serialisable: {e}") from None
    if isinstance(max_requeue, bool) or not isinstance(max_requeue, int) or max_requeue < 0:
        raise ValueError(f"max_requeue must be an integer >= 0, got {max_requeue!r}")
    gpus = parse_gpus(None) if gpus is None else _check_gpu_list(gpus)
    s = current_settings() if settings is None else settings
    if not isinstance(s, Settings):
        raise TypeError(f"settings must be a Settings, got {type(s).__name__}")
    cmd = default_worker_cmd() if worker_cmd is None else [str(c) for c in worker_cmd]
    if not cmd:
        raise ValueError("worker_cmd is empty")
    if not jobs:
        return []

    with tempfile.TemporaryDirectory(prefix="r1attn-prewarm-") as tmp:
        tasks: list[_Task] = []
        by_hash: dict[str, _Task] = {}
        for idx, job in enumerate(jobs):
            t = by_hash.get(job.spec.hash)
            if t is None:
                t = by_hash[job.spec.hash] = _Task(id=len(tasks), job=job)
                t.tensors_path = _write_tensors(job, Path(tmp) / f"job{t.id}.safetensors")
                tasks.append(t)
            else:
                log.info("prewarm: %r has the same signature as %r (%s); searching it once",
                         job.label, t.job.label, job.spec.uri)
            t.indices.append(idx)
        slots = _make_slots(gpus, s)
        sched = _Scheduler(tasks, slots, cmd, Path(tmp), max_requeue, _job_timeout(s),
                           _Progress(len(jobs), progress), on_result=on_result, jobs=jobs)
        sched.run()

    results: list[JobResult | None] = [None] * len(jobs)
    for t in tasks:
        assert t.result is not None  # the scheduler finishes every task, one way or another
        for idx in t.indices:
            results[idx] = dataclasses.replace(t.result, job=jobs[idx])
    return results  # type: ignore[return-value]


def summary_table(results: list[JobResult]) -> str:
    """A plain-text table: one row per job (label, GPU, status, speedup, best baseline, seconds,
    winner or error), then one line per GPU saying what it did (job counts by status and the
    seconds it spent, a duplicate signature counted once), then the totals."""
    if not results:
        return "no prewarm jobs"
    header = ("label", "gpu", "status", "speedup", "baseline", "seconds", "winner / error")
    rows = []
    for r in results:
        detail = r.winner if r.status != "failed" else (r.error or "")
        detail = " ".join((detail or "").split())
        if len(detail) > 100:
            detail = detail[:97] + "..."
        rows.append((
            r.job.label, r.gpu or "-", r.status, _fmt_speedup(r.speedup), r.best_baseline or "-",
            f"{r.seconds:.1f}", detail or "-",
        ))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out += [line(row) for row in rows]
    out.append("")
    per_gpu: dict[str, list[JobResult]] = {}
    for r in results:
        per_gpu.setdefault(r.gpu or "-", []).append(r)
    for g in sorted(per_gpu, key=lambda x: (not x.isdigit(), int(x) if x.isdigit() else 0, x)):
        rs = per_gpu[g]
        name = "cpu" if g == CPU_SLOT else ("not run" if g == "-" else f"gpu {g}")
        # a duplicate signature shares its twin's search: count that time once
        busy = sum({r.job.spec.hash: r.seconds for r in rs}.values())
        out.append(f"{name}: {len(rs)} job(s) ({_status_counts(rs)}), {busy:.1f} s")
    out.append(f"total: {len(results)} job(s): {_status_counts(results)}")
    return "\n".join(out)


# ------------------------------------------------------------------------------- parent internals
def _check_gpu_list(gpus: Sequence[int]) -> list[int]:
    if isinstance(gpus, (str, bytes)) or not isinstance(gpus, Sequence):
        raise TypeError(f"gpus must be a list of GPU indices (see parse_gpus), got {type(gpus).__name__}")
    out: list[int] = []
    for g in gpus:
        if isinstance(g, bool) or not isinstance(g, int) or g < 0:
            raise ValueError(f"gpus: {g!r} is not a GPU index (a non-negative int)")
        if g in out:
            raise ValueError(f"gpus: GPU {g} is listed twice")
        out.append(g)
    return out


def _fmt_speedup(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.2f}x"


def _status_counts(rs: Sequence[JobResult]) -> str:
    counts = {st: sum(1 for r in rs if r.status == st) for st in STATUSES}
    return ", ".join(f"{n} {st}" for st, n in counts.items() if n) or "none"


def _job_timeout(s: Settings) -> float:
    """Deadline for one job in a worker: the search budget, plus room for the candidate that was
    verifying when the budget ran out and for the winner's fresh re-verification (each up to
    ``verify_timeout_s``), plus one LLM answer in flight when the LLM proposer is on."""
    t = s.budget_s + 2 * s.verify_timeout_s + _JOB_TIMEOUT_SLACK_S
    if s.proposer != "templates":
        t += s.llm_request_timeout_s
    return t


def _write_tensors(job: PrewarmJob, path: Path) -> str | None:
    if not job.variant_tensors:
        return None
    from safetensors.torch import save_file

    # clone: safetensors refuses tensors that share storage (views of one doc-id buffer, say)
    save_file({n: t.detach().cpu().contiguous().clone() for n, t in job.variant_tensors.items()}, str(path))
    return str(path)


def _pin_value(index: int) -> str:
    """What to put in a worker's CUDA_VISIBLE_DEVICES for GPU ``index`` as *this* process numbers
    it: if this process is itself restricted (``CUDA_VISIBLE_DEVICES=2,3``), index 0 is ``2``."""
    own = os.environ.get("CUDA_VISIBLE_DEVICES")
    if own is None or not own.strip():
        return str(index)
    entries = []
    for e in own.split(","):
        e = e.strip()
        if not e or e.startswith("-"):  # CUDA stops enumerating at the first invalid entry
            break
        entries.append(e)
    return entries[index] if index < len(entries) else str(index)


@dataclass
class _Slot:
    name: str  # "0", "1", ... or "cpu"
    env: dict[str, str]
    dead_reason: str | None = None
    consecutive_deaths: int = 0
    device: str | None = None  # from the worker's hello


def _make_slots(gpus: list[int], s: Settings) -> list[_Slot]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("R1ATTN_")}
    base.update(settings_env(s))
    base["PYTHONUNBUFFERED"] = "1"
    if not gpus:
        env = dict(base, CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
        return [_Slot(CPU_SLOT, env)]
    slots = []
    for g in gpus:
        env = dict(base, CUDA_VISIBLE_DEVICES=_pin_value(g))
        # a GPU worker compiles real kernels; an inherited interpreter switch would time the interpreter
        env.pop("TRITON_INTERPRET", None)
        slots.append(_Slot(str(g), env))
    return slots


@dataclass
class _Task:
    id: int
    job: PrewarmJob  # the first job with this signature
    indices: list[int] = field(default_factory=list)  # every input job it answers for
    tensors_path: str | None = None
    crashes: list[str] = field(default_factory=list)
    crashed_on: set[str] = field(default_factory=set)
    last_gpu: str = ""
    seconds: float = 0.0
    result: JobResult | None = None

    def line(self) -> bytes:
        msg = {"type": "job", "id": self.id, "label": self.job.label, "spec": self.job.spec.to_dict(),
               "variant_recipe": self.job.variant_recipe, "tensors_path": self.tensors_path}
        return (json.dumps(msg) + "\n").encode()


class _Worker:
    def __init__(self, slot: _Slot, cmd: list[str], log_path: Path, events: "queue.Queue"):
        self.slot = slot
        self.log_path = log_path
        self._log_file = open(log_path, "ab")
        # its own session: Ctrl-C in the terminal reaches only the parent, which then kills the
        # whole group (worker + its verifier subprocesses) deliberately
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log_file,
                                     env=slot.env, start_new_session=True)
        self.state = "starting"  # starting | idle | busy | dying (pipe broken, awaiting EOF) | dead
        self.ready = False
        self.task: _Task | None = None
        self.started = time.monotonic()
        self.job_started = 0.0
        self.exited_at: float | None = None
        self.kill_reason: str | None = None
        self.fatal: str | None = None
        self._reader = threading.Thread(target=self._read, args=(events,), daemon=True,
                                        name=f"r1attn-prewarm-{slot.name}-{self.proc.pid}")
        self._reader.start()

    def _read(self, events: "queue.Queue") -> None:
        try:
            for raw in self.proc.stdout:
                line = raw.decode("utf-8", "replace").strip()
                if not line:
                    continue
                try:
                    msg = json.loads(line)
                except ValueError:
                    msg = None
                if isinstance(msg, dict) and isinstance(msg.get("type"), str):
                    events.put((self, "msg", msg))
                else:
                    events.put((self, "junk", line))
        except (OSError, ValueError):  # pipe torn down while we shut the worker down
            pass
        finally:
            events.put((self, "eof", None))

    def send(self, data: bytes) -> bool:
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False

    def close_stdin(self) -> None:
        try:
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass

    def kill(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def log_tail(self) -> str:
        try:
            self._log_file.flush()
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-_LOG_TAIL_LINES:])

    def release(self) -> None:
        """Close our ends of its pipes and its log (the process is gone or killed)."""
        self._reader.join(timeout=2.0)
        for f in (self.proc.stdin, self.proc.stdout, self._log_file):
            try:
                f.close()
            except (BrokenPipeError, OSError):
                pass


class _Progress:
    """A tqdm bar when asked for and importable; otherwise log lines (INFO when asked for)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled = total, 0, enabled
        self.bar = None
        self.last_log = time.monotonic()
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, desc="prewarm", unit="sig", dynamic_ncols=True)

    def finished(self, result: JobResult, n: int, per_gpu: dict[str, int]) -> None:
        self.done += n
        what = result.status
        if result.speedup is not None and result.status != "failed":
            what += f" {_fmt_speedup(result.speedup)} vs {result.best_baseline or '?'}"
        where = "cpu" if result.gpu == CPU_SLOT else (f"gpu {result.gpu}" if result.gpu else "no worker")
        msg = f"[{self.done}/{self.total}] {result.job.label}: {what} on {where} ({result.seconds:.1f} s)"
        if result.status == "failed":
            log.warning("prewarm %s: %s", msg, (result.error or "").splitlines()[0] if result.error else "")
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix_str(" ".join(f"{g}:{c}" for g, c in per_gpu.items()), refresh=True)
        elif result.status != "failed":
            log.log(logging.INFO if self.enabled else logging.DEBUG, "prewarm %s", msg)

    def heartbeat(self, running: list[str]) -> None:
        now = time.monotonic()
        if self.bar is not None or now - self.last_log < _HEARTBEAT_S:
            return
        self.last_log = now
        log.log(logging.INFO if self.enabled else logging.DEBUG, "prewarm: %d/%d done; running: %s",
                self.done, self.total, ", ".join(running) or "nothing")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Scheduler:
    """Event loop of one :func:`run_jobs` call. Reader threads turn each worker's result pipe into
    events; everything else (dispatch, deaths, restarts, deadlines) happens on the caller's thread."""

    def __init__(self, tasks: list[_Task], slots: list[_Slot], cmd: list[str], tmp: Path, max_requeue: int,
                 job_timeout: float, progress: _Progress, *, on_result: Callable[[JobResult], None] | None = None,
                 jobs: list[PrewarmJob] | None = None):
        self.tasks, self.slots, self.cmd, self.tmp = tasks, slots, cmd, tmp
        self.on_result, self.jobs = on_result, jobs or [t.job for t in tasks]
        self.max_requeue, self.job_timeout, self.progress = max_requeue, job_timeout, progress
        self.pending: deque[_Task] = deque(tasks)
        self.workers: list[_Worker] = []  # live ones (not yet dead)
        self.all_workers: list[_Worker] = []
        self.events: queue.Queue = queue.Queue()
        self.per_gpu: dict[str, int] = {s.name: 0 for s in slots}
        self._junk_warned: set[int] = set()

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        try:
            while any(t.result is None for t in self.tasks):
                self._start_needed_workers()
                self._dispatch()
                if not self.workers and self.pending:
                    self._fail_pending()
                    break
                try:
                    w, kind, payload = self.events.get(timeout=0.2)
                except queue.Empty:
                    pass
                else:
                    self._handle(w, kind, payload)
                self._check_deadlines()
                self.progress.heartbeat([f"{w.slot.name}:{w.task.job.label} ({time.monotonic() - w.job_started:.0f} s)"
                                         for w in self.workers if w.task is not None])
        except BaseException:
            self._kill_all()
            raise
        else:
            self._shutdown()
        finally:
            self.progress.close()
            for w in self.all_workers:
                w.release()

    def _start_needed_workers(self) -> None:
        # Start a worker in a vacant slot only while queued work outnumbers workers that could take it.
        for slot in self.slots:
            if slot.dead_reason is not None or any(w.slot is slot for w in self.workers):
                continue
            available = sum(1 for w in self.workers if w.state in ("starting", "idle"))
            if len(self.pending) <= available:
                return
            w = _Worker(slot, self.cmd, self.tmp / f"worker-{slot.name}-{len(self.all_workers)}.log", self.events)
            log.debug("prewarm: started worker pid %d for %s", w.proc.pid, slot.name)
            self.workers.append(w)
            self.all_workers.append(w)

    def _dispatch(self) -> None:
        # Slots with a worker right now: a job that died on every one of them may go back to one
        # (a restarted worker) rather than wait for a slot nobody is going to start.
        live = {w.slot.name for w in self.workers}
        for w in self.workers:
            if w.state != "idle" or not self.pending:
                continue
            task = next((t for t in self.pending if w.slot.name not in t.crashed_on or live <= t.crashed_on), None)
            if task is None:
                continue  # every queued job already died on this GPU; leave them to another one
            self.pending.remove(task)
            w.task, w.state, w.job_started = task, "busy", time.monotonic()
            task.last_gpu = w.slot.name
            if not w.send(task.line()):
                # the worker is already gone; its EOF will follow. This attempt never started.
                self.pending.appendleft(task)
                w.task, w.state = None, "dying"

    # ---------------------------------------------------------------- events
    def _handle(self, w: _Worker, kind: str, payload: Any) -> None:
        if w.state == "dead":
            return
        if kind == "eof":
            self._on_death(w)
        elif kind == "junk":
            if id(w) not in self._junk_warned:
                self._junk_warned.add(id(w))
                log.warning("prewarm: worker for %s wrote a non-protocol line (ignored): %.200s", w.slot.name, payload)
        else:
            self._on_message(w, payload)

    def _on_message(self, w: _Worker, msg: dict) -> None:
        typ = msg["type"]
        if typ == "hello":
            if msg.get("protocol") != PROTOCOL_VERSION:
                w.kill_reason = f"speaks worker protocol {msg.get('protocol')!r}, expected {PROTOCOL_VERSION}"
                w.kill()
                return
            w.ready, w.state = True, "idle"
            w.slot.device = str(msg.get("device") or "") or None
            log.info("prewarm: worker for %s ready (pid %s, %s)", w.slot.name, msg.get("pid"), w.slot.device or "?")
        elif typ == "fatal":
            w.fatal = str(msg.get("error") or "unspecified fatal error")
        elif typ == "result":
            t = w.task
            if t is None or msg.get("id") != t.id:
                log.warning("prewarm: worker for %s sent a result for job %r while running %r; ignored",
                            w.slot.name, msg.get("id"), t.id if t else None)
                return
            t.seconds += time.monotonic() - w.job_started
            w.task, w.state = None, "idle"
            w.slot.consecutive_deaths = 0
            self._finish(t, self._result_from(msg, t, w.slot.name))
        else:
            log.debug("prewarm: worker for %s sent an unknown message type %r", w.slot.name, typ)

    def _result_from(self, msg: dict, t: _Task, gpu: str) -> JobResult:
        status = msg.get("status")
        error = msg.get("error")
        if status not in STATUSES:
            error = f"worker reported unknown status {status!r}" + (f": {error}" if error else "")
            status = "failed"
        speedup = msg.get("speedup")
        speedup = float(speedup) if isinstance(speedup, (int, float)) and not isinstance(speedup, bool) else None
        if t.crashes and status != "failed":
            log.info("prewarm: %s succeeded on %s after %d worker death(s)", t.job.label, gpu, len(t.crashes))
        return JobResult(job=t.job, gpu=gpu, status=status, speedup=speedup,
                         best_baseline=_opt_str(msg.get("best_baseline")), seconds=t.seconds,
                         error=_opt_str(error), winner=_opt_str(msg.get("winner")))

    def _finish(self, t: _Task, result: JobResult) -> None:
        t.result = result
        if result.gpu in self.per_gpu:
            self.per_gpu[result.gpu] += len(t.indices)
        self.progress.finished(result, len(t.indices), self.per_gpu)
        if self.on_result is not None:
            for idx in t.indices:
                try:
                    self.on_result(dataclasses.replace(result, job=self.jobs[idx]))
                except Exception:  # noqa: BLE001 - a caller's callback must not end the run
                    log.exception("prewarm: on_result callback failed for %s", t.job.label)

    def _on_death(self, w: _Worker) -> None:
        w.state = "dead"
        self.workers.remove(w)
        try:
            rc: int | None = w.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            rc = None  # closed its result pipe but kept running
        w.kill()  # stray grandchildren (verifier subprocesses) of a dead worker must not linger
        if rc is None:
            try:
                w.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.error("prewarm: worker pid %d survived SIGKILL", w.proc.pid)
        where = "cpu worker" if w.slot.name == CPU_SLOT else f"worker on gpu {w.slot.name}"
        if w.kill_reason:
            detail = f"{where} (pid {w.proc.pid}) {w.kill_reason}"
        elif w.fatal:
            detail = f"{where} (pid {w.proc.pid}) cannot run: {w.fatal}"
        else:
            detail = f"{where} (pid {w.proc.pid}) died ({_describe_rc(rc)})"
        tail = w.log_tail()
        full = detail + (f"; last log lines:\n{tail}" if tail else "")

        t, w.task = w.task, None
        if t is not None:
            t.seconds += time.monotonic() - w.job_started
            t.crashes.append(full)
            t.crashed_on.add(w.slot.name)
            if len(t.crashes) <= self.max_requeue:
                log.warning("prewarm: %s while on %s; re-queued (%d of %d)", detail, t.job.label,
                            len(t.crashes), self.max_requeue)
                self.pending.appendleft(t)
            else:
                self._finish(t, JobResult(job=t.job, gpu=w.slot.name, status="failed", seconds=t.seconds,
                                          error=f"{len(t.crashes)} attempt(s) failed:\n" + "\n".join(t.crashes)))
        if not w.ready:
            w.slot.dead_reason = f"failed to start: {full}"
            log.warning("prewarm: %s before it was ready; no more workers on it", detail)
        elif w.fatal:
            w.slot.dead_reason = full
        else:
            w.slot.consecutive_deaths += 1
            if w.slot.consecutive_deaths >= _MAX_CONSECUTIVE_DEATHS:
                w.slot.dead_reason = f"{w.slot.consecutive_deaths} workers died in a row; last: {full}"
                log.warning("prewarm: %s is out of the run: %s", w.slot.name, w.slot.dead_reason)

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for w in list(self.workers):
            if w.exited_at is None and w.proc.poll() is not None:
                w.exited_at = now
            if w.exited_at is not None and now - w.exited_at > _EXIT_GRACE_S:
                # exited, but something (a grandchild holding the pipe) keeps EOF from arriving
                self._on_death(w)
                continue
            if w.kill_reason:
                continue
            if w.state == "starting" and now - w.started > _STARTUP_TIMEOUT_S:
                w.kill_reason = f"did not become ready within {_STARTUP_TIMEOUT_S:.0f} s"
                w.kill()
            elif w.state == "busy" and now - w.job_started > self.job_timeout:
                w.kill_reason = f"timed out after {self.job_timeout:.0f} s on one job (killed)"
                w.kill()

    def _fail_pending(self) -> None:
        reasons = "; ".join(f"{s.name}: {s.dead_reason}" for s in self.slots if s.dead_reason)
        while self.pending:
            t = self.pending.popleft()
            prior = ("\n" + "\n".join(t.crashes)) if t.crashes else ""
            self._finish(t, JobResult(job=t.job, gpu=t.last_gpu, status="failed", seconds=t.seconds,
                                      error=f"no search worker left to run it ({reasons}){prior}"))

    # -------------------------------------------------------------- shutdown
    def _shutdown(self) -> None:
        for w in self.workers:
            w.close_stdin()  # EOF on stdin: finish and exit 0
        deadline = time.monotonic() + _SHUTDOWN_GRACE_S
        for w in self.workers:
            try:
                w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("prewarm: worker for %s did not exit; killing it", w.slot.name)
            w.kill()
            try:
                w.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.error("prewarm: worker pid %d survived SIGKILL", w.proc.pid)
        self.workers.clear()

    def _kill_all(self) -> None:
        # only live workers: a dead one's group was killed in _on_death, and its pid may be reused
        for w in self.workers:
            w.kill(signal.SIGTERM)
        deadline = time.monotonic() + 2.0
        for w in self.workers:
            try:
                w.proc.wait(timeout=max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            w.kill(signal.SIGKILL)
            try:
                w.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.error("prewarm: worker pid %d survived SIGKILL", w.proc.pid)
        self.workers.clear()


def _describe_rc(rc: int | None) -> str:
    if rc is None:
        return "still running after its result pipe closed"
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit code {rc}"


def _opt_str(x: Any) -> str | None:
    return None if x is None else str(x)


# ---------------------------------------------------------------------------------- worker side
def _claim_protocol_channel() -> tuple[Any, Any]:
    """Take the protocol's pipes away from everything else in this process and its children:
    results go to a private duplicate of stdout (fd 1 then points at stderr, so prints and C-level
    writes land in the log), jobs come from a private duplicate of stdin (fd 0 becomes /dev/null)."""
    sys.stdout.flush()
    out_fd = os.dup(1)  # os.dup fds are non-inheritable: subprocesses never see them
    os.dup2(2, 1)
    in_fd = os.dup(0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    return os.fdopen(in_fd, "r", encoding="utf-8"), os.fdopen(out_fd, "w", encoding="utf-8", buffering=1)


def _worker_loop(handle_job: Callable[[dict], dict], startup: Callable[[], dict]) -> int:
    """Serve the worker protocol: ``startup()`` -> extra hello fields (raise = fatal),
    ``handle_job(msg)`` -> result fields (``status`` etc.; raise = a ``failed`` result)."""
    jobs_in, out = _claim_protocol_channel()

    def send(msg: dict) -> None:
        out.write(json.dumps(msg) + "\n")
        out.flush()

    try:
        hello = startup()
    except Exception as e:  # noqa: BLE001 - reported to the parent, which takes this GPU out of the run
        log.exception("worker startup failed")
        send({"type": "fatal", "error": f"{type(e).__name__}: {e}"})
        return 1
    send({"type": "hello", "protocol": PROTOCOL_VERSION, "pid": os.getpid(), **hello})
    for line in jobs_in:
        line = line.strip()
        if not line:
            continue
        try:
            msg = json.loads(line)
        except ValueError:
            log.error("ignoring a malformed job line: %.200s", line)
            continue
        if not isinstance(msg, dict) or msg.get("type") != "job":
            log.error("ignoring a message that is not a job: %.200s", line)
            continue
        try:
            res = handle_job(msg)
        except Exception as e:  # noqa: BLE001 - a job's failure is its result, not the worker's end
            log.error("job %s failed:\n%s", msg.get("label"), traceback.format_exc())
            res = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
        send({"type": "result", "id": msg.get("id"), "status": res.get("status"),
              "speedup": res.get("speedup"), "best_baseline": res.get("best_baseline"),
              "winner": res.get("winner"), "error": res.get("error")})
    return 0


def _real_startup() -> dict:
    from .spec import device_fingerprint, fingerprint_name

    current_settings()  # invalid R1ATTN_* values: fatal now, not a failure per job

    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd and cvd.strip() and not torch.cuda.is_available():
        raise RuntimeError(f"pinned to CUDA_VISIBLE_DEVICES={cvd} but no CUDA device is visible")
    return {"device": fingerprint_name(device_fingerprint())}


def _candidate_summary(hash_: str | None, proposer: str | None, config: Any) -> str | None:
    if not hash_:
        return None
    parts = [hash_, proposer or "?"]
    if isinstance(config, dict) and config:
        cfg = ",".join(f"{k}={v}" for k, v in sorted(config.items()) if isinstance(v, (int, float, str, bool)))
        if cfg:
            parts.append(cfg if len(cfg) <= 80 else cfg[:77] + "...")
    return " ".join(parts)


def _entry_facts(entry) -> dict:
    """speedup / best_baseline / winner of a cache entry, from the metadata the search loop writes
    (``measurements`` + ``provenance`` for a kernel; ``best_baseline`` for a negative verdict)."""
    meta = entry.meta if isinstance(getattr(entry, "meta", None), dict) else {}
    if entry.negative:
        bb = meta.get("best_baseline")
        return {"speedup": None, "best_baseline": bb if isinstance(bb, str) else None, "winner": None}
    meas = meta.get("measurements") if isinstance(meta.get("measurements"), dict) else {}
    prov = meta.get("provenance") if isinstance(meta.get("provenance"), dict) else {}
    base = meas.get("baselines_ms") if isinstance(meas.get("baselines_ms"), dict) else {}
    timed = {k: v for k, v in base.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    sp = meas.get("speedup")
    return {
        "speedup": sp if isinstance(sp, (int, float)) else None,
        "best_baseline": min(timed, key=timed.get) if timed else None,
        "winner": _candidate_summary(prov.get("candidate_hash"), prov.get("proposer"), meta.get("config")),
    }


_pool = None


def _search_pool():
    """One verifier pool for every search of this prewarm worker: its processes (Python, torch,
    CUDA context, compiled Triton kernels) start once per GPU, not once per signature."""
    global _pool
    if _pool is None:
        from .verify import VerifierPool

        _pool = VerifierPool(current_settings().workers)
    return _pool


def _real_handle(msg: dict) -> dict:
    from safetensors.torch import load_file

    from . import cache as cache_mod
    from .problem import variant_from_recipe
    from .search.tuner import search_now

    spec = AttentionSpec.from_dict(msg["spec"])
    path = msg.get("tensors_path")
    tensors = load_file(path) if path else {}
    variant = variant_from_recipe(msg["variant_recipe"], tensors)
    if variant.key != spec.variant:
        raise ValueError(f"the variant recipe rebuilds key {variant.key!r}, the spec says {spec.variant!r}")
    entry = cache_mod.default_cache().lookup(spec)
    if entry is not None:
        log.info("%s: already in the cache (%s)", spec.uri, "negative" if entry.negative else "kernel")
        return {"status": "cached", **_entry_facts(entry)}
    res = search_now(spec, variant, current_settings(), pool=_search_pool())
    if res.cached and res.entry is not None:
        return {"status": "cached", **_entry_facts(res.entry)}
    if res.winner is not None:
        return {"status": "kernel", "speedup": res.speedup, "best_baseline": res.best_baseline,
                "winner": _candidate_summary(res.winner.hash, res.winner.proposer, res.winner.config)}
    if res.negative:
        return {"status": "negative", "speedup": res.speedup, "best_baseline": res.best_baseline,
                "error": None, "winner": None}
    return {"status": "failed", "error": res.reason or "the search ended without a kernel or a verdict"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_r1attn.schedule",
                                     description="prewarm search worker (started by `r1attn prewarm`)")
    parser.add_argument("role", choices=["worker"], help="serve the worker protocol on stdin/stdout")
    parser.parse_args(argv)
    try:
        level = (current_settings().log_level or "INFO").upper()
    except ValueError:
        level = "INFO"  # invalid R1ATTN_* settings: _real_startup raises again and reports it as fatal
    logging.basicConfig(stream=sys.stderr, level=level,
                        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    try:
        return _worker_loop(_real_handle, _real_startup)
    finally:
        if _pool is not None:
            _pool.close()


if __name__ == "__main__":
    sys.exit(main())
