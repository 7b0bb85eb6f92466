"""The Parquet part writer: one part per window, written durably under its staging name (fsync, or a
completed upload to an object store: `output.py`).

Schema (contract 5): `id` (string or int64), `embedding` (fixed-size list of float32, or on request
float16, int8, uint8, or int8/uint8 bytes of packed bits for binary/ubinary: `embedq.quantization`),
`n_tokens` (int32, tokens embedded, special tokens and the prompt included), `truncated` (bool); a
chunked job's rows are chunks, with `chunk_index`, `n_chunks`, `token_start`, `token_end` (int32)
after the id (`embedq.chunking`). File
metadata records model, digest, dimension, pooling, normalization, max length, prompt, output type,
truncation and quantization ranges, backend, precision, embedq version and job, under keys
`embedq.<name>`.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedq import __version__
from embedq.chunking import CHUNK_COLUMNS, ChunkColumns, Chunking
from embedq.errors import OutputError
from embedq.protocol import DocId
from embedq.quantization import OutputFormat
from embedq.worker.output import OutputDir

log = logging.getLogger("embedq.worker")

METADATA_PREFIX = "embedq."
EMBEDDING_VALUES = "embedding.list.element"  # the embedding's values, as Parquet names the column
# The Arrow type of a stored value for each output type (binary types pack 8 dimensions in one).
VALUE_TYPES = {"float32": pa.float32(), "float16": pa.float16(), "int8": pa.int8(), "uint8": pa.uint8(),
               "binary": pa.int8(), "ubinary": pa.uint8()}


def output_schema(id_type: str, dim: int, dtype: str = "float32",
                  metadata: dict[str, Any] | None = None, *, chunked: bool = False) -> pa.Schema:
    """The Arrow schema of every part of a job; `dim` is the values stored per vector; a `chunked`
    job's rows are chunks, with their `embedq.chunking.CHUNK_COLUMNS` after the id."""
    value = VALUE_TYPES[dtype]
    fields = [
        pa.field("id", pa.int64() if id_type == "int64" else pa.string(), nullable=False),
        *(pa.field(name, pa.int32(), nullable=False) for name in (CHUNK_COLUMNS if chunked else ())),
        pa.field("embedding", pa.list_(pa.field("item", value, nullable=False), dim), nullable=False),
        pa.field("n_tokens", pa.int32(), nullable=False),
        pa.field("truncated", pa.bool_(), nullable=False),
    ]
    encoded = {f"{METADATA_PREFIX}{k}".encode(): str(v).encode() for k, v in (metadata or {}).items()}
    return pa.schema(fields, metadata=encoded or None)


def stored_schema(id_type: str, model_dim: int, stored: OutputFormat, metadata: dict[str, Any],
                  chunking: Chunking | None = None) -> pa.Schema:
    """The schema of a job's parts whose vectors are stored as `stored` (and documents cut by
    `chunking`), its settings in the metadata."""
    chunks = {} if chunking is None else {"chunk_tokens": chunking.size, "chunk_overlap": chunking.overlap}
    return output_schema(id_type, stored.width(model_dim), stored.dtype, {**metadata, **stored.metadata(), **chunks},
                         chunked=chunking is not None)


def part_table(schema: pa.Schema, ids: Sequence[DocId] | np.ndarray, embeddings: np.ndarray, n_tokens: np.ndarray,
               truncated: np.ndarray, chunks: ChunkColumns | None = None) -> pa.Table:
    """Rows laid out as `schema` (an `output_schema`) says; embeddings are `(n, dim)`, converted to its
    value type; `chunks` for a chunked schema. The worker's parts and the Python API's tables are both
    made here."""
    value_type = schema.field("embedding").type.value_type
    dim = schema.field("embedding").type.list_size
    n = len(ids)
    if embeddings.shape != (n, dim):
        raise ValueError(f"embeddings are {embeddings.shape}, expected ({n}, {dim})")
    values = np.ascontiguousarray(embeddings, dtype=value_type.to_pandas_dtype()).reshape(-1)
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(values, type=value_type), dim)
    chunk_columns = [] if chunks is None else [pa.array(a, type=pa.int32()) for a in chunks.arrays().values()]
    return pa.Table.from_arrays(
        [pa.array(ids, type=schema.field("id").type), *chunk_columns, embedding, pa.array(n_tokens, type=pa.int32()),
         pa.array(truncated, type=pa.bool_())],
        schema=schema,
    )


