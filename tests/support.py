"""Building blocks of the worker and producer tests: publish documents, run a worker to completion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import redis

from embedq.engines.base import Engine, Pending
from embedq.job import JobRecord
from embedq.keys import JobKeys
from embedq.model import ModelInfo
from embedq.producer.producer import Producer, ProducerOptions
from embedq.producer.sources import SourceSpec, open_source
from embedq.protocol import Limits
from embedq.worker.output import open_output
from embedq.worker.worker import Worker, WorkerOptions, WorkerReport


def write_jsonl(path: Path, ids: Sequence[Any], texts: Sequence[str]) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for doc_id, text in zip(ids, texts, strict=True):
            handle.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    return path


def produce(client: redis.Redis, keys: JobKeys, model: ModelInfo, source: Path, *, batch_size: int = 50,
            limits: Limits | None = None, **options: Any) -> tuple[JobRecord, Producer]:
    """Publish `source` as job `keys` (the whole source) and return the job record."""
    src = open_source(SourceSpec(str(source)))
    producer = Producer(client, keys, src, model,
                        ProducerOptions(batch_size=batch_size, limits=limits or Limits(), **options))
    producer.run()
    return producer.prepare(), producer


def run_worker(client: redis.Redis, keys: JobKeys, record: JobRecord, model: ModelInfo, engine: Engine,
               out: Path, **options: Any) -> WorkerReport:
    """Run one worker until the job is complete (or `idle_exit_seconds` pass with nothing to do)."""
    defaults: dict[str, Any] = {"window_docs": 200, "lease_seconds": 5.0, "idle_exit_seconds": 20.0}
    defaults.update(options)
    worker = Worker(client, keys, record, model, engine, open_output(out), WorkerOptions(**defaults))
    return worker.run(install_signals=False)


def run_workers(n: int, *args: Any, **options: Any) -> list[WorkerReport]:
    """`n` workers on one job in threads (sharing one engine: calls are serialized by a lock)."""
    reports: list[WorkerReport] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            reports.append(run_worker(*args, **options))
        except BaseException as exc:  # pragma: no cover - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    if errors:
        raise errors[0]
    return reports


class SerializedEngine:
    """The real engine behind a lock, so several workers in one process can share it."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self.name = engine.name
        self.config = engine.config

    @property
    def dim(self) -> int:
        return self._engine.dim

    @property
    def profiles(self):  # type: ignore[no-untyped-def]
        return self._engine.profiles

    def __enter__(self) -> SerializedEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def submit(self, input_ids: np.ndarray, lengths: np.ndarray) -> Pending:
        with self._lock:
            result = self._engine.submit(input_ids, lengths).result()
        return _Done(result)


class FaultyEngine(SerializedEngine):
    """The real engine, with a fault injected for batches holding a given token id (a poison document)."""

    def __init__(self, engine: Engine, poison_token: int, fault: Callable[[np.ndarray], np.ndarray] | None = None):
        super().__init__(engine)
        self.poison_token = poison_token
        self.fault = fault  # None: raise; else transform the result rows of poisoned documents

    def submit(self, input_ids: np.ndarray, lengths: np.ndarray) -> Pending:
        poisoned = (input_ids == self.poison_token).any(axis=1)
        if poisoned.any() and self.fault is None:
            raise RuntimeError(f"injected failure: batch holds token {self.poison_token}")
        result = super().submit(input_ids, lengths).result().copy()
        if poisoned.any() and self.fault is not None:
            result[poisoned] = self.fault(result[poisoned])
        return _Done(result)


class _Done:
    def __init__(self, value: np.ndarray) -> None:
        self._value = value

    def result(self) -> np.ndarray:
        return self._value


def read_output(out: Path) -> dict[Any, np.ndarray]:
    """Every row of every visible part, read as a glob reader would; asserts ids are unique."""
    import pyarrow.dataset as ds

    table = ds.dataset(str(out), format="parquet").to_table()
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "an id appears twice in the output"
    vectors = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
    return dict(zip(ids, vectors, strict=True))


def embedq_process(*args: str, env: dict[str, str] | None = None, log: Path | None = None
                   ) -> subprocess.Popen[bytes]:
    """Start the CLI in its own process (so a test can signal or kill it)."""
    full_env = {**os.environ, "EMBEDQ_BACKEND": "torch", "EMBEDQ_THREADS": "1", "PYTHONUNBUFFERED": "1",
                **(env or {})}
    sink = log.open("ab") if log is not None else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "embedq", *args], env=full_env, stdout=sink,
                            stderr=subprocess.STDOUT)


def wait_until(condition: Callable[[], bool], timeout: float, what: str, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def committed(client: redis.Redis, keys: JobKeys) -> int:
    return int(client.hget(keys.stats, "docs_committed") or 0)


def add_vouched(client: redis.Redis, keys: JobKeys, fields: dict[bytes, bytes], seq: int) -> str:
    """XADD an entry and record it in the job's ledger under `seq`, as embedq's own scripts do:
    for tests of what a worker does with content that a producer (of another version, say) vouched
    for. An entry added without this is refused as not embedq's (`embedq.ledger`)."""
    entry_id = client.xadd(keys.stream, fields)
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    client.hset(keys.ledger, text, seq)
    return text
