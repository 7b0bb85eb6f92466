"""The JSON Lines reader: one JSON object per non-blank line, with a text field and an optional id field.

Fields are judged on a sample of the first documents, not the first line alone, since a single
document may lack its text (a per-document problem) while a field that no document has is a wrong
--text-field. Lines are decoded with msgspec, falling back to the lenient `json` module only for a
line msgspec rejects (invalid UTF-8, lone surrogate escapes), so such a line still yields its id and
its text becomes a problem rather than a crash. Every line is parsed even during the scan, so a
malformed line stops the run before anything is published.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import msgspec
import numpy as np

from embedq.documents import EMPTY_TEXT, MISSING_TEXT, fits_int64, id_type_of, is_empty, unicode_problem
from embedq.errors import SourceError
from embedq.producer.files import SourceFile
from embedq.producer.formats.base import ID_BATCH_ROWS, IdBlock, Piece, Reader, group_pieces, missing_column, mixed_ids
from embedq.producer.formats.line_blocks import BLANK_BYTES, count_nonblank, nonblank_lines
from embedq.producer.spec import SourceSpec

_FIELD_SAMPLE = 100  # JSONL documents whose fields decide which fields a source has


class JsonlReader(Reader):
    """One JSON object per non-blank line; blank lines are not documents and take no position."""

    def __init__(self, spec: SourceSpec, files: list[SourceFile]) -> None:
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
            raise missing_column(where, "text", spec.text_field, fields)
        if spec.id_field is not None or "id" in fields:
            self.id_field = spec.id_field or "id"
            if self.id_field not in fields:
                raise missing_column(where, "id", self.id_field, fields)
            f, lineno, record = next(doc for doc in sample if self.id_field in doc[2])
            self._id_pytype = self._id_kind(f, lineno, 0, record[self.id_field], None)
            self.id_type = id_type_of(record[self.id_field])

    def _first_records(self, n: int) -> list[tuple[SourceFile, int, dict[str, Any]]]:
        sample = []
        for f in self.files:
            for lineno, line in nonblank_lines(f, 0):
                sample.append((f, lineno, self._parse(f, lineno, line)[0]))
                if len(sample) == n:
                    return sample
        return sample

    @staticmethod
    def _parse(f: SourceFile, lineno: int, line: bytes) -> tuple[dict[str, Any], bool]:
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

    def _id_kind(self, f: SourceFile, lineno: int, pos: int, value: Any, expected: type | None) -> type:
        kind = type(value)
        if kind is not str and kind is not int:
            raise SourceError(
                f"{f.label}:{lineno} (position {pos}): id {value!r} is {_kind(value)}; ids must be strings "
                "or integers: fix it or choose another --id-field"
            )
        if expected is not None and kind is not expected:
            raise mixed_ids(f"{f.label}:{lineno}", pos, kind, expected)
        if kind is int and not fits_int64(value):
            raise SourceError(
                f"{f.label}:{lineno} (position {pos}): id {value} does not fit in int64; write ids this "
                "large as strings"
            )
        return kind

    def _records(self, f: SourceFile, skip: int, pos: int) -> Iterator[tuple[Any, str, str | None]]:
        """(id or None, text, problem) per document after the first `skip`."""
        id_field, text_field = self.id_field, self.spec.text_field
        expected = self._id_pytype
        for lineno, line in nonblank_lines(f, skip):
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
                if lenient and isinstance(doc_id, str) and unicode_problem(doc_id, surrogate_escaped=True):
                    raise SourceError(
                        f"{f.label}:{lineno} (position {pos}): the id is not valid UTF-8 text; fix the id"
                    )
            text = record.get(text_field)
            problem = None
            if type(text) is not str:
                problem = MISSING_TEXT if text is None else f"text is {_kind(text)}, not a string"
                text = ""
            elif is_empty(text):
                problem, text = EMPTY_TEXT, ""
            elif lenient:
                problem = unicode_problem(text, surrogate_escaped=True)
                if problem:
                    text = ""
            yield doc_id, text, problem
            pos += 1

    def count(self, f: SourceFile, pos: int) -> int:
        return count_nonblank(f)

    def id_blocks(self, f: SourceFile, pos: int) -> Iterator[IdBlock]:
        # Every line is parsed, even with generated ids: a malformed line then stops the scan,
        # before anything is published, rather than a run halfway through.
        block: list[Any] = []
        for doc_id, _, _ in self._records(f, 0, pos):
            block.append(doc_id)
            if len(block) == ID_BATCH_ROWS:
                yield self._id_block(block)
                block = []
        if block:
            yield self._id_block(block)

    def _id_block(self, ids: list[Any]) -> IdBlock:
        if self.id_field is None:
            return range(len(ids))
        # Integer ids go to numpy, where scan() compares them exactly instead of by hash.
        return np.array(ids, dtype=np.int64) if self.id_type == "int64" else ids

    def pieces(self, f: SourceFile, skip: int, size: int, pos: int) -> Iterator[Piece]:
        return group_pieces(self._records(f, skip, pos), size, with_ids=self.id_field is not None)


def _array_hint(line: bytes) -> str:
    if line.lstrip(BLANK_BYTES).startswith(b"["):
        return " (a JSON array file? convert it to JSON Lines with `jq -c '.[]'`)"
    return ""


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
