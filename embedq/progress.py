"""Progress of long work: a live bar on a terminal, plain log lines elsewhere (CI, systemd, pipes)."""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from types import TracebackType
from typing import Any

log = logging.getLogger("embedq")


class Rate:
    """Throughput over the last `window` seconds, from cumulative counts."""

    def __init__(self, window: float = 30.0) -> None:
        self.window = window
        self._points: deque[tuple[float, float]] = deque()

    def add(self, total: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._points.append((now, total))
        while len(self._points) > 2 and now - self._points[0][0] > self.window:
            self._points.popleft()

    def per_second(self) -> float:
        if len(self._points) < 2:
            return 0.0
        (t0, v0), (t1, v1) = self._points[0], self._points[-1]
        return (v1 - v0) / (t1 - t0) if t1 > t0 else 0.0


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def _eta(seconds: float) -> str:
    if seconds <= 0 or seconds == float("inf"):
        return "--:--"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class ProgressReport:
    """Shows documents done of a total, tokens/s and ETA; `update` as often as you like."""

    def __init__(self, label: str, total: int, *, interactive: bool | None = None,
                 log_every: float = 10.0) -> None:
        self.label = label
        self.total = total
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.log_every = log_every
        self._docs = Rate()
        self._tokens = Rate()
        self._last_log = 0.0
        self._started = time.monotonic()
        self._bar: Any = None
        self._task: Any = None
        self._done = 0

    def __enter__(self) -> ProgressReport:
        if self.interactive:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("docs"), TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                                 transient=False)
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total, rate="")
        return self

    def update(self, done: int, tokens: int = 0, note: str = "") -> None:
        now = time.monotonic()
        self._done = done
        self._docs.add(done, now)
        self._tokens.add(tokens, now)
        docs_s, tokens_s = self._docs.per_second(), self._tokens.per_second()
        rate = f"{_si(docs_s)} docs/s {_si(tokens_s)} tok/s" + (f" {note}" if note else "")
        if self._bar is not None:
            self._bar.update(self._task, completed=done, rate=rate)
        elif now - self._last_log >= self.log_every or (done >= self.total and self._last_log >= 0):
            eta = (self.total - done) / docs_s if docs_s > 0 else float("inf")
            log.info("%s: %d/%d documents (%.1f%%), %s, ETA %s", self.label, done, self.total,
                     100.0 * done / max(1, self.total), rate, _eta(eta))
            self._last_log = now if done < self.total else -1.0

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()
