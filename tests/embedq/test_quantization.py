"""Stored vectors: Matryoshka truncation and the compact types give sentence-transformers' values.

`quantize_embeddings` (sentence-transformers' own function) is the reference: with the same ranges,
embedq's int8/uint8/binary/ubinary values must equal its values exactly, and truncation must equal
`encode(truncate_dim=N, normalize_embeddings=True)` on the real MiniLM.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sentence_transformers.util.quantization import quantize_embeddings

from embedq.errors import UsageError
from embedq.quantization import OUTPUT_DTYPES, OutputFormat, convert, from_record, quantization_ranges, read_ranges

RNG = np.random.default_rng(7)
# Unit vectors of MiniLM's width, plus rows that sit exactly on the calibration's extremes and on 0.
VECTORS = RNG.standard_normal((300, 384)).astype(np.float32)
VECTORS /= np.linalg.norm(VECTORS, axis=1, keepdims=True)
CALIBRATION = VECTORS[:200]


@pytest.mark.parametrize("dtype", ["int8", "uint8"])
def test_scalar_quantization_equals_quantize_embeddings_with_the_same_ranges(dtype: str) -> None:
    ranges = quantization_ranges(CALIBRATION)
    theirs = quantize_embeddings(VECTORS, precision=dtype, ranges=ranges)
    mine = OutputFormat(dtype, ranges=ranges).apply(VECTORS)
    assert mine.dtype == theirs.dtype and mine.shape == theirs.shape
    np.testing.assert_array_equal(mine, theirs)
    # Out of the calibration's range (the last 100 rows) values clip at the ends, as theirs do.
    assert int(mine.min()) == (-128 if dtype == "int8" else 0) and int(mine.max()) == (127 if dtype == "int8" else 255)


@pytest.mark.parametrize("dtype", ["int8", "uint8"])
def test_ranges_are_the_calibration_embeddings_per_dimension_min_and_max(dtype: str) -> None:
    ranges = quantization_ranges(CALIBRATION)
    np.testing.assert_array_equal(ranges, np.stack([CALIBRATION.min(0), CALIBRATION.max(0)]))
    theirs = quantize_embeddings(VECTORS, precision=dtype, calibration_embeddings=CALIBRATION)
    np.testing.assert_array_equal(convert(VECTORS, dtype, ranges), theirs)


def test_a_dimension_with_an_empty_range_takes_a_step_of_one_as_theirs_does() -> None:
    flat = CALIBRATION.copy()
    flat[:, 5] = 0.25
    ranges = quantization_ranges(flat)
    np.testing.assert_array_equal(convert(VECTORS, "int8", ranges), quantize_embeddings(VECTORS, "int8", ranges=ranges))


@pytest.mark.parametrize("dtype", ["binary", "ubinary"])
@pytest.mark.parametrize("dim", [384, 100])  # 100: not a multiple of 8, the last byte padded with zeros
def test_binary_packing_equals_quantize_embeddings(dtype: str, dim: int) -> None:
    vectors = VECTORS[:, :dim].copy()
    vectors[0, :9] = 0.0  # exactly 0 is not > 0
    theirs = quantize_embeddings(vectors, precision=dtype)
    mine = OutputFormat(dtype).apply(vectors)
    assert mine.dtype == theirs.dtype and mine.shape == (300, -(-dim // 8))
    np.testing.assert_array_equal(mine, theirs)


def test_truncation_renormalizes_when_the_model_normalizes_and_not_otherwise() -> None:
    cut = OutputFormat("float32", truncate_dim=64, normalize=True).apply(VECTORS)
    assert cut.shape == (300, 64)
    np.testing.assert_allclose(np.linalg.norm(cut, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(cut, VECTORS[:, :64] / np.linalg.norm(VECTORS[:, :64], axis=1, keepdims=True), rtol=1e-6)
    raw = OutputFormat("float32", truncate_dim=64, normalize=False).apply(VECTORS)
    np.testing.assert_array_equal(raw, VECTORS[:, :64])


def test_calibration_ranges_are_taken_after_truncation() -> None:
    stored = OutputFormat("int8", truncate_dim=32, normalize=True).with_calibration(CALIBRATION, "test")
    assert stored.ranges is not None and stored.ranges.shape == (2, 32)
    truncated = stored.floats(VECTORS)
    theirs = quantize_embeddings(truncated, "int8", calibration_embeddings=stored.floats(CALIBRATION))
    np.testing.assert_array_equal(stored.apply(VECTORS), theirs)


def test_storage_per_vector_for_each_type() -> None:
    sizes = {dtype: OutputFormat(dtype).bytes_per_vector(1024) for dtype in OUTPUT_DTYPES}
    assert sizes == {"float32": 4096, "float16": 2048, "int8": 1024, "uint8": 1024, "binary": 128, "ubinary": 128}
    assert OutputFormat("binary", truncate_dim=256).bytes_per_vector(1024) == 32


def test_the_record_round_trips_the_format_exactly() -> None:
    stored = OutputFormat("uint8", 48, True).with_calibration(CALIBRATION, "200 test vectors")
    fields = json.loads(json.dumps(stored.record_fields()))  # as the job record stores it (JSON)
    again = from_record(fields["output_dtype"], fields["truncate_dim"], True, fields["quantization_ranges"],
                        fields["calibration"])
    assert again.ranges is not None and stored.ranges is not None
    np.testing.assert_array_equal(again.ranges, stored.ranges)
    np.testing.assert_array_equal(again.apply(VECTORS), stored.apply(VECTORS))
    assert json.loads(stored.metadata()["quantization_ranges"]) == fields["quantization_ranges"]


def test_formats_that_cannot_be_written_are_refused_with_the_reason() -> None:
    with pytest.raises(UsageError, match="more than the model's 384"):
        OutputFormat("float32", truncate_dim=500).check(384)
    with pytest.raises(UsageError, match="needs calibration ranges"):
        OutputFormat("int8").check(384)
    with pytest.raises(UsageError, match="of another dimension"):
        OutputFormat("int8", truncate_dim=64, ranges=quantization_ranges(CALIBRATION)).check(384)
    with pytest.raises(UsageError, match="output-dtype must be one of"):
        OutputFormat("int4")


def test_ranges_files_are_read_as_npy_or_json(tmp_path: Path) -> None:
    ranges = quantization_ranges(CALIBRATION)
    np.save(tmp_path / "r.npy", ranges)
    (tmp_path / "r.json").write_text(json.dumps(ranges.tolist()))
    np.testing.assert_array_equal(read_ranges(str(tmp_path / "r.npy")), ranges)
    np.testing.assert_array_equal(read_ranges(str(tmp_path / "r.json")), ranges)
    (tmp_path / "bad.json").write_text("[1, 2, 3]")
    with pytest.raises(UsageError, match="ranges are \\(2, dim\\)"):
        read_ranges(str(tmp_path / "bad.json"))


def test_truncate_dim_equals_sentence_transformers_on_the_real_model(model_info) -> None:  # type: ignore[no-untyped-def]
    from sentence_transformers import SentenceTransformer

    from embedq.api import Embedder

    texts = ["A Matryoshka model front-loads its information.", "short", "embedq truncates after pooling " * 20]
    theirs = SentenceTransformer(str(model_info.path), device="cpu").encode(
        texts, truncate_dim=128, normalize_embeddings=True)
    with Embedder(device="cpu", backend="torch", threads=2, tokenizer_processes=0) as model:
        vectors = model.encode(texts)
    mine = OutputFormat("float32", truncate_dim=128, normalize=model_info.normalize).apply(vectors)
    assert mine.shape == (3, 128)
    np.testing.assert_allclose(mine, theirs, atol=2e-6)
