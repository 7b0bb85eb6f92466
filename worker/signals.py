"""Graceful shutdown: the first SIGTERM or SIGINT drains the worker, a second one exits at once.

After a first signal the worker stops reading and finishes and commits what is in flight (contract
8). A second signal exits with 130 at once: what was not committed stays pending in Redis and is
reclaimed by another worker after the lease, so nothing is lost either way. A signal while the
worker is still starting (waiting for its job, loading its model, building its engine) stops it at
once: it has read nothing, so there is nothing to drain, and it ends as a drained worker does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("embedq.worker")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def drain_on_signal(stop: Callable[[], None]) -> Iterator[Callable[[], bool]]:
    """While inside, a first signal calls `stop`; a second exits the process with 130. Yields a
    function that tells whether a signal came. Outside the main thread (where Python cannot
    install handlers) it does nothing."""
    received = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield received.is_set
        return

    def handle(signum: int, _frame: Any) -> None:
        if received.is_set():
            log.warning("second signal: exiting now; uncommitted batches will be reclaimed")
            os._exit(130)
        log.warning("%s: finishing and committing what is in flight (send again to exit at once)",
                    signal.Signals(signum).name)
        received.set()
        stop()

    previous = {sig: signal.signal(sig, handle) for sig in SIGNALS}
    try:
        yield received.is_set
    finally:
        for sig, handler in previous.items():
            # Once a stop was asked for, a further signal during the final steps exits at once.
            signal.signal(sig, _exit_now if received.is_set() else handler)


class StoppedWhileStarting(BaseException):
    """A SIGTERM or SIGINT came before the worker read anything. A BaseException, as KeyboardInterrupt
    is, so that no `except Exception` of the start-up (an engine build's, say) takes it for a failure."""


@contextlib.contextmanager
def stop_while_starting() -> Iterator[None]:
    """While inside, a SIGTERM or SIGINT raises `StoppedWhileStarting` (whose text is the signal's
    name), so a worker asked to stop while it starts (a node drained, a Ctrl-C during an engine
    build) stops at once instead of dying of the signal. Outside the main thread it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, _frame: Any) -> None:
        raise StoppedWhileStarting(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handle) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _exit_now(signum: int, _frame: Any) -> None:
    os._exit(130)
