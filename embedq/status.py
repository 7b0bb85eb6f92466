"""A job's state, read from Redis in one round trip: what `embedq status` prints and `run` shows."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from embedq import job as job_record
from embedq.heartbeat import liveness, parse_time
from embedq.keys import GROUP, JobKeys
from embedq.progress import byte_size


@dataclass
class JobStatus:
    """Counts of one job. Documents: produced = committed + dead-lettered + in the stream."""

    job: str
    exists: bool
    prefix: str = "embedq"  # the key prefix (`--key-prefix`)
    model: str = ""
    source: str = ""
    documents: int = 0  # in the source
    produced_documents: int = 0
    produced_batches: int = 0
    producer_done: bool = False
    producer_lock: str | None = None  # the running producer holding the job's lock, if any
    stream_entries: int = 0  # batches published and not yet settled
    pending_entries: int = 0  # of those, delivered to a worker and not yet settled
    committed_documents: int = 0
    committed_parts: int = 0
    tokens: int = 0
    dead_documents: int = 0
    dead_letters: int | None = 0  # None: Redis let them expire; the output's `_dead_letters.jsonl` lists them
    finalized: bool = False  # the output is final: every part visible, `_manifest.json` written
    # When the finished job's manifest and dead letters leave Redis (the output records them;
    # `embedq.job.compact_finished`), as a unix time; None while Redis keeps them.
    archived_until: float | None = None
    redis_bytes: int | None = None  # the job's memory in Redis; None where MEMORY USAGE is refused
    output: str = ""  # the output location the workers recorded
    # Workers holding a lease, by id: each one's last heartbeat, with its age by Redis's clock (`age_s`,
    # `stale`, `lease_expires_in_s`: `embedq.heartbeat`). A stale one still holds its entries.
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)
    stall_advice: str | None = None  # set when the job has stalled: what happened and what to run
    produce_command: str = ""  # the command that finishes publishing it

    @property
    def settled(self) -> bool:
        """Nothing left to embed (see `embedq.job.is_settled`)."""
        return job_record.is_settled(self.producer_done, self.stream_entries)

    @property
    def complete(self) -> bool:
        """Settled and the output final (see `embedq.job.is_complete`)."""
        return job_record.is_complete(self.producer_done, self.stream_entries, self.finalized)

    @property
    def stalled(self) -> bool:
        """Not fully produced, and no producer is running to finish it."""
        return self.stall_advice is not None

    @property
    def command(self) -> str | None:
        """What an operator must run for the job to complete, if anything."""
        if self.stalled:
            return self.produce_command
        if self.settled and not self.finalized:
            return job_record.finalize_command(JobKeys(self.job, self.prefix), self.output)
        return None

    @property
    def action(self) -> str | None:
        """The command with what it is for."""
        if self.stall_advice is not None:
            return self.stall_advice
        if self.settled and not self.finalized:
            return job_record.finalize_advice(JobKeys(self.job, self.prefix), self.output)
        return None

    @property
    def settled_documents(self) -> int:
        return self.committed_documents + self.dead_documents

    @property
    def alive_workers(self) -> dict[str, dict[str, Any]]:
        """Workers that renew their lease; a stale one (dead, stuck, cut off) holds it until it expires."""
        return {name: info for name, info in self.workers.items() if not info.get("stale")}

    @property
    def workers_not_responding(self) -> int:
        return len(self.workers) - len(self.alive_workers)

    @property
    def docs_per_s(self) -> float:  # a stale worker's last rate is history, not throughput
        return sum(float(w.get("docs_per_s", 0.0)) for w in self.alive_workers.values())

    @property
    def tokens_per_s(self) -> float:
        return sum(float(w.get("tokens_per_s", 0.0)) for w in self.alive_workers.values())

    @property
    def state(self) -> str:
        if not self.exists:
            return "unknown"
        if self.complete:
            return "complete"
        if self.settled:  # a worker finalizes the output as it stops; without one, `gc` does
            return "finalizing" if self.alive_workers else "not finalized"
        if self.stalled:
            return "stalled"
        if not self.alive_workers:
            return "waiting for workers"
        return "running" if self.producer_done else "producing"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "complete": self.complete, "settled": self.settled, "stalled": self.stalled,
                "state": self.state, "action": self.action, "command": self.command,
                "docs_per_s": self.docs_per_s, "tokens_per_s": self.tokens_per_s,
                "workers_alive": len(self.alive_workers), "workers_not_responding": self.workers_not_responding}


def read_status(client: redis.Redis, keys: JobKeys) -> JobStatus:
    """The job's counts; `exists` is False when no producer has created it."""
    record = job_record.load(client, keys)
    if record is None:
        return JobStatus(job=keys.job, exists=False, prefix=keys.prefix)
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.producer)
    pipe.hgetall(keys.stats)
    pipe.xlen(keys.stream)
    pipe.xlen(keys.dead)
    pipe.get(keys.producer_lock)
    pipe.info("server")  # Redis's clock, which the heartbeats are stamped with
    producer, stats, stream_len, dead_len, lock, server = pipe.execute()
    try:
        pending = int(client.xpending(keys.stream, GROUP)["pending"])
    except redis.ResponseError:  # no group yet: no worker has started
        pending = 0

    def count(values: dict[bytes, bytes], name: str) -> int:
        return int(values.get(name.encode(), 0))

    archived = stats.get(job_record.ARCHIVED_FIELD.encode())
    done = producer.get(b"done") == b"1"
    stalled = not done and lock is None
    return JobStatus(
        job=keys.job, exists=True, prefix=keys.prefix, model=record.model, source=record.source,
        documents=record.documents, produced_documents=count(producer, "docs"),
        produced_batches=count(producer, "batches"), producer_done=done,
        producer_lock=None if lock is None else lock.decode(), stream_entries=int(stream_len),
        pending_entries=pending, committed_documents=count(stats, "docs_committed"),
        committed_parts=count(stats, "parts"), tokens=count(stats, "tokens"), dead_documents=count(stats, "docs_dead"),
        dead_letters=None if archived is not None and not dead_len else int(dead_len),
        archived_until=None if archived is None else float(archived), redis_bytes=job_record.job_memory(client, keys),
        finalized=stats.get(job_record.FINALIZED_FIELD.encode()) == b"1",
        output=stats.get(job_record.OUTPUT_FIELD.encode(), b"").decode(),
        workers={name: {**info, **liveness(info, parse_time(server)).fields()}
                 for name, info in job_record.live_workers(client, keys).items()},
        stall_advice=job_record.stall_advice(record, keys, published=count(producer, "next_pos"),
                                             slices=job_record.producer_slices(producer)) if stalled else None,
        produce_command=job_record.produce_command(record, keys, slices=job_record.producer_slices(producer)),
    )