def part_metadata(job: str, model: dict[str, Any], backend: str, precision: str) -> dict[str, Any]:
    """The file metadata of a job's parts (contract 5)."""
    return {**model, "backend": backend, "precision": precision, "embedq_version": __version__, "job": job}


def read_metadata(schema: pa.Schema) -> dict[str, str]:
    """embedq's file metadata from a part's schema, without the `embedq.` prefix."""
    raw = schema.metadata or {}
    return {k.decode()[len(METADATA_PREFIX):]: v.decode() for k, v in raw.items()
            if k.startswith(METADATA_PREFIX.encode())}


@dataclass(frozen=True)
class StagedPart:
    """A part written durably under its staging name, not yet committed."""

    name: str
    rows: int
    bytes: int


class PartWriter:
    """Writes parts of one job into an output location (a directory or an object-store prefix).

    A full disk (ENOSPC, EDQUOT) is waited out for up to `disk_retry_seconds`, with backoff, since
    space often comes back (a cleanup, a log rotation); any other write error, or a disk still full
    after that, raises `OutputError`. Nothing is acknowledged before a part is staged, so either
    way its batches are retried.
    """

    def __init__(self, output: OutputDir, schema: pa.Schema, *, disk_retry_seconds: float = 0.0,
                 stopping: Callable[[], bool] = lambda: False, output_format: OutputFormat | None = None) -> None:
        self.output = output
        self.schema = schema
        self.output_format = output_format  # applied to the engine's float32 vectors (None: as they are)
        self.disk_retry_seconds = disk_retry_seconds
        self._stopping = stopping

    def table(self, ids: Sequence[DocId], embeddings: np.ndarray, n_tokens: np.ndarray,
              truncated: np.ndarray, chunks: ChunkColumns | None = None) -> pa.Table:
        """The Arrow table of one part; embeddings are the engine's `(n, dim)` float32."""
        if self.output_format is not None:
            embeddings = self.output_format.apply(embeddings)
        return part_table(self.schema, ids, embeddings, n_tokens, truncated, chunks)

    def stage(self, name: str, table: pa.Table) -> StagedPart:
        """Write `table` to the staging name and fsync it; the part stays invisible to readers."""
        deadline = time.monotonic() + self.disk_retry_seconds
        delay = 1.0
        while True:
            try:
                return self._write(name, table)
            except OSError as exc:
                message = self.output.describe(exc)
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or time.monotonic() > deadline or self._stopping():
                    raise OutputError(message + " Nothing was acknowledged; the batches will be retried.") from exc
                log.warning("%s Pausing %.0f s and retrying (gives up after %.0f s).", message, delay,
                            self.disk_retry_seconds)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)

    def _write(self, name: str, table: pa.Table) -> StagedPart:
        """One attempt; a failed write removes the partial file and re-raises the OSError. The
        output location makes the file durable (fsync, or a completed upload) before this returns."""
        with self.output.staging_stream(name) as handle:
            # Float embeddings barely compress and zstd on them costs more CPU than the GPU leaves;
            # ids compress well. Integer ones (int8, uint8, packed bits) must be encoded: Parquet has
            # no 8-bit physical type and would store each value in 4 bytes (2026-11-30, parts of 100k
            # random unit vectors of 384 dims: int8 1,543 -> 435 MB per million documents with delta
            # bit-packing and zstd, binary 198 -> 58; byte-stream-split did better for uint8, 359, but
            # for integers it is a newer encoding that not every reader knows; README "Models").
            compact = pa.types.is_integer(table.schema.field("embedding").type.value_type)
            pq.write_table(table, handle, compression={"id": "zstd", EMBEDDING_VALUES: "zstd" if compact else "none",
                                                       "n_tokens": "zstd", "truncated": "zstd",
                                                       **dict.fromkeys(CHUNK_COLUMNS, "zstd")},
                           column_encoding={EMBEDDING_VALUES: "DELTA_BINARY_PACKED"} if compact else None,
                           use_dictionary=False, write_statistics=["id", "n_tokens"])
            size = handle.tell()
        return StagedPart(name=name, rows=table.num_rows, bytes=size)
