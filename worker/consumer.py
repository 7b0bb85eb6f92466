"""Reading the batch stream as one consumer of the group: new entries, and reclaimed ones.

New entries come from XREADGROUP. Entries left pending by another worker for longer than the lease
(it died or stalled) are claimed back one by one with XCLAIM, in a script that also counts a
*crash* on an entry when its worker's lease is gone and the entry was in that worker's working set
(being tokenized or embedded, not merely held). Only crashes, never deliveries, count against a
batch: a worker killed by someone else while it holds innocent batches blames none of them. A
worker never reclaims the entries it still holds: if its lease lapsed while it was working on them,
it has them still.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import redis

from embedq.keys import GROUP, JobKeys
from embedq.protocol import PAYLOAD_FIELD


@dataclass(frozen=True)
class Delivery:
    """One stream entry handed to this worker; `raw` is None if the entry's payload field is absent.
    `crashes`: workers that died while working on it."""

    entry_id: str
    raw: bytes | None
    deliveries: int
    crashes: int = 0


_RECLAIM = """
-- KEYS: 1 stream, 2 crashes, then for each previous owner its lease key and its working set
-- ARGV: 1 group, 2 this consumer, 3 min idle ms, then pairs (entry id, owner index from 1)
-- Claims each entry still idle past the lease (XCLAIM checks that atomically, so two workers never
-- both win one) and counts a crash on it if its owner's lease is gone and it was working on it.
local out = {}
for i = 4, #ARGV, 2 do
  local id, owner = ARGV[i], tonumber(ARGV[i + 1])
  local claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], id)
  if #claimed > 0 and claimed[1] then
    local lease, working = KEYS[1 + 2 * owner], KEYS[2 + 2 * owner]
    if redis.call('EXISTS', lease) == 0 and redis.call('SISMEMBER', working, id) == 1 then
      redis.call('HINCRBY', KEYS[2], id, 1)
    end
    out[#out + 1] = claimed[1]
  end
end
return out
"""


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
        self._reclaim = client.register_script(_RECLAIM)

    def read_new(self, count: int, block_ms: int) -> list[Delivery]:
        """Up to `count` entries never delivered before (waits up to `block_ms` for the first)."""
        reply = self.client.xreadgroup(GROUP, self.consumer, {self.keys.stream: ">"}, count=count,
                                       block=block_ms)
        if not reply:
            return []
        return [Delivery(_text(entry_id), fields.get(PAYLOAD_FIELD), 1) for entry_id, fields in reply[0][1]]

    def reclaim(self, count: int, held: Collection[str] = ()) -> list[Delivery]:
        """Up to `count` entries left idle past the lease, now owned by this consumer, with their
        delivery and crash counts (see the module docstring). Its own entries are skipped while it
        `held`s them; one it no longer holds (Redis lost the settle that acknowledged it) is taken
        back like any other."""
        rows = self.client.xpending_range(self.keys.stream, GROUP, min="-", max="+", count=count * 4 + 16,
                                          idle=self.lease_ms)
        taken = [(_text(r["message_id"]), _text(r["consumer"]), int(r["times_delivered"])) for r in rows
                 if _text(r["consumer"]) != self.consumer or _text(r["message_id"]) not in held][:count]
        if not taken:
            return []
        owners = sorted({owner for _, owner, _ in taken})
        index = {owner: k + 1 for k, owner in enumerate(owners)}
        keys = [self.keys.stream, self.keys.crashes]
        for owner in owners:
            keys += [self.keys.worker_lease(owner), self.keys.worker_working(owner)]
        args: list[object] = [GROUP, self.consumer, self.lease_ms]
        for entry_id, owner, _ in taken:
            args += [entry_id, index[owner]]
        claimed = self._reclaim(keys=keys, args=args)
        if not claimed:
            return []
        delivered = {entry_id: times for entry_id, _, times in taken}
        ids = [_text(entry[0]) for entry in claimed]
        crashes = self.client.hmget(self.keys.crashes, ids)
        return [Delivery(entry_id, _fields(entry[1]).get(PAYLOAD_FIELD), delivered.get(entry_id, 1) + 1,
                         int(crash or 0)) for entry_id, entry, crash in zip(ids, claimed, crashes, strict=True)]

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
