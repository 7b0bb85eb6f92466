"""Long documents (`--chunk TOKENS --overlap TOKENS`): one document's token ids cut into windows,
each embedded as a row of its own.

The design, and what each part of embedq does for it:

- **The settings live in the job record** (`JobRecord.chunk_tokens`, `chunk_overlap`), fixed by the
  producer that creates the job, so every worker of the job cuts alike; a resumed producer with
  other settings is refused as for any other field, and a worker takes them from the record.
- **Whole token sequences.** Chunking needs a document's every token, so the tokenizer runs without
  truncation (`Tokenizer(truncate=False)`: `tokenizers` with truncation off, nanotoken without
  `max_length`): the same one pass over the text as a truncating run, only the ids past max_seq_len
  are kept instead of cut. The text is tokenized with its prompt and special tokens as usual, so a
  document that fits one chunk gives exactly the ids, and the embedding, of an unchunked job.
- **Where the cut happens: always in the worker**, from the whole sequence, in `Window.tokenize`.
  With `--pretokenize` the producer sends the whole sequence (special tokens and prompt included, not
  truncated) and the worker cuts it as it would its own. A pretokenized message's size is bounded by
  the producer's batching (`producer/batching.py`): with chunking it closes a batch at an eighth of
  the message limit in text bytes, not a half, since a token id takes 4 bytes and a token at least
  one byte of text (a punctuation run), so the ids never outgrow the message limit. A pretokenized
  document marked truncated in a chunked job is dead-lettered (its text is not whole).
- **A chunk** is the document's leading special ids (`head`: [CLS]; none for Qwen3), the prompt's
  tokens (counted as `prompt`: the prompt tokenized alone, without special ids), a window of the
  text's tokens, and the trailing special ids (`tail`: [SEP], an appended EOS). The window holds
  `size - head - prompt - tail` text tokens and moves by that less `overlap`; the last window ends at
  the text's end. So every chunk is at most `size` ids, each the model sees as a document of its own
  (pooling leaves the prompt out where the model does, as for documents). Offsets
  (`token_start`, `token_end`) count the text's tokens, after the prompt, without special ids.
- **Exactly once per chunk** comes from exactly once per stream entry: a document's chunks are rows of
  the same window (one entry is never split across windows), so they are written to one part and
  committed by the one settle that acknowledges their entry, or not at all. A chunk that fails (an
  engine error, a non-finite vector) takes its whole document to the dead letters
  (`Window.dead_letter_documents` widens the rows to all chunks of their documents): a document is in
  the output whole, or dead-lettered, never in part.
- **Output**: `id` is the parent's id on each of its chunks, with `chunk_index`, `n_chunks`,
  `token_start`, `token_end` (int32); the row key is (id, chunk_index). `verify` checks that every
  document's chunks 0..n_chunks-1 are there once each with one n_chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from embedq.errors import UsageError
from embedq.tokenization import TokenizedDocs, Tokenizer

# Chunk columns of a chunked job's Parquet, after `id` (all int32).
CHUNK_COLUMNS = ("chunk_index", "n_chunks", "token_start", "token_end")


@dataclass(frozen=True)
class ChunkColumns:
    """Per row of a chunked table: which chunk of its document it is, of how many, and where its text
    tokens start and end in the document's text tokens."""

    index: np.ndarray  # int32
    count: np.ndarray  # int32
    start: np.ndarray  # int32
    end: np.ndarray  # int32

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def take(self, rows: np.ndarray) -> ChunkColumns:
        """The rows `rows` (indices or a boolean mask)."""
        return ChunkColumns(self.index[rows], self.count[rows], self.start[rows], self.end[rows])

    def arrays(self) -> dict[str, np.ndarray]:
        """The columns by their Parquet names."""
        return dict(zip(CHUNK_COLUMNS, (self.index, self.count, self.start, self.end), strict=True))


