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
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import stat
import sys
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from embedq.errors import SourceError, UsageError
from embedq.protocol import DocId

FORMATS = ("auto", "parquet", "jsonl", "csv", "text")
TEXT_UNITS = ("line", "file")
STDIN = "-"
MAX_DUPLICATE_EXAMPLES = 10

_SUFFIX_FORMATS = {
    ".parquet": "parquet", ".pq": "parquet",
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
    ".csv": "csv", ".tsv": "csv",
    ".txt": "text", ".text": "text", ".md": "text", ".markdown": "text", ".rst": "text",
}
_PARQUET_MAGIC = b"PAR1"
_SNIFF_BYTES = 4096
# Text and JSONL files are read in blocks of whole lines: large enough that per-block overhead
# vanishes, small enough that a huge file never sits in memory at once.
_BLOCK_BYTES = 8 << 20
_CSV_BLOCK_BYTES = 4 << 20
_ID_BATCH_ROWS = 1 << 16
_FIELD_SAMPLE = 100  # JSONL documents whose fields decide which fields a source has
# A blank line (ASCII whitespace only) is no document. It is judged on the raw bytes, the same way
# when counting lines to skip and when reading them, so that the two always agree on positions.
_BLANK_BYTES = b" \t\n\r\x0b\x0c"
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
# A CSV id column is int64 only when every value is an integer written canonically: "007" stays a
# string, since reading it as 7 would change the id.
_CANONICAL_INT = r"^-?(0|[1-9][0-9]{0,18})$"

IdBlock = np.ndarray | list[Any] | range  # int64 ids, string ids, or range(n) when ids are generated


@dataclass(frozen=True)
class SourceSpec:
    """What to read and how; the CLI's --format, --id-field, --text-field, ... flags."""

    path: str  # a file, a directory, or "-" for stdin
    format: str = "auto"  # auto | parquet | jsonl | csv | text; auto goes by suffix
    id_field: str | None = None  # None: the "id" column/field if present, else int64 positions
    text_field: str = "text"
    text_unit: str = "line"  # text format only: "line" or "file"
    csv_delimiter: str | None = None  # None: "," or "\t" for .tsv


@dataclass
class SourceChunk:
    """Consecutive documents starting at source position `pos`."""

    pos: int
    ids: list[str] | list[int]
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


@dataclass(frozen=True)
class _File:
    path: str  # where to open it
    rel: str  # '/'-separated path relative to the source root: ids of text documents, the fingerprint
    label: str  # how messages name it
    size: int
    mtime_ns: int
    format: str


class _Piece(NamedTuple):
    ids: list[Any] | None  # None: generated from positions
    texts: list[str]
    problems: dict[int, str]


# --- opening -----------------------------------------------------------------------------------


def open_source(spec: SourceSpec) -> Source:
    """Check `spec`, list the source's files and resolve its format and fields; reads little."""
    _check_spec(spec)
    spool: str | None = None
    content_digest: str | None = None
    if spec.path == STDIN:
        spool, content_digest = _spool_stdin()
        try:
            files = [_stdin_file(spool, spec)]
        except BaseException:
            os.unlink(spool)
            raise
    else:
        files = _list_files(spec)
    try:
        return Source(spec, files, spool=spool, content_digest=content_digest)
    except BaseException:
        if spool is not None:
            os.unlink(spool)
        raise


def _check_spec(spec: SourceSpec) -> None:
    if spec.format not in FORMATS:
        raise UsageError(f"unknown source format {spec.format!r}; choose one of {', '.join(FORMATS)}")
    if spec.text_unit not in TEXT_UNITS:
        raise UsageError(f"unknown text unit {spec.text_unit!r}; choose 'line' or 'file'")
    if spec.format == "text" and spec.id_field is not None:
        raise UsageError("text sources take their ids from file paths and line numbers; drop --id-field")
    if spec.id_field is not None and spec.id_field == spec.text_field:
        raise UsageError(f"--id-field and --text-field both name {spec.id_field!r}; name two fields")
    if spec.csv_delimiter is not None and len(spec.csv_delimiter) != 1:
        raise UsageError(f"--csv-delimiter must be one character, not {spec.csv_delimiter!r}")
    if not spec.path:
        raise UsageError("no source path given; name a file, a directory, or - for stdin")


def _hidden(name: str) -> bool:
    return name.startswith((".", "_"))


def _list_files(spec: SourceSpec) -> list[_File]:
    root = spec.path
    try:
        st = os.stat(root)
    except FileNotFoundError:
        raise SourceError(f"{root} does not exist; check the path (or pass - to read stdin)") from None
    except OSError as exc:
        raise SourceError(f"cannot open {root}: {exc.strerror}; check the path and its permissions") from None
    if stat.S_ISDIR(st.st_mode):
        files = _walk(root, spec)
        if not files:
            raise SourceError(
                f"{root} holds no readable documents: no files in it or its subfolders (names starting "
                "with '.' or '_' are skipped); point the source at the files to embed"
            )
        _check_one_format(root, files)
        return files
    if not stat.S_ISREG(st.st_mode):  # a pipe or device could be read only once, not scanned then read
        raise SourceError(f"{root} is not a regular file; to read a pipe, pass - and feed it to stdin")
    _check_readable(root, root)
    name = os.path.basename(root)
    return [_File(root, name, root, st.st_size, st.st_mtime_ns, _file_format(root, root, spec))]


