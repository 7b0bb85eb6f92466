"""Bucket profiles: the padded shapes an engine is built or captured for.

A profile table covers sequence lengths up to the model's maximum, each profile sized to a token
budget. `fit_seq_lens` proposes the lengths for a corpus (`embedq profile`); the default table
suits text in general.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .base import Profile

# Sequence lengths of the default profile table: steps of about 1.4x keep padding to a few tens of
# percent for any length distribution; `embedq profile` fits a table to a corpus instead.
SHORT_SEQ_LENS = (8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512)
# Past 512, for long-context models (decoders at 8k-32k tokens): x1, x1.25 and x1.5 of each power of
# two, all multiples of 128. A document pads by a third at most, so a 32k model needs 18 more
# profiles rather than one jump from 512 to 32k (a 600-token document padded to 32,768).
LONG_SEQ_LENS = tuple(octave * step // 4 for octave in (1 << k for k in range(9, 18)) for step in (4, 5, 6))[1:]
DEFAULT_SEQ_LENS = SHORT_SEQ_LENS + LONG_SEQ_LENS
MAX_BATCH_CAP = 1024


def profile_table(max_seq_len: int, token_budget: int, seq_lens: Sequence[int] = DEFAULT_SEQ_LENS,
                  max_batch_cap: int = MAX_BATCH_CAP) -> tuple[Profile, ...]:
    """Profiles for sequence lengths up to `max_seq_len`, each batch holding about `token_budget` tokens."""
    if max_seq_len < 1 or token_budget < 1:
        raise ValueError("max_seq_len and token_budget must be positive")
    lens = sorted({s for s in seq_lens if s < max_seq_len} | {max_seq_len})
    # At least one row: a profile longer than the budget holds one document (its memory still grows
    # only linearly with its length, since no backend materializes S x S attention scores).
    return tuple(Profile(s, max(1, min(max_batch_cap, token_budget // s))) for s in lens)


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
    64, of 8 up to 1024, then 64 a power of two apart (GPU kernels run best on such widths; short
    documents need the fine steps, and the coarser long ones keep the search small at 32k tokens).
    Fewer profiles mean fewer shapes to build or capture and fuller batches.
    """
    if lengths.size == 0:
        return (max_seq_len,)
    candidates = _candidate_lengths(max_seq_len)
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


def _candidate_lengths(max_seq_len: int) -> list[int]:
    """The widths `fit_seq_lens` chooses among, up to and including `max_seq_len`."""
    widths = [*range(4, 65, 4), *range(72, 1025, 8)]
    octave = 1024
    while octave < max_seq_len:
        widths += range(octave + octave // 64, 2 * octave + 1, octave // 64)
        octave *= 2
    return sorted({min(max_seq_len, s) for s in widths} | {max_seq_len})


@dataclass(frozen=True)
class SeqLenProposal:
    """A sample's token lengths summed up, and the bucket lengths proposed for it (`embedq profile`)."""

    documents: int
    tokens: int
    mean: float
    percentiles: dict[int, int]  # 50, 90, 99 -> token length
    max: int
    truncated: int  # documents cut at max_seq_len
    max_seq_len: int
    default_seq_lens: tuple[int, ...]  # the default table's lengths for this model
    default_padding: float  # padded over real tokens with the default lengths
    seq_lens: tuple[int, ...]  # the proposed lengths (`--seq-lens`)
    padding: float  # padded over real tokens with the proposed lengths


def propose_seq_lens(lengths: np.ndarray, truncated: np.ndarray, max_seq_len: int, *,
                     target_waste: float = 0.10) -> SeqLenProposal:
    """Bucket lengths for documents of token `lengths` (`truncated`: which were cut at `max_seq_len`)
    that pad at most `target_waste` over the real tokens, compared with the default table."""
    if lengths.size == 0:
        raise ValueError("no lengths to propose bucket lengths for")
    default = tuple(p.max_seq_len for p in profile_table(max_seq_len, 1 << 16))
    proposed = fit_seq_lens(lengths, max_seq_len, target_waste=target_waste)
    return SeqLenProposal(
        documents=int(lengths.size), tokens=int(lengths.sum()), mean=float(lengths.mean()),
        percentiles={p: int(np.percentile(lengths, p)) for p in (50, 90, 99)}, max=int(lengths.max()),
        truncated=int(truncated.sum()), max_seq_len=max_seq_len,
        default_seq_lens=default, default_padding=sequence_padding(lengths, default),
        seq_lens=proposed, padding=sequence_padding(lengths, proposed))
