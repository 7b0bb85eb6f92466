"""A window: the messages a worker embeds together, sorts by length and writes as one part.

`assemble` decodes and validates deliveries (unreadable ones and unusable documents become dead
letters with their reason), `tokenize` turns texts into ids (or takes the producer's ids), and the
result carries everything the engine stage and the commit stage need. Pure data, no Redis.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from embedq import deadletter
from embedq.errors import ProtocolError
from embedq.documents import too_large as document_too_large
from embedq.protocol import BatchMessage, DocId, Limits, decode_batch
from embedq.tokenization import TokenizedDocs
from embedq.worker.consumer import Delivery


@dataclass
class Window:
    """Documents of several stream entries, prepared for the engine.

    `entries[k]` is the stream entry of `messages[k]`; document i of the window is row
    `doc_row[i]` of message `doc_msg[i]`. Dead letters found while preparing ride along and are
    committed with the window's part.
    """

    entries: list[str]
    messages: list[BatchMessage]
    deliveries: list[int]
    doc_ids: list[DocId] = field(default_factory=list)
    doc_msg: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    doc_row: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    tokens: TokenizedDocs = field(default_factory=lambda: TokenizedDocs.concat([]))
    dead: list[deadletter.DeadLetter] = field(default_factory=list)
    dead_entries: list[str] = field(default_factory=list)  # entries dead-lettered whole
    embeddings: np.ndarray | None = None

    @property
    def all_entries(self) -> list[str]:
        """Every entry this window settles: those with documents and those dead-lettered whole."""
        return self.entries + self.dead_entries

    def __len__(self) -> int:
        return len(self.doc_ids)


@dataclass(frozen=True)
class DocumentRules:
    """Checks applied to each document before it is embedded."""

    limits: Limits
    allow_empty: bool = False
    vocab_size: int = 0
    max_tokens: int = 0
    id_type: str = ""  # "string" or "int64": the job's; ids of another type cannot go into its Parquet


def assemble(deliveries: Sequence[Delivery], *, job: str, rules: DocumentRules, worker: str) -> Window:
    """Decode and validate deliveries into a window (texts not yet tokenized)."""
    window = Window(entries=[], messages=[], deliveries=[])
    for delivery in deliveries:
        try:
            if delivery.raw is None:
                raise ProtocolError("stream entry has no payload field")
            message = decode_batch(delivery.raw, job=job, limits=rules.limits)
        except ProtocolError as exc:
            window.dead.append(deadletter.for_unreadable(
                job, delivery.entry_id, delivery.raw or b"", reason="malformed message", error=str(exc),
                worker=worker, deliveries=delivery.deliveries))
            window.dead_entries.append(delivery.entry_id)
            continue
        window.entries.append(delivery.entry_id)
        window.messages.append(message)
        window.deliveries.append(delivery.deliveries)
    return window


def tokenize(window: Window, encode: Callable[[list[str]], TokenizedDocs], rules: DocumentRules,
             worker: str) -> Window:
    """Fill the window's documents and token ids; unusable documents become dead letters.

    The texts of all messages go to the tokenizer in one call, so a pool spreads them over all
    its processes (one call per message would keep one process busy at a time).
    """
    parts: list[TokenizedDocs | None] = []
    keeps: list[list[int]] = []
    texts: list[str] = []
    for k, message in enumerate(window.messages):
        if message.texts is not None:
            keep, problems = _text_problems(message.texts, rules)
            keep = _check_ids(message.ids, keep, problems, rules)
            texts.extend(message.texts[i] for i in keep)
            parts.append(None)  # filled from the one tokenizer call below
        else:
            tokens_all, lengths, truncated = message.token_arrays()
            keep, problems = _token_problems(tokens_all, lengths, rules)
            keep = _check_ids(message.ids, keep, problems, rules)
            parts.append(_select_tokens(tokens_all, lengths, truncated, keep))
        keeps.append(keep)
        for reason, rows in problems.items():
            window.dead.append(deadletter.for_documents(
                message, rows, entry_id=window.entries[k], reason=reason, error=reason, worker=worker,
                deliveries=window.deliveries[k]))
        window.doc_ids.extend(message.ids[i] for i in keep)
    if texts:
        encoded = encode(texts)
        start = 0
        for k, part in enumerate(parts):
            if part is None:
                parts[k] = _slice_docs(encoded, start, start + len(keeps[k]))
                start += len(keeps[k])
    window.tokens = TokenizedDocs.concat([p for p in parts if p is not None])
    window.doc_msg = np.repeat(np.arange(len(keeps), dtype=np.int32), [len(k) for k in keeps])
    window.doc_row = np.concatenate([np.asarray(k, dtype=np.int32) for k in keeps]) if keeps else np.zeros(0, np.int32)
    return window


def sort_by_length(window: Window) -> None:
    """Order the window's documents by token length (stable), so that every engine batch is a
    contiguous run of them: the engine thread then copies each batch's results into one slice and
    needs no reordering at the end. The work is done here, in the fetch thread, off the GPU's path."""
    lengths = window.tokens.lengths
    if lengths.shape[0] < 2 or bool((lengths[:-1] <= lengths[1:]).all()):
        return
    order = np.argsort(lengths, kind="stable")
    sorted_lengths = lengths[order]
    # Where each sorted document's ids start, minus where they go: one int32 gather index per token.
    shift = window.tokens.offsets[:-1][order] - (np.cumsum(sorted_lengths, dtype=np.int64) - sorted_lengths)
    index_type = np.int32 if window.tokens.tokens.shape[0] < 2**31 else np.int64
    gather = np.repeat(shift.astype(index_type), sorted_lengths)
    gather += np.arange(gather.shape[0], dtype=index_type)
    window.tokens = TokenizedDocs(window.tokens.tokens[gather], sorted_lengths, window.tokens.truncated[order])
    window.doc_ids = list(map(window.doc_ids.__getitem__, order.tolist()))
    window.doc_msg = window.doc_msg[order]
    window.doc_row = window.doc_row[order]


