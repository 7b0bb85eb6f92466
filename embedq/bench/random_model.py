"""Random-weight BERTs of named shapes, for timing models that are not downloaded (speed only)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from embedq.model import ModelInfo

SHAPES = {
    # name: (hidden, layers, heads, intermediate)
    "bert-base": (768, 12, 12, 3072),
    "minilm-l6": (384, 6, 12, 1536),
    "tiny": (32, 2, 4, 64),
}


def build_random_model(directory: Path, shape: str, tokenizer_from: ModelInfo, *, dtype: str = "float16") -> Path:
    """A random-weight BERT of a named shape in sentence-transformers layout (mean pooling,
    normalized), with the tokenizer of `tokenizer_from`. For speed tests only: its vectors mean nothing."""
    # Writing a transformers checkpoint needs torch itself; nothing here runs the model.
    import torch
    from transformers import BertConfig, BertModel

    hidden, layers, heads, intermediate = SHAPES[shape]
    directory.mkdir(parents=True, exist_ok=True)
    config = BertConfig(vocab_size=tokenizer_from.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=intermediate, max_position_embeddings=512)
    torch.manual_seed(0)
    BertModel(config).to(getattr(torch, dtype)).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (tokenizer_from.path / name).exists():
            shutil.copy(tokenizer_from.path / name, directory / name)
    (directory / "1_Pooling").mkdir(exist_ok=True)
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": hidden, "pooling_mode_mean_tokens": True}))
    (directory / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": tokenizer_from.max_seq_len}))
    return directory
