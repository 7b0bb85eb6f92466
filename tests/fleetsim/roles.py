"""The processes of a simulated fleet: the real producer, real workers on simulated devices, and
protocol-only workers. Each runs as `python -m tests.fleetsim.roles SPEC_JSON`, sets itself up,
reports ready in Redis and waits for the orchestrator's go, so that start-up is never timed.

A protocol-only worker does per window what a worker asks of Redis and nothing else: XREADGROUP,
the ledger read, the working set (added and removed twice: tokenizing, then embedding), decoding
and validating every message, and the settle script with a manifest entry; no tokenizer, no
device, no Parquet. A few of them push Redis to its limit on a machine with few cores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from embedq.engines.base import Profile
from embedq.job import JobRecord, job_settled, load
from embedq.keys import JobKeys
from embedq.model import ModelInfo, default_model_path, load_model_info
from embedq.protocol import decode_batch
from embedq.worker.commit import Committer, Settlement, part_name
from embedq.worker.consumer import Delivery, StreamConsumer, ensure_group
from embedq.worker.lease import WorkingSet
from embedq.worker.options import WorkerOptions
from embedq.worker.worker import new_worker_id
from embedq.worker.writer import StagedPart

PRODUCER, WORKER, PROTOCOL = "producer", "worker", "protocol"


@dataclass(frozen=True)
class RoleSpec:
    """What one process of the fleet is and what it needs; travels as JSON on its command line."""

    role: str
    redis_url: str
    job: str
    ready_key: str  # INCR when set up
    go_key: str  # BLPOP before starting
    source: str = ""  # producer: the source path
    tokenizer_processes: int = 0  # producer: >0 pretokenizes with a pool of this size
    slice_index: int = 0  # producer: which slice of the source it publishes (`--slice K/N`)
    slice_count: int = 1
    compress: bool = False  # producer: zstd on each message (`embedq produce --compress`)
    batch_size: int = 512
    backlog: int = 512
    rate: float = 0.0  # worker: the simulated device's padded tokens/s
    profiles: list[tuple[int, int]] = field(default_factory=list)  # worker: (max_seq_len, max_batch)
    output: str = ""  # worker: the output directory
    window_docs: int = 16384

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RoleSpec:
        raw = json.loads(text)
        raw["profiles"] = [tuple(p) for p in raw["profiles"]]
        return cls(**raw)


def command(spec: RoleSpec) -> list[str]:
    """The command line that starts the process for `spec`."""
    return [sys.executable, "-m", "tests.fleetsim.roles", spec.to_json()]


def main(argv: list[str]) -> None:
    spec = RoleSpec.from_json(argv[0])
    client = redis.Redis.from_url(spec.redis_url)
    keys = JobKeys(spec.job)
    model = load_model_info(default_model_path())
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if spec.role == PRODUCER:
        run_producer(spec, client, keys, model, stop)
    elif spec.role == WORKER:
        run_worker(spec, client, keys, model)
    elif spec.role == PROTOCOL:
        run_protocol(spec, client, keys, model, stop)
    else:
        raise SystemExit(f"unknown role {spec.role!r}")


def _record(client: redis.Redis, keys: JobKeys, timeout: float = 120.0) -> JobRecord:
    """The job's record, once the producer has scanned the source and created it."""
    deadline = time.monotonic() + timeout
    while (record := load(client, keys)) is None:
        if time.monotonic() > deadline:
            raise SystemExit(f"job {keys.job} was not created within {timeout:.0f} s")
        time.sleep(0.05)
    return record


def _ready_then_wait(spec: RoleSpec, client: redis.Redis) -> None:
    client.incr(spec.ready_key)
    while not client.blpop([spec.go_key], timeout=1):  # redis-py's reads time out after 5 s
        pass


def run_producer(spec: RoleSpec, client: redis.Redis, keys: JobKeys, model: ModelInfo, stop: threading.Event) -> None:
    """The real producer (its pool, if it pretokenizes), publishing the whole source once."""
    from embedq.producer.producer import Producer, ProducerOptions
    from embedq.producer.slices import Slice
    from embedq.producer.sources import SourceSpec, open_source
    from embedq.tokenization import TokenizerPool

    with contextlib.ExitStack() as stack:
        pool = None
        if spec.tokenizer_processes > 0:
            pool = stack.enter_context(TokenizerPool(model.tokenizer_file, model.max_seq_len,
                                                     spec.tokenizer_processes))
        source = stack.enter_context(open_source(SourceSpec(spec.source)))
        producer = Producer(client, keys, source, model,
                            ProducerOptions(batch_size=spec.batch_size, backlog=spec.backlog,
                                            part=Slice(spec.slice_index, spec.slice_count), compress=spec.compress),
                            tokenizer=pool, stopping=stop.is_set)
        producer.prepare()  # scans the source again and checks the orchestrator's record
        _ready_then_wait(spec, client)
        producer.run()


def run_worker(spec: RoleSpec, client: redis.Redis, keys: JobKeys, model: ModelInfo) -> None:
    """The real worker on a simulated device; SIGTERM drains it as it does in production."""
    from tests.hostbench import simulated_worker

    record = _record(client, keys)
    profiles = [Profile(seq, batch) for seq, batch in spec.profiles]
    options = WorkerOptions(window_docs=spec.window_docs, lease_seconds=60)
    with simulated_worker(client, keys, record, model, profiles, spec.rate, Path(spec.output), options) as worker:
        _ready_then_wait(spec, client)
        worker.run(install_signals=True)


def run_protocol(spec: RoleSpec, client: redis.Redis, keys: JobKeys, model: ModelInfo,
                 stop: threading.Event) -> None:
    """Read, validate and settle windows as a worker does, with no embedding and no part file."""
    record = _record(client, keys)
    worker = new_worker_id()
    consumer = StreamConsumer(client, keys, worker, 60_000)
    committer = Committer(client, keys, worker)
    working = WorkingSet(client, keys, worker, lambda call, what: call())
    ensure_group(client, keys)
    parts = itertools.count(1)
    per_read = max(1, spec.window_docs // record.batch_size)
    _ready_then_wait(spec, client)
    while not stop.is_set():
        deliveries = consumer.read_new(per_read, 200)
        if not deliveries:
            if job_settled(client, keys):
                return
            continue
        _settle_window(client, keys, record, model, committer, working, deliveries, part_name(next(parts), worker))


def _settle_window(client: redis.Redis, keys: JobKeys, record: JobRecord, model: ModelInfo, committer: Committer,
                   working: WorkingSet, deliveries: list[Delivery], name: str) -> None:
    from embedq.ledger import read_ledger

    ids = [d.entry_id for d in deliveries]
    ledger = read_ledger(client, keys, ids)
    working.add(ids)  # the fetch thread, while it tokenizes
    messages = [decode_batch(d.raw or b"", job=keys.job, limits=record.limits) for d in deliveries]
    refused = [m.seq for d, m in zip(deliveries, messages, strict=True) if ledger.refusal(d.entry_id, m.seq)]
    if refused:
        raise RuntimeError(f"the ledger refused batches {refused}: the simulation published them wrongly")
    working.discard(ids)
    working.add(ids)  # the engine thread, while it embeds
    working.discard(ids)
    rows = sum(len(m) for m in messages)
    tokens = sum(int(m.token_docs().lengths.sum()) for m in messages) if record.pretokenized else 0
    committer.settle(Settlement(entries=ids, part=StagedPart(name, rows, rows * model.dim * 4),
                                seqs=[m.seq for m in messages], tokens=tokens))


if __name__ == "__main__":
    main(sys.argv[1:])
