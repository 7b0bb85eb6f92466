"""`status --watch N`: a job's status every N seconds until it is complete, in the form its reader needs.

On a terminal each frame redraws the last one in place (rich's Live; the last frame stays on the
screen). Into a pipe or a file every refresh is appended as a block under its timestamp line, with
no escape codes, for a log. With `--json`, one compact JSON object per refresh and line (JSON Lines)
with a `time` field, for a script. Ctrl-C stops it as it stops every command (exit 130).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING

import typer

from embedq.status import JobStatus, render

if TYPE_CHECKING:
    from rich.console import Console


def watch(read: Callable[[], JobStatus], period: float, *, as_json: bool) -> JobStatus:
    """Show `read()` every `period` seconds until the job is complete (or not found); returns the last."""
    from rich.console import Console

    console = Console()
    frames = _frames(read, period)
    if as_json:
        return _print_each(frames, _json_line)
    if not console.is_terminal:
        return _print_each(frames, lambda at, status: f"{header(at, period, status)}\n{render(status)}\n")
    return _redraw(frames, period, console)


def header(at: datetime, period: float, status: JobStatus) -> str:
    """The line above each frame: when it was read, and how often it is refreshed (or that it has stopped)."""
    if status.complete or not status.exists:
        return f"{at:%Y-%m-%d %H:%M:%S}  stopped: job " + ("complete" if status.exists else "not found")
    return f"{at:%Y-%m-%d %H:%M:%S}  every {period:g} s"


def _frames(read: Callable[[], JobStatus], period: float) -> Iterator[tuple[datetime, JobStatus]]:
    """The status with the local time it was read, every `period` seconds, the final one included."""
    while True:
        started = time.monotonic()
        at, status = datetime.now(), read()
        yield at, status
        if status.complete or not status.exists:
            return
        time.sleep(max(0.0, period - (time.monotonic() - started)))


def _print_each(frames: Iterator[tuple[datetime, JobStatus]], text: Callable[[datetime, JobStatus], str]
                ) -> JobStatus:
    status = JobStatus(job="", exists=False)
    for at, status in frames:
        typer.echo(text(at, status))  # flushed each time: a `tail -f` or a pipe sees every refresh
    return status


def _json_line(at: datetime, status: JobStatus) -> str:
    return json.dumps({"time": at.astimezone().isoformat(timespec="seconds"), **status.as_dict()},
                      separators=(",", ":"))


def _redraw(frames: Iterator[tuple[datetime, JobStatus]], period: float, console: Console) -> JobStatus:
    from rich.live import Live
    from rich.text import Text

    status = JobStatus(job="", exists=False)
    # Refreshed only when a frame is read; Text, not markup, so a job named `[x]` prints as it is.
    with Live(console=console, auto_refresh=False, transient=False, screen=False) as live:
        for at, status in frames:
            live.update(Text(f"{header(at, period, status)}\n{render(status)}"), refresh=True)
    return status
