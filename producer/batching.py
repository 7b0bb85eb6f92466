"""Cutting a source into numbered batches, deterministically, and setting unusable documents aside.

Batch `seq` starts at source position `pos`; both depend only on the source and the batching
settings, so a producer killed at any moment and run again produces exactly the same batches
from its recorded cursor `(next_seq, next_pos)` onward. A batch closes at `batch_size` documents
(good or not) or when its texts reach half the message size limit (an eighth for a chunked job's
untruncated token ids), whichever comes first.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from embedq.deadletter import DUPLICATE_ID
from embedq.documents import EMPTY_TEXT, TOO_LARGE
from embedq.producer.sources import Source
from embedq.protocol import DocId, Limits


@dataclass(frozen=True)
class Rejected:
    """A document the producer will not publish, with why; it goes to the dead letters."""

    index: int  # within the batch
    doc_id: DocId
    reason: str
    error: str
    text: str | None  # kept for replay when the text itself is fine (empty), else None


@dataclass
class PlannedBatch:
    """One batch: the documents to publish and those set aside, covering positions [pos, next_pos)."""

    seq: int
    pos: int
    next_pos: int = 0
    ids: list[DocId] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    text_bytes: int = 0

    @property
    def documents(self) -> int:
        return self.next_pos - self.pos


@dataclass(frozen=True)
class BatchRules:
    """What the producer accepts and how large a batch may grow."""

    batch_size: int
    limits: Limits
    allow_empty: bool = False
    skip_positions: frozenset[int] = frozenset()  # later occurrences of duplicate ids, when allowed
    # A batch closes when its texts reach this share of the message limit (1/2; 1/8 where the message
    # carries a chunked job's untruncated token ids, 4 bytes each, at most one per byte of text).
    text_share: int = 2


def plan_batches(source: Source, rules: BatchRules, *, start_seq: int = 0, start_pos: int = 0,
                 stop_pos: int | None = None, chunk_size: int = 8192) -> Iterator[PlannedBatch]:
    """Batches of `source` from cursor (start_seq, start_pos) to the end, or to `stop_pos` (a slice's)."""
    byte_cap = rules.limits.max_message_bytes // rules.text_share
    batch = PlannedBatch(seq=start_seq, pos=start_pos, next_pos=start_pos)
    for chunk in source.chunks(start=start_pos, chunk_size=chunk_size):
        if stop_pos is not None and chunk.pos >= stop_pos:
            break
        for i, (doc_id, text) in enumerate(zip(chunk.ids, chunk.texts, strict=True)):
            position = chunk.pos + i
            if stop_pos is not None and position >= stop_pos:
                break
            size = len(text.encode("utf-8", "surrogatepass"))
            if batch.ids and batch.text_bytes + size > byte_cap:
                yield batch
                batch = PlannedBatch(seq=batch.seq + 1, pos=position, next_pos=position)
            _place(batch, doc_id, text, size, chunk.problems.get(i), position, rules)
            batch.next_pos = position + 1
            if batch.documents >= rules.batch_size:
                yield batch
                batch = PlannedBatch(seq=batch.seq + 1, pos=position + 1, next_pos=position + 1)
    if batch.documents:
        yield batch


def _place(batch: PlannedBatch, doc_id: DocId, text: str, size: int, problem: str | None, position: int,
           rules: BatchRules) -> None:
    index = position - batch.pos
    if problem == EMPTY_TEXT and rules.allow_empty:
        problem = None
    if problem is None and position in rules.skip_positions:
        problem = DUPLICATE_ID
        batch.rejected.append(Rejected(index, doc_id, problem,
                                       f"id {doc_id!r} appears earlier in the source; the first one is embedded",
                                       None))
        return
    if problem is None and size > rules.limits.max_doc_bytes:
        batch.rejected.append(Rejected(
            index, doc_id, TOO_LARGE,
            f"{size} bytes, over the limit of {rules.limits.max_doc_bytes}; split the document or raise "
            "--max-doc-bytes", None))
        return
    if problem is not None:
        keep = text if problem == EMPTY_TEXT else None
        batch.rejected.append(Rejected(index, doc_id, problem, f"{problem} at source position {position}", keep))
        return
    batch.ids.append(doc_id)
    batch.texts.append(text)
    batch.text_bytes += size