def _walk(root: str, spec: SourceSpec) -> list[_File]:
    def fail(exc: OSError) -> None:
        # os.walk skips folders it cannot list unless told otherwise; that would drop documents silently.
        raise SourceError(
            f"cannot list {exc.filename}: {exc.strerror}; fix its permissions or move it out of {root}"
        )

    files = []
    for folder, subfolders, names in os.walk(root, onerror=fail):
        subfolders[:] = [d for d in subfolders if not _hidden(d)]
        for name in names:
            if _hidden(name):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            try:
                st = os.stat(path)
            except OSError as exc:
                raise SourceError(
                    f"cannot open {path}: {exc.strerror} (a broken link?); fix it or move it out of {root}"
                ) from None
            if not stat.S_ISREG(st.st_mode):
                continue
            _check_readable(path, path)
            files.append(_File(path, rel, path, st.st_size, st.st_mtime_ns, _file_format(path, path, spec)))
    files.sort(key=lambda f: f.rel)
    return files


def _check_readable(path: str, label: str) -> None:
    if not os.access(path, os.R_OK):
        raise SourceError(
            f"cannot read {label}: permission denied; make it readable (chmod a+r) or move it out of the source"
        )


def _file_format(path: str, label: str, spec: SourceSpec) -> str:
    if spec.format != "auto":
        return spec.format
    known = _SUFFIX_FORMATS.get(os.path.splitext(path)[1].lower())
    if known is not None:
        return known
    return _sniff_format(path, label)


def _sniff_format(path: str, label: str) -> str:
    """Parquet by its magic bytes, text when the first bytes are UTF-8 without NULs, else unknown."""
    with _reading(label), open(path, "rb") as fh:
        head = fh.read(_SNIFF_BYTES)
    if head.startswith(_PARQUET_MAGIC):
        return "parquet"
    if b"\0" not in head:
        try:
            codecs.getincrementaldecoder("utf-8")().decode(head)  # tolerates a character cut at the end
            return "text"
        except UnicodeDecodeError:
            pass
    raise SourceError(
        f"cannot tell the format of {label}: its suffix is not one of {', '.join(sorted(_SUFFIX_FORMATS))} "
        "and it is not UTF-8 text (compressed or binary?); decompress or convert it, pass --format, "
        "or move it out of the source"
    )


def _check_one_format(root: str, files: list[_File]) -> None:
    by_format: dict[str, list[str]] = {}
    for f in files:
        by_format.setdefault(f.format, []).append(f.rel)
    if len(by_format) > 1:
        listing = "; ".join(
            f"{len(rels)} {fmt} ({', '.join(rels[:3])}{', ...' if len(rels) > 3 else ''})"
            for fmt, rels in sorted(by_format.items())
        )
        raise SourceError(
            f"{root} mixes file formats: {listing}; a source is read in one format: move the other files "
            "out, or pass --format to read every file in one format"
        )


def _spool_stdin() -> tuple[str, str]:
    """Copy stdin to a temporary file (so it can be scanned, then read) and digest its content."""
    stream = getattr(sys.stdin, "buffer", sys.stdin)
    digest = hashlib.sha256()
    fd, path = tempfile.mkstemp(prefix="embedq-stdin-", suffix=".spool")
    try:
        with os.fdopen(fd, "wb") as out:
            while block := stream.read(1 << 20):
                if isinstance(block, str):  # a text-mode stdin without .buffer
                    block = block.encode("utf-8", "surrogateescape")
                digest.update(block)
                out.write(block)
    except BaseException:
        os.unlink(path)
        raise
    return path, digest.hexdigest()


def _stdin_file(spool: str, spec: SourceSpec) -> _File:
    st = os.stat(spool)
    fmt = spec.format
    if fmt == "auto":
        fmt = _sniff_stdin(spool)
    return _File(spool, "stdin", "stdin", st.st_size, st.st_mtime_ns, fmt)


def _sniff_stdin(spool: str) -> str:
    """Parquet by magic bytes; JSONL if the first non-blank line starts with '{'; else text lines."""
    with open(spool, "rb") as fh:
        head = fh.read(_SNIFF_BYTES)
        if head.startswith(_PARQUET_MAGIC):
            return "parquet"
        head = head.removeprefix(codecs.BOM_UTF8)
        while head and not head.strip(_BLANK_BYTES):  # only blanks so far: look further
            more = fh.read(_SNIFF_BYTES)
            if not more:
                break
            head += more
    return "jsonl" if head.lstrip(_BLANK_BYTES).startswith(b"{") else "text"


