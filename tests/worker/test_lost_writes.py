"""Redis losing writes it acknowledged (AOF `everysec`, a failover) at the moments that matter for the
output: right after recovery condemned a stalled worker's part, and between a settle and its rename.
Nothing is lost, no glob reader sees an id twice, and what was set aside goes once the job is final.

A private `LossyRedis` loses exactly the writes acknowledged after its `mark()` (SIGKILL, AOF cut
back); the workers are real, in this process, with the small random BERT.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import redis

from embedq.engines.base import Engine
from embedq.errors import OutputError
from embedq.job import JobRecord, job_complete, live_workers
from embedq.keys import JobKeys
from embedq.model import ModelInfo
from embedq.verify import verify_job
from embedq.worker.commit import Settlement, SettleResult, manifest_entries, reconcile
from embedq.worker.output import OutputDir, open_output
from embedq.worker.worker import Worker, WorkerOptions
from tests.lossy_redis import LossyRedis
from tests.support import produce, read_output, run_worker, write_jsonl

N_DOCS = 100


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LossyRedis]:
    with LossyRedis(tmp_path / "redis") as lossy:
        yield lossy


def publish_job(client: redis.Redis, tiny: ModelInfo, tmp_path: Path, texts: list[str]) -> tuple[JobKeys, JobRecord]:
    keys = JobKeys("lost-writes")
    source = write_jsonl(tmp_path / "docs.jsonl", [f"d{i}" for i in range(N_DOCS)], texts[:N_DOCS])
    record, _ = produce(client, keys, tiny, source, batch_size=25)
    return keys, record


def one_window_worker(client: redis.Redis, keys: JobKeys, record: JobRecord, tiny: ModelInfo, engine: Engine,
                      output: OutputDir) -> Worker:
    """A worker with windows up to the whole job (the first is one batch), and a short lease."""
    return Worker(client, keys, record, tiny, engine, output, WorkerOptions(window_docs=N_DOCS, lease_seconds=5,
                                                                            idle_exit_seconds=3.0))


def finish_job(client: redis.Redis, keys: JobKeys, record: JobRecord, tiny: ModelInfo, engine: Engine,
               out: Path) -> None:
    """Another worker starts (recovery first), takes over what is pending, and finalizes the job."""
    report = run_worker(client, keys, record, tiny, engine, out, lease_seconds=2.0, idle_exit_seconds=30.0)
    assert report.job_complete and job_complete(client, keys)


def assert_every_id_once(client: redis.Redis, keys: JobKeys, out: Path) -> None:
    """What a user reads (pyarrow.dataset, a DuckDB glob) and what verify says; nothing left aside."""
    import duckdb

    assert sorted(read_output(out)) == sorted(f"d{i}" for i in range(N_DOCS))
    rows = duckdb.execute(f"select count(*), count(distinct id) from '{out}/*.parquet'").fetchall()[0]
    assert rows == (N_DOCS, N_DOCS)
    result = verify_job(client, keys, str(out))
    assert result.ok and result.output_rows == N_DOCS, result.render()
    output = open_output(out)
    assert output.set_aside_names() == set() and output.staged_names() == set()
    assert set(manifest_entries(client, keys)) == output.part_names()


@pytest.mark.parametrize("writer", ["publishes it", "dies before publishing it"])
def test_a_condemnation_redis_loses_cannot_lose_the_documents_the_stalled_worker_then_commits(
        server: LossyRedis, tiny: ModelInfo, tiny_engine: Engine, tmp_path: Path, gloss_texts: list[str],
        monkeypatch: pytest.MonkeyPatch, writer: str) -> None:
    """Issue 23, item 1, as reproduced: a worker stalls with a staged part; its lease lapses and
    recovery (a worker starting, `embedq gc`) condemns the part and sets it aside; Redis comes back
    without that condemnation; the worker wakes, and its settle succeeds (manifest, XACK, XDEL). Its
    publish then takes the set-aside file; if it dies first, the next worker's recovery does."""
    client = server.client()
    keys, record = publish_job(client, tiny, tmp_path, gloss_texts)
    out = open_output(tmp_path / "out")
    first = one_window_worker(client, keys, record, tiny, tiny_engine, out)
    settle = first.committer.settle
    seen: dict[str, Any] = {}

    def stall_then_settle(settlement: Settlement) -> SettleResult:
        first.committer.settle = settle
        assert settlement.part is not None
        name = seen["part"] = settlement.part.name
        server.mark()
        taken_for_dead = set(live_workers(client, keys)) - {first.id}  # its lease lapsed while it stalled
        recovery = reconcile(client, keys, out, live_workers=taken_for_dead)
        # The worker's other commit thread may have staged the next window's part too: set aside with it.
        seen["set aside"] = name in recovery.staged_set_aside and out.set_aside(name).exists()
        seen["condemned"] = bool(client.sismember(keys.condemned, name))
        server.lose_writes()  # SIGKILL, and the AOF loses the condemnation
        seen["condemnation lost"] = not client.sismember(keys.condemned, name)
        if writer == "dies before publishing it":
            monkeypatch.setattr(OutputDir, "publish", dies_instead_of_publishing)
        return settle(settlement)  # the stalled worker wakes up

    first.committer.settle = stall_then_settle
    if writer == "publishes it":
        first.run(install_signals=False)
    else:
        with pytest.raises(OutputError, match="died before its rename"):
            first.run(install_signals=False)
        monkeypatch.undo()
        assert out.set_aside(seen["part"]).exists() and not out.final(seen["part"]).exists()
    assert seen["set aside"] and seen["condemned"] and seen["condemnation lost"], seen
    assert seen["part"] in manifest_entries(client, keys), "the settle succeeded: its documents are acknowledged"
    finish_job(client, keys, record, tiny, tiny_engine, out.path)
    assert out.final(seen["part"]).exists()
    assert_every_id_once(client, keys, out.path)


