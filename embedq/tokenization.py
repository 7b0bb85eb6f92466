"""Text to token ids with the `tokenizers` library, handing ids over as flat numpy arrays.

Shared by the worker (tokenize in the worker) and the producer (`--pretokenize`, on CPU nodes).
Ids leave the tokenizer as one int32 array plus per-document lengths, never as Python lists of
lists: moving ids out of the Encoding objects is half of the tokenizer's cost (TENSORRT.md).
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import multiprocessing
import os
from collections.abc import Callable, Sequence
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

    @functools.cached_property
    def offsets(self) -> np.ndarray:
        """Start of each document in `tokens`, with the total appended: (n + 1,) int64 (computed once)."""
        out = np.zeros(len(self) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=out[1:])
        return out

    def slice(self, start: int, stop: int) -> TokenizedDocs:
        """Documents start..stop-1 (views, no copy)."""
        offsets = self.offsets
        return TokenizedDocs(self.tokens[offsets[start]:offsets[stop]], self.lengths[start:stop],
                             self.truncated[start:stop])

    def take(self, rows: np.ndarray | Sequence[int]) -> TokenizedDocs:
        """The documents `rows` (indices, in the given order, or a boolean mask), as a new table."""
        index = np.asarray(rows)
        if index.dtype == bool:
            if index.shape != self.lengths.shape:
                raise ValueError(f"mask of {index.shape[0]} for {len(self)} documents")
            if index.all():
                return self
            return TokenizedDocs(self.tokens[np.repeat(index, self.lengths)], self.lengths[index],
                                 self.truncated[index])
        lengths = self.lengths[index]
        # One gather index per token: where each chosen document's ids start, minus where they go,
        # repeated over its length, plus the running position. int32 where it fits: sorting a window
        # of 32,768 passages by length took about 17 ms so, and measurably longer with int64 indices.
        shift = self.offsets[:-1][index] - (np.cumsum(lengths, dtype=np.int64) - lengths)
        index_type = np.int32 if self.tokens.shape[0] < 2**31 else np.int64
        gather = np.repeat(shift.astype(index_type), lengths)
        gather += np.arange(gather.shape[0], dtype=index_type)
        return TokenizedDocs(self.tokens[gather], lengths, self.truncated[index])

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

    def __init__(self, tokenizer_file: str | os.PathLike[str], max_seq_len: int) -> None:
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


# One tokenizer per pool process, made by the initializer (a Tokenizer does not pickle cheaply).
_process_tokenizer: Tokenizer | None = None


def _start_process(tokenizer_file: str, max_seq_len: int) -> None:
    global _process_tokenizer
    # One thread per process: the pool's processes are the parallelism, and rayon threads on top
    # would only fight them for the same cores.
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _process_tokenizer = Tokenizer(tokenizer_file, max_seq_len)


def _encode_in_process(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    assert _process_tokenizer is not None
    docs = _process_tokenizer.encode(texts)
    return docs.tokens, docs.lengths, docs.truncated


class TokenizerPool:
    """Tokenization spread over processes, so the GIL of the worker is not its limit.

    Each process runs the `tokenizers` library single-threaded and hands ids back as numpy arrays
    (pickled as raw buffers, not Python lists). Texts are cut into chunks of `chunk_size`; results
    come back in order. `processes=0` tokenizes in the calling thread (small machines, tests).
    """

    def __init__(self, tokenizer_file: str | os.PathLike[str], max_seq_len: int, processes: int,
                 chunk_size: int = 2048) -> None:
        self.processes = processes
        self.chunk_size = chunk_size
        self._local = Tokenizer(tokenizer_file, max_seq_len) if processes == 0 else None
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        if processes > 0:
            # spawn, not fork: the worker process may already hold a CUDA context and threads.
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=processes, mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_process, initargs=(str(tokenizer_file), max_seq_len))
            # Start every process now, so the first window does not pay for their start-up; not
            # waited for, so that they start while the engine does.
            for _ in range(processes):
                self._pool.submit(_encode_in_process, ["warm up"])

    def encode(self, texts: list[str]) -> TokenizedDocs:
        """Token ids of `texts`, in order."""
        return self.submit(texts).result()

    def submit(self, texts: list[str]) -> concurrent.futures.Future[TokenizedDocs]:
        """Start tokenizing `texts`; the future's result is their token ids, in order."""
        if self._local is not None:
            done: concurrent.futures.Future[TokenizedDocs] = concurrent.futures.Future()
            done.set_result(self._local.encode(texts))
            return done
        assert self._pool is not None
        futures = [self._pool.submit(_encode_in_process, texts[i:i + self.chunk_size])
                   for i in range(0, len(texts), self.chunk_size)]
        return _Joined(futures)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> TokenizerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Joined(concurrent.futures.Future):
    """The chunks of one submit, joined in order when its result is asked for."""

    def __init__(self, parts: list[concurrent.futures.Future]) -> None:
        super().__init__()
        self._parts = parts

    def result(self, timeout: float | None = None) -> TokenizedDocs:
        return TokenizedDocs.concat([TokenizedDocs(*part.result(timeout)) for part in self._parts])


def default_tokenizer_processes(device: str) -> int:
    """Processes for the tokenizer pool: on a GPU node all cores but two (the engine and the
    fetch/commit threads keep those); on a CPU node none, since inference needs the cores."""
    if not device.startswith("cuda"):
        return 0
    return max(1, (os.cpu_count() or 2) - 2)


Encode = Callable[[list[str]], TokenizedDocs]