# --- the source --------------------------------------------------------------------------------


class Source:
    """An opened source: `scan()` it once, then read `chunks()` from any position; `close()` it."""

    def __init__(
        self, spec: SourceSpec, files: list[_File], *, spool: str | None = None,
        content_digest: str | None = None,
    ) -> None:
        self.spec = spec
        self._files = files
        self._spool = spool
        self._content_digest = content_digest
        self.format = files[0].format
        self._counts: dict[str, int] = {}  # file rel -> documents, learnt from metadata or a full read
        self._scan: SourceScan | None = None
        self._reader = _make_reader(self.format, spec, files)
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
        hashing = reader.id_field is not None  # generated and path ids are unique by construction
        hashes: list[np.ndarray] = []
        pos = 0
        for f in self._files:
            start = pos
            for block in reader.id_blocks(f, pos):
                if hashing:
                    hashes.append(_hash_ids(block))
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
        if hashing:
            candidates = _repeated_hashes(hashes)
            if candidates.size:
                repeats, examples = self._confirm_duplicates(candidates)
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

    def _confirm_duplicates(self, candidates: np.ndarray) -> tuple[list[int], list[tuple[DocId, int, int]]]:
        """Second pass over the ids whose hash repeats: compare the ids themselves; returns the
        positions of repeats and a few examples."""
        as_int = self._reader.id_type == "int64"
        first_seen: dict[DocId, int] = {}
        examples: list[tuple[DocId, int, int]] = []
        repeats: list[int] = []
        pos = 0
        for f in self._files:
            for block in self._reader.id_blocks(f, pos):
                for i in np.flatnonzero(np.isin(_hash_ids(block), candidates)).tolist():
                    # CSV blocks hold integer ids as their canonical strings; report them as ints.
                    doc_id = int(block[i]) if as_int else block[i]
                    first = first_seen.setdefault(doc_id, pos + i)
                    if first != pos + i:
                        repeats.append(pos + i)
                        if len(examples) < MAX_DUPLICATE_EXAMPLES:
                            examples.append((doc_id, first, pos + i))
                pos += len(block)
        return repeats, examples

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


# --- duplicate detection -----------------------------------------------------------------------


def _hash_ids(block: IdBlock) -> np.ndarray:
    """uint64 per id: integer ids as themselves (exact), string ids by Python's 64-bit hash."""
    if isinstance(block, np.ndarray):
        return block.view(np.uint64)
    return np.fromiter(map(hash, block), dtype=np.int64, count=len(block)).view(np.uint64)


def _repeated_hashes(blocks: list[np.ndarray]) -> np.ndarray:
    """The hash values that occur more than once; about 8 bytes per id, sorted in place."""
    hashes = np.concatenate(blocks) if blocks else np.empty(0, np.uint64)
    blocks.clear()  # the concatenated copy replaces the blocks
    hashes.sort()
    repeats = hashes[1:][hashes[1:] == hashes[:-1]]
    return np.unique(repeats)


# --- reading helpers ---------------------------------------------------------------------------


@contextmanager
def _reading(label: str, what: str = "") -> Iterator[None]:
    """Turn I/O and Arrow failures into SourceErrors that name the file."""
    try:
        yield
    except PermissionError:
        raise SourceError(
            f"cannot read {label}: permission denied; make it readable or move it out of the source"
        ) from None
    except FileNotFoundError:
        raise SourceError(f"{label} disappeared while being read; run again once the source is stable") from None
    except pa.ArrowException as exc:  # ArrowIOError is both an OSError and an ArrowException
        raise SourceError(f"{label}{what}: {exc}") from exc
    except OSError as exc:
        raise SourceError(f"cannot read {label}: {exc.strerror or exc}") from exc


def _line_blocks(f: _File) -> Iterator[tuple[int, bytes]]:
    """(1-based number of its first line, block) over a file; a block is whole lines joined by "\\n"."""
    lineno = 1
    pending: list[bytes] = []  # the unfinished last line, in pieces (no quadratic re-joining)
    with _reading(f.label), open(f.path, "rb") as fh:
        data = fh.read(_BLOCK_BYTES).removeprefix(codecs.BOM_UTF8)
        while data:
            cut = data.rfind(b"\n")
            if cut < 0:
                pending.append(data)
            else:
                block = b"".join((*pending, data[:cut])) if pending else data[:cut]
                pending = [data[cut + 1:]]
                yield lineno, block
                lineno += block.count(b"\n") + 1
            data = fh.read(_BLOCK_BYTES)
    tail = b"".join(pending)
    if tail:
        yield lineno, tail


def _count_nonblank(block: bytes) -> int:
    return sum(1 for line in block.split(b"\n") if line.strip(_BLANK_BYTES))


