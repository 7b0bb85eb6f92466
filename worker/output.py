"""The output directory: where parts are staged, published and listed, and where the manifest lives.

Layout of one job's output directory:

    part-<n>-<worker>.parquet         committed parts (the manifest lists each one)
    .part-<n>-<worker>.parquet.tmp    a part being written, or committed but not yet renamed
    _manifest.json                    the committed parts, written when the job finishes or is verified
    _embedq.json                      which job owns this directory

Staging names end in `.tmp`, which no `*.parquet` or `**/*.parquet` glob matches (DuckDB, polars),
and start with `.`, which `pyarrow.dataset` skips when handed the directory itself; so a reader
sees a part only after its commit (contract 4).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedq.durable import atomic_path, sync_directory
from embedq.errors import OutputError

PART_SUFFIX = ".parquet"
STAGING_PREFIX = "."
STAGING_SUFFIX = ".parquet.tmp"
MANIFEST_FILE = "_manifest.json"
OWNER_FILE = "_embedq.json"
DEAD_LETTERS_FILE = "_dead_letters.jsonl"


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
class OutputDir:
    """A local output directory; `open_output` creates and checks it."""

    path: Path

    def staging(self, name: str) -> Path:
        return self.path / (STAGING_PREFIX + name + STAGING_SUFFIX)

    def final(self, name: str) -> Path:
        return self.path / (name + PART_SUFFIX)

    def claim(self, job: str) -> None:
        """Mark this directory as `job`'s; refuse a directory another job already writes to."""
        owner = self.path / OWNER_FILE
        if owner.exists():
            try:
                existing = json.loads(owner.read_text(encoding="utf-8")).get("job")
            except (OSError, ValueError) as exc:
                raise OutputError(f"{owner} is unreadable ({exc}); remove it if the directory is yours.") from exc
            if existing != job:
                raise OutputError(
                    f"Output directory {self.path} belongs to job {existing!r}, not {job!r}. "
                    "Use one output directory per job."
                )
            return
        self.write_json(OWNER_FILE, {"job": job})

    def publish(self, name: str) -> None:
        """Make a committed part visible: rename its staging file and make the rename durable."""
        staging, final = self.staging(name), self.final(name)
        try:
            try:
                os.replace(staging, final)
            except FileNotFoundError:
                if not final.exists():
                    raise
                # renamed already (a retried publish, or recovery got there first)
            self._fsync_dir()
        except OSError as exc:
            raise OutputError(
                describe_os_error(exc, self.path) + f" Part {name} is committed: the next worker on this "
                "directory, or `embedq gc`, makes it visible.") from exc

    def discard(self, name: str) -> None:
        """Remove a part that will never be committed (its batches were committed elsewhere)."""
        self._remove(self.staging(name), f"Staged part {name} is not committed; `embedq gc` removes it.")

    def remove_orphan(self, name: str) -> None:
        """Remove a visible part the manifest does not list (Redis lost its commit: a failover, or
        AOF `everysec` losing its last second)."""
        self._remove(self.final(name), f"Part {name} is not committed; `embedq gc` removes it.")

    def _remove(self, path: Path, consequence: str) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise OutputError(describe_os_error(exc, self.path) + " " + consequence) from exc

    def sync_dir(self) -> None:
        """Make renames and removals in the directory durable."""
        try:
            self._fsync_dir()
        except OSError as exc:
            raise OutputError(describe_os_error(exc, self.path)) from exc

    def _fsync_dir(self) -> None:
        sync_directory(self.path)

    def part_names(self) -> set[str]:
        """Names of visible parts (`*.parquet`)."""
        return {p.name[: -len(PART_SUFFIX)] for p in self.path.glob("part-*" + PART_SUFFIX) if p.is_file()}

    def staged_names(self) -> set[str]:
        """Names of staged parts (`*.parquet.tmp`)."""
        return {p.name[len(STAGING_PREFIX):-len(STAGING_SUFFIX)]
                for p in self.path.glob(STAGING_PREFIX + "part-*" + STAGING_SUFFIX) if p.is_file()}

    def write_json(self, filename: str, data: Any, *, text: str | None = None) -> None:
        """Write a small JSON file (or `text`) atomically: temporary name, fsync, rename, fsync the directory."""
        try:
            with atomic_path(self.path / filename) as temp, temp.open("w", encoding="utf-8") as handle:
                if text is not None:
                    handle.write(text)
                else:
                    json.dump(data, handle, indent=1, sort_keys=True, default=str)
        except OSError as exc:
            raise OutputError(describe_os_error(exc, self.path)) from exc

    def write_lines(self, filename: str, rows: list[dict[str, Any]]) -> None:
        """Write JSON lines atomically, like `write_json`."""
        self.write_json(filename, None, text="".join(json.dumps(row, default=str) + "\n" for row in rows))

    def read_manifest(self) -> dict[str, Any] | None:
        path = self.path / MANIFEST_FILE
        if not path.exists():
            return None
        try:
            data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise OutputError(f"{path} is unreadable ({exc}); run `embedq verify` to rewrite it.") from exc
        return data


def open_output(location: str | os.PathLike[str], *, create: bool = True) -> OutputDir:
    """The output directory at `location`, created if asked, checked to accept durable writes."""
    text = os.fspath(location)
    if "://" in text and not text.startswith("file://"):
        raise OutputError(
            f"Output location {text!r} is a remote URI; this version writes to local directories "
            "(mount the bucket, or write locally and upload)."
        )
    path = Path(text.removeprefix("file://")).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise OutputError(f"Output location {path} exists and is not a directory.")
    if not path.exists():
        if not create:
            raise OutputError(f"Output directory {path} does not exist.")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(describe_os_error(exc, path)) from exc
    probe = path / f".embedq-probe-{uuid.uuid4().hex[:8]}"
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
    return OutputDir(path)
