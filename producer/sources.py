"""Source readers: a corpus of any supported format as one deterministic sequence of documents.

A source is a file, a directory or stdin ("-"). Its documents have positions 0..count-1 that stay
the same as long as the source does: the producer numbers batches from positions and resumes a
killed run from one, so every read of the same source yields the same documents in the same order.

- Directories are read recursively, files in sorted relative-path order (code-point order of the
  '/'-separated path). Hidden entries, files and folders whose names start with "." or "_", are
  skipped, as `pyarrow.dataset` does. Links to files are followed, links to folders are not (no cycles).
- Formats: Parquet, JSON Lines, CSV/TSV, plain text (one document per non-blank line, or per file),
  picked by suffix with `format="auto"`. Stdin is spooled to a temporary file first.
- Ids come from the id column or field ("id" when present), else they are the int64 positions;
  text documents take "relpath:line" (1-based) or "relpath" as ids.

Whatever would stop the producer (a missing column, a malformed line, a mixed id type) raises
`SourceError` naming the file, line or position and what to do. A document that merely cannot be
embedded (missing, empty or undecodable text) is kept with a reason in `SourceChunk.problems`, so the
producer can dead-letter it and lose nothing.

This module is the public face: `open_source`, `Source` and its records. The settings are in
spec.py, listing and sniffing files in files.py, stdin in stdin.py, duplicate ids in duplicates.py,
and one reader per format behind the registry in formats/.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from embedq.errors import SourceError
from embedq.producer.duplicates import IdHashes
from embedq.producer.files import SourceFile, list_files
from embedq.producer.formats import IdBlock, make_reader
from embedq.producer.spec import FORMATS, STDIN, TEXT_UNITS, SourceSpec, check_spec
from embedq.producer.stdin import spool_stdin, stdin_file
from embedq.protocol import DocId

__all__ = ["FORMATS", "STDIN", "TEXT_UNITS", "Source", "SourceChunk", "SourceScan", "SourceSpec", "open_source"]


@dataclass
class SourceChunk:
    """Consecutive documents starting at source position `pos`."""

    pos: int
    ids: list[DocId]  # all strings or all ints
    texts: list[str]  # "" where the document is unusable (see problems)
    problems: dict[int, str]  # index within this chunk -> why the document cannot be embedded


@dataclass(frozen=True)
class SourceScan:
    """What one pass over a source's ids found."""

    count: int
    id_type: str  # "string" or "int64"
    duplicate_ids: list[tuple[DocId, int, int]]  # up to 10 examples: (id, first position, repeat position)
    n_duplicates: int  # documents whose id appeared at an earlier position
    fingerprint: str
    duplicate_positions: tuple[int, ...] = ()  # every such repeat position (the first occurrence excluded)


def open_source(spec: SourceSpec) -> Source:
    """Check `spec`, list the source's files and resolve its format and fields; reads little."""
    check_spec(spec)
    spool: str | None = None
    content_digest: str | None = None
    if spec.path == STDIN:
        spool, content_digest = spool_stdin()
        try:
            files = [stdin_file(spool, spec)]
        except BaseException:
            os.unlink(spool)
            raise
    else:
        files = list_files(spec)
    try:
        return Source(spec, files, spool=spool, content_digest=content_digest)
    except BaseException:
        if spool is not None:
            os.unlink(spool)
        raise


