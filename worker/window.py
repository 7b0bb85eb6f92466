"""A window: the stream entries a worker embeds together, sorts by length and writes as one part.

A window holds one `Entry` per stream entry (entry id, decoded message, delivery count) and one
`DocumentTable` (each document's id, the entry and row it came from, its token ids, and later its
embedding). Every change goes through a method that keeps the two in step: keeping a subset of the
documents, dropping entries another worker settled, splitting off entries suspected of crashing
workers, moving documents to dead letters. Dead letters found on the way ride along and are
committed with the window's part. Pure data, no Redis: tested on its own.

`Window.assemble` decodes and validates deliveries (unreadable ones become dead letters), and
`Window.tokenize` turns texts into ids (or takes the producer's ids), checking each document against
the job's `DocumentRules`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from embedq import deadletter, documents
from embedq.chunking import ChunkColumns, Chunking
from embedq.errors import ProtocolError
from embedq.ledger import EntryLedger
from embedq.protocol import NO_PAYLOAD, BatchMessage, DocId, Limits, decode_batch
from embedq.tokenization import TokenizedDocs
from embedq.worker.consumer import Delivery


@dataclass(frozen=True)
class Entry:
    """One stream entry of the window: its id, its decoded message, how often it was delivered and
    how many workers died while working on it."""

    entry_id: str
    message: BatchMessage
    deliveries: int
    crashes: int = 0


@dataclass
class DocumentTable:
    """The window's documents, one row each: id, owning entry (index) and row in its message, tokens,
    and once embedded, the embedding. In a chunked job a row is one chunk of a document (`chunks`
    says which): its id, entry and message row are its document's, repeated on every chunk."""

    ids: list[DocId] = field(default_factory=list)
    entry: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    row: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    tokens: TokenizedDocs = field(default_factory=lambda: TokenizedDocs.concat([]))
    embeddings: np.ndarray | None = None
    chunks: ChunkColumns | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def documents(self) -> int:
        """Source documents in the table (rows, or in a chunked job the first chunks)."""
        return len(self) if self.chunks is None else int((self.chunks.index == 0).sum())

    def take(self, index: np.ndarray) -> DocumentTable:
        """The documents `index` (indices in order, or a boolean mask)."""
        chosen = np.flatnonzero(index) if index.dtype == bool else index
        return DocumentTable(
            ids=list(map(self.ids.__getitem__, chosen.tolist())), entry=self.entry[index], row=self.row[index],
            tokens=self.tokens.take(index), embeddings=None if self.embeddings is None else self.embeddings[index],
            chunks=None if self.chunks is None else self.chunks.take(index))

    def whole_documents(self, rows: np.ndarray) -> np.ndarray:
        """`rows` widened to every row of their documents (all chunks of each), sorted."""
        if self.chunks is None:
            return np.unique(rows)
        document = self.entry.astype(np.int64) << 32 | self.row.astype(np.int64)
        return np.flatnonzero(np.isin(document, document[rows]))


@dataclass(frozen=True)
class DocumentRules:
    """Checks applied to each document before it is embedded (see `embedq.documents`)."""

    limits: Limits
    allow_empty: bool = False
    vocab_size: int = 0
    max_tokens: int = 0
    id_type: str = ""  # "string" or "int64": the job's; ids of another type cannot go into its Parquet
    chunking: Chunking | None = None  # a chunked job's: whole documents come in, chunks are embedded


