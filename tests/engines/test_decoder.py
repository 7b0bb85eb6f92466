"""Decoder embedders (the Qwen3-Embedding class) on CPU in fp32, on a tiny random Qwen3 of the same
architecture: last-token pooling against transformers with the model's documented pooling (left
padding, final token, normalized) and with right padding, against sentence-transformers, truncation
as the tokenizer does it, and 8k-token documents through causal SDPA without a mask."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedq.engines import create_engine
from embedq.engines.base import Engine, EngineConfig, Profile
from embedq.engines.factory import auto_precision
from embedq.model import ModelInfo, Pooling, load_model_info
from embedq.tokenization import Tokenizer
from embedq.worker.pipeline import embed_documents

from .conftest import THREADS
from .corpus_batches import bucket_profiles, cosine, read_texts
from .decoder_model import EOS, build_tiny_decoder, plain_copy, write_bpe_tokenizer

torch = pytest.importorskip("torch")

MAX_SEQ_LEN = 64
MIN_COSINE = 0.9999
LONG = 8192


@pytest.fixture(scope="module")
def texts(corpus_dir: Path) -> list[str]:
    """Short glosses and longer passages; with a 1,000-id BPE many passages pass 64 tokens."""
    return (read_texts(corpus_dir / "glosses.parquet", 60, seed=11)
            + read_texts(corpus_dir / "passages.parquet", 40, seed=11))


@pytest.fixture(scope="module")
def decoder(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> ModelInfo:
    training = read_texts(corpus_dir / "glosses.parquet", 2000, seed=5)
    return load_model_info(build_tiny_decoder(tmp_path_factory.mktemp("tiny-qwen3"), training, MAX_SEQ_LEN))


@pytest.fixture(scope="module")
def engine(decoder: ModelInfo) -> Iterator[Engine]:
    config = EngineConfig(decoder, bucket_profiles(MAX_SEQ_LEN, 4096, step=8), threads=THREADS)
    with create_engine("torch", config) as started:
        yield started


@pytest.fixture(scope="module")
def transformer(decoder: ModelInfo) -> Any:
    """transformers' Qwen3Model, the reference for token states."""
    from transformers import AutoModel

    torch.set_num_threads(THREADS)
    return AutoModel.from_pretrained(decoder.transformer_path, local_files_only=True, dtype=torch.float32,
                                     attn_implementation="sdpa").eval()


def _hf_tokenizer(model: ModelInfo, padding_side: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model.transformer_path, padding_side=padding_side)


