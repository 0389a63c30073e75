"""Every ``R1ATTN_*`` setting, read in one place into a typed, validated dataclass.

Everything else in the package reads :func:`settings` (or takes a :class:`Settings`
explicitly); nothing else looks at ``os.environ`` for ``R1ATTN_*`` names. Reading the
environment has no side effects on torch's global state.

The README's settings table is generated from :data:`FIELDS` docs, so keep the help strings
short and accurate.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

ON_MISS_CHOICES = ("background", "sync", "off")
PROPOSER_CHOICES = ("templates", "llm", "all")
FALLBACK_CHOICES = ("auto", "sdpa", "flex", "eager")
HOTPATH_CHOICES = ("auto", "off")

# Default model id of NVIDIA's hosted DeepSeek-R1 endpoint (build.nvidia.com).
DEFAULT_LLM_MODEL = "deepseek-ai/deepseek-r1"


def _meta(env: str, help: str) -> dict[str, str]:
    return {"env": env, "help": help}


@dataclass(frozen=True)
class Settings:
    """Validated settings. Construct with keyword overrides or via :meth:`from_env`."""

    cache_dir: str | None = field(
        default=None,
        metadata=_meta("R1ATTN_CACHE_DIR", "Kernel cache root (default: platformdirs user cache dir)."),
    )
    on_miss: str = field(
        default="background",
        metadata=_meta("R1ATTN_ON_MISS", "What a cache miss does: background, sync or off."),
    )
    proposer: str = field(
        default="templates",
        metadata=_meta("R1ATTN_PROPOSER", "Who proposes candidates: templates, llm or all."),
    )
    budget_s: float = field(
        default=60.0, metadata=_meta("R1ATTN_BUDGET_S", "Search time budget per signature, seconds.")
    )
    max_candidates: int = field(
        default=24, metadata=_meta("R1ATTN_MAX_CANDIDATES", "Search candidate budget per signature.")
    )
    rounds: int = field(default=3, metadata=_meta("R1ATTN_ROUNDS", "Search rounds (generate→verify→feedback)."))
    samples: int = field(default=8, metadata=_meta("R1ATTN_SAMPLES", "Candidates proposed per round."))
    win_margin: float = field(
        default=0.03,
        metadata=_meta("R1ATTN_WIN_MARGIN", "A kernel must beat the best baseline by this fraction."),
    )
    fallback: str = field(
        default="auto",
        metadata=_meta("R1ATTN_FALLBACK", "Built-in path when no kernel: auto, sdpa, flex or eager."),
    )
    verify_timeout_s: float = field(
        default=120.0,
        metadata=_meta("R1ATTN_VERIFY_TIMEOUT_S", "Wall-clock limit for one candidate in the verifier."),
    )
    workers: int = field(
        default=2, metadata=_meta("R1ATTN_WORKERS", "Parallel compile/verify worker processes.")
    )
    llm_base_url: str | None = field(
        default=None,
        metadata=_meta("R1ATTN_LLM_BASE_URL", "OpenAI-compatible endpoint; unset = LLM proposer off."),
    )
    llm_model: str = field(
        default=DEFAULT_LLM_MODEL, metadata=_meta("R1ATTN_LLM_MODEL", "Model id at the endpoint.")
    )
    llm_api_key: str | None = field(
        default=None,
        metadata=_meta("R1ATTN_LLM_API_KEY", "API key (else OPENAI_API_KEY, else NVIDIA_API_KEY)."),
    )
    llm_samples: int = field(
        default=4, metadata=_meta("R1ATTN_LLM_SAMPLES", "LLM candidates requested per round.")
    )
    llm_concurrency: int = field(
        default=4, metadata=_meta("R1ATTN_LLM_CONCURRENCY", "Concurrent LLM requests at most.")
    )
    llm_temperature: float = field(
        default=0.6, metadata=_meta("R1ATTN_LLM_TEMPERATURE", "Sampling temperature (0.6 per DeepSeek).")
    )
    llm_max_tokens: int = field(
        default=16384, metadata=_meta("R1ATTN_LLM_MAX_TOKENS", "Max tokens per LLM answer.")
    )
    llm_request_timeout_s: float = field(
        default=600.0,
        metadata=_meta("R1ATTN_LLM_REQUEST_TIMEOUT_S", "Wall-clock deadline for one streamed answer."),
    )
    llm_max_requests: int = field(
        default=32, metadata=_meta("R1ATTN_LLM_MAX_REQUESTS", "Total LLM requests per signature.")
    )
    llm_max_total_tokens: int = field(
        default=400_000,
        metadata=_meta("R1ATTN_LLM_MAX_TOTAL_TOKENS", "Total LLM tokens per signature."),
    )
    hotpath: str = field(
        default="auto",
        metadata=_meta("R1ATTN_HOTPATH", "C++ cache-hit fast path: auto (built once, in the background) or off."),
    )
    log_level: str | None = field(
        default=None, metadata=_meta("R1ATTN_LOG_LEVEL", "Log level for the torch_r1attn logger.")
    )

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> None:
            env = {f.name: f.metadata["env"] for f in dataclasses.fields(self)}[name]
            raise ValueError(f"invalid setting {name} ({env}): {why}")

        if self.on_miss not in ON_MISS_CHOICES:
            bad("on_miss", f"{self.on_miss!r} is not one of {ON_MISS_CHOICES}")
        if self.proposer not in PROPOSER_CHOICES:
            bad("proposer", f"{self.proposer!r} is not one of {PROPOSER_CHOICES}")
        if self.hotpath not in HOTPATH_CHOICES:
            bad("hotpath", f"{self.hotpath!r} is not one of {HOTPATH_CHOICES}")
        if self.fallback not in FALLBACK_CHOICES:
            bad("fallback", f"{self.fallback!r} is not one of {FALLBACK_CHOICES}")
        for name in ("budget_s", "verify_timeout_s", "llm_request_timeout_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                bad(name, f"must be a positive finite number of seconds, got {v!r}")
        for name in (
            "max_candidates", "rounds", "samples", "workers", "llm_samples", "llm_concurrency",
            "llm_max_tokens", "llm_max_requests", "llm_max_total_tokens",
        ):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                bad(name, f"must be an integer >= 1, got {v!r}")
        if not (0.0 <= self.win_margin < 1.0):
            bad("win_margin", f"must be in [0, 1), got {self.win_margin!r}")
        if not (0.0 <= self.llm_temperature <= 2.0):
            bad("llm_temperature", f"must be in [0, 2], got {self.llm_temperature!r}")

    @property
    def resolved_llm_api_key(self) -> str | None:
        return self.llm_api_key or os.environ.get("OPENAI_API_KEY") or os.environ.get("NVIDIA_API_KEY")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        env = os.environ if environ is None else environ
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f.metadata["env"])
            if raw is None or raw == "":
                continue
            kwargs[f.name] = _parse(f, raw)
        kwargs.update(overrides)
        return cls(**kwargs)

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)


def _parse(f: dataclasses.Field, raw: str) -> Any:
    typ = str(f.type)
    try:
        if typ.startswith("int"):
            return int(raw)
        if typ.startswith("float"):
            return float(raw)
    except ValueError:
        raise ValueError(f"invalid setting {f.metadata['env']}={raw!r}: expected {typ.split()[0]}") from None
    return raw


def settings_table() -> str:
    """The README's table of every ``R1ATTN_*`` setting (markdown)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(Settings):
        rows.append(f"| `{f.metadata['env']}` | `{f.default}` | {f.metadata['help']} |")
    return "\n".join(rows)


_current: Settings | None = None


def settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    global _current
    if _current is None:
        _current = Settings.from_env()
    return _current


def set_settings(new: Settings | None) -> None:
    """Replace the process-wide settings (``None`` = re-read the environment on next use)."""
    global _current
    _current = new
