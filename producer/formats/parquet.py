"""The Parquet reader: a text column and an optional id column, streamed in record batches.

Parquet files carry their row counts in their metadata, so counting is free and a resumed run skips
whole files and row groups unread. The source's id type comes from the first file whose id column
has one (an empty file may have a null-typed column), and every later file is held to it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedq.errors import SourceError
from embedq.producer.files import SourceFile, reading
from embedq.producer.formats.arrow_columns import arrow_texts, rows_after
from embedq.producer.formats.base import ID_BATCH_ROWS, IdBlock, Piece, Reader, missing_column, mixed_ids
from embedq.producer.spec import SourceSpec


class ParquetReader(Reader):
    """Streams record batches; skips whole files and row groups by their metadata counts."""

    def __init__(self, spec: SourceSpec, files: list[SourceFile]) -> None:
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
    def _open(self, f: SourceFile) -> Iterator[pq.ParquetFile]:
        what = " is not a readable Parquet file (check it, or pass --format if it is another format)"
        with reading(f.label, what), pq.ParquetFile(f.path) as pf:
            yield pf

    def _schema(self, f: SourceFile) -> pa.Schema:
        with self._open(f) as pf:
            return pf.schema_arrow

    def _check_schema(self, f: SourceFile, schema: pa.Schema) -> str | None:
        """The file's id type ("string", "int64", None for a null column), after checking its columns."""
        text = self.spec.text_field
        if text not in schema.names:
            raise missing_column(f.label, "text", text, schema.names)
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
            raise missing_column(f.label, "id", self.id_field, schema.names)
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

    def _checked_columns(self, f: SourceFile, pf: pq.ParquetFile, pos: int) -> None:
        file_type = self._check_schema(f, pf.schema_arrow)
        if file_type is not None and file_type != self.id_type:
            raise mixed_ids(f.label, pos, file_type, self.id_type)

    def _ids(self, f: SourceFile, arr: pa.Array, pos: int) -> IdBlock:
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

    def count(self, f: SourceFile, pos: int) -> int:
        with self._open(f) as pf:
            return pf.metadata.num_rows

    def id_blocks(self, f: SourceFile, pos: int) -> Iterator[IdBlock]:
        with self._open(f) as pf:
            self._checked_columns(f, pf, pos)
            if self.id_field is None:
                yield range(pf.metadata.num_rows)
                return
            for batch in pf.iter_batches(batch_size=ID_BATCH_ROWS, columns=[self.id_field]):
                yield self._ids(f, batch.column(0), pos)
                pos += batch.num_rows

    def pieces(self, f: SourceFile, skip: int, size: int, pos: int) -> Iterator[Piece]:
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
            for batch in rows_after(skip, pf.iter_batches(batch_size=size, row_groups=groups, columns=columns)):
                ids = None
                if self.id_field:
                    block = self._ids(f, batch.column(self.id_field), pos)
                    ids = block.tolist() if isinstance(block, np.ndarray) else list(block)
                texts, problems = arrow_texts(batch.column(self.spec.text_field))
                yield Piece(ids, texts, problems)
                pos += batch.num_rows
