"""A tiny random Qwen3 decoder with a byte-level BPE tokenizer, laid out as Qwen3-Embedding is:
sentence-transformers modules (Transformer, last-token Pooling, Normalize), a tokenizer that appends
<|endoftext|> to every text and pads on the left. Built offline from real text, in well under a second."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from embedq.bench.random_model import SHAPES, save_random_weights, write_sentence_transformers_layout

EOS = "<|endoftext|>"
# Qwen2/Qwen3's pre-tokenizer split (tokenizer.json of the Qwen3 models).
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
BPE_VOCAB = 1000


def write_bpe_tokenizer(directory: Path, texts: list[str], *, append_eos: bool = True) -> int:
    """tokenizer.json and tokenizer_config.json of a byte-level BPE learnt from `texts`; returns its
    vocabulary size. With `append_eos`, its post-processor ends every text with <|endoftext|>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    # Added after training, so it sits at the end of the vocabulary as in Qwen's (id 151643 there).
    tokenizer.add_special_tokens([EOS])
    if append_eos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"$A {EOS}", special_tokens=[(EOS, tokenizer.token_to_id(EOS))])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS,
                            padding_side="left").save_pretrained(directory)
    return int(tokenizer.get_vocab_size(with_added_tokens=True))


def build_tiny_decoder(directory: Path, texts: list[str], max_seq_len: int) -> Path:
    """The tiny decoder in `directory` (fp32 weights), its tokenizer learnt from `texts`."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = write_bpe_tokenizer(directory, texts)
    shape = dataclasses.replace(SHAPES["qwen3-tiny"], max_seq_len=max_seq_len)
    save_random_weights(directory, shape, vocab, "float32")
    write_sentence_transformers_layout(directory, shape.hidden, "lasttoken", max_seq_len)
    return directory


def plain_copy(source: Path, directory: Path, **changes: object) -> Path:
    """A plain Hugging Face copy of `source` (config, weights, tokenizer; no sentence-transformers
    modules), with `changes` made to its config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (directory / name).symlink_to(source / name)
    config = json.loads((source / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))
    return directory