def _nonblank_lines(f: _File, skip: int) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of every non-blank line after the first `skip` of them."""
    for first, block in _line_blocks(f):
        if skip:
            n = _count_nonblank(block)
            if n <= skip:
                skip -= n
                continue
        for i, line in enumerate(block.split(b"\n")):
            if line.strip(_BLANK_BYTES):
                if skip:
                    skip -= 1
                    continue
                yield first + i, line


def _grouped(docs: Iterator[tuple[Any, str, str | None]], size: int, with_ids: bool) -> Iterator[_Piece]:
    """Pieces of `size` documents from (id, text, problem) triples read one by one."""
    ids: list[Any] = []
    texts: list[str] = []
    problems: dict[int, str] = {}
    for doc_id, text, problem in docs:
        if problem:
            problems[len(texts)] = problem
        ids.append(doc_id)
        texts.append(text)
        if len(texts) == size:
            yield _Piece(ids if with_ids else None, texts, problems)
            ids, texts, problems = [], [], {}
    if texts:
        yield _Piece(ids if with_ids else None, texts, problems)


def _empty(text: str) -> bool:
    return not text or text.isspace()


def _decode(raw: bytes) -> tuple[str, str | None]:
    """(text, problem) for raw document bytes; an undecodable or empty text becomes ""."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return "", f"invalid UTF-8 at byte {exc.start}"
    return ("", "empty text") if _empty(text) else (text, None)


def _unicode_problem(text: str, invalid_utf8: bool) -> str | None:
    """Why a str cannot be encoded as UTF-8 (lone surrogates), else None."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as exc:
        char = text[exc.start]
        if invalid_utf8 and "\udc80" <= char <= "\udcff":  # a byte that surrogateescape carried over
            return f"invalid UTF-8 at byte {len(text[:exc.start].encode('utf-8', 'surrogateescape'))}"
        return f"invalid Unicode: lone surrogate U+{ord(char):04X} at character {exc.start}"


_BINARY_TO_STRING = {pa.binary(): pa.string(), pa.large_binary(): pa.large_string()}
# Compute kernels such as binary_length do not take the view types yet.
_VIEW_TO_PLAIN = {pa.string_view(): pa.large_string(), pa.binary_view(): pa.large_binary()}


def _arrow_texts(arr: pa.Array) -> tuple[list[str], dict[int, str]]:
    """Texts of an Arrow string or binary array, with the problems of unusable ones; vectorized."""
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_null(arr.type):
        return [""] * len(arr), dict.fromkeys(range(len(arr)), "missing text")
    if arr.type in _VIEW_TO_PLAIN:
        arr = arr.cast(_VIEW_TO_PLAIN[arr.type])
    if arr.type in _BINARY_TO_STRING:
        try:
            arr = arr.cast(_BINARY_TO_STRING[arr.type])  # checks the UTF-8 of the whole array at once
        except pa.ArrowInvalid:
            return _decode_each(arr.to_pylist())
    try:
        texts = arr.to_pylist()
    except UnicodeDecodeError:  # a string column that holds invalid UTF-8 after all
        return _decode_each(arr.cast(pa.large_binary()).to_pylist())
    problems: dict[int, str] = {}
    unusable = pc.or_(pc.equal(pc.binary_length(arr), 0), pc.utf8_is_space(arr))
    if arr.null_count:
        unusable = unusable.fill_null(True)
    if pc.any(unusable).as_py():
        for i in np.flatnonzero(unusable.to_numpy(zero_copy_only=False)).tolist():
            problems[i] = "missing text" if texts[i] is None else "empty text"
            texts[i] = ""
    return texts, problems


def _after(skip: int, batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """The batches without their first `skip` rows."""
    for batch in batches:
        if skip >= batch.num_rows:
            skip -= batch.num_rows
            continue
        yield batch.slice(skip) if skip else batch
        skip = 0


def _decode_each(values: list[bytes | None]) -> tuple[list[str], dict[int, str]]:
    """The slow path for binary texts with invalid UTF-8: decode one by one."""
    texts: list[str] = []
    problems: dict[int, str] = {}
    for i, raw in enumerate(values):
        text, problem = ("", "missing text") if raw is None else _decode(raw)
        if problem:
            problems[i] = problem
        texts.append(text)
    return texts, problems


def _kind(value: object) -> str:
    """How messages name a JSON value's type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object" if isinstance(value, dict) else type(value).__name__


def _missing_column(label: str, role: str, name: str, present: Sequence[str]) -> SourceError:
    return SourceError(
        f"{label} has no {role} column or field {name!r} (it has: {', '.join(map(repr, present)) or 'none'}); "
        f"name the right one with --{role}-field"
    )


_PLURAL = {"string": "strings", "int64": "integers", str: "strings", int: "integers"}


def _mixed_ids(where: str, pos: int, found: str | type, expected: str | type) -> SourceError:
    return SourceError(
        f"{where} (position {pos}): ids are {_PLURAL[found]} here but {_PLURAL[expected]} before; all ids "
        "of a source must be strings or all integers: fix the ids or choose another --id-field"
    )


