"""Every CPU backend gives sentence-transformers' embeddings, document for document, and honours pooling."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedq.engines import create_engine
from embedq.engines.base import Engine, EngineConfig, Profile
from embedq.engines.pooling import pool_reference
from embedq.model import ModelInfo, Pooling, load_model_info
from embedq.tokenization import Tokenizer
from embedq.worker.pipeline import embed_documents

from .conftest import BOUNDED_SAMPLE, THREADS, Sample
from .corpus_batches import cosine, padded_batches

# The contract's tolerance for fp32 backends against sentence-transformers on the same model.
MIN_COSINE = 0.9999
OVERRIDE_SAMPLE = 48


def test_sample_mixes_short_and_truncated_documents(sample: Sample) -> None:
    assert len(sample.docs) >= 2_000
    assert int(sample.docs.lengths.min()) < 16
    assert int(sample.docs.truncated.sum()) >= 20
    assert int(sample.docs.lengths.max()) == 256


def test_the_bounded_sample_spans_the_lengths_of_the_sample(sample: Sample, bounded_sample: Sample) -> None:
    assert len(bounded_sample.docs) == BOUNDED_SAMPLE
    assert set(bounded_sample.texts) <= set(sample.texts)
    assert int(bounded_sample.docs.lengths.min()) < 16
    assert int(bounded_sample.docs.truncated.sum()) >= 5
    assert int(bounded_sample.docs.lengths.max()) == 256


@pytest.fixture(params=["bounded", pytest.param("full", marks=pytest.mark.full)])
def checked(request: pytest.FixtureRequest) -> tuple[Sample, np.ndarray]:
    """A sample and sentence-transformers' embeddings of it: the bounded one by default, all of it with -m full."""
    if request.param == "full":
        return request.getfixturevalue("sample"), request.getfixturevalue("st_reference")
    return request.getfixturevalue("bounded_sample"), request.getfixturevalue("bounded_st_reference")


def test_embeddings_match_sentence_transformers_for_every_document(
    backend_engine: Engine, checked: tuple[Sample, np.ndarray], model_info: ModelInfo
) -> None:
    sample, st_reference = checked
    embeddings = embed_documents(backend_engine, sample.docs, model_info.pad_token_id)

    assert embeddings.shape == (len(sample.docs), model_info.dim)
    assert embeddings.dtype == np.float32
    similarity = cosine(embeddings, st_reference)
    worst = int(np.argmin(similarity))
    assert similarity.min() >= MIN_COSINE, (
        f"{backend_engine.name}: document {worst} ({int(sample.docs.lengths[worst])} tokens) "
        f"has cosine {similarity.min():.7f}"
    )
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


@pytest.fixture(scope="module")
def hidden_state_model(model_info: ModelInfo) -> Any:
    """The plain Hugging Face transformer, the independent source of token states for references."""
    import torch
    from transformers import AutoModel

    torch.set_num_threads(THREADS)
    # fp32 stated, since transformers 5 otherwise loads weights in the dtype they are stored in.
    return AutoModel.from_pretrained(model_info.transformer_path, local_files_only=True,
                                     dtype=torch.float32).eval()


def _model_dir_with_pooling(source: ModelInfo, pooling_key: str, destination: Path) -> Path:
    # The same weights (linked, not copied) under a 1_Pooling/config.json asking for another mode.
    destination.mkdir()
    for entry in source.path.iterdir():
        if entry.name != "1_Pooling":
            (destination / entry.name).symlink_to(entry)
    config = json.loads((source.path / "1_Pooling" / "config.json").read_text())
    config = {key: (False if key.startswith("pooling_mode_") else value) for key, value in config.items()}
    config[pooling_key] = True
    (destination / "1_Pooling").mkdir()
    (destination / "1_Pooling" / "config.json").write_text(json.dumps(config))
    return destination


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize(("pooling", "pooling_key"), [
    (Pooling.CLS, "pooling_mode_cls_token"), (Pooling.LAST, "pooling_mode_lasttoken"),
])
def test_pooling_from_the_model_directory_is_what_the_engine_runs(
    backend: str, pooling: Pooling, pooling_key: str, model_info: ModelInfo, sample: Sample,
    profiles: tuple[Profile, ...], onnx_cache_dir: Path, hidden_state_model: Any, tmp_path: Path,
) -> None:
    import torch

    model = load_model_info(_model_dir_with_pooling(model_info, pooling_key, tmp_path / "model"))
    assert model.pooling is pooling and model.normalize
    # Both corpora, so the last token is sometimes [SEP] at 256 and sometimes early in a short row.
    texts = sample.texts[: OVERRIDE_SAMPLE // 2] + sample.texts[-OVERRIDE_SAMPLE // 2 :]
    docs = Tokenizer(model.tokenizer_file, model.max_seq_len).encode(texts)

    config = EngineConfig(model, profiles, cache_dir=str(onnx_cache_dir), threads=THREADS)
    with create_engine(backend, config) as engine:
        embeddings = embed_documents(engine, docs, model.pad_token_id)

    reference = np.empty_like(embeddings)
    with torch.inference_mode():
        for batch in padded_batches(docs, profiles, model.pad_token_id):
            mask = np.arange(batch.input_ids.shape[1])[None, :] < batch.lengths[:, None]
            hidden = hidden_state_model(input_ids=torch.from_numpy(batch.input_ids).long(),
                                        attention_mask=torch.from_numpy(mask).long()).last_hidden_state
            reference[batch.doc_index] = pool_reference(hidden.numpy(), batch.lengths, pooling, True)
    assert cosine(embeddings, reference).min() >= MIN_COSINE
    np.testing.assert_allclose(embeddings, reference, atol=1e-4)



def test_eager_attention_with_its_additive_mask_matches_sdpa(model_info: ModelInfo, sample: Sample) -> None:
    import torch

    from embedq.engines.torch_engine import load_encoder

    docs = Tokenizer(model_info.tokenizer_file, model_info.max_seq_len).encode(sample.texts[-8:])
    batch = next(padded_batches(docs, (Profile(model_info.max_seq_len, 8),), model_info.pad_token_id))
    assert batch.lengths.min() < model_info.max_seq_len  # some rows are padded, so the mask matters
    ids, lengths = torch.from_numpy(batch.input_ids), torch.from_numpy(batch.lengths)
    with torch.inference_mode():
        sdpa = load_encoder(model_info, attention="sdpa")(ids, lengths).numpy()
        eager = load_encoder(model_info, attention="eager")(ids, lengths).numpy()

    np.testing.assert_allclose(eager, sdpa, atol=1e-5)
