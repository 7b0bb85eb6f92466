"""Bucket profiles for long-context models (decoders at 8k-32k tokens): the default table and the
fitted lengths reach the model's maximum in geometric steps, so padding stays bounded, and every
batch stays within the token budget."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from embedq.engines.profiles import (
    DEFAULT_SEQ_LENS,
    _candidate_lengths,
    fit_seq_lens,
    profile_table,
    sequence_padding,
)

GPU_BUDGET = 65536


@pytest.mark.parametrize("max_seq_len", [8192, 32768])
def test_the_default_table_reaches_a_long_maximum_in_steps_of_at_most_a_third(max_seq_len: int) -> None:
    table = profile_table(max_seq_len, GPU_BUDGET)
    widths = [p.max_seq_len for p in table]
    assert widths[-1] == max_seq_len and widths[:14] == list(DEFAULT_SEQ_LENS[:14])
    assert all(b / a <= 4 / 3 + 1e-9 for a, b in itertools.pairwise(widths[13:]))
    assert all(p.tokens <= GPU_BUDGET for p in table)
    assert len(table) <= 32  # some thirty shapes to build, not one per 128 tokens


def test_long_documents_pad_by_at_most_a_third_with_the_default_table() -> None:
    lengths = np.random.default_rng(0).integers(513, 8193, size=5000)
    widths = [p.max_seq_len for p in profile_table(8192, GPU_BUDGET)]
    assert sequence_padding(lengths, widths) < 1.2
    # The table before long profiles: everything past 512 padded to the maximum.
    assert sequence_padding(lengths, [*DEFAULT_SEQ_LENS[:14], 8192]) > 1.8


def test_a_profile_longer_than_the_budget_holds_one_document() -> None:
    assert profile_table(8192, 4096)[-1].max_batch == 1


def test_fitted_lengths_for_long_documents_meet_the_target_quickly() -> None:
    rng = np.random.default_rng(1)
    lengths = np.concatenate([rng.integers(20, 300, 3000), np.exp(rng.uniform(np.log(500), np.log(30000), 2000))
                              ]).astype(np.int64)
    started = time.perf_counter()
    fitted = fit_seq_lens(lengths, 32768)
    assert time.perf_counter() - started < 5.0
    assert fitted[-1] == 32768 and sequence_padding(lengths, fitted) <= 1.10
    assert all(w % 4 == 0 for w in fitted)


@pytest.mark.parametrize("max_seq_len", [40, 256, 600, 1024])
def test_models_up_to_1024_tokens_are_fitted_among_the_same_widths_as_before(max_seq_len: int) -> None:
    before = sorted({min(max_seq_len, s) for s in [*range(4, 65, 4), *range(72, max_seq_len + 8, 8)]}
                    | {max_seq_len})
    assert _candidate_lengths(max_seq_len) == before
    # Past that, 64 widths an octave: 1040, 1056, ... 2048, then 2080, 2112, ...
    assert [w for w in _candidate_lengths(4096) if 2000 < w < 2200] == [2016, 2032, 2048, 2080, 2112, 2144, 2176]
