"""Progress of long work: a live display on a terminal, plain log lines elsewhere (CI, systemd, pipes).

On a terminal the display takes standard error over while it runs: log lines (written to the
current `sys.stderr`, see `embedq.cli.logs`) are printed above it, never into it. Rates are
averaged over the last 30 s, so a commit that lands many documents at once does not make them spike.
"""

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


def si(value: float) -> str:
    """1234567 -> '1.23M': a rate or count short enough for a progress line."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}" if value >= 10 or value == 0 else f"{value:.1f}"


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """`plural(1, "part")` -> '1 part', `plural(3, "part")` -> '3 parts', with thousands separators."""
    return f"{count:,} {noun if count == 1 else (nouns or noun + 's')}"


def byte_size(count: int) -> str:
    """A memory or file size: '812 B', '3.2 KiB', '14.0 MiB'."""
    if count < 1024:
        return f"{count:,} B"
    return f"{count / 1024:,.1f} KiB" if count < 2**20 else f"{count / 2**20:,.1f} MiB"


def duration(seconds: float) -> str:
    """A time left or taken: '42 s', '12:05', '3:02:01'; '--:--' when unknown."""
    if seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "--:--"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class ProgressReport:
    """Documents done of a total, documents/s, tokens/s, dead letters and time left.

    `update` as often as you like (the display redraws at most 4 times a second; without a terminal
    a line is logged every `log_every` seconds, and once at the end). `phase` says what happens
    before the first document is done ("loading the model", "waiting for batches").
    """

    def __init__(self, label: str, total: int, *, interactive: bool | None = None,
                 log_every: float = 10.0) -> None:
        self.label = label
        self.total = total
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.log_every = log_every
        self._docs = Rate()
        self._tokens = Rate()
        self._last_log = time.monotonic()
        self._progress: Any = None
        self._task: Any = None
        self.done = 0
        self.tokens = 0
        self.dead = 0
        self.phase = ""

    def __enter__(self) -> ProgressReport:
        if self.interactive:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn

            self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                      TextColumn("{task.fields[line]}"), console=Console(stderr=True),
                                      redirect_stderr=True, redirect_stdout=True, refresh_per_second=4)
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=max(self.total, 1), line=self.line())
        return self

    def update(self, done: int, tokens: int | None = None, *, dead: int | None = None,
               phase: str | None = None) -> None:
        now = time.monotonic()
        self.done = min(done, self.total)
        self.tokens = self.tokens if tokens is None else tokens
        self.dead = self.dead if dead is None else dead
        self.phase = self.phase if phase is None else phase
        self._docs.add(self.done, now)
        self._tokens.add(self.tokens, now)
        if self._progress is not None:
            self._progress.update(self._task, completed=self.done, line=self.line())
        elif now - self._last_log >= self.log_every:
            self._last_log = now
            log.info("%s: %s", self.label, self.line())

    def line(self) -> str:
        """'1,234/20,000 docs (6.2%) · 345 docs/s · 12.3k tok/s · 2 dead-lettered · 0:48 left'."""
        docs_s, tokens_s = self._docs.per_second(), self._tokens.per_second()
        parts = [f"{self.done:,}/{self.total:,} docs ({100.0 * self.done / max(self.total, 1):.1f}%)"]
        if self.phase and self.done == 0:
            parts.append(self.phase)
        elif docs_s > 0:
            parts += [f"{si(docs_s)} docs/s", f"{si(tokens_s)} tok/s"]
        if self.dead:
            parts.append(f"{self.dead:,} dead-lettered")
        if docs_s > 0 and self.done < self.total:
            parts.append(f"{duration((self.total - self.done) / docs_s)} left")
        return " · ".join(parts)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=self.done, line=self.line())
            self._progress.stop()
        elif exc_type is None:
            log.info("%s: %s", self.label, self.line())


class Startup:
    """Where the seconds before the first vector go, from the process's start: marks taken as each
    step ends, written as one line ("start-up: imports 2.1 s, model 0.3 s, ...")."""

    def __init__(self) -> None:
        import psutil

        self.origin = psutil.Process().create_time()
        self.marks: list[tuple[str, float]] = []

    def mark(self, step: str, at: float | None = None) -> None:
        """`step` ended now (or at `at`, a `time.time()`)."""
        self.marks.append((step, time.time() if at is None else at))

    def steps(self) -> dict[str, float]:
        """Seconds of each step, in order (a step repeated adds up)."""
        out: dict[str, float] = {}
        last = self.origin
        for step, at in sorted(self.marks, key=lambda m: m[1]):
            out[step] = out.get(step, 0.0) + max(0.0, at - last)
            last = max(last, at)
        return out

    def line(self) -> str:
        steps = self.steps()
        total = sum(steps.values())
        return "start-up: " + ", ".join(f"{step} {seconds:.1f} s" for step, seconds in steps.items()) + (
            f" (first vector {total:.1f} s after the process started)" if "first vector" in steps else "")
