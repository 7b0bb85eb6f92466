"""The entry ledger: the stream entries embedq itself added, so that a worker refuses any other.

A batch's sequence number says where its documents sit in the source, and a worker trusts an entry
to hold them once. An entry written straight into the stream (by hand, a script, a hostile client
with write access) can reuse a published sequence number (seq 0, position 0) or claim one beyond
the producer's cursor; committing it would put ids in the output twice, or ids the source does not
hold. So every entry embedq adds is recorded in the hash `keys.ledger` (entry id -> seq), by the
same Lua script that adds it:

    publish   the producer's script (cursor check + XADD) records the new entry
    split     crash isolation replaces an entry by halves (same seq, subsets of its documents):
              each half inherits the entry's record and the entry's record goes (`LEDGER_LUA`'s
              `ledger_take` + `ledger_add`)
    replay    `dead-letter replay` records the entry it adds under the letter's seq

The record and its entry are one script, so they are written, replicated and lost together: no
crash and no lost write leaves a genuine entry unrecorded. Entry ids are assigned by Redis and only
grow, so no writer can add an entry under an id already recorded. A worker reads the records of a
window's entries and the cursor in one round trip (`read_ledger`) and dead-letters, never commits,
an entry without one (`EntryLedger.refusal`, `deadletter.for_refused_entry`).

Jobs begun by an embedq without the ledger: the publish script marks the first seq it recorded
(`ledger_from` in the producer hash); entries below it, and every entry of a job without the mark,
are not checked, so a rolling upgrade refuses nothing genuine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import redis

from embedq.keys import JobKeys
from embedq.protocol import PAYLOAD_FIELD

SEQ_REUSED = "seq-reused"  # dead-letter codes, stable for scripts like `protocol.REASON_CODES`
SEQ_BEYOND_CURSOR = "seq-beyond-cursor"
SEQ_MISMATCH = "seq-mismatch"
LEDGER_FROM = "ledger_from"  # producer hash field: the first seq published with a record

# Lua functions for every script that adds entries to a job's stream; prepend to the script.
LEDGER_LUA = f"""
-- Add an entry embedq vouches for and record it under its sequence number (seq false: unrecorded,
-- for an entry that replaces one published before the ledger existed).
local function ledger_add(stream, ledger, seq, payload)
  local id = redis.call('XADD', stream, '*', '{PAYLOAD_FIELD.decode()}', payload)
  if seq then redis.call('HSET', ledger, id, seq) end
  return id
end
-- The record of an entry that is being replaced (its seq, or false), removed with it.
local function ledger_take(ledger, id)
  local seq = redis.call('HGET', ledger, id)
  redis.call('HDEL', ledger, id)
  return seq
end
"""


@dataclass(frozen=True)
class Refusal:
    """Why an entry is refused: a stable `code`, a short `reason` and the detail."""

    code: str
    reason: str
    error: str


@dataclass(frozen=True)
class EntryLedger:
    """What Redis records about some entries: a pure check, tested without Redis."""

    recorded: Mapping[str, int]  # entry id -> seq, for those of the entries asked about that are recorded
    next_seq: int  # the producer's cursor: the next sequence number it will publish
    checked_from: int | None  # the first seq published with a record; None: the job has no ledger

    def refusal(self, entry_id: str, seq: int) -> Refusal | None:
        """None if entry `entry_id`, whose message says `seq`, is one embedq added; else why not."""
        if self.checked_from is None or seq < self.checked_from:
            return None  # published before the ledger existed: nothing to check against
        recorded = self.recorded.get(entry_id)
        if recorded == seq:
            return None
        if recorded is not None:
            return Refusal(SEQ_MISMATCH, "sequence number does not match the published one",
                           f"entry {entry_id} was published as batch {recorded} but its message says {seq}")
        if seq < self.next_seq:
            return Refusal(SEQ_REUSED, "sequence number already published",
                           f"entry {entry_id} claims batch {seq}, which the producer already published as "
                           "another entry; it was not added by embedq (written straight into the stream), so "
                           "its documents are not committed")
        return Refusal(SEQ_BEYOND_CURSOR, "sequence number beyond the producer's cursor",
                       f"entry {entry_id} claims batch {seq}, but the producer has published only up to batch "
                       f"{self.next_seq - 1}; it was not added by embedq, so its documents are not committed")


def read_ledger(client: redis.Redis, keys: JobKeys, entry_ids: Sequence[str]) -> EntryLedger:
    """The records of `entry_ids` and the producer's cursor, in one round trip."""
    pipe = client.pipeline(transaction=False)
    pipe.hmget(keys.producer, ["next_seq", LEDGER_FROM])
    if entry_ids:
        pipe.hmget(keys.ledger, list(entry_ids))
    replies = pipe.execute()
    next_seq, since = replies[0]
    seqs = replies[1] if entry_ids else []
    return EntryLedger(recorded={e: int(s) for e, s in zip(entry_ids, seqs, strict=True) if s is not None},
                       next_seq=int(next_seq or 0), checked_from=None if since is None else int(since))
