"""Text to token ids with the `tokenizers` library, handing ids over as flat numpy arrays.

Shared by the worker (tokenize in the worker) and the producer (`--pretokenize`, on CPU nodes).
Ids leave the tokenizer as one int32 array plus per-document lengths, never as Python lists of
lists: moving ids out of the Encoding objects is half of the tokenizer's cost (TENSORRT.md).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedq.errors import ModelError


@dataclass(frozen=True)
class TokenizedDocs:
    """Token ids of n documents: `tokens` concatenated, `lengths[i]` ids each, `truncated[i]`."""

    tokens: np.ndarray  # int32, (sum(lengths),)
    lengths: np.ndarray  # int32, (n,)
    truncated: np.ndarray  # bool, (n,)

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def offsets(self) -> np.ndarray:
        """Start of each document in `tokens`, with the total appended: (n + 1,) int64."""
        out = np.zeros(len(self) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=out[1:])
        return out

    @staticmethod
    def concat(parts: list[TokenizedDocs]) -> TokenizedDocs:
        if not parts:
            return TokenizedDocs(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, bool))
        return TokenizedDocs(
            np.concatenate([p.tokens for p in parts]),
            np.concatenate([p.lengths for p in parts]),
            np.concatenate([p.truncated for p in parts]),
        )


class Tokenizer:
    """A fast tokenizer from a `tokenizer.json`, truncating to `max_seq_len` with special tokens."""

    def __init__(self, tokenizer_file: str | os.PathLike[str], max_seq_len: int, *,
                 threads: int | None = None) -> None:
        if threads is not None:
            # tokenizers reads RAYON_NUM_THREADS once, when its thread pool first starts.
            os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
        from tokenizers import Tokenizer as _HFTokenizer

        path = Path(tokenizer_file)
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on a bad file
            raise ModelError(f"Cannot load tokenizer {path}: {exc}") from exc
        self.max_seq_len = max_seq_len
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=max_seq_len)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: list[str]) -> TokenizedDocs:
        """Tokenize a list of texts; a document cut at max_seq_len is marked truncated."""
        if not texts:
            return TokenizedDocs.concat([])
        encodings = self._tok.encode_batch(texts, add_special_tokens=True)
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int32, count=len(encodings))
        tokens = np.fromiter(
            itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.int32,
            count=int(lengths.sum()),
        )
        # Encoding.overflowing holds the cut-off rest; only a truncated document has one.
        truncated = np.fromiter((bool(e.overflowing) for e in encodings), dtype=bool, count=len(encodings))
        return TokenizedDocs(tokens, lengths, truncated)
