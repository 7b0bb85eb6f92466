"""An output location on a local filesystem: a part is published by a rename, and every file and
every rename is fsynced (file, then directory). `output.OutputDir` holds the protocol's steps."""

from __future__ import annotations

import contextlib
import errno
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedq.durable import atomic_path, sync_directory
from embedq.errors import OutputError
from embedq.worker.output import PROBE_PREFIX, THIS_HOST, OutputDir, part_file, set_aside_file, staging_file

if TYPE_CHECKING:
    import pyarrow as pa


def describe_os_error(exc: OSError, path: Path) -> str:
    """An actionable sentence for a failed write under the output directory."""
    if exc.errno == errno.ENOSPC:
        return f"The disk holding {path} is full ({exc.strerror}). Free space or point --out elsewhere."
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (f"The output directory {path} is not writable ({exc.strerror}). Fix its permissions or "
                "mount, or point --out at a writable directory.")
    if exc.errno == errno.ENOENT:
        return f"The output directory {path} cannot be created ({exc.strerror}): is its parent on a real filesystem?"
    if exc.errno == errno.EDQUOT:
        return f"The disk quota for {path} is exhausted ({exc.strerror})."
    return f"Writing under {path} failed: {exc}"


@dataclass(frozen=True)
class LocalDir(OutputDir):
    """A local output directory; `open_output` creates and checks it."""

    path: Path

    @property
    def location(self) -> str:
        return str(self.path)

    def staging(self, name: str) -> Path:
        return self.path / staging_file(name)

    def final(self, name: str) -> Path:
        return self.path / part_file(name)

    def set_aside(self, name: str) -> Path:
        """Where recovery moves a part it takes out of sight (no glob matches it, no reader reads it)."""
        return self.path / set_aside_file(name)

    def where(self, filename: str) -> str:
        return str(self.path / filename)

    def is_at(self, location: str) -> bool:
        return Path(location).resolve() == self.path.resolve()

    def describe(self, exc: OSError) -> str:
        return describe_os_error(exc, self.path)

    @contextlib.contextmanager
    def staging_stream(self, name: str) -> Iterator[Any]:
        path = self.staging(name)
        try:
            with path.open("wb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                path.unlink()
            raise

    def read_part(self, name: str) -> pa.Table:
        import pyarrow.parquet as pq

        return pq.read_table(self.final(name))

    def _replace(self, source: str, target: str) -> None:
        os.replace(self.path / source, self.path / target)  # atomic within the directory

    def _delete(self, filename: str) -> None:
        (self.path / filename).unlink()

    def _exists(self, filename: str) -> bool:
        return (self.path / filename).exists()

    def _age(self, filename: str) -> float:
        return time.time() - (self.path / filename).stat().st_mtime

    def _touch(self, filename: str) -> None:
        os.utime(self.path / filename)  # a rename keeps the file's mtime

    def _files(self, pattern: str) -> list[str]:
        return [p.name for p in self.path.glob(pattern) if p.is_file()]

    def _write(self, filename: str, data: bytes) -> None:
        # A temporary name, fsync, rename, fsync the directory (embedq.durable).
        with atomic_path(self.path / filename) as temp, temp.open("wb") as handle:
            handle.write(data)

    def _read(self, filename: str) -> bytes:
        return (self.path / filename).read_bytes()

    def _sync(self) -> None:
        sync_directory(self.path)


def open_local_dir(path: Path, *, create: bool) -> LocalDir:
    """The directory at `path`, created if asked, checked to accept durable writes (a probe file)."""
    path = path.expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise OutputError(f"Output location {path} exists and is not a directory.")
    if not path.exists():
        if not create:
            raise OutputError(f"Output directory {path} does not exist.")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(describe_os_error(exc, path)) from exc
    output = LocalDir(path)
    output.remove_stale_probes()
    probe = path / f"{PROBE_PREFIX}{THIS_HOST}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    if create:
        try:
            with probe.open("wb") as handle:
                handle.write(b"embedq")
                handle.flush()
                os.fsync(handle.fileno())
            probe.unlink()
        except OSError as exc:
            with contextlib.suppress(OSError):
                probe.unlink()
            raise OutputError(describe_os_error(exc, path)) from exc
    return output
