"""Where log lines go, how many there are (`-q`, default, `-v`, `-vv`) and their form (`--log-format
text|json`: JSON Lines with time, level, logger, message and any exception, for log shippers).

Log lines go to the standard error of the moment, not the one at start-up, so that while a live
progress display runs (it takes stderr over) they are printed above it rather than into it.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Libraries whose progress bars and advice are noise in a batch tool, unless asked for with -vv.
_QUIET_LIBRARIES = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
                    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


class CurrentStderr(logging.StreamHandler):
    """A handler writing to whatever `sys.stderr` is when a line is logged."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[no-untyped-def]
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


class JsonLines(logging.Formatter):
    """One JSON object per record: `time` (UTC, ISO 8601), `level`, `logger`, `message`, `process`,
    `thread`, and `exception` (the traceback) where there is one."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        line = {"time": when.isoformat(timespec="milliseconds"), "level": record.levelname, "logger": record.name,
                "message": record.getMessage(), "process": record.process, "thread": record.threadName}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure(verbosity: int, quiet: bool, log_format: str = "text") -> None:
    """-q: embedq's warnings and errors; default: embedq's progress (INFO); -v: embedq's debug
    lines; -vv: every library's logs and progress bars too. `log_format` "json": JSON Lines."""
    handler = CurrentStderr()
    handler.setFormatter(JsonLines() if log_format == "json" else logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbosity >= 2 else logging.WARNING)
    own = logging.WARNING if quiet else (logging.DEBUG if verbosity >= 1 else logging.INFO)
    logging.getLogger("embedq").setLevel(own)
    if verbosity < 2:
        for name, value in _QUIET_LIBRARIES.items():
            os.environ.setdefault(name, value)
