"""The commit state machine under crashes: any interleaving of workers dying between write, fsync,
settle (manifest + XACK in one atomic step) and rename ends, after recovery, with every document
exactly once in the output, as a glob reader sees it."""

from __future__ import annotations

import itertools
import shutil
import tempfile
import uuid
from pathlib import Path

import msgspec
import numpy as np
import pyarrow.dataset as ds
import redis
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
from tests.conftest import REDIS_URL

ENTRIES = 4
DOCS_PER_ENTRY = 3
DIM = 4
RULES = DocumentRules(limits=Limits(), id_type="string")
CRASH_POINTS = ["before write", "mid write", "after fsync", "after settle", "no crash",
                "stalls after fsync"]  # alive, but its lease lapses: resumes after another worker's recovery

attempt = st.tuples(st.sampled_from(["A", "B", "C"]),
                    st.sets(st.integers(0, ENTRIES - 1), min_size=1, max_size=ENTRIES),
                    st.sampled_from(CRASH_POINTS))


def five_tokens_each(texts: list[str]) -> TokenizedDocs:
    n = len(texts)
    return TokenizedDocs(np.full(5 * n, 7, np.int32), np.full(n, 5, np.int32), np.zeros(n, bool))


class Harness:
    """A job with ENTRIES stream entries, real Redis, a real output directory, and workers that crash."""

    def __init__(self) -> None:
        self.client = redis.Redis.from_url(REDIS_URL)
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
                      "no crash": None}[crash]
        committer = Committer(self.client, self.keys, worker)
        window = Window(entries=[Entry(e, self.messages[e], 1) for e in entries])
        window.tokenize(five_tokens_each, RULES, worker)
        window.docs.embeddings = np.ones((len(window), DIM), np.float32)
        steps = PartCommit(window, self.writer, committer, lambda: part_name(next(self.counter), worker)).steps()
        for step in steps:
            if step is stop_after:
                if crash == "stalls after fsync":
                    self.stalled.append(steps)
                return  # the process dies (or stalls) here: nothing after this step happens now

    def recover(self) -> None:
        """What happens after the crashes: a new worker starts (its recovery takes every worker whose
        lease lapsed for dead), the stalled workers wake up and finish their commits, a live worker
        reclaims what is pending, then the job finishes."""
        reconcile(self.client, self.keys, self.output, live_workers=set())
        for steps in self.stalled:
            for _ in steps:
                pass
        pending = self.client.xpending_range(self.keys.stream, GROUP, "-", "+", 100)
        left = [p["message_id"].decode() for p in pending]
        if left:
            self.run("recovery", left, "no crash")
        reconcile(self.client, self.keys, self.output, live_workers=set(), finished=True)

    def close(self) -> None:
        for key in self.client.scan_iter(match=f"*{{{self.keys.job}}}*"):
            self.client.delete(key)
        shutil.rmtree(self.dir, ignore_errors=True)


@given(attempts=st.lists(attempt, min_size=1, max_size=6))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_interleaving_of_crashes_ends_exactly_once_after_recovery(
        redis_url: str, attempts: list[tuple[str, set[int], str]]) -> None:
    harness = Harness()
    try:
        for worker, entry_indexes, crash in attempts:
            harness.run(worker, [harness.entry_ids[i] for i in sorted(entry_indexes)], crash)
        harness.recover()
        expected = sorted(f"doc-{s}-{i}" for s in range(ENTRIES) for i in range(DOCS_PER_ENTRY))
        # A glob reader (what DuckDB or polars run) and pyarrow.dataset over the directory:
        by_glob = ds.dataset(sorted(str(p) for p in harness.dir.glob("*.parquet")), format="parquet").to_table()
        assert sorted(by_glob.column("id").to_pylist()) == expected
        by_dir = ds.dataset(str(harness.dir), format="parquet").to_table()
        assert sorted(by_dir.column("id").to_pylist()) == expected
        # The manifest lists exactly the visible parts; nothing is left staged or pending.
        manifest = {k.decode() for k in harness.client.hkeys(harness.keys.manifest)}
        assert manifest == harness.output.part_names()
        assert harness.output.staged_names() == set()
        assert harness.client.xlen(harness.keys.stream) == 0
        assert harness.client.xpending(harness.keys.stream, GROUP)["pending"] == 0
        entries_in_manifest = [e for raw in harness.client.hvals(harness.keys.manifest)
                               for e in msgspec.json.decode(raw)["entries"]]
        assert sorted(entries_in_manifest) == sorted(harness.entry_ids)
    finally:
        harness.close()
