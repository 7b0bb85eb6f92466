"""Length-sorted padded batches of tokenized documents, for feeding engines in tests and benchmarks.

The worker's own bucketing (worker/buckets.py) and engine stage (worker/pipeline.py), so the engine
tests feed engines exactly as a worker does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from embedq.engines.base import Profile
from embedq.engines.profiles import profile_table
from embedq.tokenization import TokenizedDocs
from embedq.worker.buckets import pad_batch, plan_buckets


@dataclass(frozen=True)
class PaddedBatch:
    """Rows `doc_index` of the tokenized documents, right-padded to one profile's width."""

    doc_index: np.ndarray  # int64 (B,)
    input_ids: np.ndarray  # int32 (B, S)
    lengths: np.ndarray  # int32 (B,)


def bucket_profiles(max_seq_len: int, token_budget: int, step: int = 16) -> tuple[Profile, ...]:
    """Widths every `step` tokens up to `max_seq_len`, each with max_batch = token_budget // width."""
    return profile_table(max_seq_len, token_budget, seq_lens=range(step, max_seq_len, step))


def padded_batches(docs: TokenizedDocs, profiles: tuple[Profile, ...], pad_id: int) -> Iterator[PaddedBatch]:
    """The worker's own buckets (worker/buckets.py), shortest first, each padded to its profile."""
    offsets = docs.offsets
    for bucket in plan_buckets(docs.lengths, profiles):
        ids, lengths = pad_batch(docs.tokens, offsets, docs.lengths, bucket.rows, bucket.profile.max_seq_len, pad_id)
        yield PaddedBatch(bucket.rows.astype(np.int64), ids, lengths)


def read_texts(path: Path, count: int, seed: int) -> list[str]:
    """`count` texts drawn at random (fixed seed) from a corpus Parquet file with a `text` column."""
    texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    picked = np.random.default_rng(seed).choice(len(texts), size=min(count, len(texts)), replace=False)
    return [texts[i] for i in np.sort(picked)]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two `(n, d)` arrays, in float64."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(axis=1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))
