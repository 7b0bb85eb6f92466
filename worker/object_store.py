"""An output location in an object store (`s3://bucket/prefix`, `gs://...`, any URI that
`pyarrow.fs.FileSystem.from_uri` opens, else fsspec): the commit protocol where there is no rename.

`output.OutputDir` holds the protocol's steps; this module supplies its storage primitives for a
pyarrow filesystem, and says why each crash point stays safe (`ObjectStoreDir`).
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import importlib
import os
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit, urlunsplit

from embedq.errors import OutputError
from embedq.worker.output import PROBE_PREFIX, THIS_HOST, OutputDir, part_file, staging_file

if TYPE_CHECKING:
    import pyarrow as pa


class ObjectStoreDir(OutputDir):
    """A prefix in an object store, where there is no rename.

    What it relies on: an object appears whole or not at all (a PUT, a completed multipart upload,
    a CopyObject), is durable once the call returns (there is nothing to fsync), and reads and
    listings after a write see it (S3 since December 2020, GCS, MinIO; an eventually consistent
    store is not supported). And part names are write-once: a name belongs to one worker process
    and window, its staged object is written once (a retried write writes the same rows), and every
    other object of that name is a copy of it; so no copy ever puts different bytes under a final
    name, and any copy of a part may stand for it.

    Publishing and setting aside therefore copy to the new name, then delete the old one
    (`_replace`). Each crash point, and why it is safe:

      staging killed mid-upload     no object (an incomplete multipart upload, invisible to listings; a
                                    bucket lifecycle rule reclaims it); the batches are reclaimed and redone
      staging failed                the partial object is deleted, or left as a staged orphan: recovery
                                    sets it aside, as on a local directory
      publish, before the copy      staged only, committed: recovery rolls it forward (the same two steps)
      publish, copied, not deleted  final and staged copy, committed: a reader sees the part once (no glob
                                    matches the staged name); recovery deletes the copy (`forget_copy`)
      set aside a visible orphan,   final and set-aside copy, not committed: the orphan stays visible until
      copied, not deleted           the next recovery, exactly as if the crash came before the copy (every
                                    worker start, gc, verify and finalize run recovery; no job is final meanwhile)
      set aside a staged part,      staged and set-aside copy, not committed: recovery condemns and moves it
      copied, not deleted           again; if its writer settles it anyway (the condemnation was lost), it
                                    publishes from either copy, and recovery then deletes the other one
      two publishes of one part     the second copy writes the same bytes again, or finds its source gone and
                                    the final there (`OutputDir.publish`); deleting a gone object is no error

    A set-aside part's age is its object's LastModified (a copy is a new object, so it counts from
    the move) on the store's clock, which a probe object relates to this host's, erring towards
    younger: a skewed local clock cannot delete a set-aside part before `finalize.SET_ASIDE_GRACE`.
    """

    def __init__(self, filesystem: Any, root: str, location: str) -> None:
        self.fs = filesystem  # a pyarrow.fs.FileSystem
        self.root = root.rstrip("/")  # the prefix, as the filesystem spells it: "bucket/prefix"
        self._location = location
        self._skew: float | None = None  # the store's clock minus this host's, at least (seconds)

    @property
    def location(self) -> str:
        return self._location

    def where(self, filename: str) -> str:
        return f"{self._location}/{filename}"

    def is_at(self, location: str) -> bool:
        return redact_uri(location).rstrip("/") == self._location

    def describe(self, exc: OSError) -> str:
        return f"Could not use {self._location} ({exc}). {_STORE_ADVICE}"

    def _path(self, filename: str) -> str:
        return f"{self.root}/{filename}"

    @contextlib.contextmanager
    def staging_stream(self, name: str) -> Iterator[Any]:
        path = self._path(staging_file(name))
        stream = self.fs.open_output_stream(path)
        try:
            yield stream
            stream.close()  # completes the upload: the object appears whole and stored, or not at all
        except BaseException:
            # pyarrow's streams cannot abort an upload: close it, then delete what it left.
            with contextlib.suppress(OSError):
                stream.close()
            with contextlib.suppress(OSError):
                self.fs.delete_file(path)
            raise

    def read_part(self, name: str) -> pa.Table:
        import pyarrow.parquet as pq

        return pq.read_table(self._path(part_file(name)), filesystem=self.fs)

    def _replace(self, source: str, target: str) -> None:
        # Two steps, each atomic; the class docstring says why a crash between them is safe.
        try:
            self.fs.copy_file(self._path(source), self._path(target))
        except OSError:
            if not self._exists(source):  # S3 says NoSuchKey as a plain OSError
                raise FileNotFoundError(errno.ENOENT, "No such object", self._path(source)) from None
            raise
        with contextlib.suppress(FileNotFoundError):  # another process's publish or move deleted it first
            self.fs.delete_file(self._path(source))

    def _delete(self, filename: str) -> None:
        self.fs.delete_file(self._path(filename))

    def _exists(self, filename: str) -> bool:
        import pyarrow.fs as pafs

        try:
            return bool(self.fs.get_file_info(self._path(filename)).type == pafs.FileType.File)
        except OSError as exc:  # the store did not answer, or refused: a listing gives no errno to act on
            raise OutputError(self.describe(exc)) from exc

    def _age(self, filename: str) -> float:
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(self._path(filename))
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(errno.ENOENT, "No such object", self._path(filename))
        if info.mtime is None:
            return 0.0  # a store that keeps no times: taken as new, so nothing is deleted for its age
        # LastModified has whole seconds: the object may be up to a second younger than it says. The
        # estimate may come out below zero; it grows with this host's clock, second for second.
        return time.time() + self._store_skew() - info.mtime.timestamp() - 1.0

    def _store_skew(self) -> float:
        """The store's clock minus this host's, at least: measured once, with a probe object."""
        if self._skew is None:
            self.probe()
        assert self._skew is not None
        return self._skew

    def probe(self) -> None:
        """Write and delete a probe object: proves the location writable, and relates the clocks."""
        import pyarrow.fs as pafs

        probe = self._path(f"{PROBE_PREFIX}{THIS_HOST}_{os.getpid()}_{uuid.uuid4().hex[:8]}")
        with self.fs.open_output_stream(probe) as stream:
            stream.write(b"embedq")
        written = time.time()  # the store stamped it before this
        info = self.fs.get_file_info(probe)
        with contextlib.suppress(FileNotFoundError):  # a stale-probe sweep with a skewed clock took it
            self.fs.delete_file(probe)
        if info.type != pafs.FileType.File:
            raise OSError(errno.EIO, f"the probe object {probe} was written but cannot be found")
        self._skew = 0.0 if info.mtime is None else info.mtime.timestamp() - written

    def _files(self, pattern: str) -> list[str]:
        import pyarrow.fs as pafs

        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        except OSError as exc:
            raise OutputError(self.describe(exc)) from exc
        return [info.base_name for info in infos
                if info.type == pafs.FileType.File and fnmatch.fnmatchcase(info.base_name, pattern)]

    def _write(self, filename: str, data: bytes) -> None:
        with self.fs.open_output_stream(self._path(filename)) as stream:  # one PUT: the old object or the new
            stream.write(data)

    def _read(self, filename: str) -> bytes:
        with self.fs.open_input_stream(self._path(filename)) as stream:
            return bytes(stream.read())

    def _touch(self, filename: str) -> None:
        pass  # the move was a copy: a new object, whose LastModified is the move's time

    def _sync(self) -> None:
        pass  # an object is durable once the call that wrote or deleted it returns


_STORE_ADVICE = ("Check that the bucket exists and these credentials may read, write and delete in it "
                 "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, or the machine's role), and for an S3-compatible "
                 "server its address (AWS_ENDPOINT_URL).")
# Stores where a prefix needs no creating (a directory there is only a marker object, which no one needs).
_FLAT_STORES = {"s3", "gcs", "abfs"}


def open_object_store(uri: str, *, create: bool) -> ObjectStoreDir:
    """The output location at `uri`, an object-store prefix; with `create`, proved writable by a probe."""
    import pyarrow.fs as pafs

    location = redact_uri(uri).rstrip("/")
    try:
        filesystem, root = _filesystem(uri)
        output = ObjectStoreDir(filesystem, root, location)
        found = filesystem.get_file_info(output.root).type
        if found == pafs.FileType.File:
            raise OutputError(f"Output location {location} is an object, not a prefix to write parts under.")
        if found == pafs.FileType.NotFound:
            if not create:
                raise OutputError(f"Output location {location} holds nothing: is that the job's --out?")
            if filesystem.type_name not in _FLAT_STORES:
                filesystem.create_dir(output.root, recursive=True)
        output.remove_stale_probes()
        if create:
            output.probe()
    except OSError as exc:
        raise OutputError(f"Output location {location} cannot be used ({exc}). {_STORE_ADVICE}") from exc
    return output


def _filesystem(uri: str) -> tuple[Any, str]:
    """The pyarrow filesystem and path of `uri`: pyarrow's own where it knows the scheme, else fsspec's."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    scheme = urlsplit(uri).scheme
    try:
        return pafs.FileSystem.from_uri(_with_s3_endpoint(uri))
    except pa.ArrowInvalid as exc:
        if "Unrecognized filesystem type" not in str(exc):
            raise OutputError(f"Output location {redact_uri(uri)} is not a valid {scheme}:// URI: {exc}") from exc
        try:  # fsspec is optional (and untyped): imported by name
            filesystem, path = importlib.import_module("fsspec").core.url_to_fs(uri)
        except (ImportError, ValueError) as fsspec_exc:
            raise OutputError(f"pyarrow cannot open {scheme}:// URIs ({exc}), nor can fsspec ({fsspec_exc}): install "
                              f"fsspec and its package for {scheme}://.") from exc
        return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem)), str(path)


def _with_s3_endpoint(uri: str) -> str:
    """`uri`, with the endpoint that AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL names made explicit
    for an s3:// URI that names none. pyarrow 26's `FileSystem.from_uri` reads both variables
    (checked), its `S3FileSystem()` reads neither (checked), and from_uri learnt AWS_ENDPOINT_URL_S3
    only in Arrow 16 (apache/arrow#39160) while embedq allows pyarrow 14."""
    parts = urlsplit(uri)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if parts.scheme != "s3" or not endpoint or "endpoint_override=" in parts.query:
        return uri
    query = "&".join(filter(None, [parts.query, "endpoint_override=" + quote(endpoint, safe="")]))
    return urlunsplit(parts._replace(query=query))


def redact_uri(uri: str) -> str:
    """`uri` without the credentials a URI may carry (`s3://KEY:SECRET@bucket/...`)."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
