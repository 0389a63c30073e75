"""Running searches: now (``sync``, prewarm) or in the background (the default on-miss policy).

Why a background *thread* and not a tuner process: a signature's variant may hold user callables
(``score_mod``/``mask_mod`` closures) that cannot cross a process boundary, and the search only
orchestrates — proposing is pure Python and every candidate runs in verifier worker processes.
So nothing unverified runs in the caller's process either way, and the thread needs no
serialisation of the variant. The thread is a daemon; an ``atexit`` hook stops it between
rounds and the verifier pool kills its workers, so the caller's exit is never held up by a search.

One search per key: in-process, ``_jobs`` holds at most one running job per spec hash; across
processes, the cache's non-blocking per-key search lock decides, and a process that loses the
race waits for the winner's cache entry instead of searching again.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from typing import Any

import torch

from ..config import Settings, settings as current_settings
from ..problem import Problem
from ..spec import AttentionSpec
from ..variants import Variant
from .base import Proposer
from .loop import SearchResult, run_search

log = logging.getLogger(__name__)

_jobs: dict[str, "Job"] = {}
_jobs_lock = threading.Lock()
_stop = threading.Event()


def make_proposers(s: Settings) -> list[Proposer]:
    """The proposers ``settings.proposer`` asks for (the LLM one only when an endpoint is set)."""
    out: list[Proposer] = []
    if s.proposer in ("templates", "all"):
        from .templates import TemplatesProposer

        out.append(TemplatesProposer())
    if s.proposer in ("llm", "all"):
        from .llm import make_llm_proposer

        p = make_llm_proposer(s)
        if p is not None:
            out.append(p)
    return out


def problem_for(spec: AttentionSpec, variant: Variant) -> Problem:
    """The problem to search: on CUDA at the caller's shape; on the CPU (interpreter) small."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return Problem.from_spec(spec, variant, device=device, small=(device == "cpu"))


def search_now(spec: AttentionSpec, variant: Variant, settings: Settings | None = None, *,
               progress: bool = False, stop: threading.Event | None = None, pool=None) -> SearchResult:
    """Search ``spec`` now unless the cache already has a verdict or another process is on it
    (then wait for its verdict, up to twice the budget). ``pool``: a VerifierPool to verify on
    (kept open; a prewarm worker shares one across its searches), else one for this search."""
    from .. import cache as cache_mod

    s = settings or current_settings()
    cache = cache_mod.default_cache()
    hit = cache.lookup(spec)
    if hit is not None:
        return SearchResult(spec_uri=spec.uri, negative=hit.negative, entry=hit, cached=True,
                            reason="already in the cache")
    lock = cache.try_search_lock(spec)
    if lock is None:
        log.info("%s: another process is searching this signature; waiting for its verdict", spec.uri)
        deadline = time.monotonic() + 2 * s.budget_s + 60
        while time.monotonic() < deadline and not (stop and stop.is_set()):
            hit = cache.lookup(spec)
            if hit is not None:
                return SearchResult(spec_uri=spec.uri, negative=hit.negative, entry=hit, cached=True,
                                    reason="decided by another process")
            time.sleep(0.5)
        return SearchResult(spec_uri=spec.uri, reason="timed out waiting for another process's search")
    try:
        hit = cache.lookup(spec)  # it may have landed while we took the lock
        if hit is not None:
            return SearchResult(spec_uri=spec.uri, negative=hit.negative, entry=hit, cached=True,
                                reason="already in the cache")
        proposers = make_proposers(s)
        if not proposers:
            return SearchResult(spec_uri=spec.uri, reason=f"no proposer available for R1ATTN_PROPOSER={s.proposer}")
        problem = problem_for(spec, variant)
        try:
            return run_search(problem, proposers, settings=s, cache=cache, progress=progress, stop=stop, pool=pool)
        finally:
            for p in proposers:
                p.close()
    finally:
        lock.release()


class Job:
    """A background search. ``done()`` is what dispatch polls."""

    def __init__(self, spec: AttentionSpec, variant: Variant, settings: Settings):
        self.spec = spec
        self.result: SearchResult | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(variant, settings), daemon=True,
                                        name=f"r1attn-tuner-{spec.hash}")

    def _run(self, variant: Variant, settings: Settings) -> None:
        try:
            self.result = search_now(self.spec, variant, settings, stop=_stop)
            r = self.result
            log.info("%s: background search finished: %s (report: %s)", self.spec.uri,
                     "kernel" if r.winner else ("cached" if r.cached else f"no kernel ({r.reason})"), r.report_path)
        except BaseException as e:  # noqa: BLE001 - the caller's forward must never see a tuner failure
            self.error = e
            log.warning("%s: background search failed: %s: %s", self.spec.uri, type(e).__name__, e)
        finally:
            with _jobs_lock:
                if _jobs.get(self.spec.hash) is self:
                    del _jobs[self.spec.hash]

    def start(self) -> "Job":
        self._thread.start()
        return self

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return self.done()


def submit(spec: AttentionSpec, variant: Variant, settings: Settings | None = None) -> Job:
    """Start (or join) the background search for ``spec``; never blocks on the search."""
    with _jobs_lock:
        job = _jobs.get(spec.hash)
        if job is None:
            job = Job(spec, variant, settings or current_settings())
            _jobs[spec.hash] = job
            job.start()
    return job


def running() -> list[dict[str, Any]]:
    with _jobs_lock:
        return [{"spec": j.spec.uri, "done": j.done()} for j in _jobs.values()]


def shutdown(timeout: float = 5.0) -> None:
    """Ask background searches to stop after their current round; wait briefly."""
    _stop.set()
    with _jobs_lock:
        jobs = list(_jobs.values())
    for j in jobs:
        j.wait(timeout / max(1, len(jobs)))


atexit.register(shutdown)