def _slice_docs(docs: TokenizedDocs, start: int, stop: int) -> TokenizedDocs:
    offsets = docs.offsets
    return TokenizedDocs(docs.tokens[offsets[start]:offsets[stop]], docs.lengths[start:stop],
                         docs.truncated[start:stop])


_INT64 = (-(1 << 63), (1 << 63) - 1)


def _check_ids(ids: list[DocId], keep: list[int], problems: dict[str, list[int]], rules: DocumentRules) -> list[int]:
    """Drop (and report) documents whose id does not fit the job's id type."""
    if not rules.id_type:
        return keep
    if rules.id_type == "int64":
        def fits(doc_id: DocId) -> bool:
            return type(doc_id) is int and _INT64[0] <= doc_id <= _INT64[1]
    else:
        def fits(doc_id: DocId) -> bool:
            return type(doc_id) is str
    if all(fits(ids[i]) for i in keep):
        return keep
    wrong = [i for i in keep if not fits(ids[i])]
    problems[f"id of the wrong type (the job's ids are {rules.id_type})"] = wrong
    return [i for i in keep if fits(ids[i])]


def _text_problems(texts: list[str], rules: DocumentRules) -> tuple[list[int], dict[str, list[int]]]:
    problems: dict[str, list[int]] = {}
    keep: list[int] = []
    for i, text in enumerate(texts):
        if not rules.allow_empty and (not text or text.isspace()):
            problems.setdefault(deadletter.EMPTY_TEXT, []).append(i)
        elif document_too_large(text, rules.limits.max_doc_bytes):
            problems.setdefault("document over the size limit", []).append(i)
        elif _has_surrogates(text):
            problems.setdefault("invalid UTF-8", []).append(i)
        else:
            keep.append(i)
    return keep, problems


def _has_surrogates(text: str) -> bool:
    # msgpack strings are valid UTF-8, but a lone surrogate can still arrive (escaped JSON
    # re-encoded); the tokenizer would reject the whole batch on it.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _token_problems(tokens: np.ndarray, lengths: np.ndarray, rules: DocumentRules
                    ) -> tuple[list[int], dict[str, list[int]]]:
    too_long = lengths > rules.max_tokens if rules.max_tokens > 0 else np.zeros(lengths.shape, bool)
    out_of_vocab = np.zeros(lengths.shape, bool)
    if rules.vocab_size > 0 and tokens.size and int(tokens.max()) >= rules.vocab_size:
        starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)[:-1]])
        out_of_vocab = np.add.reduceat((tokens >= rules.vocab_size).astype(np.int64), starts) > 0
    problems: dict[str, list[int]] = {}
    if too_long.any():
        problems[f"more than max_seq_len ({rules.max_tokens}) token ids"] = np.flatnonzero(too_long).tolist()
    if (out_of_vocab & ~too_long).any():
        problems[f"token id out of the model's vocabulary ({rules.vocab_size})"] = (
            np.flatnonzero(out_of_vocab & ~too_long).tolist())
    return np.flatnonzero(~(too_long | out_of_vocab)).tolist(), problems


def _select_tokens(tokens: np.ndarray, lengths: np.ndarray, truncated: np.ndarray,
                   keep: list[int]) -> TokenizedDocs:
    if len(keep) == lengths.shape[0]:
        return TokenizedDocs(tokens.astype(np.int32, copy=False), lengths.astype(np.int32, copy=False),
                             truncated)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    index = np.asarray(keep, dtype=np.int64)
    pieces = [tokens[offsets[i]:offsets[i + 1]] for i in index]
    return TokenizedDocs(np.concatenate(pieces).astype(np.int32) if pieces else np.zeros(0, np.int32),
                         lengths[index].astype(np.int32), truncated[index])
