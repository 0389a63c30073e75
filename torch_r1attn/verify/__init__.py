"""The verifier: isolated, adversarial correctness checking and honest timing of candidates.

::

    verify(candidate, problem, *, pool=None, timing=True, settings=None, static=True,
           timeout_s=None, protocol=None) -> VerifyResult

    with VerifierPool(workers=2) as pool:
        results = pool.verify_many(candidates, problem)       # workers evaluate several in turn
        final = pool.reverify_fresh(results[i] winner, problem)  # alone, in a brand-new worker

Flow for one candidate (nothing unverified runs in the caller's process):

1. :func:`static.check_source` — refuse cheats before anything runs (``rejected``).
2. The parent makes the trials (deterministic seeds; :mod:`.check`), computes the float64
   references and PyTorch's own same-dtype error, and writes the inputs to a private temp dir.
3. A worker subprocess (:mod:`.worker`, a fresh interpreter in its own process group) loads the
   candidate with :func:`torch_r1attn.loader.load_source_file`, runs every trial on NaN-poisoned
   ``out`` buffers, times it and every baseline on the GPU (:mod:`.timing`), re-runs it after
   timing, and writes back the raw outputs and its inputs as they are after the run. A hang is
   killed with its process group after the wall-clock limit (``timeout``); a segfault,
   ``os._exit`` or sticky CUDA error ends only the worker (``crash``), which is then replaced.
4. The parent judges: values against the reference, every element written, inputs unchanged,
   fully masked rows 0, determinism, consecutive calls, stream order, the re-check after timing,
   and (GPU) a plausible speed against the device's measured ceilings.

On the CPU the same protocol runs Triton candidates under ``TRITON_INTERPRET=1`` (correctness
only: ``timing_meaningful=False``, ``time_ms=None``).

Concurrency: workers of one pool take a shared device lock while checking and an exclusive one
while timing, so no two timings overlap and nothing else of ours runs during one.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..config import Settings
from ..config import settings as current_settings
from ..problem import Problem, variant_to_recipe
from ..search.base import Candidate
from . import check as C
from .check import Protocol
from .result import CheckResult, VerifyResult, make_feedback, timing_table
from .static import check_source
from .worker import WorkerDied, WorkerProcess, WorkerTimeout

log = logging.getLogger(__name__)

__all__ = ["verify", "VerifierPool", "VerifyResult", "CheckResult", "Protocol", "check_source",
           "VerifierError", "timing_table"]

TIMING_SEED = 97
_MAX_PREPARED = 8


class VerifierError(RuntimeError):
    """The verifier itself could not run (a worker failed to start): not the candidate's fault."""


class _DeviceLock:
    """Readers-writer lock with writer preference: checking is shared, timing is exclusive."""

    def __init__(self) -> None:
        self._c = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    def acquire(self, mode: str) -> Callable[[], None]:
        with self._c:
            if mode == "exclusive":
                self._waiting += 1
                while self._writer or self._readers:
                    self._c.wait()
                self._waiting -= 1
                self._writer = True
            else:
                while self._writer or self._waiting:
                    self._c.wait()
                self._readers += 1
        done = [False]

        def release() -> None:
            with self._c:
                if done[0]:
                    return
                done[0] = True
                if mode == "exclusive":
                    self._writer = False
                else:
                    self._readers -= 1
                self._c.notify_all()

        return release


@dataclass
class _Prepared:
    problem: Problem
    trials: list[C.Trial]
    dir: Path
    scale: float
    # The baselines' times, once a worker has reported them: later candidates of this problem
    # (other workers, the fresh re-verification) reuse them instead of timing SDPA and compiling
    # Flex again (~10-20 s per worker on the H200). Same GPU, same seeded input sets, same protocol.
    baselines_ms: dict[str, float] | None = None
    # what the job that timed them noted (a backend left out, and why): every result that gets
    # the baselines gets these too, so a speed-up against fewer peers always says why
    baselines_notes: list[str] = field(default_factory=list)
    # The job that times them now. One at a time: in a search's first wave every worker used to
    # time (and compile Flex for) the same baselines; the others' results get them afterwards
    # (VerifierPool.fill_baselines).
    baselines_job: int | None = None


