"""The output location: where parts are staged, published and listed, and where the manifest lives.

Layout of one job's output location (a directory, or a prefix in an object store):

    part-<n>-<worker>.parquet             committed parts (the manifest lists each one)
    .part-<n>-<worker>.parquet.tmp        a part being written, or committed but not yet published
    .part-<n>-<worker>.parquet.set-aside  a part recovery moved out of sight (see commit.py): kept
                                          until the finalized job proves it is not needed
    _manifest.json                        the committed parts, written when the job is finalized or verified
    _dead_letters.jsonl                   the dead letters, written when the job is finalized
    _embedq.json                          which job owns this location

Staging and set-aside names end in `.tmp` or `.set-aside`, which no `*.parquet` or `**/*.parquet`
glob matches (DuckDB, polars), and start with `.`, which `pyarrow.dataset` skips when handed the
directory itself; so a reader sees a part only after its commit (contract 4), and no longer sees
one once recovery has set it aside.

One protocol, two kinds of location: `OutputDir` writes each step once, over a few storage
primitives (replace, delete, list, age, write whole, read), and `open_output` picks the kind:
`local_dir.LocalDir`, a local directory (a part is published by a rename; files and the directory
are fsynced), or `object_store.ObjectStoreDir`, a prefix in an object store (`s3://bucket/prefix`,
`gs://...`, any URI pyarrow.fs opens, else fsspec), where there is no rename: see its docstring
for why the protocol's guarantees hold there.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedq.errors import OutputError

if TYPE_CHECKING:
    import pyarrow as pa

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


def part_file(name: str) -> str:
    """The visible file name of part `name`."""
    return name + PART_SUFFIX


def staging_file(name: str) -> str:
    """The file name part `name` is written under, before it is committed and published."""
    return STAGING_PREFIX + name + STAGING_SUFFIX


def set_aside_file(name: str) -> str:
    """The file name recovery moves part `name` to, out of every reader's sight."""
    return STAGING_PREFIX + name + SET_ASIDE_SUFFIX


