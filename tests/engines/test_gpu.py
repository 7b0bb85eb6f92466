"""The torch engine on CUDA: fp16/bf16/fp32 against CPU fp32, and each pending batch keeps its own result,
in each way it runs batches: padded eager, padded in CUDA graphs, and unpadded (embedq's own BERT)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from embedq.engines import create_engine
from embedq.engines.base import Engine, EngineConfig, Profile
from embedq.model import ModelInfo
from embedq.worker.pipeline import embed_documents

from .conftest import Sample
from .corpus_batches import cosine, padded_batches

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

# Half precision keeps ~3 significant digits per state; pooled and normalized, 0.999 is the contract.
MIN_COSINE = {"fp32": 0.9999, "fp16": 0.999, "bf16": 0.999}


@pytest.fixture(scope="module")
def cpu_fp32(model_info: ModelInfo, sample: Sample, profiles: tuple[Profile, ...]) -> np.ndarray:
    """The sample embedded by the torch engine on CPU in fp32: what every CUDA run is held against."""
    config = EngineConfig(model_info, profiles, device="cpu")
    with create_engine("torch", config) as engine:
        return embed_documents(engine, sample.docs, model_info.pad_token_id)


@pytest.fixture(scope="module", params=["eager", "cuda-graphs", "unpadded"])
def kernels(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _cuda_engine(model_info: ModelInfo, profiles: tuple[Profile, ...], precision: str, kernels: str) -> Engine:
    config = EngineConfig(model_info, profiles, device="cuda", precision=precision,
                          cuda_graphs=kernels == "cuda-graphs", unpadded=kernels == "unpadded")
    return create_engine("torch", config)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_cuda_embeddings_match_cpu_fp32_for_every_document(
    precision: str, kernels: str, model_info: ModelInfo, sample: Sample,
    profiles: tuple[Profile, ...], cpu_fp32: np.ndarray,
) -> None:
    with _cuda_engine(model_info, profiles, precision, kernels) as engine:
        embeddings = embed_documents(engine, sample.docs, model_info.pad_token_id)

    assert embeddings.dtype == np.float32
    similarity = cosine(embeddings, cpu_fp32)
    worst = int(np.argmin(similarity))
    assert similarity.min() >= MIN_COSINE[precision], (
        f"{precision}: document {worst} ({int(sample.docs.lengths[worst])} tokens) has cosine "
        f"{similarity.min():.6f}"
    )


@pytest.fixture(scope="module")
def fp16_engine(model_info: ModelInfo, profiles: tuple[Profile, ...], kernels: str) -> Iterator[Engine]:
    with _cuda_engine(model_info, profiles, "fp16", kernels) as engine:
        yield engine


def test_batches_submitted_before_any_is_collected_each_return_their_own_result(
    fp16_engine: Engine, model_info: ModelInfo, sample: Sample, profiles: tuple[Profile, ...]
) -> None:
    batches = list(padded_batches(sample.docs, profiles, model_info.pad_token_id))
    # One at a time first: the expected result of every batch on this engine.
    expected = [fp16_engine.submit(b.input_ids, b.lengths).result() for b in batches]

    # Then all at once, more batches of a profile than it has buffers, collected in reverse.
    pending = [fp16_engine.submit(b.input_ids, b.lengths) for b in batches]
    for index in reversed(range(len(batches))):
        np.testing.assert_array_equal(pending[index].result(), expected[index])


def test_a_short_batch_on_a_full_profile_does_not_see_the_previous_rows(
    fp16_engine: Engine, model_info: ModelInfo, sample: Sample, profiles: tuple[Profile, ...]
) -> None:
    full = next(b for b in padded_batches(sample.docs, profiles, model_info.pad_token_id)
                if b.lengths.size > 4)
    alone = fp16_engine.submit(full.input_ids[:2], full.lengths[:2]).result()
    fp16_engine.submit(full.input_ids, full.lengths).result()
    after_full = fp16_engine.submit(full.input_ids[:2], full.lengths[:2]).result()

    assert alone.shape == (2, model_info.dim)
    np.testing.assert_array_equal(after_full, alone)


def test_the_bench_warm_up_captures_the_graph_of_every_profile(model_info: ModelInfo,
                                                               profiles: tuple[Profile, ...]) -> None:
    """What `embedq bench --gpus` relies on to time a warm engine: after `warm_up` every profile's
    CUDA graph is captured, so no capture falls inside the timed run."""
    from embedq.bench.ceilings import warm_up

    with _cuda_engine(model_info, profiles, "fp16", "cuda-graphs") as engine:
        warm_up(engine, model_info.pad_token_id)
        assert set(engine._pipeline._runner._graphs) == set(engine.profiles)  # type: ignore[attr-defined]
