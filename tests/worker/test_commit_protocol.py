"""The commit state machine under crashes: any interleaving of workers dying between write, fsync,
settle (manifest + XACK in one atomic step) and rename, and of Redis losing the writes it had just
acknowledged (a settle, recovery's condemnations), ends, after recovery, with every document exactly
once in the output, as a glob reader sees it, and nothing left staged or set aside."""

from __future__ import annotations

import itertools
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np
import pyarrow.dataset as ds
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedq.keys import GROUP, JobKeys
from embedq.protocol import SCHEMA_VERSION, BatchMessage, Limits, encode_batch
from embedq.tokenization import TokenizedDocs
from embedq.worker.commit import Committer, PartCommit, Step, part_name, reconcile
from embedq.worker.consumer import ensure_group
from embedq.worker.output import open_output
from embedq.worker.window import DocumentRules, Entry, Window
from embedq.worker.writer import PartWriter, output_schema
from tests.lossy_redis import LossyRedis

ENTRIES = 4
DOCS_PER_ENTRY = 3
DIM = 4
RULES = DocumentRules(limits=Limits(), id_type="string")
CRASH_POINTS = ["before write", "mid write", "after fsync", "after settle", "no crash",
                "stalls after fsync",  # alive, but its lease lapses: resumes after another worker's recovery
                "settle lost, then dies",  # Redis loses the settle it acknowledged; the worker dies
                "settle lost, then renames"]  # ... and the worker, alive, renames the part: a visible orphan

attempt = st.tuples(st.sampled_from(["A", "B", "C"]),
                    st.sets(st.integers(0, ENTRIES - 1), min_size=1, max_size=ENTRIES),
                    st.sampled_from(CRASH_POINTS))


def five_tokens_each(texts: list[str]) -> TokenizedDocs:
    n = len(texts)
    return TokenizedDocs(np.full(5 * n, 7, np.int32), np.full(n, 5, np.int32), np.zeros(n, bool))