# --- readers, one per format -------------------------------------------------------------------


class _Reader:
    """Reads one format: counts, id blocks for scans, pieces of documents for chunks."""

    def __init__(self, spec: SourceSpec, files: list[_File]) -> None:
        self.spec = spec
        self.files = files
        self.id_field: str | None = None
        self.id_type = "int64"  # generated ids; readers with an id field set it

    def count(self, f: _File, pos: int) -> int:
        """Documents in `f`, as cheaply as the format allows; `pos` is its first's position."""
        return sum(len(block) for block in self.id_blocks(f, pos))

    def id_blocks(self, f: _File, pos: int) -> Iterator[IdBlock]:
        """`f`'s ids in blocks, checked; `pos` is the position of its first document (for messages)."""
        raise NotImplementedError

    def pieces(self, f: _File, skip: int, size: int, pos: int) -> Iterator[_Piece]:
        """`f`'s documents after its first `skip`, in pieces of about `size`; `pos` is the first's position."""
        raise NotImplementedError


def _make_reader(fmt: str, spec: SourceSpec, files: list[_File]) -> _Reader:
    readers: dict[str, type[_Reader]] = {
        "parquet": _ParquetReader, "jsonl": _JsonlReader, "csv": _CsvReader, "text": _TextReader,
    }
    return readers[fmt](spec, files)


class _ParquetReader(_Reader):
    """Streams record batches; skips whole files and row groups by their metadata counts."""

    def __init__(self, spec: SourceSpec, files: list[_File]) -> None:
        super().__init__(spec, files)
        schema = self._schema(files[0])
        if spec.id_field is not None or "id" in schema.names:
            self.id_field = spec.id_field or "id"
            # The first file whose id column has a type sets the source's; an empty file may have none.
            for f in files:
                file_type = self._check_schema(f, schema if f is files[0] else self._schema(f))
                if file_type is not None:
                    self.id_type = file_type
                    break

    @contextmanager
    def _open(self, f: _File) -> Iterator[pq.ParquetFile]:
        what = " is not a readable Parquet file (check it, or pass --format if it is another format)"
        with _reading(f.label, what), pq.ParquetFile(f.path) as pf:
            yield pf

    def _schema(self, f: _File) -> pa.Schema:
        with self._open(f) as pf:
            return pf.schema_arrow

    def _check_schema(self, f: _File, schema: pa.Schema) -> str | None:
        """The file's id type ("string", "int64", None for a null column), after checking its columns."""
        text = self.spec.text_field
        if text not in schema.names:
            raise _missing_column(f.label, "text", text, schema.names)
        ttype = schema.field(text).type
        if pa.types.is_dictionary(ttype):
            ttype = ttype.value_type
        # A null-typed column is what writers make of a column with no values (an empty file, all nulls).
        if not (pa.types.is_null(ttype) or pa.types.is_string(ttype) or pa.types.is_large_string(ttype)
                or pa.types.is_binary(ttype)
                or pa.types.is_large_binary(ttype) or pa.types.is_string_view(ttype)
                or pa.types.is_binary_view(ttype)):
            raise SourceError(
                f"{f.label}: text column {text!r} has type {ttype}, not string or binary; "
                "name the text column with --text-field"
            )
        if self.id_field is None:
            return "int64"
        if self.id_field not in schema.names:
            raise _missing_column(f.label, "id", self.id_field, schema.names)
        itype = schema.field(self.id_field).type
        if pa.types.is_dictionary(itype):
            itype = itype.value_type
        if pa.types.is_null(itype):  # no ids at all: matches any type, and a row fails as a null id
            return None
        if pa.types.is_integer(itype):
            return "int64"
        if pa.types.is_string(itype) or pa.types.is_large_string(itype) or pa.types.is_string_view(itype):
            return "string"
        raise SourceError(
            f"{f.label}: id column {self.id_field!r} has type {itype}; ids must be strings or integers: "
            "convert the column or choose another --id-field"
        )

    def _checked_columns(self, f: _File, pf: pq.ParquetFile, pos: int) -> None:
        file_type = self._check_schema(f, pf.schema_arrow)
        if file_type is not None and file_type != self.id_type:
            raise _mixed_ids(f.label, pos, file_type, self.id_type)

    def _ids(self, f: _File, arr: pa.Array, pos: int) -> IdBlock:
        if arr.null_count:
            i = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
            raise SourceError(
                f"{f.label}: the id at position {pos + i} is null; every document needs an id "
                "(fill them in, or drop --id-field to number documents by position)"
            )
        if pa.types.is_dictionary(arr.type):
            arr = arr.dictionary_decode()
        if self.id_type == "int64":
            try:
                return arr.cast(pa.int64()).to_numpy()  # only uint64 beyond 2**63 - 1 can fail
            except pa.ArrowInvalid:
                raise SourceError(
                    f"{f.label}: id column {self.id_field!r} holds integers beyond int64; "
                    "convert the ids to strings"
                ) from None
        return arr.to_pylist()

    def count(self, f: _File, pos: int) -> int:
        with self._open(f) as pf:
            return pf.metadata.num_rows

    def id_blocks(self, f: _File, pos: int) -> Iterator[IdBlock]:
        with self._open(f) as pf:
            self._checked_columns(f, pf, pos)
            if self.id_field is None:
                yield range(pf.metadata.num_rows)
                return
            for batch in pf.iter_batches(batch_size=_ID_BATCH_ROWS, columns=[self.id_field]):
                yield self._ids(f, batch.column(0), pos)
                pos += batch.num_rows

    def pieces(self, f: _File, skip: int, size: int, pos: int) -> Iterator[_Piece]:
        with self._open(f) as pf:
            self._checked_columns(f, pf, pos)
            groups: list[int] = []
            for g in range(pf.metadata.num_row_groups):
                rows = pf.metadata.row_group(g).num_rows
                if not groups and skip >= rows:  # row groups wholly before the start stay unread
                    skip -= rows
                    continue
                groups.append(g)
            if not groups:
                return
            columns = [self.spec.text_field] + ([self.id_field] if self.id_field else [])
            for batch in _after(skip, pf.iter_batches(batch_size=size, row_groups=groups, columns=columns)):
                ids = None
                if self.id_field:
                    block = self._ids(f, batch.column(self.id_field), pos)
                    ids = block.tolist() if isinstance(block, np.ndarray) else list(block)
                texts, problems = _arrow_texts(batch.column(self.spec.text_field))
                yield _Piece(ids, texts, problems)
                pos += batch.num_rows


