"""The contract every format reader keeps, and what the readers share.

A reader reads one format's files three ways: `count` (as cheaply as the format allows, so that a
resumed run skips whole files unread), `id_blocks` (ids only, for the scan) and `pieces` (the
documents, for chunks). Positions belong to the `Source`: a reader is told where a file starts only
to name positions in its messages. Also here: turning raw document bytes into a text or the reason
it cannot be embedded, grouping documents read one by one into pieces, and the errors that several
readers raise alike (a missing column, mixed id types), so they word them alike.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from embedq.documents import EMPTY_TEXT, INVALID_UTF8, is_empty
from embedq.errors import SourceError
from embedq.producer.files import SourceFile
from embedq.producer.spec import SourceSpec

IdBlock = np.ndarray | list[Any] | range  # int64 ids, string ids, or range(n) when ids are generated
ID_BATCH_ROWS = 1 << 16


class Piece(NamedTuple):
    """Consecutive documents of one file, as a reader yields them (the Source regroups them into chunks)."""

    ids: list[Any] | None  # None: generated from positions
    texts: list[str]
    problems: dict[int, str]


class Reader:
    """Reads one format: counts, id blocks for scans, pieces of documents for chunks."""

    def __init__(self, spec: SourceSpec, files: list[SourceFile]) -> None:
        self.spec = spec
        self.files = files
        self.id_field: str | None = None
        self.id_type = "int64"  # generated ids; readers with an id field set it

    def count(self, f: SourceFile, pos: int) -> int:
        """Documents in `f`, as cheaply as the format allows; `pos` is its first's position."""
        return sum(len(block) for block in self.id_blocks(f, pos))

    def id_blocks(self, f: SourceFile, pos: int) -> Iterator[IdBlock]:
        """`f`'s ids in blocks, checked; `pos` is the position of its first document (for messages)."""
        raise NotImplementedError

    def pieces(self, f: SourceFile, skip: int, size: int, pos: int) -> Iterator[Piece]:
        """`f`'s documents after its first `skip`, in pieces of about `size`; `pos` is the first's position."""
        raise NotImplementedError


def decode_text(raw: bytes) -> tuple[str, str | None]:
    """(text, problem) for raw document bytes; an undecodable or empty text becomes ""."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return "", f"{INVALID_UTF8} at byte {exc.start}"
    return ("", EMPTY_TEXT) if is_empty(text) else (text, None)


def group_pieces(docs: Iterator[tuple[Any, str, str | None]], size: int, with_ids: bool) -> Iterator[Piece]:
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
            yield Piece(ids if with_ids else None, texts, problems)
            ids, texts, problems = [], [], {}
    if texts:
        yield Piece(ids if with_ids else None, texts, problems)


def missing_column(label: str, role: str, name: str, present: Sequence[str]) -> SourceError:
    """The error for an id or text column (`role`) that a file does not have."""
    return SourceError(
        f"{label} has no {role} column or field {name!r} (it has: {', '.join(map(repr, present)) or 'none'}); "
        f"name the right one with --{role}-field"
    )


_PLURAL = {"string": "strings", "int64": "integers", str: "strings", int: "integers"}


def mixed_ids(where: str, pos: int, found: str | type, expected: str | type) -> SourceError:
    """The error for ids of one type (a job id type or a Python type) where earlier ones had another."""
    return SourceError(
        f"{where} (position {pos}): ids are {_PLURAL[found]} here but {_PLURAL[expected]} before; all ids "
        "of a source must be strings or all integers: fix the ids or choose another --id-field"
    )
