"""The job record: what a job embeds, with which model and batching, stored once in Redis.

The producer creates it (or checks it against its own settings when resuming); every worker reads
it and refuses to run a job whose model differs from the one it loaded (contract 1).
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Any

import msgspec
import redis

from embedq import __version__
from embedq.chunking import Chunking
from embedq.config import Settings
from embedq.errors import JobMismatch, ModelError, UsageError
from embedq.keys import JobKeys
from embedq.model import ModelInfo, default_model_path
from embedq.protocol import SCHEMA_VERSION, Limits
from embedq.quantization import OutputFormat, from_record
from embedq.tokenization import Tokenizer

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
    # The prompt before every text (counted in its tokens), and whether pooling takes its tokens in.
    prompt: str = ""
    prompt_name: str = ""
    include_prompt: bool = True
    # The stored vectors (`embedq.quantization.OutputFormat`), fixed here so every worker writes alike.
    output_dtype: str = "float32"
    truncate_dim: int | None = None
    quantization_ranges: list[list[float]] | None = None
    calibration: str = ""
    # Long documents cut into chunks of this many tokens (0: none), neighbours sharing `chunk_overlap`
    # text tokens (`embedq.chunking`), fixed here so every worker cuts alike.
    chunk_tokens: int = 0
    chunk_overlap: int = 0

    @property
    def limits(self) -> Limits:
        return Limits(max_message_bytes=self.max_message_bytes, max_doc_bytes=self.max_doc_bytes)

    def output_format(self) -> OutputFormat:
        """How this job's vectors are stored: every worker writes them alike."""
        return from_record(self.output_dtype, self.truncate_dim, self.normalize, self.quantization_ranges,
                           self.calibration)

    def chunking(self, model: ModelInfo) -> Chunking | None:
        """How this job cuts documents for `model`'s tokenizer and prompt, or None if it does not."""
        if not self.chunk_tokens:
            return None
        tokenizer = Tokenizer(model.tokenizer_file, model.max_seq_len, prompt=self.prompt, truncate=False)
        return Chunking.for_tokenizer(tokenizer, self.chunk_tokens, self.chunk_overlap)

    def model_fields(self) -> dict[str, Any]:
        return {"model": self.model, "model_digest": self.model_digest, "dimension": self.dimension,
                "pooling": self.pooling, "normalize": self.normalize, "max_seq_len": self.max_seq_len,
                "prompt": self.prompt, "include_prompt": self.include_prompt}


# Fields that may differ between a job's first producer run and a resumed one.
# (prompt_name and calibration only describe the prompt and the ranges, which are compared.)
_MAY_DIFFER = frozenset({"created_at", "embedq_version", "model_path", "source", "source_spec", "prompt_name",
                         "calibration"})


def new_record(job: str, model: ModelInfo, **fields: Any) -> JobRecord:
    """A record for `job` with `model`'s settings and the producer's `fields`."""
    return JobRecord(job=job, model_path=str(model.path), created_at=time.time(), **{
        "model": model.name, "model_digest": model.digest, "dimension": model.dim,
        "pooling": model.pooling.value, "normalize": model.normalize, "max_seq_len": model.max_seq_len,
        "prompt": model.prompt, "prompt_name": model.prompt_name or "", "include_prompt": model.include_prompt,
        **fields,
    })


def load(client: redis.Redis, keys: JobKeys) -> JobRecord | None:
    """The job's record, or None if no producer has created the job yet."""
    raw = client.hget(keys.meta, _RECORD_FIELD)
    return None if raw is None else _decode(raw, keys)


def _decode(raw: bytes, keys: JobKeys) -> JobRecord:
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
#
# Two notions, two names. *Settled*: the producer has published the whole source and every stream
# entry has been settled (committed or dead-lettered): nothing is left to embed, and a worker stops.
# *Complete*: settled, and the output is final (every committed part visible under its name,
# `_manifest.json` written): what `status` reports and a glob reader may rely on. Whoever finalizes
# the output at the job's end (a worker, `gc`, `verify`) records it in the stats hash.

FINALIZED_FIELD = "finalized"  # stats hash: 1 once the output is final
OUTPUT_FIELD = "output"  # stats hash: the output location, as the workers opened it


def is_settled(producer_done: bool, stream_entries: int) -> bool:
    """Nothing left to embed: the producer has finished and every stream entry has been settled."""
    return producer_done and stream_entries == 0


def is_complete(producer_done: bool, stream_entries: int, finalized: bool) -> bool:
    """Complete for the job's readers: settled, and the output final."""
    return is_settled(producer_done, stream_entries) and finalized