class _CsvReader(_Reader):
    """pyarrow's streaming CSV reader; ids read as strings and kept as int64 when all are integers."""

    def __init__(self, spec: SourceSpec, files: list[_File]) -> None:
        super().__init__(spec, files)
        # (count, id type) per file, from one pass over its id column: its type depends on all its values.
        self._layout: dict[str, tuple[int, str]] = {}
        self._typed = False  # whether id_type is known, so that later files can be held to it
        names = self._header(files[0])
        if spec.text_field not in names:
            raise _missing_column(files[0].label, "text", spec.text_field, names)
        if spec.id_field is not None or "id" in names:
            self.id_field = spec.id_field or "id"
            if self.id_field not in names:
                raise _missing_column(files[0].label, "id", self.id_field, names)
            # The first file with rows sets the type; a file of only a header has ids of no type.
            pos = 0
            for f in files:
                n, file_type = self._file_layout(f, pos)
                if n:
                    self.id_type = file_type
                    break
                pos += n
        self._typed = True

    def _delimiter(self, f: _File) -> str:
        if self.spec.csv_delimiter is not None:
            return self.spec.csv_delimiter
        return "\t" if f.path.lower().endswith(".tsv") else ","

    @contextmanager
    def _open(self, f: _File, columns: list[str] | None, types: dict[str, pa.DataType]
              ) -> Iterator[pa_csv.CSVStreamingReader]:
        bad_rows: list[str] = []

        def invalid_row(row: pa_csv.InvalidRow) -> str:
            # Row numbers are unknown when values may hold newlines, so the row's text says which.
            where = f"row {row.number}" if row.number is not None else "a row"
            where += f" ({row.text[:80]!r})"
            bad_rows.append(f"{where} has {row.actual_columns} fields, not {row.expected_columns}")
            return "error"

        read = pa_csv.ReadOptions(block_size=_CSV_BLOCK_BYTES)
        # Quoted texts may hold newlines; without this a document would be split into broken rows.
        parse = pa_csv.ParseOptions(delimiter=self._delimiter(f), newlines_in_values=True,
                                    invalid_row_handler=invalid_row)
        convert = pa_csv.ConvertOptions(include_columns=columns or [], column_types=types)
        hint = " (check the file and --csv-delimiter)"
        try:
            with _reading(f.label, hint):
                yield pa_csv.open_csv(f.path, read_options=read, parse_options=parse, convert_options=convert)
        except SourceError as exc:
            if bad_rows:
                raise SourceError(f"{f.label}: {bad_rows[0]}; fix the row (quote fields that hold "
                                  f"the delimiter) or check --csv-delimiter") from exc
            raise

    def _header(self, f: _File) -> list[str]:
        with self._open(f, None, {}) as reader:
            return list(reader.schema.names)

    def _stream(self, f: _File, with_text: bool) -> AbstractContextManager[pa_csv.CSVStreamingReader]:
        columns = [c for c in (self.id_field, self.spec.text_field if with_text else None) if c]
        if not columns:
            columns = [self.spec.text_field]
        types = {self.spec.text_field: pa.binary()}
        if self.id_field:
            types[self.id_field] = pa.string()
        names = self._header(f)
        for role, name in (("text", self.spec.text_field), ("id", self.id_field)):
            if name is not None and name not in names:
                raise _missing_column(f.label, role, name, names)
        return self._open(f, columns, types)

    def _file_layout(self, f: _File, pos: int) -> tuple[int, str]:
        if f.rel not in self._layout:
            for _ in self.id_blocks(f, pos):
                pass
        return self._layout[f.rel]

    def count(self, f: _File, pos: int) -> int:
        return self._file_layout(f, pos)[0]

    def id_blocks(self, f: _File, pos: int) -> Iterator[IdBlock]:
        first, canonical, n = pos, True, 0
        with self._stream(f, with_text=self.id_field is None) as reader:
            for batch in reader:
                if self.id_field is None:
                    yield range(batch.num_rows)
                    n += batch.num_rows
                    continue
                arr = batch.column(0)
                empty = pc.equal(pc.binary_length(arr), 0)
                if pc.any(empty).as_py():
                    i = int(np.flatnonzero(empty.to_numpy(zero_copy_only=False))[0])
                    raise SourceError(
                        f"{f.label}: data row {n + i + 1} (position {pos + i}) has an empty id; every "
                        "document needs an id (fill them in, or drop --id-field to number by position)"
                    )
                if canonical:
                    canonical = bool(pc.all(pc.match_substring_regex(arr, _CANONICAL_INT)).as_py())
                    if canonical:
                        try:
                            arr.cast(pa.int64())
                        except pa.ArrowInvalid:  # 19 digits beyond int64
                            canonical = False
                yield arr.to_pylist()
                n += batch.num_rows
                pos += batch.num_rows
        file_type = "int64" if canonical or self.id_field is None else "string"
        self._layout[f.rel] = (n, file_type)
        if self._typed and n and file_type != self.id_type:
            raise _mixed_ids(f.label, first, file_type, self.id_type)

    def pieces(self, f: _File, skip: int, size: int, pos: int) -> Iterator[_Piece]:
        as_int = self.id_field is not None and self._file_layout(f, pos - skip)[1] == "int64"
        with self._stream(f, with_text=True) as reader:
            for batch in _after(skip, reader):
                ids = None
                if self.id_field:
                    arr = batch.column(self.id_field)
                    ids = (arr.cast(pa.int64()) if as_int else arr).to_pylist()
                texts, problems = _arrow_texts(batch.column(self.spec.text_field))
                yield _Piece(ids, texts, problems)


