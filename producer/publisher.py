"""Publishing batches to the stream: idempotent, resumable, with backpressure.

Each batch is published by one atomic script that checks the producer's cursor: it adds the
batch only if `seq` is the next expected sequence number, then advances the cursor
`(next_seq, next_pos)` in the same step. So a batch is never added twice (a retry after a lost
reply, a second producer, a restarted one), and a producer that starts again reads the cursor and
continues from exactly the next batch. Before publishing, the producer waits while the stream
holds `backlog` entries or more; it never trims entries (contract 3).

The same script records the new entry in the job's ledger (`embedq.ledger`): workers refuse
entries embedq did not add. The producer holds the job's lock (`keys.producer_lock`, with a TTL it
renews) while it runs, so that a job left unfinished with no lock holder is known to have stalled.

A publisher of one slice of the source (several producers per job, `slices.py`) keeps its own
cursor and lock, numbers its batches from the slice's first sequence number, and counts into the
job's producer hash; the same scripts serve both, with the job's hash as the cursor of one producer.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis

from embedq.deadletter import DEAD_FIELD
from embedq.errors import UsageError
from embedq.job import FINALIZED_FIELD, is_complete
from embedq.keys import JobKeys
from embedq.ledger import LEDGER_FROM, LEDGER_LUA
from embedq.producer.slices import SLICE_LOCK_PREFIX, Slice

log = logging.getLogger("embedq.producer")

_PUBLISH = LEDGER_LUA + f"""
-- KEYS: 1 stream, 2 cursor (the job's producer hash, or a slice's), 3 dead, 4 stats, 5 ledger, 6 producer
-- ARGV: 1 seq, 2 next pos, 3 payload ('' if none), 4 documents covered, 5 dead documents,
--       6 slices (1: one producer), 7 the cursor's first seq, 8 its first position, then dead letters
local slices = tonumber(ARGV[6])
local recorded = tonumber(redis.call('HGET', KEYS[6], 'slices') or '0')
if recorded == 0 and slices > 1 then  -- the first slice to publish, unless one producer has published
  if redis.call('HEXISTS', KEYS[6], 'next_seq') == 1 then return {{'slices', 1}} end
  redis.call('HSET', KEYS[6], 'slices', slices)
  recorded = slices
end
if math.max(recorded, 1) ~= slices then return {{'slices', recorded}} end
local expected = tonumber(redis.call('HGET', KEYS[2], 'next_seq') or ARGV[7])
if tonumber(ARGV[1]) ~= expected then
  return {{'skip', expected, tonumber(redis.call('HGET', KEYS[2], 'next_pos') or ARGV[8])}}
end
-- The entry goes into the ledger with its seq in this same step: workers refuse unrecorded ones.
redis.call('HSETNX', KEYS[6], '{LEDGER_FROM}', slices > 1 and 0 or expected)
if ARGV[3] ~= '' then
  ledger_add(KEYS[1], KEYS[5], expected, ARGV[3])
  redis.call('HINCRBY', KEYS[6], 'batches', 1)
end
for i = 9, #ARGV do redis.call('XADD', KEYS[3], '*', '{DEAD_FIELD.decode()}', ARGV[i]) end
redis.call('HSET', KEYS[2], 'next_seq', expected + 1, 'next_pos', ARGV[2])
redis.call('HINCRBY', KEYS[6], 'docs', tonumber(ARGV[4]))
-- With slices the job's next_pos counts the documents covered so far (status reads it as published).
if slices > 1 then redis.call('HINCRBY', KEYS[6], 'next_pos', tonumber(ARGV[4])) end
redis.call('HINCRBY', KEYS[4], 'docs_dead', tonumber(ARGV[5]))
return {{'ok', redis.call('XLEN', KEYS[1])}}
"""

_FINISH = """
-- KEYS: 1 cursor, 2 producer, then every slice's cursor (none for one producer)
-- ARGV: 1 the cursor's end position (the source's document count for one producer), 2 time, 3 its first position
if tonumber(redis.call('HGET', KEYS[1], 'next_pos') or ARGV[3]) ~= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'done', 1, 'finished_at', ARGV[2])
for i = 3, #KEYS do  -- the last slice to finish marks the job produced
  if redis.call('HGET', KEYS[i], 'done') ~= '1' then return 1 end