def job_settled(client: redis.Redis, keys: JobKeys) -> bool:
    """Whether the job is settled now (see `is_settled`): a worker's test that there is no more work."""
    pipe = client.pipeline(transaction=False)
    pipe.hget(keys.producer, "done")
    pipe.xlen(keys.stream)
    done, entries = pipe.execute()
    return is_settled(done == b"1", int(entries))


job_complete = job_settled  # the worker's, `gc`'s and `verify`'s name for it: "no more work", not "final"


# What a finished job no longer needs in Redis: bookkeeping per stream entry, read only while
# entries are in flight (the ledger of entries embedq added, failure and crash counts, the staged
# parts recovery condemned). And what the output location now records (`_manifest.json`,
# `_dead_letters.jsonl` with each letter's payload): the manifest hash and the dead-letter stream get
# a TTL, and `ARCHIVED_FIELD` in the stats hash says so. The record, counters, producer cursor and the
# empty stream with its group stay for good, so `status` still knows the job and says it is complete.
# One script, so it cannot interleave with a replay; it acts only on a final job with nothing queued.
#
# The invariant (`embedq.worker.archive` keeps the other half): the manifest and the dead letters
# carry a TTL, or are gone, only while `ARCHIVED_FIELD` is set, and it is set only here, when the job
# is final and its files written. Whatever reads or changes them afterwards (recovery, finalization,
# `verify`, `gc`, a starting worker, `dead-letter replay`) first restores them from the output,
# removes their TTL and clears the field, in one script; the replay script refuses an archived job.
# So a job that changes again (a replay, then its settles) always has whole copies without a TTL.
ARCHIVED_FIELD = "archived_until"  # stats hash: the unix time the manifest and dead letters expire

_COMPACT = f"""
-- KEYS: 1 stream, 2 stats, 3 manifest, 4 dead, 5.. the keys to drop.  ARGV: 1 TTL (0: keep), 2 when it ends
if redis.call('XLEN', KEYS[1]) ~= 0 or redis.call('HGET', KEYS[2], '{FINALIZED_FIELD}') ~= '1' then return -1 end
local dropped = 0
for i = 5, #KEYS do dropped = dropped + redis.call('DEL', KEYS[i]) end
if tonumber(ARGV[1]) > 0 then
  redis.call('EXPIRE', KEYS[3], ARGV[1])
  redis.call('EXPIRE', KEYS[4], ARGV[1])
  redis.call('HSET', KEYS[2], '{ARCHIVED_FIELD}', ARGV[2])
end
return dropped
"""


def compact_finished(client: redis.Redis, keys: JobKeys, *, ttl: int = Settings.finished_ttl
                     ) -> tuple[int | None, int | None] | None:
    """Drop what a finished job no longer needs from Redis, and give what its output records a TTL
    of `ttl` seconds (0: none); the job's memory (bytes) before and after (None where Redis does not
    let this user ask), or None if the job is not final (then nothing changes). Call it only once
    `_manifest.json` and `_dead_letters.jsonl` are written (`finalize.finalize_output`)."""
    before = job_memory(client, keys)
    spent = [keys.ledger, keys.failures, keys.crashes, keys.condemned]
    compacted = client.register_script(_COMPACT)(keys=[keys.stream, keys.stats, keys.manifest, keys.dead, *spent],
                                                 args=[ttl, f"{time.time() + ttl:.3f}"])  # not rounded up
    if int(compacted) < 0:
        return None
    return before, job_memory(client, keys)


def job_memory(client: redis.Redis, keys: JobKeys) -> int | None:
    """Bytes the job's keys take in Redis (`MEMORY USAGE` of each; the workers' short-lived lease
    and working-set keys left out), without scanning the keyspace; None where Redis refuses MEMORY
    USAGE (not among the commands embedq needs, or renamed away by a managed Redis)."""
    names = [keys.stream, keys.meta, keys.producer, keys.producer_lock, keys.ledger, keys.manifest, keys.stats,
             keys.dead, keys.condemned, keys.failures, keys.workers, keys.crashes]
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.memory_usage(name, samples=0)
    try:
        return sum(int(used or 0) for used in pipe.execute())
    except redis.exceptions.ResponseError:  # NoPermissionError among them
        return None


def producer_stalled(client: redis.Redis, keys: JobKeys) -> str | None:
    """What to run when the job has stalled (its producer stopped before the end, or Redis lost its
    last writes, and no producer holds the lock), else None. For idle workers to log."""
    pipe = client.pipeline(transaction=False)
    pipe.hget(keys.meta, _RECORD_FIELD)
    pipe.hmget(keys.producer, ["done", "next_pos", "slices"])
    pipe.get(keys.producer_lock)  # GET, not EXISTS: the narrowest ACL the README lists has no EXISTS
    raw, (done, next_pos, slices), holder = pipe.execute()
    if raw is None or done == b"1" or holder is not None:
        return None
    return stall_advice(_decode(raw, keys), keys, published=int(next_pos or 0), slices=producer_slices([slices]))


