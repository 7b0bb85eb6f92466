"""Reading the batch stream as one consumer of the group: new entries, and reclaimed ones.

New entries come from XREADGROUP; entries left pending by a dead or stalled worker for longer than
the lease come back through XAUTOCLAIM, with their delivery count, so poison batches can be told
apart from batches whose worker was merely killed.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from embedq.keys import GROUP, JobKeys
from embedq.protocol import PAYLOAD_FIELD


@dataclass(frozen=True)
class Delivery:
    """One stream entry handed to this worker; `raw` is None if the entry's payload field is absent."""

    entry_id: str
    raw: bytes | None
    deliveries: int


def ensure_group(client: redis.Redis, keys: JobKeys) -> None:
    """Create the consumer group (and the stream) if they do not exist yet."""
    try:
        client.xgroup_create(keys.stream, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


class StreamConsumer:
    """One worker's view of the stream."""

    def __init__(self, client: redis.Redis, keys: JobKeys, consumer: str, lease_ms: int) -> None:
        self.client = client
        self.keys = keys
        self.consumer = consumer
        self.lease_ms = lease_ms
        self._cursor = "0-0"

    def read_new(self, count: int, block_ms: int) -> list[Delivery]:
        """Up to `count` entries never delivered before (waits up to `block_ms` for the first)."""
        reply = self.client.xreadgroup(GROUP, self.consumer, {self.keys.stream: ">"}, count=count,
                                       block=block_ms)
        if not reply:
            return []
        return [Delivery(_text(entry_id), fields.get(PAYLOAD_FIELD), 1) for entry_id, fields in reply[0][1]]

    def reclaim(self, count: int) -> tuple[list[Delivery], list[str]]:
        """Entries idle for longer than the lease, now owned by this consumer, with delivery counts.

        Also returns ids that were pending but are gone from the stream (trimmed by someone else);
        those are acknowledged here, since there is nothing left to process.
        """
        cursor, claimed, deleted = self._autoclaim(count)
        self._cursor = cursor
        deleted_ids = [_text(d) for d in deleted]
        if deleted_ids:
            self.client.xack(self.keys.stream, GROUP, *deleted_ids)
        if not claimed:
            return [], deleted_ids
        counts = self.delivery_counts([_text(e) for e, _ in claimed])
        return [Delivery(_text(e), (f or {}).get(PAYLOAD_FIELD), counts.get(_text(e), 2))
                for e, f in claimed], deleted_ids

    def _autoclaim(self, count: int) -> tuple[str, list, list]:
        reply = self.client.execute_command(
            "XAUTOCLAIM", self.keys.stream, GROUP, self.consumer, self.lease_ms, self._cursor, "COUNT", count)
        cursor = _text(reply[0])
        claimed = [(e, _fields(f)) for e, f in reply[1] if e is not None]
        deleted = list(reply[2]) if len(reply) > 2 else []
        return cursor, claimed, deleted

    def delivery_counts(self, entry_ids: list[str]) -> dict[str, int]:
        """How often each of these pending entries (owned by this consumer) has been delivered."""
        if not entry_ids:
            return {}
        ordered = sorted(entry_ids, key=_id_key)
        rows = self.client.xpending_range(self.keys.stream, GROUP, min=ordered[0], max=ordered[-1],
                                          count=len(entry_ids) * 4 + 16, consumername=self.consumer)
        wanted = set(entry_ids)
        return {_text(r["message_id"]): int(r["times_delivered"]) for r in rows
                if _text(r["message_id"]) in wanted}

    def owned(self, entry_ids: list[str]) -> list[str]:
        """Those of `entry_ids` still pending under this consumer."""
        return list(self.delivery_counts(entry_ids))

    def touch(self, entry_ids: list[str], *, min_idle_ms: int) -> None:
        """Reset the idle time of entries this consumer still owns (its lease on them)."""
        mine = self.owned(entry_ids)
        if mine:
            self.client.xclaim(self.keys.stream, GROUP, self.consumer, min_idle_ms, mine, justid=True)

    def release(self, entry_ids: list[str]) -> None:
        """Make entries immediately reclaimable by others (on shutdown, for work never started)."""
        mine = self.owned(entry_ids)
        if mine:
            self.client.xclaim(self.keys.stream, GROUP, self.consumer, 0, mine, idle=self.lease_ms * 10,
                               justid=True)


def _fields(value: object) -> dict[bytes, bytes]:
    if isinstance(value, dict):
        return value
    if isinstance(value, list):  # RESP2 gives a flat [field, value, ...] list
        return dict(zip(value[::2], value[1::2], strict=False))
    return {}


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