def _array_hint(line: bytes) -> str:
    if line.lstrip(_BLANK_BYTES).startswith(b"["):
        return " (a JSON array file? convert it to JSON Lines with `jq -c '.[]'`)"
    return ""


class _JsonlReader(_Reader):
    """One JSON object per non-blank line; blank lines are not documents and take no position."""

    def __init__(self, spec: SourceSpec, files: list[_File]) -> None:
        super().__init__(spec, files)
        self._id_pytype: type | None = None  # str or int, from the first document that has an id
        sample = self._first_records(_FIELD_SAMPLE)
        if not sample:  # no documents at all: scan() says so
            self.id_field = spec.id_field
            return
        # Fields are judged on a sample, not the first line alone: a first document without a text
        # is a per-document problem, a text field that no document has is a wrong --text-field.
        fields = list(dict.fromkeys(name for _, _, record in sample for name in record))
        where = f"{sample[0][0].label} (its first {len(sample)} documents)"
        if spec.text_field not in fields:
            raise _missing_column(where, "text", spec.text_field, fields)
        if spec.id_field is not None or "id" in fields:
            self.id_field = spec.id_field or "id"
            if self.id_field not in fields:
                raise _missing_column(where, "id", self.id_field, fields)
            f, lineno, record = next(doc for doc in sample if self.id_field in doc[2])
            self._id_pytype = self._id_kind(f, lineno, 0, record[self.id_field], None)
            self.id_type = "int64" if self._id_pytype is int else "string"

    def _first_records(self, n: int) -> list[tuple[_File, int, dict[str, Any]]]:
        sample = []
        for f in self.files:
            for lineno, line in _nonblank_lines(f, 0):
                sample.append((f, lineno, self._parse(f, lineno, line)[0]))
                if len(sample) == n:
                    return sample
        return sample

    @staticmethod
    def _parse(f: _File, lineno: int, line: bytes) -> tuple[dict[str, Any], bool]:
        """(object, whether strings may hold surrogates); raises SourceError for a malformed line."""
        try:
            record, lenient = msgspec.json.decode(line), False
        except (msgspec.DecodeError, UnicodeDecodeError):
            # msgspec rejects invalid UTF-8 and lone surrogate escapes; json takes both, so such a
            # line still yields its id, and its text is reported as a problem instead of a crash.
            try:
                record = json.loads(line.decode("utf-8", "surrogateescape"))
                lenient = True
            except ValueError as exc:
                raise SourceError(
                    f"{f.label}:{lineno}: not valid JSON ({exc}){_array_hint(line)}; each line of a JSON Lines "
                    "file must be one JSON object: fix or remove the line"
                ) from None
        if not isinstance(record, dict):
            raise SourceError(
                f"{f.label}:{lineno}: the line is {_kind(record)}, not a JSON object{_array_hint(line)}; "
                "each line of a JSON Lines file must be one object"
            )
        return record, lenient

    def _id_kind(self, f: _File, lineno: int, pos: int, value: Any, expected: type | None) -> type:
        kind = type(value)
        if kind is not str and kind is not int:
            raise SourceError(
                f"{f.label}:{lineno} (position {pos}): id {value!r} is {_kind(value)}; ids must be strings "
                "or integers: fix it or choose another --id-field"
            )
        if expected is not None and kind is not expected:
            raise _mixed_ids(f"{f.label}:{lineno}", pos, kind, expected)
        if kind is int and not _INT64_MIN <= value <= _INT64_MAX:
            raise SourceError(
                f"{f.label}:{lineno} (position {pos}): id {value} does not fit in int64; write ids this "
                "large as strings"
            )
        return kind

    def _records(self, f: _File, skip: int, pos: int) -> Iterator[tuple[Any, str, str | None]]:
        """(id or None, text, problem) per document after the first `skip`."""
        id_field, text_field = self.id_field, self.spec.text_field
        expected = self._id_pytype
        for lineno, line in _nonblank_lines(f, skip):
            record, lenient = self._parse(f, lineno, line)
            doc_id = None
            if id_field is not None:
                if id_field not in record:
                    raise SourceError(
                        f"{f.label}:{lineno} (position {pos}): no {id_field!r} field; every document "
                        "needs an id (add it, or drop --id-field to number documents by position)"
                    )
                doc_id = record[id_field]
                if type(doc_id) is not expected or expected is int:  # the rare cases, checked in full
                    self._id_kind(f, lineno, pos, doc_id, expected)
                if lenient and isinstance(doc_id, str) and _unicode_problem(doc_id, True):
                    raise SourceError(
                        f"{f.label}:{lineno} (position {pos}): the id is not valid UTF-8 text; fix the id"
                    )
            text = record.get(text_field)
            problem = None
            if type(text) is not str:
                problem = "missing text" if text is None else f"text is {_kind(text)}, not a string"
                text = ""
            elif _empty(text):
                problem, text = "empty text", ""
            elif lenient:
                problem = _unicode_problem(text, invalid_utf8=True)
                if problem:
                    text = ""
            yield doc_id, text, problem
            pos += 1

    def count(self, f: _File, pos: int) -> int:
        return sum(_count_nonblank(block) for _, block in _line_blocks(f))

    def id_blocks(self, f: _File, pos: int) -> Iterator[IdBlock]:
        # Every line is parsed, even with generated ids: a malformed line then stops the scan,
        # before anything is published, rather than a run halfway through.
        block: list[Any] = []
        for doc_id, _, _ in self._records(f, 0, pos):
            block.append(doc_id)
            if len(block) == _ID_BATCH_ROWS:
                yield self._id_block(block)
                block = []
        if block:
            yield self._id_block(block)

    def _id_block(self, ids: list[Any]) -> IdBlock:
        if self.id_field is None:
            return range(len(ids))
        # Integer ids go to numpy, where scan() compares them exactly instead of by hash.
        return np.array(ids, dtype=np.int64) if self.id_type == "int64" else ids

    def pieces(self, f: _File, skip: int, size: int, pos: int) -> Iterator[_Piece]:
        return _grouped(self._records(f, skip, pos), size, with_ids=self.id_field is not None)