def stall_advice(record: JobRecord, keys: JobKeys, *, published: int, slices: int = 1) -> str:
    """The advice for a stalled job: what happened and the command that finishes publishing it."""
    stdin = " (pipe the same input into it)" if _source_path(record) == "-" else ""
    each = (f" for each slice K from 0 to {slices - 1} (a slice that finished has nothing left to publish)"
            if slices > 1 else "")
    return (f"the producer stopped after {published:,} of {record.documents:,} documents (killed, or Redis lost "
            f"its last writes) and no producer is running: run `{produce_command(record, keys, slices=slices)}`"
            f"{each}{stdin} against the same Redis; it publishes what is missing, never a batch twice")


def producer_slices(values: dict[bytes, bytes] | list[bytes | None]) -> int:
    """How many slices publish the job (1: one producer), from its producer hash's `slices` field."""
    raw = values.get(b"slices") if isinstance(values, dict) else values[0]
    return int(raw or 1)


def finalize_advice(keys: JobKeys, output: str) -> str:
    """The advice for a settled job whose output is not final yet."""
    return (f"every batch is settled but the output is not final yet (parts may still be staged, "
            f"_manifest.json missing): run `{finalize_command(keys, output)}`")


def finalize_command(keys: JobKeys, output: str) -> str:
    """`embedq gc` for the job: rolls committed parts forward, removes orphans, finalizes the output."""
    return shlex.join(["embedq", "gc", "--job", keys.job, *_prefix_flag(keys), "--out", output or "DIR"])


def produce_command(record: JobRecord, keys: JobKeys, *, slices: int = 1) -> str:
    """The `embedq produce` command that continues this job: its source, and as flags every setting
    the job record fixes that a plain `embedq produce` might not repeat (a resumed producer must
    match them all, or it is refused). Redis comes from `--redis` or `EMBEDQ_REDIS_URL`, as before.
    A job published in `slices` slices gets `--slice K/N`, K to fill in for each slice."""
    spec = record.source_spec
    args = ["embedq", "produce", _source_path(record), "--job", record.job, *_prefix_flag(keys)]
    for name, flag, default in _SOURCE_FLAGS:
        value = spec.get(name, default)
        if value is not None and value != default:
            args += [flag, str(value)]
    if not _is_default_model(record.model_path):
        args += ["--model", record.model_path]
    # The model's own defaults for these are not in the record: state them, so the command is exact.
    args += ["--pooling", record.pooling, "--normalize" if record.normalize else "--no-normalize",
             "--max-seq-len", str(record.max_seq_len)]
    # No prompt is stated too (--prompt ''): a plain produce would apply the model's default prompt.
    args += ["--prompt", record.prompt or ""]
    if record.output_dtype != "float32":
        args += ["--output-dtype", record.output_dtype]
    if record.truncate_dim is not None:
        args += ["--truncate-dim", str(record.truncate_dim)]
    if record.chunk_tokens:
        args += ["--chunk", str(record.chunk_tokens), "--overlap", str(record.chunk_overlap)]
    if record.batch_size != Settings.batch_size:
        args += ["--batch-size", str(record.batch_size)]
    if record.max_doc_bytes != Settings.max_doc_bytes:
        args += ["--max-doc-bytes", str(record.max_doc_bytes)]
    args += [flag for flag, on in (("--allow-empty", record.allow_empty), ("--pretokenize", record.pretokenized),
                                   ("--allow-duplicate-ids", record.allow_duplicate_ids)) if on]
    if slices > 1:
        args += ["--slice", f"K/{slices}"]
    command = shlex.join(args)
    if record.max_message_bytes != Settings.max_message_bytes:  # a setting without a flag
        command = f"EMBEDQ_MAX_MESSAGE_BYTES={record.max_message_bytes} {command}"
    return command


# The source flags of `embedq produce` and their defaults (`SourceSpec`'s, which the core cannot import).
_SOURCE_FLAGS = (("format", "--format", "auto"), ("id_field", "--id-field", None),
                 ("text_field", "--text-field", "text"), ("text_unit", "--text-unit", "line"))


def _source_path(record: JobRecord) -> str:
    return str(record.source_spec.get("path") or record.source)


def _prefix_flag(keys: JobKeys) -> list[str]:
    return [] if keys.prefix == Settings.key_prefix else ["--key-prefix", keys.prefix]


def _is_default_model(path: str) -> bool:
    try:
        return Path(path).resolve() == default_model_path().resolve()
    except ModelError:
        return False


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
