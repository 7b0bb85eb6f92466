"""Benchmark corpora: Parquet files with columns id and text, read (repeated) and written back."""

from __future__ import annotations

from pathlib import Path


def load_corpus(path: Path, repeat: int, limit: int | None = None) -> tuple[list[str], list[str]]:
    """Ids and texts of a Parquet corpus (columns id, text; the first `limit`), repeated with distinct ids."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["id", "text"])
    if limit is not None:
        table = table.slice(0, limit)
    ids = [str(i) for i in table.column("id").to_pylist()]
    texts = table.column("text").to_pylist()
    if repeat == 1:
        return ids, texts
    return [f"{i}#{k}" for k in range(repeat) for i in ids], texts * repeat


def write_corpus(path: Path, ids: list[str], texts: list[str]) -> None:
    """Write ids and texts as the Parquet source a producer reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ids, "text": texts}), path, row_group_size=65536)