@dataclass(frozen=True)
class Chunking:
    """How a job cuts documents: `size` ids a chunk at most (special ids and prompt included),
    `overlap` text tokens shared by neighbours; `head`, `prompt` and `tail` are the ids every chunk
    carries besides its text (module docstring)."""

    size: int
    overlap: int = 0
    head: int = 1
    tail: int = 1
    prompt: int = 0

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer, size: int, overlap: int) -> Chunking:
        """The chunking of `size` and `overlap` for documents tokenized by `tokenizer` (its special ids
        and prompt); UsageError when no text token would fit a chunk or the overlap fills it."""
        chunking = cls(size, overlap, tokenizer.head, tokenizer.tail, tokenizer.prompt_tokens)
        chunking.check(tokenizer.max_seq_len)
        return chunking

    @property
    def window(self) -> int:
        """Text tokens per chunk."""
        return self.size - self.head - self.prompt - self.tail

    @property
    def step(self) -> int:
        """Text tokens from one chunk's start to the next's."""
        return self.window - self.overlap

    def check(self, max_seq_len: int) -> None:
        if self.size > max_seq_len:
            raise UsageError(f"--chunk {self.size} is over the model's max_seq_len ({max_seq_len}); "
                             f"use at most {max_seq_len}.")
        if self.window < 1:
            raise UsageError(f"--chunk {self.size} leaves no room for text: every chunk carries "
                             f"{self.head + self.tail} special and {self.prompt} prompt tokens; use a larger --chunk.")
        if not 0 <= self.overlap < self.window:
            raise UsageError(f"--overlap {self.overlap} must be at least 0 and below the {self.window} text tokens "
                             f"a chunk of {self.size} holds (after special and prompt tokens).")

    def counts(self, lengths: np.ndarray) -> np.ndarray:
        """Chunks of documents of `lengths` ids (whole sequences, special ids included)."""
        content = self._parts(lengths.astype(np.int64))[2]
        return np.where(content <= self.window, 1, 1 + -(-(content - self.window) // self.step)).astype(np.int64)

    def split(self, docs: TokenizedDocs) -> tuple[TokenizedDocs, np.ndarray, ChunkColumns]:
        """Cut whole (untruncated) documents into chunks: the chunks' ids, the document each chunk
        comes from (an index into `docs`, in order), and their chunk columns."""
        if docs.truncated.any():
            raise ValueError("chunking needs whole documents; these were tokenized with truncation")
        lengths = docs.lengths.astype(np.int64)
        prefix, suffix, content = self._parts(lengths)
        count = self.counts(lengths)
        doc = np.repeat(np.arange(len(docs), dtype=np.int64), count)
        index = np.arange(doc.shape[0], dtype=np.int64) - np.repeat(np.cumsum(count) - count, count)
        start = index * self.step
        end = np.minimum(start + self.window, content[doc])
        # Three runs of ids per chunk: the head and prompt, its window of text, the tail; gathered with
        # one index array (as TokenizedDocs.take does for whole documents).
        first = docs.offsets[:-1][doc]
        run_start = np.stack([first, first + prefix[doc] + start, first + lengths[doc] - suffix[doc]], axis=1).ravel()
        run_length = np.stack([prefix[doc], end - start, suffix[doc]], axis=1).ravel()
        gather = np.repeat(run_start - (np.cumsum(run_length) - run_length), run_length)
        gather += np.arange(gather.shape[0], dtype=np.int64)
        chunk_lengths = (prefix[doc] + end - start + suffix[doc]).astype(np.int32)
        tokens = TokenizedDocs(docs.tokens[gather].astype(np.int32, copy=False), chunk_lengths,
                               np.zeros(doc.shape[0], dtype=bool))
        columns = ChunkColumns(index.astype(np.int32), count[doc].astype(np.int32), start.astype(np.int32),
                               end.astype(np.int32))
        return tokens, doc, columns

    def _parts(self, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per document: ids before the text (head and prompt), after it (tail), and text tokens. A
        sequence shorter than head + prompt + tail (a producer's odd ids) keeps what it has."""
        prefix = np.minimum(self.head + self.prompt, lengths)
        suffix = np.minimum(self.tail, lengths - prefix)
        return prefix, suffix, lengths - prefix - suffix