end
redis.call('HSET', KEYS[2], 'done', 1, 'finished_at', ARGV[2])
return 1
"""

_HOLD_SLICE = f"""
-- KEYS: 1 the slice's lock, 2 the job's producer lock.  ARGV: 1 owner, 2 lifetime ms
-- Takes or renews a slice's lock, and the job's lock for all slices, unless another producer has either.
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return holder end
local job = redis.call('GET', KEYS[2])
if job and string.sub(job, 1, {len(SLICE_LOCK_PREFIX)}) ~= '{SLICE_LOCK_PREFIX}' then return job end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], '{SLICE_LOCK_PREFIX}' .. ARGV[1], 'PX', ARGV[2])
return false
"""

_RELEASE_SLICE = f"""
-- KEYS: 1 the slice's lock, 2 the job's producer lock, 3... the other slices' locks.  ARGV: 1 owner
-- The last slice to stop lets the job's lock go too, so a job whose slices all stopped shows no producer.
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
for i = 3, #KEYS do
  if redis.call('GET', KEYS[i]) then return 0 end
end
local job = redis.call('GET', KEYS[2])
if job and string.sub(job, 1, {len(SLICE_LOCK_PREFIX)}) == '{SLICE_LOCK_PREFIX}' then redis.call('DEL', KEYS[2]) end
return 1
"""


@dataclass(frozen=True)
class Cursor:
    """Where publishing stands: the next batch's sequence number and source position."""

    next_seq: int
    next_pos: int
    done: bool = False


@dataclass(frozen=True)
class Published:
    """The answer to one publish call."""

    accepted: bool
    backlog: int = 0
    cursor: Cursor | None = None  # when not accepted: where Redis says publishing stands


@dataclass(frozen=True)
class JobProgress:
    """The job as a producer that stays until it is complete (`--until-complete`) sees it."""

    cursor: Cursor
    stream_entries: int
    finalized: bool
    lock_holder: str | None

    @property
    def complete(self) -> bool:
        return is_complete(self.cursor.done, self.stream_entries, self.finalized)


class Publisher:
    """Publishes one job's batches: all of them, or those of one slice of the source."""

    def __init__(self, client: redis.Redis, keys: JobKeys, backlog: int, *,
                 lock_seconds: float = 15.0, part: Slice = Slice()) -> None:
        self.client = client
        self.keys = keys
        self.backlog = backlog
        self.lock_seconds = lock_seconds
        self.part = part
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.cursor_key = keys.producer if part.whole else keys.producer_slice(part.index, part.count)
        self.lock_key = keys.producer_lock if part.whole else keys.producer_slice_lock(part.index, part.count)
        self.start, self.stop = 0, 0  # the source positions this publisher covers: see `cover`
        self._publish = client.register_script(_PUBLISH)
        self._finish = client.register_script(_FINISH)
        self._hold = client.register_script(_HOLD_SLICE)
        self._release = client.register_script(_RELEASE_SLICE)
        self._last_backlog = 0
        self._lock_renewed = 0.0

    def cover(self, documents: int) -> None:
        """Set the positions to publish: this publisher's slice of a source of `documents` documents."""
        self.start, self.stop = self.part.bounds(documents)

    def cursor(self) -> Cursor:
        return self._cursor(self.client.hmget(self.cursor_key, ["next_seq", "next_pos", "done"]))

    def _cursor(self, values: list[bytes | None]) -> Cursor:
        """A cursor from its hash's fields; a slice not yet begun stands at its first batch."""
        next_seq, next_pos, done = values
        return Cursor(self.part.first_seq if next_seq is None else int(next_seq),
                      self.start if next_pos is None else int(next_pos), done == b"1")

    def _take(self) -> bytes | None:
        """Take (or renew) the lock; None if taken, else who holds it."""
        px = int(self.lock_seconds * 1000)
        if not self.part.whole:
            return self._hold(keys=[self.lock_key, self.keys.producer_lock], args=[self.owner, px])
        if self.client.set(self.lock_key, self.owner, nx=True, px=px):
            return None
        return self.client.get(self.lock_key) or b"?"

    def acquire(self, wait: float | None = None, *, log_wait: Callable[[str], None] = log.info,
                stopping: Callable[[], bool] = lambda: False) -> bool:
        """Take the job's producer lock; wait for a killed producer's lock to expire (up to `wait`
        seconds, `math.inf` for as long as another producer holds it). False if stopped first."""
        deadline = time.monotonic() + (wait if wait is not None else self.lock_seconds + 5)
        announced = False
        while (holder := self._take()) is not None:
            if time.monotonic() > deadline:
                raise UsageError(
                    f"Another producer ({holder.decode()}) is publishing {self._what()}. "
                    "Wait for it to finish, or stop it first."
                )
            if stopping():
                return False
            if not announced:
                limit = "until it finishes" if deadline == math.inf else f"up to {deadline - time.monotonic():.0f} s"
                log_wait(f"{self._what()} is locked by producer {holder.decode()}; waiting {limit} "
                         "for its lock to go (a killed producer's expires)")
                announced = True
            time.sleep(0.5)
        self._lock_renewed = time.monotonic()
        return True

    def renew(self, *, force: bool = False) -> None:
        """Keep the lock while publishing (called often; renews at most every third of its life,
        or now if `force`, e.g. when Redis came back without it)."""
        if not force and time.monotonic() - self._lock_renewed < self.lock_seconds / 3:
            return
        if self.part.whole:
            holder = self.client.get(self.lock_key)
            if holder is None or holder.decode() == self.owner:
                self.client.set(self.lock_key, self.owner, px=int(self.lock_seconds * 1000))
                holder = None
        else:
            holder = self._take()
        if holder is not None:
            raise UsageError(f"Producer lock of {self._what()} was taken by {holder.decode()}; stopping.")
        self._lock_renewed = time.monotonic()

    def _what(self) -> str:
        return f"job {self.keys.job!r}" + ("" if self.part.whole else f" (slice {self.part})")

    def progress(self) -> JobProgress:
        """The cursor, the stream's length, whether the output is final and who holds the lock:
        what a producer staying until the job is complete watches (one round trip)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(self.cursor_key, ["next_seq", "next_pos", "done"])
        pipe.xlen(self.keys.stream)
        pipe.hget(self.keys.stats, FINALIZED_FIELD)
        pipe.get(self.lock_key)
        cursor, entries, finalized, holder = pipe.execute()
        return JobProgress(self._cursor(cursor), int(entries), finalized == b"1",
                           None if holder is None else holder.decode())

    def release(self) -> None:
        """Let the lock go (a slice: and the job's, if no other slice holds its own)."""
        if not self.part.whole:
            others = [self.keys.producer_slice_lock(i, self.part.count) for i in range(self.part.count)
                      if i != self.part.index]
            self._release(keys=[self.lock_key, self.keys.producer_lock, *others], args=[self.owner])
        elif self.client.get(self.lock_key) == self.owner.encode():
            self.client.delete(self.lock_key)

    def check_numbering(self) -> None:
        """Refuse at once a job published under another numbering: by one producer when this one
        has a slice, or by another number of slices (the publish script refuses it too)."""
        slices, whole = self.client.hmget(self.keys.producer, ["slices", "next_seq"])
        recorded = int(slices) if slices is not None else (1 if whole is not None else self.part.count)
        if recorded != self.part.count:
            raise UsageError(self._numbering_refused(recorded))

    def wait_for_room(self, stopping: Callable[[], bool] = lambda: False,
                      on_wait: Callable[[int], None] = lambda _: None) -> None:
        """Backpressure: block while the stream holds `backlog` or more unsettled entries."""
        if self._last_backlog < self.backlog:
            return
        delay = 0.05
        while not stopping():
            self._last_backlog = self.client.xlen(self.keys.stream)
            if self._last_backlog < self.backlog:
                return
            on_wait(self._last_backlog)
            self.renew()
            time.sleep(delay)
            delay = min(delay * 1.5, 0.2)  # a longer sleep leaves workers idle once the backlog drains

    def publish(self, seq: int, next_pos: int, payload: bytes | None, documents: int,
                dead_letters: Sequence[bytes], dead_documents: int) -> Published:
        """Publish batch `seq` (covering positions up to `next_pos`) unless it is not the next one."""
        reply = self._publish(
            keys=[self.keys.stream, self.cursor_key, self.keys.dead, self.keys.stats, self.keys.ledger,
                  self.keys.producer],
            args=[seq, next_pos, payload or b"", documents, dead_documents, self.part.count, self.part.first_seq,
                  self.start, *dead_letters])
        if reply[0] == b"ok":
            self._last_backlog = int(reply[1])
            return Published(True, self._last_backlog)
        if reply[0] == b"slices":
            raise UsageError(self._numbering_refused(int(reply[1])))
        return Published(False, cursor=Cursor(int(reply[1]), int(reply[2])))

    def finish(self) -> bool:
        """Mark this publisher's positions fully produced, if its cursor has reached their end; the
        job is produced when every slice is (one producer: its one slice is the whole source)."""
        slices = [] if self.part.whole else [self.keys.producer_slice(i, self.part.count)
                                              for i in range(self.part.count)]
        return bool(self._finish(keys=[self.cursor_key, self.keys.producer, *slices],
                                 args=[self.stop, time.time(), self.start]))

    def _numbering_refused(self, slices: int) -> str:
        if slices == 1:
            return (f"Job {self.keys.job!r} was published by one producer over the whole source, so it cannot "
                    f"take slice {self.part}: run the producer without --slice.")
        pending = [i for i in range(slices)
                   if self.client.hget(self.keys.producer_slice(i, slices), "done") != b"1"]
        return (f"Job {self.keys.job!r} is published by {slices} producers, one slice each (--slice K/{slices}); "
                f"this producer {'has no slice' if self.part.whole else f'has slice {self.part}'}. Slices not yet "
                f"done: {', '.join(f'{i}/{slices}' for i in pending) or 'none'}; run `embedq produce` with "
                f"--slice for each of them.")