def dies_instead_of_publishing(self: OutputDir, name: str) -> None:
    raise OutputError(f"(test) the worker died before its rename of {name}")


def lose_the_first_settle(server: LossyRedis, worker: Worker, then: Callable[[], None] = lambda: None) -> list[str]:
    """Make Redis lose the worker's first settle right after acknowledging it (manifest entry, XACK
    and XDEL together: its batches are pending again); returns [the part's name] once it happened."""
    settle = worker.committer.settle
    lost: list[str] = []

    def settle_then_lose_it(settlement: Settlement) -> SettleResult:
        worker.committer.settle = settle
        server.mark()
        result = settle(settlement)
        server.lose_writes()
        assert settlement.part is not None
        lost.append(settlement.part.name)
        then()
        return result

    worker.committer.settle = settle_then_lose_it
    return lost


def test_a_settle_redis_loses_after_the_worker_renamed_its_part_is_redone_and_the_orphan_goes(
        server: LossyRedis, tiny: ModelInfo, tiny_engine: Engine, tmp_path: Path, gloss_texts: list[str]) -> None:
    """Redis loses a settle (manifest entry + XACK + XDEL together) after acknowledging it; the worker
    has renamed its part: a visible part the manifest does not list, whose batches are pending again.
    They are embedded again; the orphan is set aside and, once the job is final, deleted."""
    client = server.client()
    keys, record = publish_job(client, tiny, tmp_path, gloss_texts)
    out = open_output(tmp_path / "out")
    first = one_window_worker(client, keys, record, tiny, tiny_engine, out)
    lost = lose_the_first_settle(server, first)
    first.run(install_signals=False)
    assert lost and lost[0] not in manifest_entries(client, keys)
    finish_job(client, keys, record, tiny, tiny_engine, out.path)
    assert not out.final(lost[0]).exists()
    assert_every_id_once(client, keys, out.path)


class GlobReader(threading.Thread):
    """Reads the directory as a user's glob does, over and over: every snapshot of the visible parts
    whose files could all be read is checked for an id seen twice."""

    def __init__(self, out: Path) -> None:
        super().__init__(daemon=True)
        self.out = out
        self.stop = threading.Event()
        self.snapshots = 0
        self.duplicated: list[list[str]] = []

    def run(self) -> None:
        while not self.stop.is_set():
            files = sorted(self.out.glob("*.parquet"))
            try:
                ids = [i for f in files for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()]
            except OSError:  # set aside (or deleted) between the listing and the read: look again
                continue
            self.snapshots += 1
            if len(ids) != len(set(ids)):
                self.duplicated.append([f.name for f in files])


def test_a_visible_orphan_is_set_aside_at_once_and_a_glob_reader_never_sees_an_id_twice(
        server: LossyRedis, tiny: ModelInfo, tiny_engine: Engine, tmp_path: Path, gloss_texts: list[str]) -> None:
    client = server.client()
    keys, record = publish_job(client, tiny, tmp_path, gloss_texts)
    out = open_output(tmp_path / "out")
    first = one_window_worker(client, keys, record, tiny, tiny_engine, out)
    orphans = lose_the_first_settle(server, first, then=first.stop)  # it renames the part, then leaves
    first.run(install_signals=False)
    assert out.final(orphans[0]).exists() and orphans[0] not in manifest_entries(client, keys)
    assert not job_complete(client, keys), "its batches are pending again"

    reader = GlobReader(out.path)
    reader.start()
    try:
        # The next worker's recovery sets the orphan aside before it commits anything.
        finish_job(client, keys, record, tiny, tiny_engine, out.path)
    finally:
        reader.stop.set()
        reader.join(timeout=30)
    assert reader.snapshots > 0 and reader.duplicated == []
    assert_every_id_once(client, keys, out.path)


def test_recovery_sets_a_visible_orphan_aside_under_a_name_no_reader_reads(
        redis_client: redis.Redis, job_name: str, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.dataset as ds

    out = open_output(tmp_path / "out")
    pq.write_table(pa.table({"id": ["a", "b"]}), out.final("part-000001-ghost_1_aaaaaa"))
    result = reconcile(redis_client, JobKeys(job_name), out, live_workers=set())
    assert result.orphans_set_aside == ["part-000001-ghost_1_aaaaaa"]
    aside = out.set_aside("part-000001-ghost_1_aaaaaa")
    assert aside.exists() and aside.name == ".part-000001-ghost_1_aaaaaa.parquet.set-aside"
    assert list(out.path.glob("*.parquet")) == list(out.path.glob("**/*.parquet")) == []
    assert ds.dataset(str(out.path), format="parquet").to_table().num_rows == 0