class Harness:
    """A job with ENTRIES stream entries, real Redis, a real output directory, and workers that crash."""

    def __init__(self, server: LossyRedis) -> None:
        self.server = server
        self.client = server.client()
        self.keys = JobKeys(f"prop-{uuid.uuid4().hex[:10]}")
        self.dir = Path(tempfile.mkdtemp(prefix="embedq-prop-"))
        self.output = open_output(self.dir)
        self.writer = PartWriter(self.output, output_schema("string", DIM))
        ensure_group(self.client, self.keys)
        self.entry_ids: list[str] = []
        self.messages: dict[str, BatchMessage] = {}
        for seq in range(ENTRIES):
            ids = [f"doc-{seq}-{i}" for i in range(DOCS_PER_ENTRY)]
            message = BatchMessage(v=SCHEMA_VERSION, job=self.keys.job, seq=seq, pos=seq * DOCS_PER_ENTRY,
                                   ids=ids, texts=ids)
            entry = self.client.xadd(self.keys.stream, {b"m": encode_batch(message)}).decode()
            self.entry_ids.append(entry)
            self.messages[entry] = message
        self.client.hset(self.keys.producer, "done", 1)
        self.client.xreadgroup(GROUP, "first-reader", {self.keys.stream: ">"}, count=ENTRIES)
        self.counter = itertools.count(1)
        self.stalled: list = []  # commit generators of workers paused after staging their part

    def run(self, worker: str, entries: list[str], crash: str) -> None:
        """A worker takes `entries` over (as XAUTOCLAIM would) and commits them, crashing at `crash`."""
        self.client.xclaim(self.keys.stream, GROUP, worker, 0, entries, justid=True)
        if crash == "before write":
            return
        if crash == "mid write":
            name = part_name(next(self.counter), worker)
            self.output.staging(name).write_bytes(b"PAR1 half a part")
            return
        stop_after = {"after fsync": Step.STAGED, "stalls after fsync": Step.STAGED, "after settle": Step.SETTLED,
                      "settle lost, then dies": Step.SETTLED, "no crash": None}.get(crash)
        lossy = crash.startswith("settle lost")
        committer = Committer(self.client, self.keys, worker)
        window = Window(entries=[Entry(e, self.messages[e], 1) for e in entries])
        window.tokenize(five_tokens_each, RULES, worker)
        window.docs.embeddings = np.ones((len(window), DIM), np.float32)
        steps = PartCommit(window, self.writer, committer, lambda: part_name(next(self.counter), worker)).steps()
        for step in steps:
            if lossy and step is Step.STAGED:
                self.server.mark()  # what follows, the settle, is what Redis will lose
            if lossy and step is Step.SETTLED:
                self.server.lose_writes()
            if step is stop_after:
                if crash == "stalls after fsync":
                    self.stalled.append(steps)
                return  # the process dies (or stalls) here: nothing after this step happens now

    def recover(self, *, condemnations_lost: bool) -> None:
        """What happens after the crashes: a new worker starts (its recovery takes every worker whose
        lease lapsed for dead; Redis may then lose the condemnations it wrote), the stalled workers
        wake up and finish their commits, a live worker reclaims what is pending, then the job
        finishes and its output is finalized."""
        if condemnations_lost:
            self.server.mark()
        reconcile(self.client, self.keys, self.output, live_workers=set())
        if condemnations_lost:
            self.server.lose_writes()
        for steps in self.stalled:
            for _ in steps:
                pass
        pending = self.client.xpending_range(self.keys.stream, GROUP, "-", "+", 100)
        left = [p["message_id"].decode() for p in pending]
        if left:
            self.run("recovery", left, "no crash")
        reconcile(self.client, self.keys, self.output, live_workers=set(), finished=True, grace=0.0)

    def close(self) -> None:
        for key in self.client.scan_iter(match=f"*{{{self.keys.job}}}*"):
            self.client.delete(key)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def lossy_redis() -> Iterator[LossyRedis]:
    """One private Redis for every example (each makes its own job); it loses writes on demand. Its
    AOF lives in memory where there is a tmpfs: it fsyncs every write, and a disk makes that slow."""
    shm = Path("/dev/shm")
    directory = Path(tempfile.mkdtemp(prefix="embedq-lossy-", dir=shm if shm.is_dir() else None))
    try:
        with LossyRedis(directory) as server:
            yield server
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@given(attempts=st.lists(attempt, min_size=1, max_size=6), condemnations_lost=st.booleans())
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_interleaving_of_crashes_and_lost_redis_writes_ends_exactly_once_after_recovery(
        lossy_redis: LossyRedis, attempts: list[tuple[str, set[int], str]], condemnations_lost: bool) -> None:
    harness = Harness(lossy_redis)
    try:
        for worker, entry_indexes, crash in attempts:
            harness.run(worker, [harness.entry_ids[i] for i in sorted(entry_indexes)], crash)
        harness.recover(condemnations_lost=condemnations_lost)
        expected = sorted(f"doc-{s}-{i}" for s in range(ENTRIES) for i in range(DOCS_PER_ENTRY))
        # A glob reader (what DuckDB or polars run) and pyarrow.dataset over the directory:
        by_glob = ds.dataset(sorted(str(p) for p in harness.dir.glob("*.parquet")), format="parquet").to_table()
        assert sorted(by_glob.column("id").to_pylist()) == expected
        by_dir = ds.dataset(str(harness.dir), format="parquet").to_table()
        assert sorted(by_dir.column("id").to_pylist()) == expected
        # The manifest lists exactly the visible parts; nothing is left staged or pending.
        manifest = {k.decode() for k in harness.client.hkeys(harness.keys.manifest)}
        assert manifest == harness.output.part_names()
        assert harness.output.staged_names() == set() and harness.output.set_aside_names() == set()
        assert harness.client.xlen(harness.keys.stream) == 0
        assert harness.client.xpending(harness.keys.stream, GROUP)["pending"] == 0
        entries_in_manifest = [e for raw in harness.client.hvals(harness.keys.manifest)
                               for e in msgspec.json.decode(raw)["entries"]]
        assert sorted(entries_in_manifest) == sorted(harness.entry_ids)
    finally:
        harness.close()
