"""What the verifier says about one candidate: :class:`VerifyResult` and :class:`CheckResult`.

Verdicts, in the order they take precedence:

* ``timeout``  — the worker did not report within the wall-clock limit; its process group was killed.
* ``crash``    — the worker died (segfault, ``os._exit``) or hit a sticky CUDA error.
* ``rejected`` — the static check refused the source, or the measured speed is implausible
  (faster than the device's measured matmul/bandwidth ceiling allows: a cheat).
* ``error``    — the source did not import/compile, or ``forward`` raised.
* ``fail``     — it ran, but a correctness check failed (values, unwritten ``out``, mutated
  inputs, nondeterminism, drift over consecutive calls, ...).
* ``pass``     — every correctness check passed (and, on the GPU, the speed is plausible).

``ok`` means "correct" (verdict ``pass``); whether it is *fast enough* is
:attr:`VerifyResult.wins` (beats the best baseline by ``settings().win_margin``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

VERDICTS = ("pass", "fail", "error", "timeout", "crash", "rejected")


@dataclass
class CheckResult:
    """One named check. ``detail`` is human-readable (numbers included); ``data`` is structured
    (e.g. ``failed_trials``, ``worst``: position/got/ref) for programs and tests."""

    name: str
    passed: bool
    detail: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return f"[{'ok' if self.passed else 'FAIL'}] {self.name}: {self.detail}"


@dataclass
class VerifyResult:
    ok: bool
    compiled: bool
    verdict: str
    reason: str
    checks: list[CheckResult] = field(default_factory=list)
    time_ms: float | None = None
    baselines_ms: dict[str, float] = field(default_factory=dict)
    best_baseline: str | None = None
    best_baseline_ms: float | None = None
    speedup: float | None = None
    timing_meaningful: bool = False
    win_margin: float = 0.0
    notes: list[str] = field(default_factory=list)  # e.g. "flex timed in the parent process"
    log_tail: str = ""  # the worker's stderr tail when something went wrong
    seconds: float = 0.0  # wall time the verification took
    effective_tflops: float | None = None
    feedback: str = ""
    # seconds per phase (worker = taking/starting a worker, inputs, import, first_call = compile +
    # first run, trials, lock_wait, timing, recheck, write, judge): where the time went
    phases: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")

    @property
    def wins(self) -> bool:
        """Correct, timed meaningfully, and faster than the best baseline by the win margin."""
        return bool(self.ok and self.timing_meaningful and self.speedup is not None
                    and self.speedup >= 1.0 + self.win_margin)

    def check(self, name: str) -> CheckResult | None:
        for c in self.checks:
            if c.name == name:
                return c
        return None

    @property
    def failed_checks(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.passed]

    def to_feedback(self, candidate) -> "Feedback":  # noqa: F821 - imported lazily
        from ..search.base import Feedback

        return Feedback(candidate=candidate, ok=self.ok, time_ms=self.time_ms,
                        best_baseline_ms=self.best_baseline_ms, best_baseline=self.best_baseline,
                        speedup=self.speedup, text=self.feedback)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["wins"] = self.wins
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VerifyResult":
        d = dict(d)
        d.pop("wins", None)
        d["checks"] = [CheckResult(**c) for c in d.get("checks", [])]
        return cls(**d)


def timing_table(r: VerifyResult) -> str:
    """A small table: the candidate and every baseline, fastest first."""
    if not r.timing_meaningful:
        return "timing: not meaningful on this device (correctness only)"
    rows = []
    if r.time_ms is not None:
        rows.append(("candidate", r.time_ms))
    rows += sorted(r.baselines_ms.items(), key=lambda kv: kv[1])
    if not rows:
        return "timing: nothing was timed"
    lines = ["timing (median ms):"]
    for name, ms in sorted(rows, key=lambda kv: kv[1]):
        lines.append(f"  {name:<16} {ms:9.4f}")
    if r.speedup is not None:
        lines.append(f"  speedup vs best baseline ({r.best_baseline}): {r.speedup:.3f}x "
                     f"(needs >= {1 + r.win_margin:.2f}x to win)")
    if r.effective_tflops is not None:
        lines.append(f"  effective TFLOP/s (allowed pairs only): {r.effective_tflops:.1f}")
    return "\n".join(lines)


def make_feedback(r: VerifyResult, max_chars: int = 1800) -> str:
    """The concise text the next proposal round sees: verdict, the first failing check (with its
    worst element), and the timing table."""
    failed = r.failed_checks
    parts = [f"verdict: {r.verdict}" + ("" if failed else f" — {r.reason}")]
    if failed:
        parts.append(f"first failing check: {failed[0].name}: {failed[0].detail}")
        if len(failed) > 1:
            parts.append("also failed: " + ", ".join(c.name for c in failed[1:]))
    if r.log_tail and r.verdict in ("error", "crash", "timeout"):
        tail = r.log_tail.strip()[-600:]
        parts.append("worker log (tail):\n" + tail)
    if r.verdict in ("pass", "rejected") and r.compiled:
        parts.append(timing_table(r))
    for n in r.notes:
        parts.append("note: " + n)
    text = "\n".join(parts)
    return text if len(text) <= max_chars else text[: max_chars - 15] + "\n...(truncated)"
