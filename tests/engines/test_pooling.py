"""The pooling maths: the torch module (what runs on the device and in the ONNX graph) against numpy."""

from __future__ import annotations

import numpy as np
import pytest

from embedq.engines.pooling import pool_hidden_states, pool_reference, pooling_head
from embedq.model import Pooling

torch = pytest.importorskip("torch")

LENGTHS = np.array([1, 5, 12, 7, 2, 12], dtype=np.int32)
WIDTH, DIM = 12, 16


def _hidden(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((LENGTHS.size, WIDTH, DIM)).astype(np.float32)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("pooling", list(Pooling))
def test_torch_pooling_matches_the_numpy_reference(pooling: Pooling, normalize: bool) -> None:
    hidden = _hidden()
    pooled = pooling_head(pooling, normalize)(torch.from_numpy(hidden), torch.from_numpy(LENGTHS))

    assert pooled.dtype == torch.float32 and tuple(pooled.shape) == (LENGTHS.size, DIM)
    np.testing.assert_allclose(pooled.numpy(), pool_reference(hidden, LENGTHS, pooling, normalize),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooling", list(Pooling))
def test_padding_states_do_not_reach_the_pooled_vector(pooling: Pooling) -> None:
    hidden = _hidden()
    noisy = hidden.copy()
    padding = np.arange(WIDTH)[None, :] >= LENGTHS[:, None]
    noisy[padding] = 1e6

    for states in (hidden, noisy):
        np.testing.assert_allclose(pool_reference(states, LENGTHS, pooling, True),
                                   pool_reference(hidden, LENGTHS, pooling, True), rtol=1e-6)
    pooled = pool_hidden_states(torch.from_numpy(noisy), torch.from_numpy(LENGTHS), pooling, True)
    np.testing.assert_allclose(pooled.numpy(), pool_reference(hidden, LENGTHS, pooling, True),
                               rtol=1e-5, atol=1e-6)


def test_reference_follows_the_definitions() -> None:
    hidden = _hidden()
    mean = pool_reference(hidden, LENGTHS, Pooling.MEAN, normalize=False)
    cls = pool_reference(hidden, LENGTHS, Pooling.CLS, normalize=False)
    last = pool_reference(hidden, LENGTHS, Pooling.LAST, normalize=False)
    for row, length in enumerate(LENGTHS):
        np.testing.assert_allclose(mean[row], hidden[row, :length].mean(axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(cls[row], hidden[row, 0])
        np.testing.assert_array_equal(last[row], hidden[row, length - 1])


def test_normalize_gives_unit_vectors_and_leaves_zero_vectors_finite() -> None:
    hidden = _hidden()
    hidden[0] = 0.0  # a zero vector: eps keeps the division finite, as in torch's normalize
    pooled = pool_hidden_states(torch.from_numpy(hidden), torch.from_numpy(LENGTHS), Pooling.CLS, True)

    norms = np.linalg.norm(pooled.numpy(), axis=1)
    assert np.isfinite(pooled.numpy()).all()
    assert norms[0] == 0.0
    np.testing.assert_allclose(norms[1:], 1.0, rtol=1e-6)


def test_half_precision_states_pool_to_float32() -> None:
    hidden = _hidden()
    pooled = pool_hidden_states(torch.from_numpy(hidden).half(), torch.from_numpy(LENGTHS), Pooling.MEAN, True)

    assert pooled.dtype == torch.float32
    np.testing.assert_allclose(pooled.numpy(), pool_reference(hidden, LENGTHS, Pooling.MEAN, True), atol=2e-3)


@pytest.mark.parametrize("pooling", list(Pooling))
def test_a_prompt_left_out_of_pooling_is_left_out_on_the_device_as_in_the_reference(pooling: Pooling) -> None:
    hidden = _hidden(3)
    skip = 3  # LENGTHS holds rows shorter than, equal to and longer than the prompt
    pooled = pooling_head(pooling, True, skip)(torch.from_numpy(hidden), torch.from_numpy(LENGTHS))
    reference = pool_reference(hidden, LENGTHS, pooling, True, skip)
    np.testing.assert_allclose(pooled.numpy(), reference, rtol=1e-5, atol=1e-6)
    long = skip < LENGTHS
    if pooling is Pooling.MEAN:  # the mean of the text's tokens only; a row that is all prompt pools to zero
        text = hidden[2, skip:12].mean(axis=0)
        np.testing.assert_allclose(reference[2], text / np.linalg.norm(text), rtol=1e-5)
        assert not reference[~long].any()
    elif pooling is Pooling.CLS:  # sentence-transformers: the first token still in the mask
        np.testing.assert_allclose(reference[long], pool_reference(hidden[long, skip:], LENGTHS[long] - skip,
                                                                   Pooling.CLS, True), rtol=1e-6)
    else:
        np.testing.assert_array_equal(reference, pool_reference(hidden, LENGTHS, pooling, True))