def render(status: JobStatus) -> str:
    """The status as aligned lines for a terminal."""
    if not status.exists:
        return f"job {status.job}: not found (no producer has created it in this Redis)"
    rows = [
        ("job", f"{status.job} ({status.state})"),
        ("model", status.model),
        ("source", f"{status.source}, {status.documents:,} documents"),
        ("produced", f"{status.produced_documents:,} documents in {status.produced_batches:,} batches"
                     + (" (done)" if status.producer_done else "")),
        ("producer", _producer_state(status)),
        ("in stream", f"{status.stream_entries:,} batches, {status.pending_entries:,} of them being processed"),
        ("committed", f"{status.committed_documents:,} documents in {status.committed_parts:,} parts, "
                      f"{status.tokens:,} tokens"),
        ("dead-lettered", _dead_lettered(status)),
        ("workers alive", _workers_alive(status)),
        ("throughput", f"{status.docs_per_s:,.0f} documents/s, {status.tokens_per_s:,.0f} tokens/s"),
    ]
    if status.output:
        rows.append(("output", status.output + (" (final)" if status.finalized else " (not final yet)")))
    rows.append(("redis memory", _redis_memory(status)))
    for name, info in sorted(status.workers.items()):
        rows.append((f"  {name}", f"{_worker_state(info)}, {info.get('backend', '?')} on "
                                  f"{info.get('device', '?')} {info.get('precision', '')}, "
                                  f"{int(info.get('documents', 0)):,} documents, "
                                  f"{float(info.get('docs_per_s', 0)):,.0f} docs/s"))
    if status.action is not None:
        rows.append(("action", status.action))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _dead_lettered(status: JobStatus) -> str:
    if status.dead_letters is not None:
        return f"{status.dead_documents:,} documents ({status.dead_letters:,} dead letters)"
    return f"{status.dead_documents:,} documents" + (" (listed in the output's _dead_letters.jsonl)"
                                                     if status.dead_documents else "")


def _redis_memory(status: JobStatus) -> str:
    """The job's memory in Redis, and when what the output records leaves it."""
    size = ("not known (this Redis user may not run MEMORY USAGE)" if status.redis_bytes is None
            else byte_size(status.redis_bytes))
    if status.archived_until is None:
        return size
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(status.archived_until))
    went = "left" if status.archived_until <= time.time() else "leave"
    return f"{size}; its manifest and dead letters, which the output records, {went} Redis at {when}"


def _workers_alive(status: JobStatus) -> str:
    alive, silent = len(status.alive_workers), status.workers_not_responding
    return f"{alive} alive, {silent} not responding" if silent else str(alive)


def _worker_state(info: dict[str, Any]) -> str:
    """Its last state, or for a stale worker how long it has been silent and how long it keeps its lease."""
    if not info.get("stale"):
        return str(info.get("state", "?"))
    return (f"stale (no heartbeat for {float(info['age_s']):.0f} s, was {info.get('state', '?')}; "
            f"lease expires in {float(info['lease_expires_in_s']):.0f} s)")


def _producer_state(status: JobStatus) -> str:
    if status.producer_done:
        return "finished" + (f", staying until complete ({status.producer_lock})" if status.producer_lock else "")
    return f"running ({status.producer_lock})" if status.producer_lock else "not running"


def to_json(status: JobStatus) -> str:
    return json.dumps(status.as_dict(), indent=1, sort_keys=True)
