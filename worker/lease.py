"""A worker's lease: a heartbeat that keeps its in-flight entries from being reclaimed while it works.

Every third of the lease (`RENEWALS_PER_LEASE`) the heartbeat renews the worker's lease key (alive,
with a TTL of the lease) and resets the idle time of the entries it holds. It does so only while the
worker makes progress: a worker stuck for longer than the lease stops renewing, so a live worker takes
its entries over (XAUTOCLAIM) instead of waiting for it forever. Each heartbeat is stamped with
Redis's time, so `status` can tell a silent worker from a live one before its lease runs out
(`embedq.heartbeat`).
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from embedq.heartbeat import RENEWALS_PER_LEASE, redis_time, stamp
from embedq.keys import JobKeys
from embedq.worker.consumer import StreamConsumer

log = logging.getLogger("embedq.worker")


class InFlight:
    """The entry ids this worker holds (read and not yet settled), shared between threads."""

    def __init__(self) -> None:
        self._ids: set[str] = set()
        self._lock = threading.Lock()

    def add(self, ids: list[str]) -> None:
        with self._lock:
            self._ids.update(ids)

    def discard(self, ids: list[str]) -> None:
        with self._lock:
            self._ids.difference_update(ids)

    def snapshot(self) -> list[str]:
        with self._lock:
            return list(self._ids)

    def __len__(self) -> int:
        with self._lock:
            return len(self._ids)


class WorkingSet:
    """The entries this worker is working on (tokenizing or embedding), mirrored in Redis.

    Counted per entry, since a window can be on the engine while the next one is being tokenized.
    When the worker dies, whoever reclaims an entry found here counts a crash on it (consumer.py);
    entries the worker merely holds (prepared, waiting for the engine or the commit) are not here.
    """

    # The set outlives a killed worker until its entries are reclaimed; a day bounds what is left.
    TTL_SECONDS = 86400

    def __init__(self, client: redis.Redis, keys: JobKeys, worker: str,
                 call: Callable[[Callable[[], Any], str], Any]) -> None:
        self.client = client
        self.key = keys.worker_working(worker)
        self._call = call  # runs a Redis call, retrying outages
        self._counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def add(self, ids: list[str]) -> None:
        with self._lock:
            new = [i for i in ids if self._counts[i] == 0]
            self._counts.update(ids)
        if new:
            pipe = self.client.pipeline(transaction=False)
            pipe.sadd(self.key, *new)
            pipe.expire(self.key, self.TTL_SECONDS)
            self._call(pipe.execute, "record the entries being worked on")

    def discard(self, ids: list[str]) -> None:
        with self._lock:
            self._counts.subtract(ids)
            gone = [i for i in set(ids) if self._counts[i] <= 0]
            for i in gone:
                del self._counts[i]
        if gone:
            self._call(lambda: self.client.srem(self.key, *gone), "record the entries being worked on")

    def clear(self) -> None:
        """Forget everything (a clean exit: nothing was being worked on when the worker stopped)."""
        with self._lock:
            self._counts.clear()
        self.client.delete(self.key)


class Lease:
    """The heartbeat thread of one worker.

    `progress` is a counter that grows with every step the worker takes (documents fetched,
    tokenized, engine batches, commits): the lease is renewed only while it grows, so a worker in
    the middle of a long window keeps its lease batch by batch, and a stuck one loses it.
    """

    def __init__(self, client: redis.Redis, keys: JobKeys, worker: str, consumer: StreamConsumer,
                 in_flight: InFlight, lease_seconds: float, status: Callable[[], dict[str, Any]],
                 progress: Callable[[], int] = lambda: 0) -> None:
        self.client = client
        self.keys = keys
        self.worker = worker
        self.consumer = consumer
        self.in_flight = in_flight
        self.lease_seconds = lease_seconds
        self.status = status
        self.progress = progress
        self._last_count = progress()
        self._last_progress = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="embedq-lease", daemon=True)

    def progressed(self) -> None:
        """Called by the worker whenever it finishes a step; proves it is not stuck."""
        self._last_progress = time.monotonic()

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and drop the lease key, so status shows the worker gone at once."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.delete(self.keys.worker_lease(self.worker))
            pipe.hdel(self.keys.workers, self.worker)
            pipe.execute()
        except redis.RedisError:
            pass

    def beat(self) -> None:
        """Renew the lease once (if the worker is progressing)."""
        lease_ms = int(self.lease_seconds * 1000)
        count = self.progress()
        if count != self._last_count:
            self._last_count = count
            self.progressed()
        # Only a worker that holds batches can be stuck; an idle one keeps its lease (and its staged
        # parts stay safe from recovery, which condemns the parts of workers whose lease lapsed).
        stuck = len(self.in_flight) > 0 and time.monotonic() - self._last_progress > self.lease_seconds
        if stuck:
            log.warning("no progress for %.0f s: letting the lease on %d entries lapse",
                        time.monotonic() - self._last_progress, len(self.in_flight))
            return
        # One more round trip per renewal (every 10 s at the default lease) for a stamp by Redis's clock.
        info = stamp({**self.status(), "beat_at": time.time()}, lease_seconds=self.lease_seconds,
                     now=redis_time(self.client))
        pipe = self.client.pipeline(transaction=False)
        pipe.set(self.keys.worker_lease(self.worker), json.dumps(info), px=lease_ms)
        pipe.hset(self.keys.workers, self.worker, json.dumps(info))
        pipe.execute()
        ids = self.in_flight.snapshot()
        if ids:
            self.consumer.touch(ids, min_idle_ms=lease_ms // 4)

    def _run(self) -> None:
        interval = self.lease_seconds / RENEWALS_PER_LEASE
        while not self._stop.wait(interval):
            try:
                self.beat()
            except redis.RedisError as exc:
                log.warning("heartbeat failed (%s); retrying in %.1f s", exc, interval)
