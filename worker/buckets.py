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

# Sequence lengths of the default profile table: steps of about 1.4x keep padding to a few tens of
# percent for any length distribution; `embedq profile` fits a table to a corpus instead.
DEFAULT_SEQ_LENS = (8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512)
MAX_BATCH_CAP = 1024


@dataclass(frozen=True)
class Bucket:
    """One padded engine batch: `rows` index the window's documents, all of length <= profile's."""

    profile: Profile
    rows: np.ndarray  # int64 indices into the window, in ascending length order

    def __len__(self) -> int:
        return int(self.rows.shape[0])


def profile_table(max_seq_len: int, token_budget: int, seq_lens: Sequence[int] = DEFAULT_SEQ_LENS,
                  max_batch_cap: int = MAX_BATCH_CAP) -> tuple[Profile, ...]:
    """Profiles for sequence lengths up to `max_seq_len`, each batch holding about `token_budget` tokens."""
    if max_seq_len < 1 or token_budget < 1:
        raise ValueError("max_seq_len and token_budget must be positive")
    lens = sorted({s for s in seq_lens if s < max_seq_len} | {max_seq_len})
    return tuple(Profile(s, max(1, min(max_batch_cap, token_budget // s))) for s in lens)


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


def sequence_padding(lengths: np.ndarray, seq_lens: Sequence[int]) -> float:
    """Padded over real tokens when every document is padded to the smallest fitting length."""
    table = np.array(sorted(seq_lens), dtype=np.int64)
    padded = table[np.searchsorted(table, lengths, side="left")]
    return float(padded.sum()) / max(1, int(lengths.sum()))


def fit_seq_lens(lengths: np.ndarray, max_seq_len: int, *, target_waste: float = 0.10,
                 max_profiles: int = 24) -> tuple[int, ...]:
    """The fewest sequence lengths (ending at `max_seq_len`) that keep the padding of `lengths`
    under `target_waste` (0.10: padded tokens at most 1.10x the real ones); if no set of
    `max_profiles` does, the set of that size with the least padding.

    Exact for the given lengths: dynamic programming over candidate lengths, multiples of 4 up to
    64 and of 8 above (GPU kernels run best on such widths; short documents need the fine steps).
    Fewer profiles mean fewer shapes to build or capture and fuller batches.
    """
    if lengths.size == 0:
        return (max_seq_len,)
    candidates = sorted({min(max_seq_len, s) for s in [*range(4, 65, 4), *range(72, max_seq_len + 8, 8)]}
                        | {max_seq_len})
    index = {c: i for i, c in enumerate(candidates)}
    counts = np.zeros(len(candidates), dtype=np.int64)
    cells = np.searchsorted(np.array(candidates), np.minimum(lengths, max_seq_len), side="left")
    np.add.at(counts, cells, 1)
    below = np.concatenate([[0], np.cumsum(counts)])  # documents in cells < i
    real = int(lengths.sum())
    n = len(candidates)
    # cost[k][j]: fewest padded tokens covering cells 0..j with k boundaries, the last at cell j.
    infinity = float("inf")
    cost = np.full((max_profiles + 1, n), infinity)
    choice = np.full((max_profiles + 1, n), -1, dtype=np.int64)
    for j in range(n):
        cost[1][j] = candidates[j] * below[j + 1]
    def boundaries(k: int, j: int) -> tuple[int, ...]:
        bounds = []
        for level in range(k, 0, -1):
            bounds.append(candidates[j])
            j = int(choice[level][j])
        return tuple(sorted(bounds))

    last = index[max_seq_len]
    for k in range(1, max_profiles + 1):
        if k > 1:
            for j in range(n):
                docs = below[j + 1] - below[1:j + 1]  # documents in cells i+1..j, for each previous boundary i
                options = cost[k - 1][:j] + candidates[j] * docs
                if options.size:
                    i = int(np.argmin(options))
                    cost[k][j], choice[k][j] = options[i], i
        if cost[k][last] <= (1.0 + target_waste) * real:
            return boundaries(k, last)
    # Out of reach: the fewest lengths that give the least padding possible with max_profiles.
    least = min(cost[k][last] for k in range(1, max_profiles + 1))
    k = next(k for k in range(1, max_profiles + 1) if cost[k][last] == least)
    return boundaries(k, last)