def _normalized(vectors: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(vectors.float(), dim=-1).numpy()


def test_the_fixture_is_a_causal_last_token_decoder_whose_tokenizer_appends_eos(decoder: ModelInfo) -> None:
    assert (decoder.architecture, decoder.causal, decoder.pooling, decoder.normalize) == (
        "Qwen3ForCausalLM", True, Pooling.LAST, True)
    tokenizer = Tokenizer(decoder.tokenizer_file, MAX_SEQ_LEN)
    assert tokenizer.library == "tokenizers" and tokenizer.tail == 1
    eos = _hf_tokenizer(decoder, "left").convert_tokens_to_ids(EOS)
    assert eos != decoder.pad_token_id  # padding is not the token pooled
    assert int(tokenizer.encode(["a short text"]).tokens[-1]) == eos


def test_one_padded_batch_of_mixed_lengths_pools_each_documents_last_token_as_transformers_does(
    decoder: ModelInfo, engine: Engine, transformer: Any, texts: list[str]
) -> None:
    docs = Tokenizer(decoder.tokenizer_file, MAX_SEQ_LEN).encode(texts)
    lengths = docs.lengths
    assert lengths.min() < 16 and docs.truncated.sum() >= 5  # short, long and cut documents, one batch
    ids = np.full((len(docs), MAX_SEQ_LEN), decoder.pad_token_id, dtype=np.int32)
    for row in range(len(docs)):
        ids[row, :lengths[row]] = docs.slice(row, row + 1).tokens
    batch_engine = create_engine("torch", EngineConfig(decoder, (Profile(MAX_SEQ_LEN, len(docs)),), threads=THREADS))
    with batch_engine:
        ours = batch_engine.submit(ids, lengths).result()

    # Qwen3-Embedding's documented pooling: pad on the left, take the final position, normalize.
    left = _hf_tokenizer(decoder, "left")(texts, padding=True, truncation=True, max_length=MAX_SEQ_LEN,
                                          return_tensors="pt")
    assert [row[row != 0].tolist() for row in left["input_ids"] * left["attention_mask"]] == [
        docs.slice(i, i + 1).tokens.tolist() for i in range(len(docs))]  # the same ids, the same cuts
    right = _hf_tokenizer(decoder, "right")(texts, padding=True, truncation=True, max_length=MAX_SEQ_LEN,
                                            return_tensors="pt")
    with torch.inference_mode():
        by_left = _normalized(transformer(**left).last_hidden_state[:, -1])
        states = transformer(**right).last_hidden_state
        by_right = _normalized(states[torch.arange(len(docs)), right["attention_mask"].sum(1) - 1])

    assert cosine(ours, by_left).min() >= MIN_COSINE
    assert cosine(ours, by_right).min() >= MIN_COSINE
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_a_documents_vector_does_not_depend_on_what_pads_it(
    decoder: ModelInfo, engine: Engine, transformer: Any, texts: list[str]
) -> None:
    docs = Tokenizer(decoder.tokenizer_file, MAX_SEQ_LEN).encode(texts[:1])
    assert int(docs.lengths[0]) < MAX_SEQ_LEN // 2
    with torch.inference_mode():
        alone = transformer(input_ids=torch.from_numpy(docs.tokens[None, :].astype(np.int64))).last_hidden_state
    # Any id after the text, even its EOS again, changes nothing: no real token attends to it.
    for pad in (decoder.pad_token_id, 5, int(docs.tokens[-1])):
        padded = engine.submit(_padded(docs.tokens, MAX_SEQ_LEN, pad), docs.lengths).result()
        np.testing.assert_allclose(padded, _normalized(alone[:, -1]), atol=1e-5)


def _padded(tokens: np.ndarray, width: int, pad: int) -> np.ndarray:
    row = np.full((1, width), pad, dtype=np.int32)
    row[0, :tokens.size] = tokens
    return row


def test_decoder_embeddings_match_sentence_transformers_through_the_worker_buckets(
    decoder: ModelInfo, engine: Engine, texts: list[str]
) -> None:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(decoder.path), device="cpu", model_kwargs={"dtype": torch.float32})
    assert st.tokenizer.padding_side == "left" and st.max_seq_length == MAX_SEQ_LEN
    reference = st.encode(texts, batch_size=16, convert_to_numpy=True)
    docs = Tokenizer(decoder.tokenizer_file, MAX_SEQ_LEN).encode(texts)

    ours = embed_documents(engine, docs, decoder.pad_token_id)

    similarity = cosine(ours, reference)
    worst = int(np.argmin(similarity))
    assert similarity.min() >= MIN_COSINE, f"document {worst} ({int(docs.lengths[worst])} tokens): {similarity[worst]}"


def test_an_over_length_document_is_cut_as_the_tokenizer_cuts_it_keeping_its_eos(
    decoder: ModelInfo, texts: list[str]
) -> None:
    long_text = " ".join(texts[60:])
    for max_len in (MAX_SEQ_LEN, 17):
        docs = Tokenizer(decoder.tokenizer_file, max_len).encode([long_text, "short"])
        want = _hf_tokenizer(decoder, "right")([long_text], truncation=True, max_length=max_len)["input_ids"][0]
        assert docs.slice(0, 1).tokens.tolist() == want
        assert want[-1] == _hf_tokenizer(decoder, "right").convert_tokens_to_ids(EOS)
        assert docs.truncated.tolist() == [True, False]


def test_a_tokenizer_that_appends_nothing_is_cut_at_max_length_too(tmp_path: Path, texts: list[str]) -> None:
    # No special id after the text: the first max_seq_len ids, not max_seq_len - 1 and the last one.
    from transformers import AutoTokenizer

    write_bpe_tokenizer(tmp_path, texts, append_eos=False)
    tokenizer = Tokenizer(tmp_path / "tokenizer.json", 20)
    assert tokenizer.tail == 0
    long_text = " ".join(texts[60:70])
    want = AutoTokenizer.from_pretrained(tmp_path)([long_text], truncation=True, max_length=20)["input_ids"][0]
    assert tokenizer.encode([long_text]).tokens.tolist() == want