@dataclass
class Window:
    """Documents of several stream entries, prepared for the engine and the commit."""

    entries: list[Entry] = field(default_factory=list)
    docs: DocumentTable = field(default_factory=DocumentTable)
    dead: list[deadletter.DeadLetter] = field(default_factory=list)
    dead_entries: list[str] = field(default_factory=list)  # entries dead-lettered whole

    def __len__(self) -> int:
        return len(self.docs)

    # -- reading -----------------------------------------------------------------------------------

    @property
    def entry_ids(self) -> list[str]:
        """The entries whose documents the window holds."""
        return [e.entry_id for e in self.entries]

    @property
    def all_entry_ids(self) -> list[str]:
        """Every entry this window settles: those with documents and those dead-lettered whole."""
        return self.entry_ids + self.dead_entries

    @property
    def seqs(self) -> list[int]:
        return sorted({e.message.seq for e in self.entries})

    @property
    def tokens(self) -> TokenizedDocs:
        return self.docs.tokens

    @property
    def token_count(self) -> int:
        return int(self.docs.tokens.lengths.sum())

    @property
    def document_count(self) -> int:
        """Source documents to embed (a chunked job's windows have more rows)."""
        return self.docs.documents

    @property
    def dead_documents(self) -> int:
        return sum(len(letter.doc_ids) for letter in self.dead)

    def rows_of(self, k: int) -> np.ndarray:
        """The documents (window rows) of entry `k`."""
        return np.flatnonzero(self.docs.entry == k)

    # -- building ----------------------------------------------------------------------------------

    @classmethod
    def assemble(cls, deliveries: Sequence[Delivery], *, job: str, rules: DocumentRules, worker: str,
                 ledger: EntryLedger | None = None) -> Window:
        """Decode and validate deliveries into a window (texts not yet tokenized); with the `ledger`
        of their entries, an entry embedq did not add is set aside, never embedded. An entry
        delivered twice is taken once: when Redis loses a delivery it acknowledged (a restart from
        an AOF a second behind), a read retried in the same window gets that entry again as new."""
        window = cls()
        taken: set[str] = set()
        for delivery in deliveries:
            if delivery.entry_id in taken:
                continue
            taken.add(delivery.entry_id)
            try:
                if delivery.raw is None:
                    raise ProtocolError("stream entry has no payload field", code=NO_PAYLOAD)
                message = decode_batch(delivery.raw, job=job, limits=rules.limits)
            except ProtocolError as exc:
                window.dead_letter_entry(delivery.entry_id, deadletter.for_unreadable(
                    job, delivery.entry_id, delivery.raw or b"", reason="malformed message", error=str(exc),
                    worker=worker, deliveries=delivery.deliveries, code=exc.code))
                continue
            refusal = ledger.refusal(delivery.entry_id, message.seq) if ledger is not None else None
            if refusal is not None:
                window.dead_letter_entry(delivery.entry_id, deadletter.for_refused_entry(
                    job, delivery.entry_id, delivery.raw or b"", message.seq, refusal, worker=worker,
                    deliveries=delivery.deliveries))
                continue
            window.entries.append(Entry(delivery.entry_id, message, delivery.deliveries, delivery.crashes))
        return window

    def tokenize(self, encode: Callable[[list[str]], TokenizedDocs], rules: DocumentRules, worker: str) -> None:
        """Fill the document table with the entries' documents and token ids; unusable documents
        become dead letters.

        The texts of all messages go to the tokenizer in one call, so a pool spreads them over all
        its processes (one call per message would keep one process busy at a time).
        """
        parts: list[TokenizedDocs | None] = []
        keeps: list[list[int]] = []
        texts: list[str] = []
        ids: list[DocId] = []
        for entry in self.entries:
            message = entry.message
            if message.texts is not None:
                keep, problems = _text_problems(message.texts, rules)
                keep = _check_ids(message.ids, keep, problems, rules)
                texts.extend(message.texts[i] for i in keep)
                parts.append(None)  # filled from the one tokenizer call below
            else:
                docs = message.token_docs()
                keep, problems = _token_problems(docs, rules)
                keep = _check_ids(message.ids, keep, problems, rules)
                parts.append(docs if len(keep) == len(docs) else docs.take(keep))
            keeps.append(keep)
            for reason, rows in problems.items():
                self.dead.append(deadletter.for_documents(
                    message, rows, entry_id=entry.entry_id, reason=reason, error=reason, worker=worker,
                    deliveries=entry.deliveries))
            ids.extend(message.ids[i] for i in keep)
        if texts:
            encoded = encode(texts)
            start = 0
            for k, part in enumerate(parts):
                if part is None:
                    parts[k] = encoded.slice(start, start + len(keeps[k]))
                    start += len(keeps[k])
        tokens = TokenizedDocs.concat([p for p in parts if p is not None])
        self.docs = DocumentTable(
            ids=ids, entry=np.repeat(np.arange(len(keeps), dtype=np.int32), [len(k) for k in keeps]),
            row=np.concatenate([np.asarray(k, dtype=np.int32) for k in keeps]) if keeps else np.zeros(0, np.int32),
            tokens=TokenizedDocs(tokens.tokens.astype(np.int32, copy=False),
                                 tokens.lengths.astype(np.int32, copy=False), tokens.truncated))
        if rules.chunking is not None:  # one row per chunk, all of an entry's in this window
            chunked, doc, columns = rules.chunking.split(self.docs.tokens)
            self.docs = DocumentTable(ids=list(map(ids.__getitem__, doc.tolist())), entry=self.docs.entry[doc],
                                      row=self.docs.row[doc], tokens=chunked, chunks=columns)

    def sort_by_length(self) -> None:
        """Order the documents by token length (stable), so that every engine batch is a contiguous
        run of them: the engine thread then copies each batch's results into one slice and needs no
        reordering at the end. Done in the fetch thread, off the GPU's path."""
        lengths = self.docs.tokens.lengths
        if lengths.shape[0] < 2 or bool((lengths[:-1] <= lengths[1:]).all()):
            return
        self.docs = self.docs.take(np.argsort(lengths, kind="stable"))

    # -- changing ----------------------------------------------------------------------------------

    def keep_documents(self, keep: np.ndarray) -> None:
        """Restrict the documents (tokens and embeddings with them) to the boolean mask `keep`."""
        if not keep.all():
            self.docs = self.docs.take(keep)

    def dead_letter_entry(self, entry_id: str, letter: deadletter.DeadLetter) -> None:
        """Set a whole entry aside (it holds no documents of this window)."""
        self.dead.append(letter)
        self.dead_entries.append(entry_id)

    def dead_letter_documents(self, rows: np.ndarray, *, reason: str, error: str, worker: str,
                              failures: int = 0) -> None:
        """Move documents `rows` of the window to dead letters (one per entry) and out of the table;
        a chunk takes every chunk of its document with it (a document is never output in part)."""
        rows = self.docs.whole_documents(rows)
        for k in np.unique(self.docs.entry[rows]).tolist():
            entry = self.entries[k]
            message_rows = np.unique(self.docs.row[rows[self.docs.entry[rows] == k]]).tolist()
            self.dead.append(deadletter.for_documents(
                entry.message, message_rows, entry_id=entry.entry_id, reason=reason, error=error, worker=worker,
                deliveries=entry.deliveries, failures=failures))
        keep = np.ones(len(self), dtype=bool)
        keep[rows] = False
        self.keep_documents(keep)

    def drop_entries(self, gone: set[str] | frozenset[str]) -> int:
        """Remove everything that belongs to entries settled elsewhere; returns the documents dropped."""
        kept = [k for k, e in enumerate(self.entries) if e.entry_id not in gone]
        before = len(self)
        self.keep_documents(np.isin(self.docs.entry, np.array(kept, dtype=np.int32)))
        remap = np.full(len(self.entries), -1, dtype=np.int32)
        remap[kept] = np.arange(len(kept), dtype=np.int32)
        self.docs.entry = remap[self.docs.entry]
        self.entries = [self.entries[k] for k in kept]
        self.dead = [d for d in self.dead if d.entry_id not in gone]
        self.dead_entries = [e for e in self.dead_entries if e not in gone]
        return before - len(self)

    def split_off(self, suspect: Callable[[Entry], bool]) -> list[Entry]:
        """Take the entries for which `suspect` holds out of the window (before tokenizing) and
        return them: the worker isolates entries that were delivered too often this way."""
        if len(self):
            raise ValueError("entries are split off before the window is tokenized")
        taken = [e for e in self.entries if suspect(e)]
        if taken:
            self.entries = [e for e in self.entries if not suspect(e)]
        return taken