class VerifierPool:
    """Worker subprocesses that verify candidates in turn; a worker that saw a fault is replaced.

    Args:
        workers: how many candidates run at once (default ``settings().workers``).
        settings: the :class:`~torch_r1attn.config.Settings` to use (default: process-wide).
        protocol: correctness/timing thoroughness (default :class:`Protocol`\\ ()).
        timeout_s: wall-clock limit per candidate (default ``settings().verify_timeout_s``).

    Raises:
        ValueError: ``workers`` < 1 or ``timeout_s`` <= 0.
    """

    def __init__(self, workers: int | None = None, *, settings: Settings | None = None,
                 protocol: Protocol | None = None, timeout_s: float | None = None) -> None:
        self.settings = settings or current_settings()
        self.workers = int(workers if workers is not None else self.settings.workers)
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.protocol = protocol or Protocol()
        self.timeout_s = float(timeout_s if timeout_s is not None else self.settings.verify_timeout_s)
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s}")
        self._dir = Path(tempfile.mkdtemp(prefix="r1attn-verify-"))  # mode 0700: private
        self._idle: list[WorkerProcess] = []
        # A started worker that has run nothing yet, per device: the fresh re-verification of a
        # winner takes it instead of paying a worker start (Python + torch + CUDA init) on the
        # search's critical path. It starts while the candidates are being verified.
        self._spare: dict[str, WorkerProcess] = {}
        self._lock = threading.Lock()
        self._device_lock = _DeviceLock()
        self._prepared: dict[int, _Prepared] = {}
        self._ids = itertools.count()
        self._closed = False

    # ---- lifecycle
    def __enter__(self) -> "VerifierPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop every worker and delete the private temp dir."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            spares, self._spare = list(self._spare.values()), {}
        for w in idle:  # all at once: each takes a second or two to tear down its CUDA context
            w.request_quit()
        deadline = time.monotonic() + 5.0
        for w in idle:
            w.close(timeout_s=deadline - time.monotonic())
        for w in spares:
            w.kill()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __del__(self) -> None:  # a forgotten pool must not leave processes behind
        if not getattr(self, "_closed", True):
            self.close()

    def _ceilings_path(self, device: str) -> Path | None:
        if not device.startswith("cuda"):
            return None
        from ..spec import device_fingerprint, fingerprint_name
        from .timing import ceilings_path

        return ceilings_path(fingerprint_name(device_fingerprint()))

    def _spawn(self, device: str) -> WorkerProcess:
        n = next(self._ids)
        w = WorkerProcess(self._dir / f"worker-{n}.log", device, ceilings_path=self._ceilings_path(device))
        try:
            w.wait_ready(acquire=self._device_lock.acquire)
        except (WorkerDied, WorkerTimeout) as e:
            tail = w.log_tail()
            w.kill()
            raise VerifierError(f"verifier worker failed to start: {e}\n{tail[-2000:]}") from None
        return w

    def _start_spare(self, device: str) -> None:
        """Start (not wait for) a spare worker for ``device`` unless one is there."""
        with self._lock:
            if self._closed or (device in self._spare and self._spare[device].alive):
                return
        try:
            w = WorkerProcess(self._dir / f"worker-{next(self._ids)}.log", device,
                              ceilings_path=self._ceilings_path(device))
        except OSError as e:  # no spare: the fresh verification spawns its own worker
            log.debug("could not start a spare verifier worker: %s", e)
            return
        with self._lock:
            old = self._spare.get(device)
            if self._closed or (old is not None and old.alive):
                w.kill()
                return
            self._spare[device] = w

    def _take_fresh(self, device: str) -> WorkerProcess:
        """A worker that has run nothing: the spare when it started fine, else a new one."""
        with self._lock:
            w = self._spare.pop(device, None)
        if w is not None:
            try:
                w.wait_ready(acquire=self._device_lock.acquire)
                return w
            except (WorkerDied, WorkerTimeout) as e:
                log.debug("spare verifier worker failed to start (%s); starting another", e)
                w.kill()
        return self._spawn(device)

    def _take(self, device: str) -> WorkerProcess:
        with self._lock:
            if self._closed:
                raise VerifierError("the verifier pool is closed")
            while self._idle:
                w = self._idle.pop()
                if w.alive and w.device == device:
                    return w
                w.kill()
        return self._spawn(device)

    def _give_back(self, w: WorkerProcess) -> None:
        with self._lock:
            if w.alive and not self._closed and len(self._idle) < self.workers:
                self._idle.append(w)
                return
        w.close()

    # ---- problems
    def _prepare(self, problem: Problem) -> _Prepared:
        with self._lock:
            p = self._prepared.get(id(problem))
            if p is not None and p.problem is problem:
                return p
        from safetensors.torch import save_file

        scale = float(problem.extra.get("scale", 1.0 / math.sqrt(problem.spec.head_dim)))
        trials = C.make_trials(problem, self.protocol, scale)
        C.prepare_references(trials, C.reference_device(problem))
        d = self._dir / f"problem-{next(self._ids)}"
        d.mkdir()
        tensors: dict[str, torch.Tensor] = {}
        meta = []
        for i, t in enumerate(trials):
            tensors.update({f"t{i}.q": t.q, f"t{i}.k": t.k, f"t{i}.v": t.v})
            tensors.update({f"t{i}.vt.{n}": x for n, x in t.tensors.items()})
            meta.append({"name": t.name, "shape": list(t.shape), "calls": t.calls, "scale": t.scale,
                         "tensors": list(t.tensors), "layout": t.layout})
        save_file({n: x.detach().cpu().clone().contiguous() for n, x in tensors.items()}, str(d / "inputs.safetensors"))
        recipe, rt = variant_to_recipe(problem.variant)
        if rt:
            save_file({n: x.clone().contiguous() for n, x in rt.items()}, str(d / "recipe.safetensors"))
        pr = self.protocol
        (d / "problem.json").write_text(json.dumps({
            "spec": problem.spec.to_dict(), "recipe": recipe, "shape": list(problem.shape),
            "device": str(problem.device), "trials": meta, "timing_seed": TIMING_SEED, "scale": scale,
            "rotate_bytes": pr.rotate_bytes,
            "bench": {"warmup_ms": pr.warmup_ms, "rep_ms": pr.rep_ms, "min_reps": pr.min_reps, "max_reps": pr.max_reps},
        }))
        p = _Prepared(problem, trials, d, scale)
        with self._lock:
            self._prepared[id(problem)] = p
            while len(self._prepared) > _MAX_PREPARED:  # a long-lived pool (the tuner) sees many problems
                old = self._prepared.pop(next(iter(self._prepared)))
                shutil.rmtree(old.dir, ignore_errors=True)
        return p

    # ---- verification
    def verify(self, candidate: Candidate, problem: Problem, *, timing: bool = True, static: bool = True,
               fresh: bool = False, baselines: bool = True) -> VerifyResult:
        """Verify one candidate (see the module docstring). ``fresh=True`` runs it alone in a
        brand-new worker that is discarded afterwards.

        Raises:
            TypeError: ``candidate`` is not a Candidate or ``problem`` not a Problem.
            VerifierError: no worker could be started.
        """
        if not isinstance(candidate, Candidate):
            raise TypeError(f"candidate must be a search.base.Candidate, got {type(candidate).__name__}")
        if not isinstance(problem, Problem):
            raise TypeError(f"problem must be a problem.Problem, got {type(problem).__name__}")
        t0 = time.monotonic()
        margin = self.settings.win_margin
        device = str(problem.device)
        meaningful = bool(timing and device.startswith("cuda") and torch.cuda.is_available())
        if static:
            reasons = check_source(candidate.source, candidate.language)
            if reasons:
                chk = CheckResult("static", False, "; ".join(reasons), {"reasons": reasons})
                r = VerifyResult(ok=False, compiled=False, verdict="rejected",
                                 reason=f"static check: {reasons[0]}", checks=[chk], win_margin=margin)
                return self._finalize(r, t0)
        prep = self._prepare(problem)
        job_id = next(self._ids)
        job = self._dir / f"job-{job_id}"
        job.mkdir()
        src = job / ("candidate.cu" if candidate.language == "cuda" else "candidate.py")
        src.write_text(candidate.source)
        (job / "job.json").write_text(json.dumps({
            "problem_dir": str(prep.dir), "candidate": str(src), "language": candidate.language,
            "name_hint": f"cand_{candidate.hash}", "timing": meaningful, "recheck": self.protocol.recheck_after_timing,
            "baselines": baselines and meaningful and self._claim_baselines(prep, job_id),
        }))
        t_take = time.monotonic()
        w = self._take_fresh(device) if fresh else self._take(device)
        phases = {"worker": time.monotonic() - t_take}
        since = w.log_offset()
        try:
            w.run_job(job, self.timeout_s, self._device_lock.acquire)
        except WorkerTimeout as e:
            w.kill()
            r = VerifyResult(ok=False, compiled=True, verdict="timeout",
                             reason=f"killed after the {self.timeout_s:g} s limit: {e}", win_margin=margin,
                             checks=[CheckResult("run", False, f"timed out ({w.last_phase})")],
                             log_tail=w.log_tail(since))
            return self._finalize(r, t0, job)
        except WorkerDied as e:
            w.kill()
            r = VerifyResult(ok=False, compiled=True, verdict="crash", reason=str(e), win_margin=margin,
                             checks=[CheckResult("run", False, f"the worker died: {e}")],
                             log_tail=w.log_tail(since))
            return self._finalize(r, t0, job)
        finally:
            with self._lock:
                if prep.baselines_job == job_id:
                    prep.baselines_job = None  # timed or not: the next job may take it on
            phases.update(w.last_phases)
            if fresh:
                w.close()
            else:
                self._give_back(w)  # a dead or faulted worker is closed there, not reused
        t_judge = time.monotonic()
        r = self._judge(prep, job, w.log_tail(since), meaningful, margin)
        phases["judge"] = time.monotonic() - t_judge
        r.phases = phases
        return self._finalize(r, t0, job)

    def _claim_baselines(self, prep: _Prepared, job_id: int) -> bool:
        """True when job ``job_id`` is to time the baselines: none are known and no other job is
        timing them."""
        with self._lock:
            if prep.baselines_ms is not None or prep.baselines_job is not None:
                return False
            prep.baselines_job = job_id
            return True

    def fill_baselines(self, results: Sequence[VerifyResult], problem: Problem) -> int:
        """Give timed results that lack baselines (another job of their wave was timing them) the
        baselines this pool has for ``problem`` since, with their speed-up. Returns how many."""
        with self._lock:
            p = self._prepared.get(id(problem))
            p = p if p is not None and p.problem is problem and p.baselines_ms else None
        if p is None:
            return 0
        n = 0
        for r in results:
            if r.timing_meaningful and r.time_ms and not r.baselines_ms:
                _give_baselines(r, p, "timed by another job of this search")
                _set_speedup(r)
                if r.ok:
                    r.reason = _pass_reason(r)
                r.feedback = make_feedback(r)
                n += 1
        return n

    def verify_many(self, candidates: list[Candidate], problem: Problem, *, timing: bool = True,
                    static: bool = True) -> list[VerifyResult]:
        """Verify candidates on up to ``workers`` workers at once; results in input order."""
        cands = list(candidates)
        results: list[VerifyResult | None] = [None] * len(cands)
        if not cands:
            return []
        t_prep = time.monotonic()
        self._prepare(problem)  # once, before the threads race for it
        if time.monotonic() - t_prep > 0.5:
            log.info("verify: problem prepared (inputs + float64 references) in %.1fs", time.monotonic() - t_prep)
        self._start_spare(str(problem.device))  # for the winner's fresh re-verification
        it = iter(range(len(cands)))
        it_lock = threading.Lock()
        errors: list[BaseException] = []

        def run() -> None:
            while True:
                with it_lock:
                    i = next(it, None)
                if i is None or errors:
                    return
                try:
                    results[i] = self.verify(cands[i], problem, timing=timing, static=static)
                except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread below
                    errors.append(e)
                    return

        threads = [threading.Thread(target=run, daemon=True) for _ in range(min(self.workers, len(cands)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        out = [r for r in results if r is not None]
        self.fill_baselines(out, problem)
        return out

    def reverify_fresh(self, candidate: Candidate, problem: Problem, *, timing: bool = True) -> VerifyResult:
        """Verify ``candidate`` alone in a brand-new worker (the winner's final check)."""
        return self.verify(candidate, problem, timing=timing, fresh=True)

    # ---- judging (parent side)
    def _judge(self, prep: _Prepared, job: Path, log_tail: str, meaningful: bool, margin: float) -> VerifyResult:
        from safetensors.torch import load_file

        try:
            report = json.loads((job / "result.json").read_text())
        except (OSError, ValueError) as e:
            return VerifyResult(ok=False, compiled=True, verdict="crash", win_margin=margin, log_tail=log_tail,
                                reason=f"the worker reported done but wrote no readable result ({e})")
        out_path = job / "out.safetensors"
        outputs = load_file(str(out_path)) if out_path.exists() else {}
        checks: list[CheckResult] = []
        err = report.get("error")
        if report.get("stage") == "load" and err:
            first = _first_line(err)
            checks.append(CheckResult("load", False, err))
            r = VerifyResult(ok=False, compiled=False, verdict="error", reason=f"import/compile failed: {first}",
                             checks=checks, win_margin=margin, log_tail=log_tail)
            return r
        checks.append(CheckResult("load", True, "imported"))
        compiled = True
        verdict = reason = None
        if err:
            etype = str(report.get("error_type", ""))
            if report.get("first_call") and ("Compilation" in etype or "Interpreter" in etype):
                compiled = False
            where = report.get("error_trial", "?")
            checks.append(CheckResult("run", False, f"{where}: {err}"))
            if report.get("fatal"):
                verdict, reason = "crash", f"sticky CUDA error in {where}: {_first_line(err)}"
            else:
                verdict = "error"
                reason = f"{'compile' if not compiled else 'forward'} failed in {where}: {_first_line(err)}"
        else:
            checks.append(CheckResult("run", True, f"{report.get('trials_done', 0)} trials ran"))
        if report.get("unsupported"):
            checks.append(CheckResult("supports", False, report["unsupported"]))
            verdict = verdict or "fail"
            reason = reason or f"kernel does not support the problem: {report['unsupported']}"
        checks += C.judge(prep.trials, outputs, report)
        r = VerifyResult(ok=False, compiled=compiled, verdict="pass", reason="", checks=checks,
                         win_margin=margin, log_tail=log_tail if err else "", notes=list(report.get("notes", [])))
        tm = report.get("timing")
        if meaningful and tm and not tm.get("unsupported"):
            self._apply_timing(r, prep, tm)
        elif meaningful and tm and tm.get("unsupported"):
            checks.append(CheckResult("supports", False, tm["unsupported"]))
        if not meaningful:
            r.notes.append("timing not meaningful here (CPU / Triton interpreter): verdict on correctness only")
        r.checks = C.sort_checks(r.checks)
        failed = [c for c in r.checks if not c.passed]
        if verdict is None:
            correctness_fail = [c for c in failed if c.name != "plausible_speed"]
            if correctness_fail:
                verdict, reason = "fail", f"{correctness_fail[0].name}: {correctness_fail[0].detail}"
            elif failed:
                verdict, reason = "rejected", failed[0].detail
            else:
                verdict = "pass"
                reason = _pass_reason(r)
        r.verdict, r.reason = verdict, reason[:500]
        r.ok = verdict == "pass"
        return r

    def _apply_timing(self, r: VerifyResult, prep: _Prepared, tm: dict) -> None:
        problem = prep.problem
        r.timing_meaningful = True
        r.time_ms = float(tm["time_ms"])
        r.baselines_ms = {k: float(v) for k, v in (tm.get("baselines_ms") or {}).items()}
        bnotes = list(tm.get("notes", []))  # the worker's notes on the baselines it timed
        if tm.get("flex_in_parent"):
            ms, note = _time_flex_in_parent(prep, self.protocol, self._device_lock)
            if ms is not None:
                r.baselines_ms["flex"] = ms
            bnotes.append(note)
        r.notes += bnotes
        with self._lock:
            if r.baselines_ms and prep.baselines_ms is None:
                prep.baselines_ms = dict(r.baselines_ms)
                prep.baselines_notes = bnotes
            elif not r.baselines_ms and prep.baselines_ms:
                _give_baselines(r, prep, "timed earlier in this search")
        _set_speedup(r)
        # plausibility, computed here from the variant's mask (the worker only timed)
        cpath = self._ceilings_path(str(problem.device))
        try:
            ceilings = json.loads(cpath.read_text()) if cpath else None
        except (OSError, ValueError):
            ceilings = None
        B, Hq, Hkv, Sq, Sk = problem.shape
        spec = problem.spec
        dev = C.reference_device(problem)
        tv = problem.timing_variant(TIMING_SEED, device=dev)
        pairs = C.allowed_pairs(tv, B, Hq, Sq, Sk, dev)
        flops = 2.0 * pairs * (spec.head_dim + spec.head_dim_v)
        esz = torch.empty((), dtype=spec.torch_dtype).element_size()
        min_bytes = esz * (B * Hq * Sq * spec.head_dim + B * Hkv * Sk * (spec.head_dim + spec.head_dim_v)
                           + B * Hq * Sq * spec.head_dim_v)
        if ceilings:
            from .timing import plausibility

            ok, why, eff = plausibility(r.time_ms, flops, min_bytes, ceilings, self.protocol.ceiling_slack)
            r.effective_tflops = eff
            r.checks.append(CheckResult("plausible_speed", ok, why, {"effective_tflops": eff, "ceilings": ceilings}))
        else:
            r.effective_tflops = flops / (r.time_ms * 1e-3) / 1e12 if r.time_ms > 0 else None
            r.notes.append("device ceilings unavailable: implausible-speed check skipped")

    def _finalize(self, r: VerifyResult, t0: float, job: Path | None = None) -> VerifyResult:
        r.seconds = time.monotonic() - t0
        r.feedback = make_feedback(r)
        if job is not None:
            shutil.rmtree(job, ignore_errors=True)
        log.info("verify: %s (%s) in %.1fs", r.verdict, r.reason[:160], r.seconds)
        return r


def _give_baselines(r: VerifyResult, prep: _Prepared, when: str) -> None:
    """``r`` gets the baselines another job of its problem timed, with that job's notes."""
    r.baselines_ms = dict(prep.baselines_ms)
    r.notes.append(f"baselines: {when} (same GPU, inputs and protocol)")
    r.notes += prep.baselines_notes


def _set_speedup(r: VerifyResult) -> None:
    """``best_baseline``/``best_baseline_ms``/``speedup`` from ``r.baselines_ms`` and ``r.time_ms``."""
    if r.baselines_ms:
        r.best_baseline, r.best_baseline_ms = min(r.baselines_ms.items(), key=lambda kv: kv[1])
        r.speedup = r.best_baseline_ms / r.time_ms if r.time_ms and r.time_ms > 0 else None


def _pass_reason(r: VerifyResult) -> str:
    return "correct on every trial" + (f"; {r.speedup:.3f}x the best baseline ({r.best_baseline})"
                                       if r.speedup is not None else "")


def _first_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    return lines[-1].strip()[:300] if lines else ""


def _time_flex_in_parent(prep: _Prepared, protocol: Protocol, device_lock: _DeviceLock) -> tuple[float | None, str]:
    """FlexAttention baseline timed here when the variant's callable cannot reach the worker:
    same inputs (seeded), same protocol, under the pool's exclusive device lock."""
    from . import timing
    from .check import random_qkv

    problem = prep.problem
    spec = problem.spec
    shape = problem.shape
    dev = str(problem.device)
    tv = problem.timing_variant(TIMING_SEED, device=dev)
    q, k, v = (x.to(dev) for x in random_qkv(shape, spec.torch_dtype, "normal", TIMING_SEED,
                                              spec.head_dim_v, spec.head_dim))
    set_bytes = sum(x.numel() * x.element_size() for x in (q, k, v))
    sets = timing.make_timing_sets(q, k, v, timing.rotation_count(set_bytes, protocol.rotate_bytes))
    bk = {"warmup_ms": protocol.warmup_ms, "rep_ms": protocol.rep_ms, "min_reps": protocol.min_reps,
          "max_reps": protocol.max_reps}
    release = device_lock.acquire("exclusive")
    try:
        base, notes = timing.time_baselines(sets, tv, prep.scale, bk, flex=True, sdpa=False)
    finally:
        release()
    if "flex" in base:
        return base["flex"], "flex baseline timed in the parent process (its callable is not importable in the worker)"
    return None, "flex baseline could not be timed in the parent either: " + "; ".join(notes)


def verify(candidate: Candidate, problem: Problem, *, pool: VerifierPool | None = None, timing: bool = True,
           settings: Settings | None = None, static: bool = True, timeout_s: float | None = None,
           protocol: Protocol | None = None) -> VerifyResult:
    """Verify one candidate for ``problem``; see the module docstring for the protocol.

    ``pool``: reuse its workers (its settings/protocol/timeout apply); without one, a one-worker
    pool is made for this call. ``static=False`` skips the static check (tests of the isolation
    itself). ``timeout_s`` / ``protocol`` override the defaults when no pool is given.

    Raises:
        TypeError: bad ``candidate`` / ``problem`` types.
        ValueError: ``timeout_s`` given together with ``pool`` (the pool's limit applies).
        VerifierError: no worker could be started.
    """
    if pool is not None:
        if timeout_s is not None or protocol is not None:
            raise ValueError("timeout_s/protocol apply to a new pool; configure the pool you pass instead")
        return pool.verify(candidate, problem, timing=timing, static=static)
    with VerifierPool(1, settings=settings, protocol=protocol, timeout_s=timeout_s) as p:
        return p.verify(candidate, problem, timing=timing, static=static)
