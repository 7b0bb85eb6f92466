"""Random-weight models of named shapes, for timing models that are not downloaded (speed only):
BERT encoders (mean pooling) and Qwen3 decoders (last-token pooling, as Qwen3-Embedding)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedq.model import ModelInfo


@dataclass(frozen=True)
class Shape:
    """A model's architecture and size; None leaves a field to the family's default."""

    family: str  # "bert" or "qwen3"
    hidden: int
    layers: int
    heads: int
    intermediate: int
    kv_heads: int | None = None
    head_dim: int | None = None
    vocab_size: int | None = None  # None: the tokenizer's
    max_positions: int = 512
    max_seq_len: int | None = None  # None: the tokenizer model's


# Qwen3-Embedding-0.6B as its config.json gives it (bf16, tied embeddings, 32k positions); embedq
# runs it to 8,192 tokens here, the long-document setting the benchmark times.
QWEN3_EMBEDDING_06B = Shape("qwen3", 1024, 28, 16, 3072, kv_heads=8, head_dim=128, vocab_size=151669,
                            max_positions=32768, max_seq_len=8192)

SHAPES = {
    "bert-base": Shape("bert", 768, 12, 12, 3072),
    "minilm-l6": Shape("bert", 384, 6, 12, 1536),
    "tiny": Shape("bert", 32, 2, 4, 64),
    "qwen3-0.6b": QWEN3_EMBEDDING_06B,
    # The same architecture, small enough for a CPU test of the decoder path end to end.
    "qwen3-tiny": Shape("qwen3", 64, 2, 4, 128, kv_heads=2, head_dim=16, max_positions=32768, max_seq_len=8192),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def build_random_model(directory: Path, shape: str, tokenizer_from: ModelInfo, *, dtype: str | None = None) -> Path:
    """A random-weight model of a named shape in sentence-transformers layout (normalized; mean
    pooling for a BERT, last token for a decoder), with the tokenizer of `tokenizer_from`. For speed
    tests only: its vectors mean nothing. Weights are saved in `dtype` (default: float16 for a BERT,
    bfloat16 for a decoder, as Qwen3-Embedding ships, so `--precision auto` picks bf16 for it)."""
    spec = SHAPES[shape]
    directory.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_from.path / name).exists():
            shutil.copy(tokenizer_from.path / name, directory / name)
    save_random_weights(directory, spec, max(spec.vocab_size or 0, tokenizer_from.vocab_size), dtype)
    write_sentence_transformers_layout(directory, spec.hidden, "lasttoken" if spec.family == "qwen3" else "mean_tokens",
                                       spec.max_seq_len or tokenizer_from.max_seq_len)
    return directory


def write_sentence_transformers_layout(directory: Path, dim: int, pooling: str, max_seq_len: int) -> None:
    """modules.json (Transformer, Pooling, Normalize), 1_Pooling with `pooling_mode_{pooling}`, and
    sentence_bert_config.json beside a transformers checkpoint in `directory`."""
    (directory / "1_Pooling").mkdir(exist_ok=True)
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": dim, f"pooling_mode_{pooling}": True}))
    (directory / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_len}))


def save_random_weights(directory: Path, spec: Shape, vocab_size: int, dtype: str | None = None) -> None:
    """A transformers checkpoint (config.json, model.safetensors) of `spec` with seeded random weights."""
    if spec.family == "qwen3":
        _save_qwen3(directory, spec, vocab_size, dtype or "bfloat16")
    else:
        _save_bert(directory, spec, vocab_size, dtype or "float16")


def _save_bert(directory: Path, spec: Shape, vocab: int, dtype: str) -> None:
    # Writing a transformers checkpoint needs torch itself; nothing here runs the model.
    import torch
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=vocab, hidden_size=spec.hidden, num_hidden_layers=spec.layers,
                        num_attention_heads=spec.heads, intermediate_size=spec.intermediate,
                        max_position_embeddings=spec.max_positions)
    torch.manual_seed(0)
    BertModel(config).to(getattr(torch, dtype)).save_pretrained(directory)


def _save_qwen3(directory: Path, spec: Shape, vocab: int, dtype: str) -> None:
    import torch
    from transformers import Qwen3Model

    torch.manual_seed(0)
    Qwen3Model(qwen3_config(spec, vocab)).to(getattr(torch, dtype)).save_pretrained(directory)
    # The class name Qwen3-Embedding's config.json gives (save_pretrained writes its own), which is
    # what tells sentence-transformers that the model is a causal decoder.
    saved = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**saved, "architectures": ["Qwen3ForCausalLM"]}, indent=2))


def qwen3_config(spec: Shape, vocab_size: int) -> Any:
    """transformers' `Qwen3Config` of a qwen3 `spec` (tied embeddings and RoPE base as Qwen3-Embedding's)."""
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=vocab_size, hidden_size=spec.hidden, num_hidden_layers=spec.layers,
                       num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                       head_dim=spec.head_dim or spec.hidden // spec.heads, intermediate_size=spec.intermediate,
                       max_position_embeddings=spec.max_positions, tie_word_embeddings=True,
                       rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