def _check_ids(ids: list[DocId], keep: list[int], problems: dict[str, list[int]], rules: DocumentRules) -> list[int]:
    """Drop (and report) documents whose id does not fit the job's id type."""
    if not rules.id_type:
        return keep
    if all(documents.id_fits(ids[i], rules.id_type) for i in keep):
        return keep
    wrong = [i for i in keep if not documents.id_fits(ids[i], rules.id_type)]
    problems[f"id of the wrong type (the job's ids are {rules.id_type})"] = wrong
    return [i for i in keep if documents.id_fits(ids[i], rules.id_type)]


def _text_problems(texts: list[str], rules: DocumentRules) -> tuple[list[int], dict[str, list[int]]]:
    problems: dict[str, list[int]] = {}
    keep: list[int] = []
    for i, text in enumerate(texts):
        problem = documents.text_problem(text, allow_empty=rules.allow_empty, max_bytes=rules.limits.max_doc_bytes)
        if problem is None:
            keep.append(i)
        else:
            problems.setdefault(problem, []).append(i)
    return keep, problems


def _token_problems(docs: TokenizedDocs, rules: DocumentRules) -> tuple[list[int], dict[str, list[int]]]:
    lengths, tokens = docs.lengths, docs.tokens
    # A chunked job takes documents of any length (the message limits bound them) but only whole ones.
    chunked = rules.chunking is not None
    limit = lengths > rules.max_tokens if rules.max_tokens > 0 and not chunked else np.zeros(lengths.shape, bool)
    too_long = docs.truncated if chunked else limit
    out_of_vocab = np.zeros(lengths.shape, bool)
    if rules.vocab_size > 0 and tokens.size and int(tokens.max()) >= rules.vocab_size:
        out_of_vocab = np.add.reduceat((tokens >= rules.vocab_size).astype(np.int64), docs.offsets[:-1]) > 0
    problems: dict[str, list[int]] = {}
    if too_long.any():
        why = ("token ids truncated by the producer (a chunked job needs the whole text's)" if chunked
               else f"more than max_seq_len ({rules.max_tokens}) token ids")
        problems[why] = np.flatnonzero(too_long).tolist()
    if (out_of_vocab & ~too_long).any():
        problems[f"token id out of the model's vocabulary ({rules.vocab_size})"] = (
            np.flatnonzero(out_of_vocab & ~too_long).tolist())
    return np.flatnonzero(~(too_long | out_of_vocab)).tolist(), problems