class Source:
    """An opened source: `scan()` it once, then read `chunks()` from any position; `close()` it."""

    def __init__(
        self, spec: SourceSpec, files: list[SourceFile], *, spool: str | None = None,
        content_digest: str | None = None,
    ) -> None:
        self.spec = spec
        self._files = files
        self._spool = spool
        self._content_digest = content_digest
        self.format = files[0].format
        self._counts: dict[str, int] = {}  # file rel -> documents, learnt from metadata or a full read
        self._scan: SourceScan | None = None
        self._reader = make_reader(self.format, spec, files)
        self._fingerprint = self._compute_fingerprint()
        # The spooled copy of stdin goes away even when the caller forgets close(). Registered last:
        # if opening fails, open_source removes the spool itself.
        self._cleanup = weakref.finalize(self, _remove, spool) if spool else None

    # The resolved settings: what `auto` and a missing --id-field turned into.
    @property
    def id_field(self) -> str | None:
        """The id column or field; None when ids are positions or, for text, paths and lines."""
        return self._reader.id_field

    @property
    def text_field(self) -> str | None:
        return None if self.format == "text" else self.spec.text_field

    @property
    def fingerprint(self) -> str:
        """A digest of the files' paths, sizes and mtimes (stdin: its content) and the settings."""
        return self._fingerprint

    def describe(self) -> str:
        """One line for logs, e.g. "passages.parquet (parquet, id=id, text=text)"."""
        if self.format == "text":
            fields = (
                "one document per line, id=path:line" if self.spec.text_unit == "line"
                else "one document per file, id=path"
            )
        else:
            fields = f"id={self.id_field or 'position'}, text={self.spec.text_field}"
        if self._spool is not None:
            return f"stdin ({self.format}, {fields})"
        if len(self._files) == 1 and self._files[0].label == self.spec.path:
            return f"{self.spec.path} ({self.format}, {fields})"
        n = len(self._files)
        return f"{self.spec.path.rstrip('/')}/ ({n} {self.format} file{'s' if n != 1 else ''}, {fields})"

    def scan(self) -> SourceScan:
        """One pass over the ids: count them, check their types, find duplicates; cached."""
        if self._scan is not None:
            return self._scan
        reader = self._reader
        # Generated and path ids are unique by construction: only ids from a field are hashed.
        hashes = IdHashes() if reader.id_field is not None else None
        pos = 0
        for f in self._files:
            start = pos
            for block in reader.id_blocks(f, pos):
                if hashes is not None:
                    hashes.add(block)
                pos += len(block)
            self._counts[f.rel] = pos - start
        if pos == 0:
            raise SourceError(
                f"{self.spec.path if self._spool is None else 'stdin'} holds no documents "
                f"({len(self._files)} file{'s' if len(self._files) != 1 else ''}, all empty or blank); "
                "point the source at the documents to embed"
            )
        examples: list[tuple[DocId, int, int]] = []
        repeats: list[int] = []
        if hashes is not None:
            repeats, examples = hashes.repeats(self._id_blocks(), as_int=reader.id_type == "int64")
        self._scan = SourceScan(pos, reader.id_type, examples, len(repeats), self._fingerprint, tuple(repeats))
        return self._scan

    def chunks(self, start: int = 0, chunk_size: int = 4096) -> Iterator[SourceChunk]:
        """Documents from position `start` on, in chunks of exactly `chunk_size` (the last may be short).

        Chunk boundaries fall at start + k * chunk_size, whatever the files' boundaries, so a run
        resumed at a chunk boundary cuts the same chunks as the run it resumes.
        """
        if start < 0 or chunk_size <= 0:
            raise ValueError(f"start must be >= 0 and chunk_size > 0, not {start} and {chunk_size}")
        return _rechunk(self._pieces(start, chunk_size), chunk_size)

    def close(self) -> None:
        """Remove the spooled copy of stdin, if any; closing twice is harmless."""
        if self._cleanup is not None:
            self._cleanup()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Source {self.describe()}>"

    def _id_blocks(self) -> Iterator[IdBlock]:
        """Every id of the source in blocks, from position 0 (a second pass for duplicate ids)."""
        pos = 0
        for f in self._files:
            for block in self._reader.id_blocks(f, pos):
                yield block
                pos += len(block)

    def _pieces(self, start: int, size: int) -> Iterator[SourceChunk]:
        reader = self._reader
        pos = 0
        for f in self._files:
            skip = 0
            if pos < start:
                n = self._counts.get(f.rel)
                if n is None:
                    n = self._counts[f.rel] = reader.count(f, pos)
                if pos + n <= start:  # the whole file lies before the start: skip it unread
                    pos += n
                    continue
                skip = start - pos
                pos = start
            file_start = pos - skip
            for piece in reader.pieces(f, skip, size, pos):
                n = len(piece.texts)
                ids = piece.ids if piece.ids is not None else list(range(pos, pos + n))
                yield SourceChunk(pos, ids, piece.texts, piece.problems)
                pos += n
            self._counts[f.rel] = pos - file_start

    def _compute_fingerprint(self) -> str:
        digest = hashlib.sha256(b"embedq-source-v1\n")
        settings: dict[str, Any] = {"format": self.format}
        if self.format == "text":
            settings["text_unit"] = self.spec.text_unit
        else:
            settings.update(id_field=self.id_field, text_field=self.spec.text_field)
        if self.format == "csv":
            settings["csv_delimiter"] = self.spec.csv_delimiter
        digest.update(json.dumps(settings, sort_keys=True).encode() + b"\n")
        if self._content_digest is not None:
            digest.update(f"stdin\0{self._content_digest}\n".encode())
        else:
            for f in self._files:
                digest.update(f"{f.rel}\0{f.size}\0{f.mtime_ns}\n".encode("utf-8", "surrogateescape"))
        return digest.hexdigest()


def _remove(path: str) -> None:
    with suppress(FileNotFoundError):
        os.unlink(path)


def _rechunk(pieces: Iterator[SourceChunk], size: int) -> Iterator[SourceChunk]:
    """Regroup consecutive pieces into chunks of exactly `size` documents, the last one shorter."""
    ids: list[Any] = []
    texts: list[str] = []
    problems: dict[int, str] = {}
    pos = 0
    for piece in pieces:
        n = len(piece.texts)
        if not texts and n == size:  # the common case: a piece is already a whole chunk
            yield piece
            continue
        offset = 0
        while offset < n:
            if not texts:
                pos = piece.pos + offset
            take = min(size - len(texts), n - offset)
            for i, reason in piece.problems.items():
                if offset <= i < offset + take:
                    problems[len(texts) + i - offset] = reason
            ids.extend(piece.ids[offset:offset + take])
            texts.extend(piece.texts[offset:offset + take])
            offset += take
            if len(texts) == size:
                yield SourceChunk(pos, ids, texts, problems)
                ids, texts, problems = [], [], {}
    if texts:
        yield SourceChunk(pos, ids, texts, problems)
