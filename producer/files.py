"""A source's files: listing a file or directory in a stable order, and telling each file's format.

The producer numbers documents by their position across a source's files, so the listing must be
the same on every run: directories are read recursively in sorted relative-path order (code-point
order of the '/'-separated path), hidden entries (names starting with "." or "_", as
`pyarrow.dataset` skips them) are left out, links to files are followed and links to folders are
not (no cycles). With `format="auto"` a file's format comes from its suffix, else from sniffing its
first bytes; a directory must hold one format. `reading` turns the failures of reading any of these
files into `SourceError`s that name the file.
"""

from __future__ import annotations

import codecs
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pyarrow as pa

from embedq.errors import SourceError
from embedq.producer.spec import SourceSpec

SUFFIX_FORMATS = {
    ".parquet": "parquet", ".pq": "parquet",
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
    ".csv": "csv", ".tsv": "csv",
    ".txt": "text", ".text": "text", ".md": "text", ".markdown": "text", ".rst": "text",
}
PARQUET_MAGIC = b"PAR1"
SNIFF_BYTES = 4096


@dataclass(frozen=True)
class SourceFile:
    """One file of a source, as listed when the source was opened."""

    path: str  # where to open it
    rel: str  # '/'-separated path relative to the source root: ids of text documents, the fingerprint
    label: str  # how messages name it
    size: int
    mtime_ns: int
    format: str


@contextmanager
def reading(label: str, what: str = "") -> Iterator[None]:
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


def list_files(spec: SourceSpec) -> list[SourceFile]:
    """The files of the file or directory `spec.path`, in reading order, each with its format."""
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
    return [SourceFile(root, name, root, st.st_size, st.st_mtime_ns, _file_format(root, root, spec))]


def _hidden(name: str) -> bool:
    return name.startswith((".", "_"))


def _walk(root: str, spec: SourceSpec) -> list[SourceFile]:
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
            files.append(SourceFile(path, rel, path, st.st_size, st.st_mtime_ns, _file_format(path, path, spec)))
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
    known = SUFFIX_FORMATS.get(os.path.splitext(path)[1].lower())
    if known is not None:
        return known
    return _sniff_format(path, label)


def _sniff_format(path: str, label: str) -> str:
    """Parquet by its magic bytes, text when the first bytes are UTF-8 without NULs, else unknown."""
    with reading(label), open(path, "rb") as fh:
        head = fh.read(SNIFF_BYTES)
    if head.startswith(PARQUET_MAGIC):
        return "parquet"
    if b"\0" not in head:
        try:
            codecs.getincrementaldecoder("utf-8")().decode(head)  # tolerates a character cut at the end
            return "text"
        except UnicodeDecodeError:
            pass
    raise SourceError(
        f"cannot tell the format of {label}: its suffix is not one of {', '.join(sorted(SUFFIX_FORMATS))} "
        "and it is not UTF-8 text (compressed or binary?); decompress or convert it, pass --format, "
        "or move it out of the source"
    )


def _check_one_format(root: str, files: list[SourceFile]) -> None:
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
