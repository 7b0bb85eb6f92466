"""Dead letters: documents or messages that cannot be embedded, kept with their reason, replayable.

A dead letter lands in the stream `embedq:{job}:dead` in the same atomic step that acknowledges its
batch (see commit.py), so a document is never both lost and unaccounted. `replay` puts dead
documents back into the batch stream after a fix, again in one atomic step per letter.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import redis

from embedq.documents import EMPTY_TEXT
from embedq.errors import ProtocolError, UsageError
from embedq.job import ARCHIVED_FIELD
from embedq.keys import JobKeys
from embedq.ledger import LEDGER_LUA, Refusal
from embedq.protocol import SCHEMA_VERSION, BatchMessage, DocId, Limits, encode_batch, uncompressed

DEAD_FIELD = b"d"


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """Why some documents (or a whole unreadable message) were set aside."""

    job: str
    entry_id: str
    seq: int | None
    pos: int | None
    doc_ids: list[DocId]
    reason: str
    error: str
    worker: str
    deliveries: int = 0
    failures: int = 0
    failed_at: float = 0.0
    payload: bytes = b""
    replayable: bool = True
    code: str = ""  # for a refused message, `ProtocolError.code`: a stable reason for scripts


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(DeadLetter)


def encode(letter: DeadLetter) -> bytes:
    return _encoder.encode(letter)


def decode(raw: bytes) -> DeadLetter:
    return _decoder.decode(raw)


def for_documents(message: BatchMessage, rows: Sequence[int], *, entry_id: str, reason: str, error: str,
                  worker: str, deliveries: int = 0, failures: int = 0) -> DeadLetter:
    """A replayable dead letter holding `rows` of `message` (the payload is those documents alone)."""
    payload = encode_batch(subset(message, rows))
    return DeadLetter(job=message.job, entry_id=entry_id, seq=message.seq, pos=message.pos,
                      doc_ids=[message.ids[i] for i in rows], reason=reason, error=error, worker=worker,
                      deliveries=deliveries, failures=failures, failed_at=time.time(), payload=payload)


def for_unreadable(job: str, entry_id: str, raw: bytes, *, reason: str, error: str, worker: str,
                   deliveries: int = 0, max_payload: int = 1 << 20, code: str = "") -> DeadLetter:
    """A dead letter for a message that could not be decoded; its raw bytes are kept (up to a limit)."""
    return DeadLetter(job=job, entry_id=entry_id, seq=None, pos=None, doc_ids=[], reason=reason,
                      error=error, worker=worker, deliveries=deliveries, failed_at=time.time(),
                      payload=raw[:max_payload], replayable=False, code=code)


def for_refused_entry(job: str, entry_id: str, raw: bytes, seq: int, refusal: Refusal, *, worker: str,
                      deliveries: int = 0, max_payload: int = 1 << 20) -> DeadLetter:
    """The dead letter of an entry embedq did not add (`embedq.ledger`): not replayable (replaying
    would vouch for it), and with no document ids, since the job's own entry for that seq accounts
    for them (so `verify --allow-dead-letters` does not count them twice). The message's ids stay in
    its payload."""
    return DeadLetter(job=job, entry_id=entry_id, seq=seq, pos=None, doc_ids=[], reason=refusal.reason,
                      error=refusal.error, worker=worker, deliveries=deliveries, failed_at=time.time(),
                      payload=raw[:max_payload], replayable=False, code=refusal.code)


def subset(message: BatchMessage, rows: Sequence[int]) -> BatchMessage:
    """The same batch holding only `rows`, in the given order (token arrays sliced accordingly)."""
    ids = [message.ids[i] for i in rows]
    if message.texts is not None:
        return msgspec.structs.replace(message, ids=ids, texts=[message.texts[i] for i in rows])
    import numpy as np

    docs = message.token_docs().take(list(rows))
    return msgspec.structs.replace(
        message, ids=ids, tokens=docs.tokens.astype("<i4").tobytes(), lengths=docs.lengths.astype("<i4").tobytes(),
        truncated=docs.truncated.astype(np.uint8).tobytes(),
    )


@dataclass(frozen=True)
class DeadEntry:
    """A dead letter as stored: its id in the dead stream and the letter."""

    dead_id: str
    letter: DeadLetter


def list_dead(client: redis.Redis, keys: JobKeys, *, count: int | None = None,
              ids: Iterable[str] | None = None) -> list[DeadEntry]:
    """Dead letters of a job, oldest first (all, the first `count`, or the given dead-stream ids)."""
    if ids is not None:
        entries = []
        for dead_id in ids:
            entries.extend(client.xrange(keys.dead, dead_id, dead_id))
    else:
        entries = client.xrange(keys.dead, count=count)
    return decode_entries(entries)


def decode_entries(entries: Iterable[tuple[Any, Mapping[bytes, bytes]]]) -> list[DeadEntry]:
    """Dead letters from the dead stream's entries as XRANGE returns them (entries of other shape skipped)."""
    out = []
    for dead_id, fields in entries:
        raw = fields.get(DEAD_FIELD)
        if raw is not None:
            out.append(DeadEntry(dead_id.decode() if isinstance(dead_id, bytes) else dead_id, decode(raw)))
    return out