class OutputDir(ABC):
    """A job's output location: the commit protocol's file steps, over the primitives each kind supplies."""

    @property
    @abstractmethod
    def location(self) -> str:
        """Where it is, as recorded in Redis and shown: an absolute path, or a URI without credentials."""

    def claim(self, job: str) -> None:
        """Mark this location as `job`'s; refuse one another job already writes to."""
        if self._exists(OWNER_FILE):
            try:
                existing = json.loads(self._read(OWNER_FILE).decode("utf-8")).get("job")
            except (OSError, ValueError) as exc:
                raise OutputError(f"{self.where(OWNER_FILE)} is unreadable ({exc}); remove it if the directory "
                                  "is yours.") from exc
            if existing != job:
                raise OutputError(
                    f"Output directory {self.location} belongs to job {existing!r}, not {job!r}. "
                    "Use one output directory per job."
                )
            return
        self.write_json(OWNER_FILE, {"job": job})

    def publish(self, name: str) -> None:
        """Make a committed part visible: move its staging file (or, if recovery set it aside, the
        set-aside file) to its visible name, and make that durable."""
        final = part_file(name)
        try:
            try:
                self._replace(staging_file(name), final)
            except FileNotFoundError:
                try:  # recovery took its writer for dead and set it aside; that condemnation was lost
                    self._replace(set_aside_file(name), final)
                except FileNotFoundError:
                    if not self._exists(final):
                        raise
                    # published already (a retried publish, or recovery got there first)
            self._sync()
        except OSError as exc:
            raise OutputError(self._unpublished(name, exc)) from exc

    def _unpublished(self, name: str, exc: OSError) -> str:
        """What a failed publish leaves, said truthfully: who makes the part visible, if anyone can."""
        kept = next((f for f in (staging_file(name), set_aside_file(name)) if self._there(f)), None)
        visible = self._there(part_file(name))
        # ENOENT with a file still there: recovery moved it during the rename (not a directory problem).
        failed = (f"Renaming part {name} failed ({exc.strerror})." if exc.errno == errno.ENOENT
                  else self.describe(exc))
        if kept is not None and visible:  # an object store: copied, and the copy's source not yet deleted
            return failed + (f" Part {name} is committed and visible; the copy left as {kept} is removed by the "
                             "next worker on this location, `embedq gc` or `embedq verify`.")
        if kept is not None:
            return (failed + f" Part {name} is committed and its file is kept as {kept}: the next worker "
                    "on this directory, `embedq gc` or `embedq verify` makes it visible (once the directory "
                    "accepts renames).")
        if visible:
            return failed + f" Part {name} is committed and renamed; `embedq verify` checks that it is on disk."
        return (f"Part {name} is committed in Redis, but neither its staged file nor a set-aside copy is in "
                f"{self.location} ({exc.strerror or exc}): was the directory cleaned by hand? Its documents are "
                "missing from the output; `embedq verify` lists them.")

    def _there(self, filename: str) -> bool:
        """`_exists` for a message: False where even that cannot be found out."""
        try:
            return self._exists(filename)
        except (OSError, OutputError):
            return False

    def discard(self, name: str) -> None:
        """Remove a staged part its writer will never commit (its settle step found some of its
        batches committed elsewhere, or the part condemned): no one else may commit that name."""
        self._remove(staging_file(name), f"Staged part {name} is not committed; `embedq gc` sets it aside.")

    def forget_copy(self, name: str) -> None:
        """Remove a staged or set-aside copy of a committed part that is visible already (an object
        store's publish that died between its copy and its delete): the visible part has its bytes."""
        for filename in (staging_file(name), set_aside_file(name)):
            self._remove(filename, f"Part {name} is visible; `embedq gc` removes the copy {filename}.")
        self.sync_dir()

    def move_aside(self, name: str, *, visible: bool) -> bool:
        """Move a staged part (or, with `visible`, a visible one) to its set-aside name; False if
        it was not there. Its age then counts from now: see `finalize.prune_set_aside`."""
        source, target = (part_file(name) if visible else staging_file(name)), set_aside_file(name)
        try:
            self._replace(source, target)
        except FileNotFoundError:
            return False  # published or set aside meanwhile, or removed by its writer
        except OSError as exc:
            raise OutputError(self.describe(exc) + f" {source} was not set aside; `embedq gc` tries again.") from exc
        with contextlib.suppress(OSError):  # gone already if its writer just published it
            self._touch(target)
        return True

    def set_aside_age(self, name: str) -> float | None:
        """Seconds since the part was set aside, or None if it is not (any more)."""
        try:
            return self._age(set_aside_file(name))
        except FileNotFoundError:
            return None

    def delete_set_aside(self, name: str) -> None:
        """Delete a set-aside part for good (only once the finalized job proves it is not needed)."""
        self._remove(set_aside_file(name), f"Set-aside part {name} is not needed; `embedq gc` deletes it.")

    def _remove(self, filename: str, consequence: str) -> None:
        try:
            self._delete(filename)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise OutputError(self.describe(exc) + " " + consequence) from exc

    def remove_file(self, filename: str) -> None:
        """Remove one of the location's own files (`_dead_letters.jsonl` once no letter is left)."""
        self._remove(filename, f"Remove {filename} by hand.")
        self.sync_dir()

    def sync_dir(self) -> None:
        """Make moves and removals in the location durable."""
        try:
            self._sync()
        except OSError as exc:
            raise OutputError(self.describe(exc)) from exc

    def part_names(self) -> set[str]:
        """Names of visible parts (`*.parquet`)."""
        return {f[: -len(PART_SUFFIX)] for f in self._files("part-*" + PART_SUFFIX)}

    def staged_names(self) -> set[str]:
        """Names of staged parts (`.*.parquet.tmp`)."""
        return self._hidden_names(STAGING_SUFFIX)

    def set_aside_names(self) -> set[str]:
        """Names of set-aside parts (`.*.parquet.set-aside`)."""
        return self._hidden_names(SET_ASIDE_SUFFIX)

    def _hidden_names(self, suffix: str) -> set[str]:
        return {f[len(STAGING_PREFIX):-len(suffix)] for f in self._files(STAGING_PREFIX + "part-*" + suffix)}

    def has_part(self, name: str) -> bool:
        """Whether part `name` is visible."""
        return self._exists(part_file(name))

    def has_file(self, filename: str) -> bool:
        """Whether one of the location's own files (`_dead_letters.jsonl`, ...) is there."""
        return self._exists(filename)

    def remove_stale_probes(self) -> list[str]:
        """Remove `.embedq-probe-*` files older than a minute, or written by a process of this host
        that is gone; returns their names. Best effort: a location that refuses removals keeps them."""
        removed = []
        for probe in self._files(PROBE_PREFIX + "*"):
            try:
                if self._age(probe) > PROBE_STALE_SECONDS or _writer_gone(probe):
                    self._delete(probe)
                    removed.append(probe)
            except OSError:
                continue
        return removed

    def write_json(self, filename: str, data: Any, *, text: str | None = None) -> None:
        """Write a small JSON file (or `text`) whole: a reader sees the old one or the new one."""
        body = text if text is not None else json.dumps(data, indent=1, sort_keys=True, default=str)
        try:
            self._write(filename, body.encode("utf-8"))
        except OSError as exc:
            raise OutputError(self.describe(exc)) from exc

    def write_lines(self, filename: str, rows: list[dict[str, Any]]) -> None:
        """Write JSON lines whole, like `write_json`."""
        self.write_json(filename, None, text="".join(json.dumps(row, default=str) + "\n" for row in rows))

    def read_manifest(self) -> dict[str, Any] | None:
        if not self._exists(MANIFEST_FILE):
            return None
        try:
            data: dict[str, Any] = json.loads(self._read(MANIFEST_FILE).decode("utf-8"))
        except (OSError, ValueError) as exc:
            raise OutputError(f"{self.where(MANIFEST_FILE)} is unreadable ({exc}); run `embedq verify` to "
                              "rewrite it.") from exc
        return data

    def read_lines(self, filename: str) -> list[dict[str, Any]] | None:
        """The rows of a JSON Lines file `write_lines` wrote, or None where there is none."""
        if not self._exists(filename):
            return None
        try:
            return [json.loads(line) for line in self._read(filename).decode("utf-8").splitlines() if line.strip()]
        except (OSError, ValueError) as exc:
            raise OutputError(f"{self.where(filename)} is unreadable ({exc}).") from exc

    # -- what each kind supplies ------------------------------------------------------------------

    @abstractmethod
    def where(self, filename: str) -> str:
        """A file of the location, spelled for messages."""

    @abstractmethod
    def is_at(self, location: str) -> bool:
        """Whether `location` (as `location` spells it, or as a user wrote it) names this one."""

    @abstractmethod
    def describe(self, exc: OSError) -> str:
        """An actionable sentence for a failed operation on the location."""

    @abstractmethod
    def staging_stream(self, name: str) -> contextlib.AbstractContextManager[Any]:
        """A binary stream that writes part `name` under its staging name: whole and durable once
        the block ends, removed if the block fails."""

    @abstractmethod
    def read_part(self, name: str) -> pa.Table:
        """Read a visible part."""

    @abstractmethod
    def _replace(self, source: str, target: str) -> None:
        """Move `source` to `target`, replacing it; FileNotFoundError if `source` is not there."""

    @abstractmethod
    def _delete(self, filename: str) -> None:
        """Delete a file; FileNotFoundError if it is not there."""

    @abstractmethod
    def _exists(self, filename: str) -> bool: ...

    @abstractmethod
    def _age(self, filename: str) -> float:
        """Seconds since the file was written or moved, never more than it is; FileNotFoundError."""

    @abstractmethod
    def _touch(self, filename: str) -> None:
        """Make a moved file's age count from now."""

    @abstractmethod
    def _files(self, pattern: str) -> list[str]:
        """The names of the files directly in the location that match a glob `pattern`."""

    @abstractmethod
    def _write(self, filename: str, data: bytes) -> None:
        """Write a whole file, so that a reader sees the old content or the new, durably."""

    @abstractmethod
    def _read(self, filename: str) -> bytes: ...

    @abstractmethod
    def _sync(self) -> None:
        """Make the moves and removals so far durable."""


def is_remote(location: str | os.PathLike[str]) -> bool:
    """Whether `location` is a URI of a filesystem other than this machine's."""
    text = os.fspath(location)
    return "://" in text and not text.startswith("file://")


def open_output(location: str | os.PathLike[str], *, create: bool = True) -> OutputDir:
    """The output location at `location` (a path or a URI), created if asked, checked to accept
    durable writes."""
    text = os.fspath(location)
    # The two kinds build on this module, so they are imported here.
    if is_remote(text):
        from embedq.worker.object_store import open_object_store

        return open_object_store(text, create=create)
    from embedq.worker.local_dir import open_local_dir

    return open_local_dir(Path(text.removeprefix("file://")), create=create)


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
