"""Length bucketing: sort documents by token count, cut them into padded batches that fit profiles.

Pure functions over numpy arrays; no Redis, no device. A window of documents is ordered by
length, each document goes to the smallest profile whose `max_seq_len` holds it, and each
profile's documents are cut into batches of at most `max_batch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from embedq.engines.base import Profile


@dataclass(frozen=True)
class Bucket:
    """One padded engine batch: `rows` index the window's documents, all of length <= profile's."""

    profile: Profile
    rows: np.ndarray  # int64 indices into the window, in ascending length order

    def __len__(self) -> int:
        return int(self.rows.shape[0])


def plan_buckets(lengths: np.ndarray, profiles: Sequence[Profile]) -> list[Bucket]:
    """Cut documents of the given token `lengths` into buckets, shortest first.

    Every index of `lengths` lands in exactly one bucket; lengths over the largest profile are an
    error (the tokenizer truncates to the model's max_seq_len, which is the largest profile).
    """
    if lengths.size == 0:
        return []
    table = sorted(profiles)
    seqs = np.array([p.max_seq_len for p in table], dtype=np.int64)
    if int(lengths.max()) > int(seqs[-1]):
        raise ValueError(f"a document of {int(lengths.max())} tokens exceeds the largest profile {table[-1]}")
    order = np.argsort(lengths, kind="stable")
    which = np.searchsorted(seqs, lengths[order], side="left")
    bounds = np.searchsorted(which, np.arange(len(table) + 1), side="left")
    buckets: list[Bucket] = []
    for k, profile in enumerate(table):
        rows = order[bounds[k]:bounds[k + 1]]
        for start in range(0, rows.shape[0], profile.max_batch):
            buckets.append(Bucket(profile, rows[start:start + profile.max_batch]))
    return buckets


def pad_batch(tokens: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, rows: np.ndarray,
              seq_len: int, pad_id: int, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The `(len(rows), seq_len)` int32 id matrix of the given documents, right-padded with pad_id.

    `out`, if given, is filled in place (a pinned host buffer, for instance) and returned.
    """
    n = rows.shape[0]
    row_lengths = lengths[rows].astype(np.int32)
    ids = out[:n] if out is not None else np.empty((n, seq_len), dtype=np.int32)
    ids.fill(pad_id)
    columns = np.arange(seq_len, dtype=np.int64)
    mask = columns[None, :] < row_lengths[:, None]
    source = offsets[rows][:, None] + columns[None, :]
    ids[mask] = tokens[source[mask]]
    return ids, row_lengths


def padding_ratio(lengths: np.ndarray, buckets: Sequence[Bucket], *, full_batches: bool = False) -> float:
    """Padded tokens over real tokens (1.0 = no padding). With `full_batches`, every batch counts
    as max_batch rows (what a CUDA graph captured at max_batch computes)."""
    real = int(lengths.sum())
    if real == 0:
        return 1.0
    padded = sum(
        b.profile.max_seq_len * (b.profile.max_batch if full_batches else len(b)) for b in buckets
    )
    return padded / real