class WindowSizer:
    """How many documents the next window should hold.

    A window closes at `window_docs` or after about `window_seconds` of engine work at the speed
    measured so far, whichever comes first, and never at more than a third of the lease: a CPU
    worker (hundreds of documents a second) then commits every few seconds and renews its lease,
    while a GPU worker fills whole windows. Before anything is measured a window is one batch (a job
    small enough for one window still spreads over the workers that are there), and each window
    grows at most 4x over the last, so the estimate firms up before windows get long.
    """

    def __init__(self, *, window_docs: int, window_seconds: float, lease_seconds: float, batch_size: int) -> None:
        self.window_docs = max(1, window_docs)
        self.seconds = max(0.1, min(window_seconds, lease_seconds / 3))
        self.batch_size = max(1, batch_size)
        self._last = 0

    def next_window(self, embedded_docs: int, engine_seconds: float) -> int:
        """Documents for the next window, given the documents embedded and engine seconds so far."""
        if embedded_docs <= 0 or engine_seconds <= 0:
            target = self.batch_size if self._last == 0 else self._last
        else:
            target = int(embedded_docs / engine_seconds * self.seconds)
            target = min(target, 4 * max(self._last, self.batch_size))
        self._last = max(self.batch_size, min(self.window_docs, target))
        return self._last
