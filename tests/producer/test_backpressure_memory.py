"""Backpressure bounds Redis memory: a corpus 20+ times the backlog goes through a Redis whose memory
stays at the backlog's size, while the same corpus without the bound fills Redis with all of it.

Each run gets its own redis-server, so `used_memory_peak` covers that run alone. The producer is the
real CLI in its own process; the worker runs in this process with a small random BERT (what is
measured is Redis, not the embeddings), and a thread samples `INFO memory` and XLEN every few ms.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import redis

from embedq import job as job_record
from embedq.connection import RedisServer
from embedq.engines.base import Engine
from embedq.keys import JobKeys
from embedq.model import ModelInfo, load_model_info
from embedq.protocol import PAYLOAD_FIELD
from embedq.verify import verify_job
from tests.support import run_worker, wait_until, write_jsonl

BATCH = 50  # documents per message
BACKLOG = 8  # messages: the bound under test
N_DOCS = 8_500  # real passages, ~616 bytes each: 170 messages, 21 times the bound
MAX_SEQ_LEN = 16  # the worker's cost, not Redis's: messages carry whole texts whatever this is
UNBOUNDED = 1_000_000


@dataclass
class Memory:
    """What one run did to its Redis."""

    baseline: int = 0  # used_memory before the job
    peak: int = 0  # max of the server's used_memory_peak and of every sample
    max_xlen: int = 0
    samples: int = 0

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


@pytest.fixture(scope="module")
def corpus(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = pq.read_table(corpus_dir / "passages.parquet", columns=["text"]).column("text").to_pylist()[:N_DOCS]
    assert len(texts) == N_DOCS
    return write_jsonl(tmp_path_factory.mktemp("passages") / "passages.jsonl", list(range(N_DOCS)), texts)


@pytest.fixture(scope="module")
def tiny(tiny_model: Path) -> ModelInfo:
    return load_model_info(tiny_model, max_seq_len=MAX_SEQ_LEN)


@pytest.fixture(scope="module")
def tiny_engine(tiny: ModelInfo) -> Iterator[Engine]:
    from embedq.engines import create_engine
    from embedq.engines.base import EngineConfig
    from embedq.engines.profiles import profile_table

    engine = create_engine("torch", EngineConfig(model=tiny, profiles=profile_table(MAX_SEQ_LEN, 4096),
                                                 device="cpu", precision="fp32", threads=2))
    with engine:
        yield engine


@contextmanager
def measured(client: redis.Redis, keys: JobKeys) -> Iterator[Memory]:
    """Sample used_memory and XLEN in a thread while the block runs; the peak includes Redis's own."""
    memory = Memory(baseline=int(client.info("memory")["used_memory"]))
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            pipe = client.pipeline(transaction=False)
            pipe.info("memory")
            pipe.xlen(keys.stream)
            info, xlen = pipe.execute()
            memory.peak = max(memory.peak, int(info["used_memory"]))
            memory.max_xlen = max(memory.max_xlen, int(xlen))
            memory.samples += 1
            time.sleep(0.003)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield memory
    finally:
        done.set()
        thread.join(timeout=5)
        memory.peak = max(memory.peak, int(client.info("memory")["used_memory_peak"]))


def producer(corpus: Path, job: str, url: str, tiny_model: Path, backlog: int, log: Path) -> subprocess.Popen[bytes]:
    """`embedq produce` as a user runs it, in its own process."""
    args = ["produce", str(corpus), "--job", job, "--batch-size", str(BATCH), "--backlog", str(backlog),
            "--model", str(tiny_model), "--max-seq-len", str(MAX_SEQ_LEN), "--redis", url]
    with log.open("ab") as sink:
        return subprocess.Popen([sys.executable, "-m", "embedq", *args], stdout=sink, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_redis_memory_stays_at_the_backlog_bound_for_a_corpus_21_times_larger(
        corpus: Path, tiny: ModelInfo, tiny_engine: Engine, tiny_model: Path, tmp_path: Path) -> None:
    keys = JobKeys("memory")
    messages = -(-N_DOCS // BATCH)
    assert messages >= 20 * BACKLOG

    # Without a bound: the producer publishes everything before any worker runs.
    with RedisServer(extra_args=("--hz", "100")) as server:
        client = redis.Redis.from_url(server.url)
        with measured(client, keys) as unbounded:
            assert producer(corpus, keys.job, server.url, tiny_model, UNBOUNDED, tmp_path / "p0.log").wait(120) == 0
        entries: Any = client.xrange(keys.stream)
        payloads = [len(fields[PAYLOAD_FIELD]) for _, fields in entries]
    assert len(payloads) == messages == unbounded.max_xlen
    corpus_bytes, largest = sum(payloads), max(payloads)

    # With the bound: producer and worker together; the producer waits whenever BACKLOG messages are unsettled.
    out = tmp_path / "out"
    with RedisServer(extra_args=("--hz", "100")) as server:
        client = redis.Redis.from_url(server.url)
        with measured(client, keys) as bounded:
            publishing = producer(corpus, keys.job, server.url, tiny_model, BACKLOG, tmp_path / "p1.log")
            wait_until(lambda: job_record.load(client, keys) is not None, 60, "the job record")
            record = job_record.load(client, keys)
            assert record is not None
            started = time.monotonic()
            report = run_worker(client, keys, record, tiny, tiny_engine, out, window_docs=2 * BATCH)  # settles often
            seconds = time.monotonic() - started
            assert publishing.wait(timeout=60) == 0, (tmp_path / "p1.log").read_text()[-2000:]
        result = verify_job(client, keys, str(out))
        added = int(client.xinfo_stream(keys.stream)["entries-added"])

    # Every document arrived exactly once: the producer waited, it never trimmed.
    assert report.job_complete and result.ok and result.output_rows == N_DOCS, result.render()
    assert 0 < bounded.max_xlen <= BACKLOG
    assert added == messages  # each batch added once, each settled (acknowledged and deleted) by the worker
    # Redis holds the stream (at most BACKLOG messages), as much again in replies on their way to the
    # worker, the message being published (query buffer, arguments, the script's copy: under
    # BACKLOG x largest for BACKLOG >= 3), and a constant: clients, scripts, counters, the manifest
    # (~250 bytes a part) and ~160 KiB Redis keeps after a stream of such entries is emptied.
    bound = 3 * BACKLOG * largest + (512 << 10)
    print(f"\nbackpressure: corpus {N_DOCS:,} documents in {messages} messages of {BATCH} "
          f"({corpus_bytes / 2**20:.2f} MiB of payload, largest message {largest / 2**10:.0f} KiB); "
          f"bound {BACKLOG} messages ({BACKLOG * largest / 2**10:.0f} KiB at most), corpus/bound = "
          f"{messages / BACKLOG:.0f}x\n"
          f"  unbounded: peak used_memory {unbounded.peak / 2**20:.2f} MiB "
          f"(+{unbounded.growth / 2**20:.2f} MiB over a {unbounded.baseline / 2**20:.2f} MiB empty Redis), "
          f"max XLEN {unbounded.max_xlen}\n"
          f"  bounded:   peak used_memory {bounded.peak / 2**20:.2f} MiB "
          f"(+{bounded.growth / 2**20:.2f} MiB), max XLEN {bounded.max_xlen}, {bounded.samples} samples, "
          f"allowed +{bound / 2**20:.2f} MiB; worker {seconds:.1f} s, {N_DOCS / seconds:,.0f} docs/s")
    assert bounded.growth <= bound
    assert unbounded.growth >= corpus_bytes  # without the bound the whole corpus sits in Redis
    assert unbounded.growth > 4 * bounded.growth
