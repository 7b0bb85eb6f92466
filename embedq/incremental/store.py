"""Where an incremental record lives: a local directory or an object-store prefix, one interface.

The record's protocol (state.py) needs four things of storage: write a whole file so a reader sees
the old or the new one (a local file goes through a temporary name, fsync and rename; an object PUT
is atomic by itself), read one, list a folder, remove a folder. Object stores read their own writes
(S3 has since 2020, GCS always), which is all the pointer file `CURRENT` needs.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedq.durable import atomic_path, write_atomically
from embedq.errors import OutputError
from embedq.worker.output import is_remote

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass(frozen=True)
class StateStore:
    """A folder of the record: `root` is a local path or a URI; `path(...)` names files under it."""

    root: str
    filesystem: Any = None  # a pyarrow filesystem for URIs; None for a local directory

    @classmethod
    def open(cls, location: str) -> StateStore:
        """The store at `location` (a directory, created if missing, or an object-store URI)."""
        if not is_remote(location):
            path = Path(location.removeprefix("file://")).expanduser().resolve()
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OutputError(f"cannot create the state directory {path}: {exc.strerror}") from exc
            return cls(str(path))
        from embedq.worker.object_store import _filesystem  # the same URI handling as job output

        filesystem, root = _filesystem(location)
        return cls(root.rstrip("/"), filesystem)

    def child(self, *names: str) -> StateStore:
        """The store of a sub-folder."""
        return StateStore("/".join([self.root, *names]), self.filesystem)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def exists(self, name: str) -> bool:
        if self.filesystem is None:
            return os.path.exists(self.path(name))
        import pyarrow.fs as pafs

        return bool(self.filesystem.get_file_info(self.path(name)).type != pafs.FileType.NotFound)

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a whole file atomically and durably."""
        if self.filesystem is None:
            Path(self.root).mkdir(parents=True, exist_ok=True)
            write_atomically(Path(self.path(name)), data)
            return
        with self.filesystem.open_output_stream(self.path(name)) as stream:
            stream.write(data)

    @contextlib.contextmanager
    def writer(self, name: str) -> Iterator[Any]:
        """A binary stream that writes file `name` whole: visible under its name only once the block
        ends without error (local: a temporary name, fsync, rename; object store: the upload completes
        at close)."""
        if self.filesystem is None:
            Path(self.root).mkdir(parents=True, exist_ok=True)
            with atomic_path(Path(self.path(name))) as temp, temp.open("wb") as handle:
                yield handle
            return
        with self.filesystem.open_output_stream(self.path(name)) as stream:
            yield stream

    def fetch(self, name: str, target: Path) -> None:
        """Copy file `name` to the local path `target` (whole, atomically)."""
        import pyarrow.fs as pafs

        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as temp:
            pafs.copy_files(self.path(name), str(temp), source_filesystem=self.filesystem,
                            destination_filesystem=pafs.LocalFileSystem())

    def read_bytes(self, name: str) -> bytes:
        if self.filesystem is None:
            return Path(self.path(name)).read_bytes()
        with self.filesystem.open_input_stream(self.path(name)) as stream:
            return bytes(stream.read())

    def write_table(self, name: str, table: pa.Table) -> None:
        """Write a Parquet file whole (zstd), atomically."""
        import pyarrow.parquet as pq

        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd")
        self.write_bytes(name, sink.getvalue())

    def read_table(self, name: str, columns: list[str] | None = None) -> pa.Table:
        import pyarrow.parquet as pq

        return pq.read_table(self.path(name), columns=columns, filesystem=self.filesystem)

    def folders(self) -> list[str]:
        """The names of the folders directly under the root."""
        if self.filesystem is None:
            root = Path(self.root)
            return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.exists() else []
        import pyarrow.fs as pafs

        found = self.filesystem.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return sorted(info.base_name for info in found if info.type == pafs.FileType.Directory)

    def remove(self) -> None:
        """Remove this folder and everything under it (an abandoned generation)."""
        if self.filesystem is None:
            import shutil

            shutil.rmtree(self.root, ignore_errors=True)
            return
        self.filesystem.delete_dir_contents(self.root, missing_dir_ok=True)

    def __str__(self) -> str:
        return self.root
