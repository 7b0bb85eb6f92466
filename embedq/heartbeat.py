"""A worker's heartbeat, read by Redis's clock: how long since the worker last renewed its lease.

A worker renews its lease `RENEWALS_PER_LEASE` times per lease (`worker/lease.py`) and stamps each
heartbeat with Redis's time. A heartbeat older than `MISSED_RENEWALS` renewal periods means the
worker is dead, stuck or cut off from Redis, though its lease key (and its claim on its entries)
lives on until the lease runs out: `status` shows it as not responding rather than by its last state.

Both ends of an age are Redis's clock (INFO's `server_time_usec`; INFO is in the narrowest ACL the
README lists, TIME is not), so neither the worker's clock nor the reader's, nor a skew between
them, enters it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

RENEWALS_PER_LEASE = 3
MISSED_RENEWALS = 2  # one late or failed renewal is tolerated (the heartbeat retries a period later)
STAMP_FIELD = "beat_redis_s"  # Redis's time at the heartbeat, in seconds
LEASE_FIELD = "lease_s"  # the worker's lease, in seconds


def redis_time(client: redis.Redis) -> float:
    """Redis's clock now, in seconds since the epoch."""
    return parse_time(client.info("server"))


def parse_time(info: dict[str, Any]) -> float:
    """Redis's clock in seconds, from the reply of INFO server."""
    return int(info["server_time_usec"]) / 1e6


def stamp(record: dict[str, Any], *, lease_seconds: float, now: float) -> dict[str, Any]:
    """The heartbeat record as a worker writes it: its status, stamped with Redis's time `now`."""
    return {**record, STAMP_FIELD: now, LEASE_FIELD: lease_seconds}


@dataclass(frozen=True)
class Liveness:
    """How old a heartbeat is; `age_s` is None for a record without a stamp (an older embedq's)."""

    age_s: float | None
    lease_s: float | None

    @property
    def stale(self) -> bool:
        """No renewal for longer than `MISSED_RENEWALS` renewal periods."""
        if self.age_s is None or self.lease_s is None:
            return False
        return self.age_s > MISSED_RENEWALS * self.lease_s / RENEWALS_PER_LEASE

    @property
    def lease_expires_in_s(self) -> float | None:
        if self.age_s is None or self.lease_s is None:
            return None
        return max(0.0, self.lease_s - self.age_s)

    def fields(self) -> dict[str, Any]:
        """What `status` adds to each worker's record (and `--json` prints)."""
        return {"age_s": None if self.age_s is None else round(self.age_s, 3), "stale": self.stale,
                "lease_expires_in_s": None if self.lease_expires_in_s is None else round(self.lease_expires_in_s, 3)}


def liveness(record: dict[str, Any], now: float) -> Liveness:
    """The age of heartbeat `record` at Redis time `now` (never negative: a beat may land after `now` was read)."""
    beat, lease = record.get(STAMP_FIELD), record.get(LEASE_FIELD)
    if not isinstance(beat, (int, float)) or not isinstance(lease, (int, float)):
        return Liveness(age_s=None, lease_s=None)
    return Liveness(age_s=max(0.0, now - float(beat)), lease_s=float(lease))
