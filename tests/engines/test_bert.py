"""embedq's own BERT (engines/bert.py) against transformers' BertModel on CPU in fp32: padded and
unpadded, for every pooling, on real text; its checks on the checkpoint; and where it is used."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from embedq.engines.base import Profile
from embedq.engines.bert import load_native_bert, native_unsupported
from embedq.engines.factory import EngineSpec, plan_engine
from embedq.engines.torch_engine import load_encoder
from embedq.errors import EngineError
from embedq.model import ModelInfo, Pooling
from embedq.tokenization import TokenizedDocs

from .conftest import Sample
from .corpus_batches import padded_batches

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def spread(sample: Sample) -> TokenizedDocs:
    """Every 40th document of the sample (glosses and passages, some cut at 256 tokens)."""
    return sample.docs.take(np.arange(0, len(sample.docs), 40))


def _both(model: ModelInfo, docs: TokenizedDocs, profiles: tuple[Profile, ...]
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """transformers', the native padded and the native unpadded embeddings of `docs`, per batch."""
    reference = load_encoder(model)
    native = load_native_bert(model, device="cpu", dtype=torch.float32)
    out: list[list[np.ndarray]] = [[], [], []]
    with torch.inference_mode():
        for batch in padded_batches(docs, profiles, model.pad_token_id):
            ids, lengths = torch.from_numpy(batch.input_ids), torch.from_numpy(batch.lengths)
            out[0].append(reference(ids, lengths).numpy())
            out[1].append(native(ids, lengths).numpy())
            out[2].append(native(ids, lengths, tokens=int(batch.lengths.sum())).numpy())
    return tuple(np.concatenate(part) for part in out)  # type: ignore[return-value]


@pytest.mark.parametrize("pooling", list(Pooling))
def test_native_bert_matches_transformers_padded_and_unpadded(
    pooling: Pooling, model_info: ModelInfo, spread: TokenizedDocs, profiles: tuple[Profile, ...]
) -> None:
    model = dataclasses.replace(model_info, pooling=pooling)
    reference, padded, unpadded = _both(model, spread, profiles)

    assert reference.shape == (len(spread), model.dim)
    # fp32 on both sides: the same sums in another order, so float32 rounding apart.
    np.testing.assert_allclose(padded, reference, atol=2e-6)
    np.testing.assert_allclose(unpadded, reference, atol=2e-6)


@pytest.mark.parametrize("pooling", [Pooling.MEAN, Pooling.CLS])
def test_a_prompt_left_out_of_pooling_is_left_out_padded_and_unpadded(
    pooling: Pooling, model_info: ModelInfo, spread: TokenizedDocs, profiles: tuple[Profile, ...]
) -> None:
    # transformers' side pools with `pooling_head`, whose leaving out is pinned by test_pooling.py.
    model = dataclasses.replace(model_info, pooling=pooling, include_prompt=False, prompt_tokens=4)
    reference, padded, unpadded = _both(model, spread.take(np.arange(0, len(spread), 3)), profiles)
    np.testing.assert_allclose(padded, reference, atol=2e-6)
    np.testing.assert_allclose(unpadded, reference, atol=2e-6)


def test_a_checkpoint_with_a_head_is_read_under_its_bert_prefix(
    model_info: ModelInfo, spread: TokenizedDocs, profiles: tuple[Profile, ...], tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    copy = _copy_model(model_info, tmp_path)
    weights = load_file(str(copy / "model.safetensors"))
    # As BertForMaskedLM saves it: the encoder under "bert.", a head beside it.
    save_file({**{f"bert.{k}": v for k, v in weights.items()}, "cls.predictions.bias": torch.zeros(3)},
              str(copy / "model.safetensors"))
    moved = dataclasses.replace(model_info, path=copy, transformer_path=copy)
    docs = spread.slice(0, 40)
    batch = next(padded_batches(docs, profiles, model_info.pad_token_id))
    ids, lengths = torch.from_numpy(batch.input_ids), torch.from_numpy(batch.lengths)
    with torch.inference_mode():
        expected = load_native_bert(model_info, device="cpu", dtype=torch.float32)(ids, lengths)
        got = load_native_bert(moved, device="cpu", dtype=torch.float32)(ids, lengths)
    np.testing.assert_array_equal(got.numpy(), expected.numpy())


def test_a_checkpoint_without_a_bert_weight_is_refused_by_name(model_info: ModelInfo, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    copy = _copy_model(model_info, tmp_path)
    weights = load_file(str(copy / "model.safetensors"))
    del weights["encoder.layer.3.intermediate.dense.weight"]
    save_file(weights, str(copy / "model.safetensors"))

    with pytest.raises(EngineError, match=r"encoder\.layer\.3\.intermediate\.dense\.weight"):
        load_native_bert(dataclasses.replace(model_info, transformer_path=copy), device="cpu", dtype=torch.float32)


@pytest.mark.parametrize(("change", "reason"), [
    ({"model_type": "roberta"}, "model_type is not bert"),
    ({"position_embedding_type": "relative_key"}, "position embeddings are not absolute"),
    ({"hidden_act": "gelu_new"}, "the activation is not exact GELU"),
])
def test_other_architectures_go_to_transformers(
    change: dict[str, str], reason: str, model_info: ModelInfo, tmp_path: Path
) -> None:
    copy = _copy_model(model_info, tmp_path)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, **change}))

    assert native_unsupported(dataclasses.replace(model_info, transformer_path=copy)) == reason
    assert native_unsupported(model_info) is None


def test_without_safetensors_weights_the_model_goes_to_transformers(model_info: ModelInfo, tmp_path: Path) -> None:
    copy = _copy_model(model_info, tmp_path)
    (copy / "model.safetensors").unlink()

    assert native_unsupported(dataclasses.replace(model_info, transformer_path=copy)) == "no model.safetensors"


def test_a_model_that_bert_cannot_run_is_loaded_by_transformers(model_info: ModelInfo, tmp_path: Path) -> None:
    copy = _copy_model(model_info, tmp_path)
    config = json.loads((copy / "config.json").read_text())
    # transformers' BertModel runs relative positions (with fresh position weights); embedq's does not.
    (copy / "config.json").write_text(json.dumps({**config, "position_embedding_type": "relative_key"}))

    encoder = load_encoder(dataclasses.replace(model_info, path=copy, transformer_path=copy), native=True)

    assert type(encoder).__name__ == "SentenceEncoder"
    assert not getattr(encoder, "runs_unpadded", False)


@pytest.mark.parametrize(("unpad", "dim", "expected"), [
    ("auto", 384, False), ("auto", 768, True), ("auto", 1024, True), ("on", 384, True), ("off", 768, False),
])
def test_unpadded_batches_by_setting_and_model_width(
    unpad: str, dim: int, expected: bool, model_info: ModelInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    from embedq.engines import factory

    monkeypatch.setattr(factory, "resolve_device", lambda device: "cuda:0")
    _, config = plan_engine(dataclasses.replace(model_info, dim=dim), EngineSpec(backend="torch", unpad=unpad))

    assert config.unpadded is expected
    assert config.cuda_graphs  # for whatever runs padded


def test_batches_on_cpu_are_never_unpadded(model_info: ModelInfo) -> None:
    _, config = plan_engine(model_info, EngineSpec(backend="torch", device="cpu", unpad="on"))

    assert not config.unpadded


def _copy_model(model: ModelInfo, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(model.path, copy, ignore=shutil.ignore_patterns("README.md", "data_config.json"))
    return copy
