"""Durable file writes: a file appears under its final name whole, and survives a power loss.

Write under a temporary name beside the final one, fsync it, rename it into place, fsync the
directory. Readers then never see a half-written file (a rename is atomic within a filesystem), and
after the directory's fsync the new name is on disk. The engine cache and the output directory both
write this way.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def sync_directory(directory: str | os.PathLike[str]) -> None:
    """fsync a directory, so the renames and removals inside it are on disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_file(path: str | os.PathLike[str]) -> None:
    """fsync a file's contents."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def temporary_name(final: Path) -> Path:
    """A name beside `final` that is unique per writer and that no glob for the final name matches
    (a leading dot and a `.tmp` suffix), so concurrent writers never write into one file."""
    return final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """A temporary path beside `final`; once the block succeeds it is fsynced and renamed to `final`.

    The caller creates the file (so it gets the umask's permissions; mkstemp's 0600 would hide it
    from other users' processes). If the block fails, the temporary file is removed.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    staged = temporary_name(final)
    try:
        yield staged
        sync_file(staged)
        os.replace(staged, final)
        sync_directory(final.parent)
    finally:
        staged.unlink(missing_ok=True)


def write_atomically(final: Path, data: bytes) -> None:
    """Write `data` to `final` durably and atomically."""
    with atomic_path(final) as staged:
        staged.write_bytes(data)


@contextmanager
def locked(path: Path, *, when_busy: Callable[[], None]) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created if missing) for the block. If another
    process holds it, `when_busy()` is called first: it raises to give up, or returns to wait.
    The lock goes with the process, so a killed holder never leaves it taken."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            when_busy()
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield
