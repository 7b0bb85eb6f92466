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

log = logging.getLogger("embedq.producer")

_PUBLISH = LEDGER_LUA + f"""
-- KEYS: 1 stream, 2 producer, 3 dead, 4 stats, 5 ledger
-- ARGV: 1 seq, 2 next pos, 3 payload ('' if none), 4 documents covered, 5 dead documents, then dead letters
local expected = tonumber(redis.call('HGET', KEYS[2], 'next_seq') or '0')
if tonumber(ARGV[1]) ~= expected then
  return {{'skip', expected, tonumber(redis.call('HGET', KEYS[2], 'next_pos') or '0')}}
end
-- The entry goes into the ledger with its seq in this same step: workers refuse unrecorded ones.
redis.call('HSETNX', KEYS[2], '{LEDGER_FROM}', expected)
if ARGV[3] ~= '' then
  ledger_add(KEYS[1], KEYS[5], expected, ARGV[3])
  redis.call('HINCRBY', KEYS[2], 'batches', 1)
end
for i = 6, #ARGV do redis.call('XADD', KEYS[3], '*', '{DEAD_FIELD.decode()}', ARGV[i]) end
redis.call('HSET', KEYS[2], 'next_seq', expected + 1, 'next_pos', ARGV[2])
redis.call('HINCRBY', KEYS[2], 'docs', tonumber(ARGV[4]))
redis.call('HINCRBY', KEYS[4], 'docs_dead', tonumber(ARGV[5]))
return {{'ok', redis.call('XLEN', KEYS[1])}}
"""

_FINISH = """
-- KEYS: 1 producer.  ARGV: 1 expected next_pos (the source's document count), 2 time
if tonumber(redis.call('HGET', KEYS[1], 'next_pos') or '0') ~= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'done', 1, 'finished_at', ARGV[2])
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
    """Publishes one job's batches."""

    def __init__(self, client: redis.Redis, keys: JobKeys, backlog: int, *,
                 lock_seconds: float = 15.0) -> None:
        self.client = client
        self.keys = keys
        self.backlog = backlog
        self.lock_seconds = lock_seconds
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._publish = client.register_script(_PUBLISH)
        self._finish = client.register_script(_FINISH)
        self._last_backlog = 0
        self._lock_renewed = 0.0

    def cursor(self) -> Cursor:
        values = self.client.hmget(self.keys.producer, ["next_seq", "next_pos", "done"])
        return Cursor(int(values[0] or 0), int(values[1] or 0), values[2] == b"1")

    def acquire(self, wait: float | None = None, *, log_wait: Callable[[str], None] = log.info,
                stopping: Callable[[], bool] = lambda: False) -> bool:
        """Take the job's producer lock; wait for a killed producer's lock to expire (up to `wait`
        seconds, `math.inf` for as long as another producer holds it). False if stopped first."""
        deadline = time.monotonic() + (wait if wait is not None else self.lock_seconds + 5)
        announced = False
        while not self.client.set(self.keys.producer_lock, self.owner, nx=True, px=int(self.lock_seconds * 1000)):
            holder = self.client.get(self.keys.producer_lock)
            if time.monotonic() > deadline:
                raise UsageError(
                    f"Another producer ({(holder or b'?').decode()}) is publishing job {self.keys.job!r}. "
                    "Wait for it to finish, or stop it first."
                )
            if stopping():
                return False
            if not announced:
                limit = "until it finishes" if deadline == math.inf else f"up to {deadline - time.monotonic():.0f} s"
                log_wait(f"job {self.keys.job!r} is locked by producer {(holder or b'?').decode()}; waiting {limit} "
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
        holder = self.client.get(self.keys.producer_lock)
        if holder is not None and holder.decode() != self.owner:
            raise UsageError(f"Producer lock of job {self.keys.job!r} was taken by {holder.decode()}; stopping.")
        self.client.set(self.keys.producer_lock, self.owner, px=int(self.lock_seconds * 1000))
        self._lock_renewed = time.monotonic()

    def progress(self) -> JobProgress:
        """The cursor, the stream's length, whether the output is final and who holds the lock:
        what a producer staying until the job is complete watches (one round trip)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(self.keys.producer, ["next_seq", "next_pos", "done"])
        pipe.xlen(self.keys.stream)
        pipe.hget(self.keys.stats, FINALIZED_FIELD)
        pipe.get(self.keys.producer_lock)
        (next_seq, next_pos, done), entries, finalized, holder = pipe.execute()
        return JobProgress(Cursor(int(next_seq or 0), int(next_pos or 0), done == b"1"), int(entries),
                           finalized == b"1", None if holder is None else holder.decode())

    def release(self) -> None:
        if self.client.get(self.keys.producer_lock) == self.owner.encode():
            self.client.delete(self.keys.producer_lock)

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
            keys=[self.keys.stream, self.keys.producer, self.keys.dead, self.keys.stats, self.keys.ledger],
            args=[seq, next_pos, payload or b"", documents, dead_documents, *dead_letters])
        if reply[0] == b"ok":
            self._last_backlog = int(reply[1])
            return Published(True, self._last_backlog)
        return Published(False, cursor=Cursor(int(reply[1]), int(reply[2])))

    def finish(self, documents: int) -> bool:
        """Mark the job fully produced, if the cursor has reached the source's end."""
        return bool(self._finish(keys=[self.keys.producer], args=[documents, time.time()]))
