"""Length-sorted padded batches of tokenized documents, for feeding engines in tests and benchmarks.

A stand-in for the worker's bucketing (worker/buckets.py): sort by length, cut into runs that fit
one profile's token budget, pad each run to its profile's max_seq_len.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from embedq.engines.base import Engine, Pending, Profile
from embedq.tokenization import TokenizedDocs


@dataclass(frozen=True)
class PaddedBatch:
    """Rows `doc_index` of the tokenized documents, right-padded to one profile's width."""

    doc_index: np.ndarray  # int64 (B,)
    input_ids: np.ndarray  # int32 (B, S)
    lengths: np.ndarray  # int32 (B,)


def bucket_profiles(max_seq_len: int, token_budget: int, step: int = 16) -> tuple[Profile, ...]:
    """Widths every `step` tokens up to `max_seq_len`, each with max_batch = token_budget // width."""
    widths = sorted({*range(step, max_seq_len, step), max_seq_len})
    return tuple(Profile(w, max(1, token_budget // w)) for w in widths)


def padded_batches(docs: TokenizedDocs, profiles: tuple[Profile, ...], pad_id: int) -> Iterator[PaddedBatch]:
    """Sort documents by length and pad them, a profile's max_batch at a time, to the narrowest width."""
    order = np.argsort(docs.lengths, kind="stable")
    offsets = docs.offsets
    start = 0
    while start < order.size:
        profile = next(p for p in sorted(profiles) if p.max_seq_len >= docs.lengths[order[start]])
        stop = start
        # Take documents while they fit the profile; sorted order means the first misfit ends the run.
        while (stop < order.size and stop - start < profile.max_batch
               and docs.lengths[order[stop]] <= profile.max_seq_len):
            stop += 1
        rows = order[start:stop]
        input_ids = np.full((rows.size, profile.max_seq_len), pad_id, dtype=np.int32)
        for row, doc in enumerate(rows):
            input_ids[row, : docs.lengths[doc]] = docs.tokens[offsets[doc] : offsets[doc + 1]]
        yield PaddedBatch(rows.astype(np.int64), input_ids, docs.lengths[rows].astype(np.int32))
        start = stop


def read_texts(path: Path, count: int, seed: int) -> list[str]:
    """`count` texts drawn at random (fixed seed) from a corpus Parquet file with a `text` column."""
    texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    picked = np.random.default_rng(seed).choice(len(texts), size=min(count, len(texts)), replace=False)
    return [texts[i] for i in np.sort(picked)]


def embed_documents(engine: Engine, docs: TokenizedDocs, pad_id: int) -> np.ndarray:
    """Embeddings of every document, in document order, submitting a batch before collecting the last."""
    out = np.empty((len(docs), engine.dim), dtype=np.float32)
    in_flight: list[tuple[np.ndarray, Pending]] = []
    for batch in padded_batches(docs, tuple(engine.profiles), pad_id):
        in_flight.append((batch.doc_index, engine.submit(batch.input_ids, batch.lengths)))
        if len(in_flight) > 1:
            rows, pending = in_flight.pop(0)
            out[rows] = pending.result()
    for rows, pending in in_flight:
        out[rows] = pending.result()
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two `(n, d)` arrays, in float64."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(axis=1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))