class _TextReader(_Reader):
    """Plain text: one document per non-blank line (id "relpath:line") or per file (id "relpath")."""

    def __init__(self, spec: SourceSpec, files: list[_File]) -> None:
        super().__init__(spec, files)
        self.id_type = "string"
        for f in files:  # the paths become ids, which must be valid UTF-8
            try:
                f.rel.encode("utf-8")
            except UnicodeEncodeError:
                raise SourceError(
                    f"the name of {f.label!r} is not valid UTF-8 and cannot become a document id; rename it"
                ) from None

    def count(self, f: _File, pos: int) -> int:
        if self.spec.text_unit == "file":
            return 1
        return sum(_count_nonblank(block) for _, block in _line_blocks(f))

    def id_blocks(self, f: _File, pos: int) -> Iterator[IdBlock]:
        yield range(self.count(f, pos))

    def pieces(self, f: _File, skip: int, size: int, pos: int) -> Iterator[_Piece]:
        if self.spec.text_unit == "file":
            if not skip:
                with _reading(f.label), open(f.path, "rb") as fh:
                    text, problem = _decode(fh.read().removeprefix(codecs.BOM_UTF8))
                yield _Piece([f.rel], [text], {0: problem} if problem else {})
            return
        docs = ((f"{f.rel}:{lineno}", *_decode(line.removesuffix(b"\r")))
                for lineno, line in _nonblank_lines(f, skip))
        yield from _grouped(docs, size, with_ids=True)