def summary(entry: DeadEntry) -> dict[str, object]:
    """A dead letter as a JSON-able row (without its payload): what `dead-letter list --json` prints."""
    letter = entry.letter
    return {"dead_id": entry.dead_id, "doc_ids": letter.doc_ids, "reason": letter.reason, "error": letter.error,
            "worker": letter.worker, "deliveries": letter.deliveries, "failures": letter.failures,
            "seq": letter.seq, "pos": letter.pos, "entry_id": letter.entry_id, "replayable": letter.replayable,
            "failed_at": letter.failed_at, "code": letter.code}


def file_row(entry: DeadEntry) -> dict[str, object]:
    """A dead letter as a row of the output's `_dead_letters.jsonl`: its summary and its payload
    (base64), so the file holds all of it and Redis may let its copy expire (`worker/archive.py`)."""
    return {**summary(entry), "payload": base64.b64encode(entry.letter.payload).decode("ascii")}


def from_file_row(row: Mapping[str, Any], job: str) -> DeadEntry:
    """The dead letter a `file_row` holds (a row written before payloads were kept: without one)."""
    names = set(DeadLetter.__struct_fields__) - {"job", "payload"}
    letter = DeadLetter(job=job, payload=base64.b64decode(row.get("payload") or ""),
                        **{name: row[name] for name in names if name in row})
    return DeadEntry(str(row["dead_id"]), letter)


_REPLAY = LEDGER_LUA + f"""
-- KEYS: 1 dead stream, 2 batch stream, 3 stats, 4 ledger.  ARGV: 1 dead id, 2 payload, 3 documents, 4 seq
-- The entry it adds is recorded in the ledger under the letter's seq, as the producer's would be.
-- An archived job (`embedq.job.ARCHIVED_FIELD`) must first be restored from its output, so that
-- its manifest and dead letters are whole and lose their TTL before the job changes again.
if redis.call('HEXISTS', KEYS[3], '{ARCHIVED_FIELD}') == 1 then return -1 end
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then return 0 end
ledger_add(KEYS[2], KEYS[4], ARGV[4], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[1])
redis.call('HINCRBY', KEYS[3], 'docs_dead', -tonumber(ARGV[3]))
redis.call('HINCRBY', KEYS[3], 'docs_replayed', tonumber(ARGV[3]))
return 1
"""


DUPLICATE_ID = "duplicate id"


def why_not_replayable(letter: DeadLetter, *, allow_empty: bool) -> str | None:
    """The reason a letter cannot go back into the stream, or None if it can."""
    if letter.reason == DUPLICATE_ID:
        return "duplicate id: the first document with this id is already embedded"
    if not letter.replayable or not letter.payload:
        return f"{letter.reason}: its content was not kept (unreadable, oversized or invalid)"
    if letter.reason == EMPTY_TEXT and not allow_empty:
        return "empty text: the job does not embed empty documents, so it would come straight back"
    return None


def replay(client: redis.Redis, keys: JobKeys, entries: Sequence[DeadEntry], *, allow_empty: bool = False,
           limits: Limits | None = None) -> tuple[int, list[tuple[str, str]]]:
    """Put replayable dead letters back into the batch stream; returns (documents replayed,
    [(dead id, why it was skipped)]). A payload is read within the job's message `limits` (its
    record's; the defaults if not given), as a worker reads it.

    Each letter moves in one atomic step (XADD to the batches, XDEL from the dead stream), so a
    crash during replay neither loses nor doubles a document.
    """
    script = client.register_script(_REPLAY)
    replayed, skipped = 0, []
    for entry in entries:
        letter = entry.letter
        reason = why_not_replayable(letter, allow_empty=allow_empty)
        if reason is not None:
            skipped.append((entry.dead_id, reason))
            continue
        try:
            message = msgspec.msgpack.decode(uncompressed(letter.payload, limits or Limits()), type=BatchMessage)
        except ProtocolError as exc:
            skipped.append((entry.dead_id, str(exc)))
            continue
        if message.v != SCHEMA_VERSION:
            skipped.append((entry.dead_id, f"schema version {message.v} is not this version's"))
            continue
        moved = script(keys=[keys.dead, keys.stream, keys.stats, keys.ledger],
                       args=[entry.dead_id, encode_batch(message), len(message.ids), message.seq])
        if int(moved) < 0:
            raise UsageError(
                f"Job {keys.job!r} was archived (its dead letters are kept in the output, and Redis lets its copy "
                f"expire), {replayed:,} documents replayed before that: run `embedq dead-letter replay --job "
                f"{keys.job}` again; it restores them from the output first.")
        if moved:
            replayed += len(message.ids)
    return replayed, skipped
