"""What a worker is told (`WorkerOptions`) and what it reports (`WorkerReport`).

The option defaults are the CLI's (`Settings`), so a worker built in Python behaves like one
started from the command line; `WorkerOptions.from_settings` is the one mapping between them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from embedq.config import Settings
from embedq.metrics import Histogram
from embedq.worker.pipeline import EngineStats

__all__ = ["StageCounters", "WorkerOptions", "WorkerReport"]


@dataclass(frozen=True)
class WorkerOptions:
    """How a worker reads, retries and stops; see `embedq work --help`. The defaults are the CLI's
    (`Settings`), so a worker built in Python behaves like one started from the command line."""

    lease_seconds: float = Settings.lease_seconds
    max_failures: int = Settings.max_failures
    max_deliveries: int = Settings.max_deliveries
    window_docs: int = Settings.window_docs
    window_seconds: float = Settings.window_seconds
    prefetch: int = Settings.prefetch
    shutdown_timeout: float = Settings.shutdown_timeout
    disk_retry_seconds: float = Settings.disk_retry_seconds
    redis_retry_seconds: float = Settings.redis_retry_seconds
    output_dtype: str = Settings.output_dtype
    commit_threads: int = Settings.commit_threads
    finished_ttl: int = Settings.finished_ttl  # what the output records leaves Redis this long after the job
    exit_when_done: bool = True
    idle_exit_seconds: float | None = None  # exit after this long with nothing to do (tests, bench)

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> WorkerOptions:
        return settings.options_for(cls, **overrides)


@dataclass
class StageCounters:
    """Documents through each stage so far; read by `status` and sampled by `embedq bench`."""

    fetched: int = 0
    tokenized: int = 0
    embedded: int = 0
    committed: int = 0
    tokens_embedded: int = 0


@dataclass
class WorkerReport:
    """What one worker run did."""

    worker: str
    documents: int = 0
    tokens: int = 0
    parts: int = 0
    dead_documents: int = 0
    duplicates_dropped: int = 0
    seconds: float = 0.0
    job_complete: bool = False
    stopped_by_signal: bool = False
    engine: EngineStats = field(default_factory=EngineStats)
    stages: StageCounters = field(default_factory=StageCounters)
    delivered: int = 0  # stream entries delivered to this worker (new and reclaimed)
    reclaimed: int = 0  # of them, taken over from a worker whose lease ran out
    errors: dict[str, int] = field(default_factory=dict)  # by kind: redis, batch (a failed attempt)
    # Seconds per window: reading it from Redis, tokenizing it, writing and committing its part.
    latency: dict[str, Histogram] = field(default_factory=lambda: {s: Histogram() for s in ("fetch", "tokenize",
                                                                                         "commit")})

    def count_error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def counting(self, kind: str, say: Callable[[str], None]) -> Callable[[str], None]:
        """`say`, counting an error of `kind` each time it is called."""
        def counted(message: str) -> None:
            self.count_error(kind)
            say(message)
        return counted
