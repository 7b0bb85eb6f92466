"""The engine stage: run a window's documents through the engine bucket by bucket, keeping it busy.

Batches are submitted ahead of collection (`depth` in flight, 2 by default): while the device
runs batch k, the host pads batch k+1 and hands it over, and only then waits for batch k. With a
synchronous engine (CPU) this degenerates to one batch at a time, with the same results.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from embedq.engines.base import Engine, Pending, Profile
from embedq.tokenization import TokenizedDocs
from embedq.worker.buckets import Bucket, pad_batch, plan_buckets


@dataclass
class EngineStats:
    """Counters of the engine stage, for progress, status and the benchmark."""

    batches: int = 0
    documents: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0

    @property
    def padding_ratio(self) -> float:
        return self.padded_tokens / self.real_tokens if self.real_tokens else 1.0


def embed_documents(engine: Engine, docs: TokenizedDocs, pad_id: int, *,
                    indices: np.ndarray | None = None, profiles: Sequence[Profile] | None = None,
                    depth: int = 2, stats: EngineStats | None = None) -> np.ndarray:
    """Embeddings `(len(indices), dim)` float32 of the documents `indices` (all when None)."""
    rows = np.arange(len(docs), dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
    out = np.empty((rows.shape[0], engine.dim), dtype=np.float32)
    if rows.shape[0] == 0:
        return out
    lengths = docs.lengths[rows]
    offsets = docs.offsets
    started = time.perf_counter()
    buckets = plan_buckets(lengths, profiles or engine.profiles)
    in_flight: collections.deque[tuple[Bucket, Pending]] = collections.deque()
    for bucket in buckets:
        ids, row_lengths = pad_batch(docs.tokens, offsets, docs.lengths, rows[bucket.rows],
                                     bucket.profile.max_seq_len, pad_id)
        in_flight.append((bucket, engine.submit(ids, row_lengths)))
        if len(in_flight) >= depth:
            done, pending = in_flight.popleft()
            out[done.rows] = pending.result()
        if stats is not None:
            stats.batches += 1
            stats.padded_tokens += bucket.profile.max_seq_len * len(bucket)
    while in_flight:
        done, pending = in_flight.popleft()
        out[done.rows] = pending.result()
    if stats is not None:
        stats.documents += rows.shape[0]
        stats.real_tokens += int(lengths.sum())
        stats.seconds += time.perf_counter() - started
    return out


def non_finite_rows(embeddings: np.ndarray) -> np.ndarray:
    """Indices of rows holding NaN or infinity (a model overflow in fp16, for instance)."""
    return np.flatnonzero(~np.isfinite(embeddings).all(axis=1))
