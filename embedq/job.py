"""The job record: what a job embeds, with which model and batching, stored once in Redis.

The producer creates it (or checks it against its own settings when resuming); every worker reads
it and refuses to run a job whose model differs from the one it loaded (contract 1).
"""

from __future__ import annotations

import json
import time
from typing import Any

import msgspec
import redis

from embedq import __version__
from embedq.errors import JobMismatch, UsageError
from embedq.keys import JobKeys
from embedq.model import ModelInfo
from embedq.protocol import SCHEMA_VERSION, Limits

_RECORD_FIELD = "record"


class JobRecord(msgspec.Struct, frozen=True, kw_only=True):
    """Everything that decides a job's output; compared field by field when a producer resumes."""

    job: str
    schema_version: int = SCHEMA_VERSION
    model: str
    model_digest: str
    model_path: str
    dimension: int
    pooling: str
    normalize: bool
    max_seq_len: int
    source: str
    source_fingerprint: str
    source_spec: dict[str, Any] = {}
    id_type: str
    documents: int
    batch_size: int
    pretokenized: bool
    max_doc_bytes: int
    max_message_bytes: int
    allow_empty: bool = False
    allow_duplicate_ids: bool = False
    created_at: float = 0.0
    embedq_version: str = __version__

    @property
    def limits(self) -> Limits:
        return Limits(max_message_bytes=self.max_message_bytes, max_doc_bytes=self.max_doc_bytes)

    def model_fields(self) -> dict[str, Any]:
        return {"model": self.model, "model_digest": self.model_digest, "dimension": self.dimension,
                "pooling": self.pooling, "normalize": self.normalize, "max_seq_len": self.max_seq_len}


# Fields that may differ between a job's first producer run and a resumed one.
_MAY_DIFFER = frozenset({"created_at", "embedq_version", "model_path", "source", "source_spec"})


def new_record(job: str, model: ModelInfo, **fields: Any) -> JobRecord:
    """A record for `job` with `model`'s settings and the producer's `fields`."""
    return JobRecord(job=job, model_path=str(model.path), created_at=time.time(), **{
        "model": model.name, "model_digest": model.digest, "dimension": model.dim,
        "pooling": model.pooling.value, "normalize": model.normalize, "max_seq_len": model.max_seq_len,
        **fields,
    })


def load(client: redis.Redis, keys: JobKeys) -> JobRecord | None:
    """The job's record, or None if no producer has created the job yet."""
    raw = client.hget(keys.meta, _RECORD_FIELD)
    if raw is None:
        return None
    try:
        return msgspec.json.decode(raw, type=JobRecord)
    except msgspec.DecodeError as exc:
        raise JobMismatch(f"Job {keys.job!r} has a record this version of embedq cannot read: {exc}") from exc


def require(client: redis.Redis, keys: JobKeys) -> JobRecord:
    """The job's record; UsageError if the job does not exist."""
    record = load(client, keys)
    if record is None:
        raise UsageError(
            f"Job {keys.job!r} does not exist in this Redis; run `embedq produce SOURCE --job {keys.job}` first."
        )
    return record


def create_or_check(client: redis.Redis, keys: JobKeys, record: JobRecord) -> JobRecord:
    """Store `record` if the job is new; otherwise check that the stored one matches it.

    Returns the stored record. A resumed job must be the same job: same model, source content,
    batching and limits, or positions and sequence numbers would mean something else.
    """
    created = client.hsetnx(keys.meta, _RECORD_FIELD, msgspec.json.encode(record))
    if created:
        return record
    stored = require(client, keys)
    differences = [
        f"{name}: job has {getattr(stored, name)!r}, this run has {getattr(record, name)!r}"
        for name in record.__struct_fields__
        if name not in _MAY_DIFFER and getattr(stored, name) != getattr(record, name)
    ]
    if differences:
        raise JobMismatch(
            f"Job {keys.job!r} already exists with other settings:\n  " + "\n  ".join(differences)
            + f"\nUse another --job name, or delete the old job with `embedq delete --job {keys.job}`."
        )
    return stored


def check_model(record: JobRecord, model: ModelInfo) -> None:
    """Refuse to work on a job whose model (or its settings) differs from the loaded one."""
    theirs = record.model_fields()
    mine = model.describe()
    differences = [f"{k}: job {theirs[k]!r}, worker {mine[k]!r}" for k in theirs if theirs[k] != mine[k]]
    if differences:
        raise JobMismatch(
            f"This worker's model does not match job {record.job!r}: " + "; ".join(differences)
            + ". Start the worker with the job's model (--model, or leave it out to use the job's)."
        )


# -- the job's state in Redis -------------------------------------------------------------------

def is_complete(producer_done: bool, stream_entries: int) -> bool:
    """A job is complete once its producer has finished and every stream entry has been settled."""
    return producer_done and stream_entries == 0


def job_complete(client: redis.Redis, keys: JobKeys) -> bool:
    """Whether the job is complete now (see `is_complete`)."""
    return is_complete(client.hget(keys.producer, "done") == b"1", int(client.xlen(keys.stream)))


def live_workers(client: redis.Redis, keys: JobKeys) -> dict[str, dict[str, Any]]:
    """Workers whose lease key exists, with their last heartbeat; forgets workers whose lease expired."""
    names = [n.decode() if isinstance(n, bytes) else n for n in client.hkeys(keys.workers)]
    if not names:
        return {}
    values = client.mget([keys.worker_lease(n) for n in names])
    alive = {name: json.loads(value) for name, value in zip(names, values, strict=True) if value is not None}
    stale = [name for name in names if name not in alive]
    if stale:
        client.hdel(keys.workers, *stale)
    return alive
