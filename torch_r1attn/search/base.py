"""The one proposer interface shared by the templates proposer and the LLM proposer.

A proposer turns a :class:`~torch_r1attn.problem.Problem` and the history of verified candidates
(with the verifier's feedback) into new candidate kernel sources. It never runs them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..problem import Problem


@dataclass
class Candidate:
    """A kernel source following the kernel contract (see ``loader.py``)."""

    source: str
    language: str = "triton"  # "triton" | "cuda"
    proposer: str = "templates"
    config: dict[str, Any] = field(default_factory=dict)  # template knobs, or llm sampling info
    provenance: dict[str, Any] = field(default_factory=dict)  # model, prompt hash, tokens, seconds

    @property
    def hash(self) -> str:
        """Content hash: whitespace-insensitive so re-formatted duplicates are skipped."""
        norm = "\n".join(line.rstrip() for line in self.source.strip().splitlines())
        return hashlib.sha256(f"{self.language}\n{norm}".encode()).hexdigest()[:16]


@dataclass
class Feedback:
    """One verified candidate, as the next round of proposals sees it."""

    candidate: Candidate
    ok: bool  # passed every correctness check
    time_ms: float | None  # candidate's median time (None if it did not run / CPU)
    best_baseline_ms: float | None
    best_baseline: str | None
    speedup: float | None  # best_baseline_ms / time_ms
    text: str  # the verifier's concise feedback (compile error, first failing check, timings)


@runtime_checkable
class Proposer(Protocol):
    name: str

    def propose(self, problem: Problem, history: list[Feedback], n: int) -> list[Candidate]:
        """Up to ``n`` new candidates. May return fewer (space exhausted, budget spent)."""
        ...

    def close(self) -> None:  # release clients/threads
        ...