def test_an_8k_token_document_runs_causal_sdpa_without_a_mask_and_matches_transformers(
    decoder: ModelInfo, transformer: Any, texts: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = decoder.with_overrides(max_seq_len=LONG)
    docs = Tokenizer(model.tokenizer_file, LONG).encode([" ".join(texts) * 40])
    assert docs.lengths.tolist() == [LONG] and docs.truncated.tolist() == [True]
    calls: list[tuple[bool, bool]] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append((kwargs.get("attn_mask") is None, bool(kwargs.get("is_causal"))))
        return sdpa(*args, **kwargs)

    long_engine = create_engine("torch", EngineConfig(model, (Profile(LONG, 1),), threads=THREADS))
    with long_engine:
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
        ours = long_engine.submit(docs.tokens[None, :].astype(np.int32), docs.lengths).result()
        monkeypatch.undo()
    # Every layer: no (S x S) mask, the causal kernel (flash attention on CUDA, blockwise on CPU).
    assert calls == [(True, True)] * 2
    with torch.inference_mode():
        states = transformer(input_ids=torch.from_numpy(docs.tokens[None, :].astype(np.int64))).last_hidden_state
    assert cosine(ours, _normalized(states[:, -1])).min() >= MIN_COSINE


def test_decoders_attend_through_embedqs_causal_attention_which_gives_what_transformers_sdpa_gives(
    decoder: ModelInfo, texts: list[str]
) -> None:
    # Every decoder runs engines.attention (transformers' SDPA path syncs the host in each forward);
    # in fp32 it repeats grouped key/value heads, which the fixture has, so that path is exercised.
    from embedq.engines.attention import NAME
    from embedq.engines.torch_engine import load_encoder

    ours = load_encoder(decoder)
    config = ours.transformer.config
    assert config._attn_implementation == NAME == ours.attn_implementation
    assert config.num_key_value_heads < config.num_attention_heads
    plain = load_encoder(decoder)
    plain.transformer.set_attn_implementation("sdpa")
    assert plain.transformer.config._attn_implementation == "sdpa"
    docs = Tokenizer(decoder.tokenizer_file, MAX_SEQ_LEN).encode(texts[:8])
    ids = np.full((len(docs), MAX_SEQ_LEN), decoder.pad_token_id, dtype=np.int64)
    for row, (start, length) in enumerate(zip(docs.offsets[:-1], docs.lengths, strict=True)):
        ids[row, :length] = docs.tokens[start:start + length]
    lengths = torch.from_numpy(docs.lengths.astype(np.int64))
    with torch.inference_mode():
        want = plain(torch.from_numpy(ids), lengths)
        got = ours(torch.from_numpy(ids), lengths)
    assert torch.allclose(got, want, atol=1e-5)


def test_a_plain_causal_lm_directory_pools_its_last_token_as_sentence_transformers_would(
    decoder: ModelInfo, tmp_path: Path
) -> None:
    plain = load_model_info(plain_copy(decoder.path, tmp_path / "plain"))
    assert (plain.pooling, plain.normalize, plain.causal, plain.dtype) == (Pooling.LAST, False, True, "float32")
    bidirectional = load_model_info(plain_copy(decoder.path, tmp_path / "bidirectional", is_causal=False))
    assert (bidirectional.pooling, bidirectional.causal) == (Pooling.MEAN, False)
    # Saved as the bare model class: not what sentence-transformers calls a causal LM (mean pooling),
    # but embedq still knows its attention is causal.
    bare = load_model_info(plain_copy(decoder.path, tmp_path / "bare", architectures=["Qwen3Model"]))
    assert (bare.pooling, bare.causal) == (Pooling.MEAN, True)


def test_encoders_stay_bidirectional_and_fp16_while_bf16_decoders_get_bf16(
    decoder: ModelInfo, model_info: ModelInfo
) -> None:
    assert not model_info.causal
    bf16_decoder = dataclasses.replace(decoder, dtype="bfloat16")
    assert [auto_precision(m, on_gpu=True) for m in (model_info, decoder, bf16_decoder)] == ["fp16", "fp16", "bf16"]
    assert auto_precision(bf16_decoder, on_gpu=False) == "fp32"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_on_cuda_8k_token_batches_match_cpu_without_s_by_s_memory(
    precision: str, decoder: ModelInfo, texts: list[str]
) -> None:
    model = decoder.with_overrides(max_seq_len=LONG)
    docs = Tokenizer(model.tokenizer_file, LONG).encode([" ".join(texts) * (1 + i) for i in range(8)] + texts[:8])
    cpu = create_engine("torch", EngineConfig(model, (Profile(LONG, 16),), threads=THREADS))
    with cpu:
        reference = embed_documents(cpu, docs, model.pad_token_id)
    cuda = create_engine("torch", EngineConfig(model, (Profile(LONG, 16),), device="cuda", precision=precision))
    with cuda:
        embed_documents(cuda, docs, model.pad_token_id)  # warm-up: kernels chosen, allocator settled
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        ours = embed_documents(cuda, docs, model.pad_token_id)
        peak = torch.cuda.max_memory_allocated() - before

    assert cosine(ours, reference).min() >= (0.9999 if precision == "fp32" else 0.999)
    # 16 rows of 8,192 tokens: one (B, 1, S, S) boolean mask alone would be 1 GiB, the fp32 attention
    # scores of one layer 16 GiB; the tiny model's activations at 131k tokens are a few tens of MiB.
    assert peak < 512 << 20, f"peak {peak / 2**20:.0f} MiB"
