"""The output directory: where parts are staged, published and listed, and where the manifest lives.

Layout of one job's output directory:

    part-<n>-<worker>.parquet             committed parts (the manifest lists each one)
    .part-<n>-<worker>.parquet.tmp        a part being written, or committed but not yet renamed
    .part-<n>-<worker>.parquet.set-aside  a part recovery moved out of sight (see commit.py): kept
                                          until the finalized job proves it is not needed
    _manifest.json                        the committed parts, written when the job is finalized or verified
    _dead_letters.jsonl                   the dead letters, written when the job is finalized
    _embedq.json                          which job owns this directory

Staging and set-aside names end in `.tmp` or `.set-aside`, which no `*.parquet` or `**/*.parquet`
glob matches (DuckDB, polars), and start with `.`, which `pyarrow.dataset` skips when handed the
directory itself; so a reader sees a part only after its commit (contract 4), and no longer sees
one once recovery has set it aside.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedq.durable import atomic_path, sync_directory
from embedq.errors import OutputError

PART_SUFFIX = ".parquet"
STAGING_PREFIX = "."
STAGING_SUFFIX = ".parquet.tmp"
SET_ASIDE_SUFFIX = ".parquet.set-aside"
PROBE_PREFIX = ".embedq-probe-"
PROBE_STALE_SECONDS = 60.0  # a probe lives for milliseconds; one older than this was left by a killed process
# This host, as probe names spell it (`<host>_<pid>_<random>`): a probe of a process gone from here is stale.
THIS_HOST = socket.gethostname().split(".")[0].replace("_", "").replace("-", "") or "host"
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

    def set_aside(self, name: str) -> Path:
        """Where recovery moves a part it takes out of sight (no glob matches it, no reader reads it)."""
        return self.path / (STAGING_PREFIX + name + SET_ASIDE_SUFFIX)

    def publish(self, name: str) -> None:
        """Make a committed part visible: rename its staging file (or, if recovery set it aside,
        the set-aside file) to its visible name, and make the rename durable."""
        final = self.final(name)
        try:
            try:
                os.replace(self.staging(name), final)
            except FileNotFoundError:
                try:  # recovery took its writer for dead and set it aside; that condemnation was lost
                    os.replace(self.set_aside(name), final)
                except FileNotFoundError:
                    if not final.exists():
                        raise
                    # renamed already (a retried publish, or recovery got there first)
            self._fsync_dir()
        except OSError as exc:
            raise OutputError(self._unpublished(name, exc)) from exc

    def _unpublished(self, name: str, exc: OSError) -> str:
        """What a failed publish leaves, said truthfully: who makes the part visible, if anyone can."""
        kept = next((p for p in (self.staging(name), self.set_aside(name)) if p.exists()), None)
        # ENOENT with a file still there: recovery moved it during the rename (not a directory problem).
        failed = (f"Renaming part {name} failed ({exc.strerror})." if exc.errno == errno.ENOENT
                  else describe_os_error(exc, self.path))
        if kept is not None:
            return (failed + f" Part {name} is committed and its file is kept as {kept.name}: the next worker "
                    "on this directory, `embedq gc` or `embedq verify` makes it visible (once the directory "
                    "accepts renames).")
        if self.final(name).exists():
            return failed + f" Part {name} is committed and renamed; `embedq verify` checks that it is on disk."
        return (f"Part {name} is committed in Redis, but neither its staged file nor a set-aside copy is in "
                f"{self.path} ({exc.strerror}): was the directory cleaned by hand? Its documents are missing "
                "from the output; `embedq verify` lists them.")

    def discard(self, name: str) -> None:
        """Remove a staged part its writer will never commit (its settle step found some of its
        batches committed elsewhere, or the part condemned): no one else may commit that name."""
        self._remove(self.staging(name), f"Staged part {name} is not committed; `embedq gc` sets it aside.")

    def move_aside(self, name: str, *, visible: bool) -> bool:
        """Move a staged part (or, with `visible`, a visible one) to its set-aside name; False if
        it was not there. Its age (mtime) then counts from now: see `commit.prune_set_aside`."""
        source, target = (self.final(name) if visible else self.staging(name)), self.set_aside(name)
        try:
            os.replace(source, target)
        except FileNotFoundError:
            return False  # published or set aside meanwhile, or removed by its writer
        except OSError as exc:
            raise OutputError(describe_os_error(exc, self.path) + f" {source.name} was not set aside; "
                              "`embedq gc` tries again.") from exc
        with contextlib.suppress(OSError):  # gone already if its writer just published it
            os.utime(target)
        return True

    def set_aside_age(self, name: str) -> float | None:
        """Seconds since the part was set aside, or None if it is not (any more)."""
        try:
            return time.time() - self.set_aside(name).stat().st_mtime
        except FileNotFoundError:
            return None

    def delete_set_aside(self, name: str) -> None:
        """Delete a set-aside part for good (only once the finalized job proves it is not needed)."""
        self._remove(self.set_aside(name), f"Set-aside part {name} is not needed; `embedq gc` deletes it.")

    def _remove(self, path: Path, consequence: str) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise OutputError(describe_os_error(exc, self.path) + " " + consequence) from exc

    def remove_file(self, filename: str) -> None:
        """Remove one of the directory's own files (`_dead_letters.jsonl` once no letter is left)."""
        self._remove(self.path / filename, f"Remove {filename} by hand.")
        self.sync_dir()

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
        """Names of staged parts (`.*.parquet.tmp`)."""
        return self._hidden_names(STAGING_SUFFIX)

    def set_aside_names(self) -> set[str]:
        """Names of set-aside parts (`.*.parquet.set-aside`)."""
        return self._hidden_names(SET_ASIDE_SUFFIX)

    def _hidden_names(self, suffix: str) -> set[str]:
        return {p.name[len(STAGING_PREFIX):-len(suffix)]
                for p in self.path.glob(STAGING_PREFIX + "part-*" + suffix) if p.is_file()}

    def remove_stale_probes(self) -> list[str]:
        """Remove writability probes that killed processes left behind; returns their names."""
        return remove_stale_probes(self.path)

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
    remove_stale_probes(path)
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
    return OutputDir(path)



def remove_stale_probes(path: Path) -> list[str]:
    """Remove `.embedq-probe-*` files older than a minute, or written by a process of this host that
    is gone; returns their names. Best effort: a directory that refuses removals keeps them."""
    removed = []
    for probe in path.glob(PROBE_PREFIX + "*"):
        try:
            stale = time.time() - probe.stat().st_mtime > PROBE_STALE_SECONDS or _writer_gone(probe.name)
            if stale:
                probe.unlink()
                removed.append(probe.name)
        except OSError:
            continue
    return removed


def _writer_gone(probe: str) -> bool:
    """Whether the probe's writer (`<host>_<pid>_<random>`) ran on this host and has exited."""
    host, _, rest = probe[len(PROBE_PREFIX):].partition("_")
    pid = rest.partition("_")[0]
    if host != THIS_HOST or not pid.isdigit():
        return False  # another host's (its processes cannot be checked from here), or an old-style name
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # alive, but another user's
    return False
