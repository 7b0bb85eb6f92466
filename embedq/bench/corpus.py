"""Benchmark corpora: Parquet files with columns id and text, read (repeated) and written back; and
the long documents (`--corpus long`) the bench builds from the passages."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

# The long documents' lengths in words, drawn uniformly per document. With the passages' 1.32
# MiniLM tokens a word, the 497 documents built from passages.parquet measured 1,462 to 7,090
# tokens (p10 2,059, p50 3,735, p90 5,553; 1.89M in all; MiniLM's tokenizer, special tokens
# included, untruncated; 2026-11-30): a few thousand tokens each, all under the 8,192 of the
# long-context random models (qwen3-0.6b, qwen3-tiny), so unchunked each is embedded whole, and
# `--chunk 512 --overlap 64` cuts them into 4,432 chunks (4 to 16 a document).
LONG_WORDS = (1_200, 4_500)
LONG_SEED = 21


@dataclass(frozen=True)
class Corpus:
    """A benchmark corpus by name: its Parquet file, or for the long documents (`joined`) the
    passages they are built from in the bench's work directory."""

    name: str
    path: Path
    joined: bool = False

    def file(self, work: Path) -> Path:
        """The Parquet file to read: `path`, or the long documents built from it in `work` (once)."""
        if not self.joined:
            return self.path
        built = work / f"{self.name}.parquet"
        if not built.exists():
            ids, texts = long_documents(load_corpus(self.path, 1)[1])
            write_corpus(built, ids, texts)
        return built


def long_documents(passages: list[str], *, words: tuple[int, int] = LONG_WORDS,
                   seed: int = LONG_SEED) -> tuple[list[str], list[str]]:
    """Ids and texts of documents of a few thousand tokens: consecutive passages joined with a blank
    line until each reaches its word target (drawn from `words` with `seed`, so the same passages
    give the same documents). Passages left over after the last whole document are not used, so
    every document reaches its target; it passes it by less than one passage."""
    rng = random.Random(seed)
    texts: list[str] = []
    start = 0
    while start < len(passages):
        target, count, stop = rng.randint(*words), 0, start
        while stop < len(passages) and count < target:
            count += len(passages[stop].split())
            stop += 1
        if count < target:
            break
        texts.append("\n\n".join(passages[start:stop]))
        start = stop
    return [f"long-{i}" for i in range(len(texts))], texts


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
