"""Latency histograms that the worker fills as it goes, without a metrics library: the Prometheus
exporter (`embedq.exporter`) reads them when it is scraped, and anything else may read them too."""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

# Seconds: from a fast GPU batch (milliseconds) to a window committed under a slow disk (a minute).
LATENCY_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Histogram:
    """Observations counted per bucket (`counts[i]`: values <= `bounds[i]`, not cumulative; the last
    count is above every bound), with their sum. Safe to observe from several threads."""

    bounds: tuple[float, ...] = LATENCY_BOUNDS
    counts: list[int] = field(init=False)
    total: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.bounds, value)] += 1
            self.total += value

    @contextmanager
    def time(self) -> Iterator[None]:
        """Observe the seconds the block took."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.observe(time.perf_counter() - started)

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or under it), the last bound infinite: Prometheus' buckets."""
        with self._lock:
            counts, running = list(self.counts), 0
        out = []
        for bound, count in zip((*self.bounds, float("inf")), counts, strict=True):
            running += count
            out.append((bound, running))
        return out
