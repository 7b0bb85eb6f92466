"""The CSV/TSV reader: a header row naming the text column and an optional id column.

Read with pyarrow's streaming CSV reader, ids as strings: a CSV value has no type of its own, so
a file's ids are int64 only when every one of them is an integer written canonically, which takes
one pass over its id column to know. That pass also counts the file's rows (CSV has no metadata to
count from), and both are remembered per file.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from embedq.errors import SourceError
from embedq.producer.files import SourceFile, reading
from embedq.producer.formats.arrow_columns import arrow_texts, rows_after
from embedq.producer.formats.base import IdBlock, Piece, Reader, missing_column, mixed_ids
from embedq.producer.spec import SourceSpec

_CSV_BLOCK_BYTES = 4 << 20
# A CSV id column is int64 only when every value is an integer written canonically: "007" stays a
# string, since reading it as 7 would change the id.
_CANONICAL_INT = r"^-?(0|[1-9][0-9]{0,18})$"


class CsvReader(Reader):
    """pyarrow's streaming CSV reader; ids read as strings and kept as int64 when all are integers."""

    def __init__(self, spec: SourceSpec, files: list[SourceFile]) -> None:
        super().__init__(spec, files)
        # (count, id type) per file, from one pass over its id column: its type depends on all its values.
        self._layout: dict[str, tuple[int, str]] = {}
        self._typed = False  # whether id_type is known, so that later files can be held to it
        names = self._header(files[0])
        if spec.text_field not in names:
            raise missing_column(files[0].label, "text", spec.text_field, names)
        if spec.id_field is not None or "id" in names:
            self.id_field = spec.id_field or "id"
            if self.id_field not in names:
                raise missing_column(files[0].label, "id", self.id_field, names)
            # The first file with rows sets the type; a file of only a header has ids of no type.
            pos = 0
            for f in files:
                n, file_type = self._file_layout(f, pos)
                if n:
                    self.id_type = file_type
                    break
                pos += n
        self._typed = True

    def _delimiter(self, f: SourceFile) -> str:
        if self.spec.csv_delimiter is not None:
            return self.spec.csv_delimiter
        return "\t" if f.path.lower().endswith(".tsv") else ","

    @contextmanager
    def _open(self, f: SourceFile, columns: list[str] | None, types: dict[str, pa.DataType]
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
            with reading(f.label, hint):
                yield pa_csv.open_csv(f.path, read_options=read, parse_options=parse, convert_options=convert)
        except SourceError as exc:
            if bad_rows:
                raise SourceError(f"{f.label}: {bad_rows[0]}; fix the row (quote fields that hold "
                                  f"the delimiter) or check --csv-delimiter") from exc
            raise

    def _header(self, f: SourceFile) -> list[str]:
        with self._open(f, None, {}) as reader:
            return list(reader.schema.names)

    def _stream(self, f: SourceFile, with_text: bool) -> AbstractContextManager[pa_csv.CSVStreamingReader]:
        columns = [c for c in (self.id_field, self.spec.text_field if with_text else None) if c]
        if not columns:
            columns = [self.spec.text_field]
        types = {self.spec.text_field: pa.binary()}
        if self.id_field:
            types[self.id_field] = pa.string()
        names = self._header(f)
        for role, name in (("text", self.spec.text_field), ("id", self.id_field)):
            if name is not None and name not in names:
                raise missing_column(f.label, role, name, names)
        return self._open(f, columns, types)

    def _file_layout(self, f: SourceFile, pos: int) -> tuple[int, str]:
        if f.rel not in self._layout:
            for _ in self.id_blocks(f, pos):
                pass
        return self._layout[f.rel]

    def count(self, f: SourceFile, pos: int) -> int:
        return self._file_layout(f, pos)[0]

    def id_blocks(self, f: SourceFile, pos: int) -> Iterator[IdBlock]:
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
            raise mixed_ids(f.label, first, file_type, self.id_type)

    def pieces(self, f: SourceFile, skip: int, size: int, pos: int) -> Iterator[Piece]:
        as_int = self.id_field is not None and self._file_layout(f, pos - skip)[1] == "int64"
        with self._stream(f, with_text=True) as reader:
            for batch in rows_after(skip, reader):
                ids = None
                if self.id_field:
                    arr = batch.column(self.id_field)
                    ids = (arr.cast(pa.int64()) if as_int else arr).to_pylist()
                texts, problems = arrow_texts(batch.column(self.spec.text_field))
                yield Piece(ids, texts, problems)
