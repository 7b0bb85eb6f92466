"""The Parquet part writer: one part per window, written durably under its staging name (fsync, or a
completed upload to an object store: `output.py`).

Schema (contract 5): `id` (string or int64), `embedding` (fixed-size list of float32, or float16 on
request), `n_tokens` (int32, tokens embedded, special tokens included), `truncated` (bool). File
metadata records model, digest, dimension, pooling, normalization, max length, backend, precision,
embedq version and job, under keys `embedq.<name>`.
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
from embedq.errors import OutputError
from embedq.protocol import DocId
from embedq.worker.output import OutputDir

log = logging.getLogger("embedq.worker")

METADATA_PREFIX = "embedq."


def output_schema(id_type: str, dim: int, dtype: str = "float32",
                  metadata: dict[str, Any] | None = None) -> pa.Schema:
    """The Arrow schema of every part of a job."""
    value = pa.float16() if dtype == "float16" else pa.float32()
    fields = [
        pa.field("id", pa.int64() if id_type == "int64" else pa.string(), nullable=False),
        pa.field("embedding", pa.list_(pa.field("item", value, nullable=False), dim), nullable=False),
        pa.field("n_tokens", pa.int32(), nullable=False),
        pa.field("truncated", pa.bool_(), nullable=False),
    ]
    encoded = {f"{METADATA_PREFIX}{k}".encode(): str(v).encode() for k, v in (metadata or {}).items()}
    return pa.schema(fields, metadata=encoded or None)


def part_table(schema: pa.Schema, ids: Sequence[DocId] | np.ndarray, embeddings: np.ndarray, n_tokens: np.ndarray,
               truncated: np.ndarray) -> pa.Table:
    """Rows laid out as `schema` (an `output_schema`) says; embeddings are `(n, dim)`, converted to its
    value type. The worker's parts and the Python API's tables are both made here."""
    value_type = schema.field("embedding").type.value_type
    dim = schema.field("embedding").type.list_size
    n = len(ids)
    if embeddings.shape != (n, dim):
        raise ValueError(f"embeddings are {embeddings.shape}, expected ({n}, {dim})")
    values = np.ascontiguousarray(embeddings, dtype=value_type.to_pandas_dtype()).reshape(-1)
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(values, type=value_type), dim)
    return pa.Table.from_arrays(
        [pa.array(ids, type=schema.field("id").type), embedding, pa.array(n_tokens, type=pa.int32()),
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
                 stopping: Callable[[], bool] = lambda: False) -> None:
        self.output = output
        self.schema = schema
        self.disk_retry_seconds = disk_retry_seconds
        self._stopping = stopping

    def table(self, ids: Sequence[DocId], embeddings: np.ndarray, n_tokens: np.ndarray,
              truncated: np.ndarray) -> pa.Table:
        """The Arrow table of one part; embeddings are `(n, dim)`."""
        return part_table(self.schema, ids, embeddings, n_tokens, truncated)

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
            # Embeddings barely compress and zstd on them costs more CPU than the GPU leaves;
            # ids compress well.
            pq.write_table(table, handle, compression={"id": "zstd", "embedding": "none",
                                                       "n_tokens": "zstd", "truncated": "zstd"},
                           use_dictionary=False, write_statistics=["id", "n_tokens"])
            size = handle.tell()
        return StagedPart(name=name, rows=table.num_rows, bytes=size)
