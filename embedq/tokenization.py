"""Text to token ids, handed over as flat numpy arrays: one int32 array plus per-document lengths.

Shared by the worker (tokenize in the worker) and the producer (`--pretokenize`, on CPU nodes).
BERT-style WordPiece runs on `nanotoken` where it gives the ids of `tokenizers` (checked at load),
everything else on `tokenizers`. Measured on one core of the 2-core CI machine (2026-11-30): nanotoken
19.6M tokens/s on glosses and 22.7M on passages, `tokenizers` 0.51M and 0.57M (of which moving ids
out of its Encoding objects was about 4%); both gave identical ids on every document of both corpora
and on edge cases (`python -m embedq.bench.tokenizer_eval`).
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import logging
import multiprocessing
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedq.errors import ModelError

if TYPE_CHECKING:
    from embedq.model import ModelInfo

log = logging.getLogger("embedq.tokenization")


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


# Texts on which a fast tokenizer must give the ids of `tokenizers` before it is used (checked at
# every load, in well under a millisecond): the cases where other fast WordPiece implementations
# were found to differ (accents, Greek final sigma, unassigned code points, CJK, control and
# format characters, special-token text, over-long words, truncation).
SELF_CHECK = (
    "Café naïve résumé Ångström ΟΔΥΣΣΕΥΣ", "ab\u0378cd \U00020000 中文字符 日本語 한국어",
    "tab\there\r\n\x00\x07 zero\u200bwidth \ufeffbom soft\u00adhyphen", "[CLS] [SEP] [PAD] [MASK] [UNK]",
    "emoji 👍🏽 👨‍👩‍👧 ∑∫√ العربية עברית देवनागरी ไทย", "a" * 150, "", "   ", "word " * 400,
)


class Tokenizer:
    """A WordPiece or other tokenizer from a `tokenizer.json`, truncating to `max_seq_len` with
    special tokens.

    `library="auto"` runs a BERT-style WordPiece tokenizer with `nanotoken` (about 40x the speed of
    `tokenizers` on one core, and it hands back one flat id array) where it is installed and gives
    the ids of `tokenizers` on `SELF_CHECK`; anything else, and `library="tokenizers"`, runs the
    `tokenizers` library, which stays the reference the tests hold the fast one against.
    """

    def __init__(self, tokenizer_file: str | os.PathLike[str], max_seq_len: int, *,
                 library: str = "auto", prompt: str = "", truncate: bool = True) -> None:
        from tokenizers import Tokenizer as _HFTokenizer

        path = Path(tokenizer_file)
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on a bad file
            raise ModelError(f"Cannot load tokenizer {path}: {exc}") from exc
        self.max_seq_len = max_seq_len
        # Put before every text, as sentence-transformers does (the text, not the prompt, is cut at
        # max_seq_len, and the prompt's tokens count in every length).
        self.prompt = prompt
        self._tok.no_padding()
        # The special ids before the text ([CLS]) and after it ([SEP], Qwen3-Embedding's <|endoftext|>):
        # truncation keeps the tail, and chunking (`embedq.chunking`) puts both on every chunk.
        self.head, self.tail = _special_ends(self._tok)
        self.prompt_tokens = len(self._tok.encode(prompt, add_special_tokens=False).ids) if prompt else 0
        # Without truncation (chunked jobs) every id of a document is kept: the length limit is then
        # the chunk's, applied by whoever cuts the documents.
        self.truncate = truncate
        # One id more than allowed: a row that long was cut, and `_cut` makes it what truncation at
        # max_seq_len gives (its first max_seq_len - tail ids and the tail), so both libraries say
        # alike which documents were truncated.
        if truncate:
            self._tok.enable_truncation(max_length=max_seq_len + 1)
        else:
            self._tok.no_truncation()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._fast = _nanotoken(path) if library == "auto" else None
        if self._fast is not None and not self._agrees(self._fast):
            self._fast = None
        self.library = "nanotoken" if self._fast is not None else "tokenizers"

    @classmethod
    def for_model(cls, model: ModelInfo, *, chunked: bool = False) -> Tokenizer:
        """`model`'s tokenizer as a job runs it: its prompt, truncating at max_seq_len, or for a
        `chunked` job keeping every token (`embedq.chunking`: the worker cuts whole documents)."""
        return cls(model.tokenizer_file, model.max_seq_len, prompt=model.prompt, truncate=not chunked)

    def encode(self, texts: list[str]) -> TokenizedDocs:
        """Tokenize a list of texts; a document cut at max_seq_len is marked truncated."""
        if not texts:
            return TokenizedDocs.concat([])
        if self.prompt:
            texts = [self.prompt + text for text in texts]
        if self._fast is not None:
            ids, offsets = self._fast.encode_batch(texts, add_special_tokens=True, parallel=False,
                                                   max_length=self.max_seq_len + 1 if self.truncate else None)
            return self._cut(ids, np.diff(offsets))
        # encode_batch_fast skips the character offsets, which embedq never reads.
        encodings = self._tok.encode_batch_fast(texts, add_special_tokens=True)
        rows = [e.ids for e in encodings]  # each read of `ids` builds a list: once per document
        lengths = np.fromiter(map(len, rows), dtype=np.int32, count=len(rows))
        tokens = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=int(lengths.sum()))
        return self._cut(tokens, lengths)

    def _cut(self, tokens: np.ndarray, lengths: np.ndarray) -> TokenizedDocs:
        if self.truncate:
            return _cut(tokens, lengths, self.max_seq_len, self.tail)
        lengths = lengths.astype(np.int32, copy=False)
        return TokenizedDocs(tokens.astype(np.int32, copy=False), lengths, np.zeros(lengths.shape, bool))

    def _agrees(self, fast: Any) -> bool:
        """Whether `fast` gives the ids of `tokenizers` on SELF_CHECK (else it is not used, with a warning)."""
        texts = list(SELF_CHECK)
        reference = [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=True)]
        ids, offsets = fast.encode_batch(texts, add_special_tokens=True, parallel=False,
                                         max_length=self.max_seq_len + 1 if self.truncate else None)
        differs = [t for t, want, start, stop in zip(texts, reference, offsets[:-1], offsets[1:], strict=True)
                   if ids[start:stop].tolist() != want]
        if differs:
            log.warning("nanotoken gives other ids than tokenizers for %r (and %d more): tokenizing with "
                        "tokenizers", differs[0][:40], len(differs) - 1)
        return not differs


def _nanotoken(path: Path) -> Any:
    """A nanotoken tokenizer of `path`, or None where nanotoken is missing or does not run its model
    (it implements BERT-style WordPiece only)."""
    try:
        import nanotoken
    except ImportError:
        return None
    try:
        return nanotoken.WordPieceTokenizer.from_json(path.read_text(encoding="utf-8"))
    except Exception as exc:
        log.debug("nanotoken does not run %s: %s", path, exc)
        return None


def _special_ends(tokenizer: Any) -> tuple[int, int]:
    """How many special ids the tokenizer's post-processor puts before and after a text's own: (1, 1)
    for BERT's [CLS] and [SEP], (0, 1) for Qwen3-Embedding's appended <|endoftext|> (which last-token
    pooling reads), (0, 0) where it adds none."""
    plain = tokenizer.encode("a b", add_special_tokens=False).ids
    full = tokenizer.encode("a b", add_special_tokens=True).ids
    starts = [i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain]
    return (starts[0], len(full) - starts[0] - len(plain)) if starts else (1, 1)


def _cut(tokens: np.ndarray, lengths: np.ndarray, max_seq_len: int, tail: int = 1) -> TokenizedDocs:
    """Rows with special tokens, truncated at max_seq_len + 1 ids: a row longer than max_seq_len
    keeps its first max_seq_len - tail ids and its last `tail` (the special ids after the text), as
    truncation at max_seq_len does."""
    lengths = lengths.astype(np.int32, copy=False)
    truncated = lengths > max_seq_len
    if not truncated.any():
        return TokenizedDocs(tokens.astype(np.int32, copy=False), lengths, truncated)
    row_length = np.repeat(lengths, lengths)
    position = np.arange(row_length.shape[0]) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    keep = (position < max_seq_len - tail) | (position >= row_length - tail)
    return TokenizedDocs(tokens[keep].astype(np.int32, copy=False), np.minimum(lengths, max_seq_len), truncated)


# One tokenizer per pool process, made by the initializer (a Tokenizer does not pickle cheaply).
_process_tokenizer: Tokenizer | None = None


def _start_process(tokenizer_file: str, max_seq_len: int, prompt: str = "", truncate: bool = True) -> None:
    global _process_tokenizer
    # One thread per process: the pool's processes are the parallelism, and rayon threads on top
    # would only fight them for the same cores.
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _process_tokenizer = Tokenizer(tokenizer_file, max_seq_len, prompt=prompt, truncate=truncate)


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
                 chunk_size: int = 2048, *, prompt: str = "", truncate: bool = True) -> None:
        self.processes = processes
        self.chunk_size = chunk_size
        self._local = (Tokenizer(tokenizer_file, max_seq_len, prompt=prompt, truncate=truncate) if processes == 0
                       else None)
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._warming: list[concurrent.futures.Future[Any]] = []
        if processes > 0:
            # spawn, not fork: the worker process may already hold a CUDA context and threads.
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=processes, mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_process, initargs=(str(tokenizer_file), max_seq_len, prompt, truncate))
            # Start every process now, so the first window does not pay for their start-up (about
            # 1 s on the H200 host); not waited for, so that they start while the engine does.
            self._warming = [self._pool.submit(_encode_in_process, ["warm up"]) for _ in range(processes)]

    @classmethod
    def for_model(cls, model: ModelInfo, processes: int, *, chunked: bool = False) -> TokenizerPool:
        """The pool of a job's producer (`--pretokenize`) or worker: `Tokenizer.for_model`'s, in
        `processes` processes."""
        return cls(model.tokenizer_file, model.max_seq_len, processes, prompt=model.prompt, truncate=not chunked)

    def wait_ready(self) -> None:
        """Wait until the processes started with the pool have tokenized their warm-up (a timed run
        starts once they have, as a worker that is already running finds them)."""
        for future in self._warming:
            future.result()

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


def default_tokenizer_processes(device: str, tokenizer_file: str | os.PathLike[str]) -> int:
    """Processes for the tokenizer pool. On a CPU node none, since inference needs the cores. On a
    GPU node two for nanotoken: it tokenizes 20M tokens/s on a core, so more processes only add
    hand-over costs (on the H200's 16 cores, MiniLM end to end with the tokenizer in the worker:
    glosses 150k docs/s with 2 processes, 151k with none, 140k with 14; passages 5.80M, 5.37M and
    5.58M tokens/s; 2026-11-30). For `tokenizers` all cores but two (the engine and the fetch and
    commit threads keep those)."""
    if not device.startswith("cuda"):
        return 0
    cores = max(1, len(usable_cores()) - 2)
    return min(2, cores) if Tokenizer(tokenizer_file, 8).library == "nanotoken" else cores


def usable_cores() -> set[int]:
    """The cores this process may run on: a worker under `embedq work --gpus` is pinned to its share."""
    try:
        return os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 2))


Encode = Callable[[list[str]], TokenizedDocs]
