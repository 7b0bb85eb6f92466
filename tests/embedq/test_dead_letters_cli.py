"""The operator's commands end to end: `dead-letter list|replay`, `gc`, `status` and `delete`.

A job is published holding documents of each dead-letter kind: empty ones and an oversized one
(set aside by the producer), a batch that "killed" every worker that took it (its delivery count
raised as dead workers would have), and, where a test asks, a duplicate id (`--allow-duplicate-ids`).
A real worker, run here on the CPU, settles the job; the commands then run as an operator runs them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from embedq import job as job_record
from embedq.deadletter import list_dead
from embedq.engines.base import Engine
from embedq.keys import GROUP, JobKeys
from embedq.model import ModelInfo
from embedq.protocol import Limits
from embedq.verify import verify_job
from embedq.worker.consumer import StreamConsumer, ensure_group
from embedq.worker.output import open_output
from embedq.worker.worker import WorkerReport
from tests.embedq.test_cli import embedq
from tests.support import produce, read_output, run_worker, write_jsonl

BATCH = 20
MAX_DOC_BYTES = 2000
# Documents 0-99 in five batches; 100, alone in the last batch, is the one that kills workers.
DOCS = [(f"n{i}", f"a normal document, number {i}") for i in range(100)]
DOCS[7] = ("empty", "")
DOCS[33] = ("blank", "  \t ")
DOCS[58] = ("huge", "x" * (MAX_DOC_BYTES + 1))
DOCS.append(("fragile", "the document every worker died on"))
FRAGILE_SEQ = 5
WITH_DUPLICATE = [*DOCS[:71], ("n3", "a second document with the id n3"), *DOCS[72:]]


@dataclass
class DeadJob:
    """A settled job with one dead letter of each kind; `dead_ids` maps a document id to its letter."""

    keys: JobKeys
    client: redis.Redis
    out: Path
    redis_url: str
    report: WorkerReport
    dead_ids: dict[str, str]

    def cli(self, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
        return embedq(*args, "--job", self.keys.job, "--redis", self.redis_url, stdin=stdin)

    def work(self, model_info: ModelInfo, engine: Engine) -> WorkerReport:
        record = job_record.require(self.client, self.keys)
        return run_worker(self.client, self.keys, record, model_info, engine, self.out)

    def output_ids(self) -> set[str]:
        return set(read_output(self.out))


def kill_workers_on(client: redis.Redis, keys: JobKeys, seq: int, deaths: int) -> None:
    """As if `deaths` workers had died while embedding batch `seq`: its delivery and crash counts are
    raised; every other batch was taken once by a worker that died merely holding it, so all are
    reclaimable at once."""
    ensure_group(client, keys)
    taken = StreamConsumer(client, keys, "dead-worker", lease_ms=0).read_new(1000, 100)
    for number, delivery in enumerate(taken):
        client.xclaim(keys.stream, GROUP, "dead-worker", 0, [delivery.entry_id], idle=10**7,
                      retrycount=deaths if number == seq else None, justid=True)
        if number == seq:
            client.hset(keys.crashes, delivery.entry_id, deaths)


def settled_job(docs: list[tuple[str, str]], client: redis.Redis, job_name: str, model_info: ModelInfo,
                engine: Engine, tmp_path: Path, redis_url: str, *, allow_duplicate_ids: bool = False) -> DeadJob:
    """Publish `docs`, let dead workers take the fragile batch, settle the job with a worker."""
    source = write_jsonl(tmp_path / "docs.jsonl", [d for d, _ in docs], [t for _, t in docs])
    keys = JobKeys(job_name)
    produce(client, keys, model_info, source, batch_size=BATCH, limits=Limits(max_doc_bytes=MAX_DOC_BYTES),
            allow_duplicate_ids=allow_duplicate_ids)
    kill_workers_on(client, keys, FRAGILE_SEQ, deaths=9)
    job = DeadJob(keys, client, tmp_path / "out", redis_url, WorkerReport(worker=""), {})
    job.report = job.work(model_info, engine)
    assert job.report.job_complete
    job.dead_ids = {str(e.letter.doc_ids[0]): e.dead_id for e in list_dead(client, keys)}
    return job


@pytest.fixture
def dead_job(redis_client, job_name: str, model_info, cpu_engine, tmp_path: Path, redis_url: str) -> DeadJob:
    return settled_job(DOCS, redis_client, job_name, model_info, cpu_engine, tmp_path, redis_url)


def test_produce_sets_unusable_documents_aside_and_says_how_many(tmp_path: Path, job_name: str,
                                                                 redis_url: str) -> None:
    source = write_jsonl(tmp_path / "docs.jsonl", [d for d, _ in WITH_DUPLICATE], [t for _, t in WITH_DUPLICATE])
    produced = embedq("produce", str(source), "--job", job_name, "--batch-size", str(BATCH), "--max-doc-bytes",
                      str(MAX_DOC_BYTES), "--allow-duplicate-ids", "--redis", redis_url)
    assert produced.returncode == 0, produced.stderr
    assert "published 101 documents in 6 batches (4 dead-lettered by the producer)" in produced.stdout
    listed = embedq("dead-letter", "list", "--job", job_name, "--redis", redis_url)
    assert [line.split("  ")[1].split(":")[0] for line in listed.stdout.splitlines() if not line.startswith(" ")] \
        == ["empty text", "empty text", "document over the size limit", "duplicate id"]


def test_dead_letter_list_shows_each_letter_with_reason_worker_and_deliveries(dead_job: DeadJob) -> None:
    listed = dead_job.cli("dead-letter", "list")
    assert listed.returncode == 0, listed.stderr
    lines = {doc: next(line for line in listed.stdout.splitlines() if line.startswith(dead_id))
             for doc, dead_id in dead_job.dead_ids.items()}
    assert set(lines) == {"empty", "blank", "huge", "fragile"}
    assert "empty text: 1 doc(s) ['empty']" in lines["empty"] and "worker=producer" in lines["empty"]
    assert "empty text: 1 doc(s) ['blank']" in lines["blank"]
    assert "document over the size limit" in lines["huge"] and lines["huge"].endswith("(not replayable)")
    assert f"worker died processing it: 1 doc(s) ['fragile'] seq={FRAGILE_SEQ} worker={dead_job.report.worker} " \
           "deliveries=10" in lines["fragile"]
    assert "9 workers died or stalled while working on this document alone" in listed.stdout
    assert f"over the limit of {MAX_DOC_BYTES}" in listed.stdout

    as_json = [json.loads(line) for line in dead_job.cli("dead-letter", "list", "--json").stdout.splitlines()]
    by_doc = {letter["doc_ids"][0]: letter for letter in as_json}
    assert by_doc["fragile"] == {**by_doc["fragile"], "reason": "worker died processing it", "deliveries": 10,
                                 "worker": dead_job.report.worker, "replayable": True, "seq": FRAGILE_SEQ,
                                 "dead_id": dead_job.dead_ids["fragile"]}
    assert by_doc["huge"]["replayable"] is False and by_doc["empty"]["pos"] == 7
    assert len(dead_job.cli("dead-letter", "list", "--json", "--limit", "2").stdout.splitlines()) == 2


def test_a_replayed_letter_is_embedded_after_the_fix_and_leaves_the_dead_letters(
        dead_job: DeadJob, model_info, cpu_engine) -> None:
    # The fix: whatever killed the workers is gone (here, nothing kills them any more).
    replayed = dead_job.cli("dead-letter", "replay", "--id", dead_job.dead_ids["fragile"])
    assert replayed.returncode == 0 and "replayed 1 documents" in replayed.stdout, replayed.stderr
    status = json.loads(dead_job.cli("status", "--json").stdout)
    assert status["stream_entries"] == 1 and status["dead_documents"] == 3 and not status["complete"]
    assert dead_job.work(model_info, cpu_engine).documents == 1
    assert "fragile" in dead_job.output_ids()
    assert "fragile" not in {e.letter.doc_ids[0] for e in list_dead(dead_job.client, dead_job.keys)}
    result = verify_job(dead_job.client, dead_job.keys, str(dead_job.out), allow_dead=True)
    assert result.ok and result.output_rows == 98 and result.dead_documents == 3, result.render()
    # Replaying it again is a usage error: that letter is gone.
    again = dead_job.cli("dead-letter", "replay", "--id", dead_job.dead_ids["fragile"])
    assert again.returncode == 2 and "No dead letter with id" in again.stderr


def test_empty_documents_are_not_replayed_into_a_job_that_does_not_embed_them(
        dead_job: DeadJob, model_info, cpu_engine) -> None:
    # They would only come straight back: replay says so and leaves them where they are.
    replayed = dead_job.cli("dead-letter", "replay", "--id", dead_job.dead_ids["empty"], "--id",
                            dead_job.dead_ids["blank"])
    assert replayed.returncode == 0 and "nothing replayed" in replayed.stdout, replayed.stderr
    assert replayed.stdout.count("empty text: the job does not embed empty documents") == 2
    letters = {e.letter.doc_ids[0]: e.letter for e in list_dead(dead_job.client, dead_job.keys)}
    assert letters["empty"].reason == letters["blank"].reason == "empty text"
    result = verify_job(dead_job.client, dead_job.keys, str(dead_job.out), allow_dead=True)
    assert result.ok and result.dead_documents == 4 and result.output_rows == 97, result.render()


def test_replaying_everything_skips_what_cannot_be_replayed_and_names_it(dead_job: DeadJob) -> None:
    replayed = dead_job.cli("dead-letter", "replay")
    assert replayed.returncode == 0, replayed.stderr
    assert f"skipped {dead_job.dead_ids['huge']}: document over the size limit" in replayed.stdout
    assert replayed.stdout.count("empty text: the job does not embed empty documents") == 2
    assert sorted(e.letter.doc_ids[0] for e in list_dead(dead_job.client, dead_job.keys)) == ["blank", "empty",
                                                                                              "huge"]


def test_a_job_made_with_allowed_duplicate_ids_verifies(redis_client, job_name: str, model_info, cpu_engine,
                                                        tmp_path: Path, redis_url: str) -> None:
    job = settled_job(WITH_DUPLICATE, redis_client, job_name, model_info, cpu_engine, tmp_path, redis_url,
                      allow_duplicate_ids=True)
    checked = job.cli("verify", "--out", str(job.out), "--allow-dead-letters")
    assert checked.returncode == 0 and "OK" in checked.stdout, checked.stdout


def test_a_duplicate_id_letter_cannot_be_replayed_into_a_second_copy_of_the_id(
        redis_client, job_name: str, model_info, cpu_engine, tmp_path: Path, redis_url: str) -> None:
    job = settled_job(WITH_DUPLICATE, redis_client, job_name, model_info, cpu_engine, tmp_path, redis_url,
                      allow_duplicate_ids=True)
    replayed = job.cli("dead-letter", "replay", "--id", job.dead_ids["n3"])
    assert replayed.returncode == 0 and "duplicate id: the first document with this id is already embedded" \
        in replayed.stdout, replayed.stdout
    job.work(model_info, cpu_engine)
    import pyarrow.dataset as ds

    ids = ds.dataset(str(job.out), format="parquet").to_table(columns=["id"]).column("id").to_pylist()
    assert ids.count("n3") == 1


def test_gc_removes_orphans_and_dead_workers_staged_parts_and_keeps_a_live_workers(dead_job: DeadJob) -> None:
    out, keys, client = dead_job.out, dead_job.keys, dead_job.client
    output = open_output(out)
    committed = sorted(output.part_names())
    shutil.copy(output.final(committed[0]), out / "part-000099-ghost_1_aaaaaa.parquet")  # its commit was lost
    output.final(committed[0]).rename(output.staging(committed[0]))  # committed, crashed before the rename
    (out / ".part-000001-dead_2_bbbbbb.parquet.tmp").write_bytes(b"half a part of a dead worker")
    (out / ".part-000001-live_3_cccccc.parquet.tmp").write_bytes(b"a live worker is writing this")
    client.hset(keys.workers, "live_3_cccccc", json.dumps({"state": "embedding"}))
    client.set(keys.worker_lease("live_3_cccccc"), json.dumps({"state": "embedding"}), px=60_000)
    client.hdel(keys.producer, "done")  # the producer is still publishing: the job is not finished

    collected = dead_job.cli("gc", "--out", str(out))
    assert collected.returncode == 0, collected.stderr
    assert f"{len(committed)} committed parts; rolled forward 1, removed 1 visible and 1 staged orphans; kept 1 " \
           "staged parts of live workers" in collected.stdout
    assert sorted(output.part_names()) == committed
    assert output.staged_names() == {"part-000001-live_3_cccccc"}
    import duckdb

    rows = duckdb.execute(f"select count(*), count(distinct id) from '{out}/*.parquet'").fetchall()[0]
    assert rows == (97, 97)

    client.delete(keys.worker_lease("live_3_cccccc"))  # the live worker died after all
    again = dead_job.cli("gc", "--out", str(out))
    assert "removed 0 visible and 1 staged orphans; kept 0" in again.stdout
    assert output.staged_names() == set()


def test_status_prints_every_count_and_the_live_workers(dead_job: DeadJob) -> None:
    beat = json.dumps({"state": "embedding", "backend": "tensorrt", "device": "cuda:0", "precision": "fp16",
                       "documents": 1234, "docs_per_s": 5000.0, "tokens_per_s": 80000.0})
    dead_job.client.hset(dead_job.keys.workers, "gpu_7_abcdef", beat)  # a worker elsewhere, heartbeating
    dead_job.client.set(dead_job.keys.worker_lease("gpu_7_abcdef"), beat, px=60_000)
    shown = dead_job.cli("status")
    assert shown.returncode == 0, shown.stderr
    rows = [re.fullmatch(r"\s*(\S.*?)\s{2,}(\S.*)", line) for line in shown.stdout.splitlines()]
    fields = {row[1]: row[2] for row in rows if row is not None}
    assert len(fields) == len(rows), shown.stdout
    assert fields["job"] == f"{dead_job.keys.job} (complete)"
    assert fields["model"].endswith("all-MiniLM-L6-v2")
    assert "docs.jsonl" in fields["source"] and fields["source"].endswith(", 101 documents")
    assert fields["produced"] == "101 documents in 6 batches (done)"
    assert fields["in stream"] == "0 batches, 0 of them being processed"
    parts = len(open_output(dead_job.out).part_names())
    assert re.fullmatch(f"97 documents in {parts} parts, [0-9,]+ tokens", fields["committed"])
    assert fields["dead-lettered"] == "4 documents (4 dead letters)"
    assert fields["workers alive"] == "1"
    assert fields["throughput"] == "5,000 documents/s, 80,000 tokens/s"
    assert fields["gpu_7_abcdef"] == "embedding, tensorrt on cuda:0 fp16, 1,234 documents, 5,000 docs/s"
    missing = embedq("status", "--job", "no-such-job-here", "--redis", dead_job.redis_url)
    assert missing.returncode == 2 and "not found" in missing.stdout


def test_delete_asks_first_then_removes_every_key_of_the_job_and_nothing_else(dead_job: DeadJob,
                                                                             job_name: str) -> None:
    client = dead_job.client
    neighbour = JobKeys(f"{job_name}-x")  # a job whose name starts the same way: not matched
    client.hset(neighbour.meta, "record", b"{}")
    try:
        before = sorted(client.scan_iter(match=f"*{{{job_name}}}*"))
        refused = dead_job.cli("delete", stdin=b"n\n")
        assert refused.returncode == 1 and f"Delete {len(before)} keys of job" in refused.stdout
        assert sorted(client.scan_iter(match=f"*{{{job_name}}}*")) == before
        deleted = dead_job.cli("delete", "--yes")
        assert deleted.returncode == 0 and f"deleted {len(before)} keys" in deleted.stdout, deleted.stderr
        assert list(client.scan_iter(match=f"*{{{job_name}}}*")) == []
        assert client.exists(neighbour.meta)
        assert dead_job.output_ids()  # the output directory is left alone
        assert dead_job.cli("status").returncode == 2
        assert "no keys" in dead_job.cli("delete", "--yes").stdout
    finally:
        client.delete(neighbour.meta)
