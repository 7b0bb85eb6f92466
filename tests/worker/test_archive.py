"""Redis memory after a job: a finished job gives back what it held per stream entry, and what its
output records (`_manifest.json`, `_dead_letters.jsonl`) leaves Redis after `finished_ttl`. After
that, `status`, `verify` and `dead-letter list|replay` work from the output, and recovery refuses to
run without the output's manifest rather than take every committed part for an orphan.

Expiry is real: the job is finalized with a TTL of one second and the test waits for Redis to
drop the keys."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import redis

from embedq.deadletter import DeadEntry, file_row, for_unreadable, from_file_row, list_dead, replay
from embedq.engines.base import Engine
from embedq.errors import OutputError, UsageError
from embedq.job import ARCHIVED_FIELD, FINALIZED_FIELD, JobRecord, job_memory
from embedq.keys import JobKeys
from embedq.model import ModelInfo
from embedq.protocol import PAYLOAD_FIELD
from embedq.worker.commit import manifest_entries, reconcile
from embedq.worker.finalize import finalize_output
from embedq.worker.output import DEAD_LETTERS_FILE, MANIFEST_FILE, open_output
from tests.embedq.test_cli import embedq
from tests.support import read_output, run_worker, wait_until
from tests.worker.test_finalize import N_DOCS, dead_letter_last_batch, dead_letters_file, publish

DEAD_IDS = sorted(["d5", *(f"d{i}" for i in range(40, 60))])  # the empty document, and the last batch
JUNK = 1 << 20  # what a worker keeps of an unreadable entry


@pytest.fixture
def keys(job_name: str) -> JobKeys:
    return JobKeys(job_name)


def settled_job(client: redis.Redis, keys: JobKeys, tiny: ModelInfo, engine: Engine, tmp_path: Path,
                texts: list[str]) -> tuple[JobRecord, Path]:
    """A job of 60 documents, 21 dead-lettered, and 1 MiB of junk written into its stream by hand
    (a third dead letter, which keeps the junk as its payload, and holds no document), embedded and
    settled by a worker that leaves its finalization to the test (it stops when idle)."""
    record = publish(client, keys, tiny, tmp_path, texts)
    dead_letter_last_batch(client, keys)
    client.xadd(keys.stream, {PAYLOAD_FIELD: os.urandom(JUNK)})
    out = tmp_path / "out"
    run_worker(client, keys, record, tiny, engine, out, exit_when_done=False, idle_exit_seconds=1.0)
    assert not client.hexists(keys.stats, FINALIZED_FIELD)
    return record, out


def expired_job(client: redis.Redis, keys: JobKeys, tiny: ModelInfo, engine: Engine, tmp_path: Path,
                texts: list[str]) -> tuple[JobRecord, Path]:
    """The settled job, finalized with a TTL of one second, once Redis has dropped what expired."""
    record, out = settled_job(client, keys, tiny, engine, tmp_path, texts)
    assert finalize_output(client, keys, open_output(out), record, finished_ttl=1).finalized
    wait_until(lambda: client.exists(keys.manifest, keys.dead) == 0, 5, "Redis to expire the manifest and dead letters")
    return record, out


def test_a_finished_job_gives_back_its_redis_memory_and_what_the_output_records_gets_a_ttl(
        redis_client: redis.Redis, keys: JobKeys, tiny: ModelInfo, tiny_engine: Engine, tmp_path: Path,
        gloss_texts: list[str]) -> None:
    record, out = settled_job(redis_client, keys, tiny, tiny_engine, tmp_path, gloss_texts)
    before = job_memory(redis_client, keys)

    finalize_output(redis_client, keys, open_output(out), record, finished_ttl=3600)

    after = job_memory(redis_client, keys)
    assert before is not None and after is not None and before > JUNK  # the junk's letter, until it expires
    assert redis_client.exists(keys.ledger) == 0  # bookkeeping per stream entry: dropped at once
    assert 3500 < redis_client.ttl(keys.manifest) <= 3600 and 3500 < redis_client.ttl(keys.dead) <= 3600
    for kept in (keys.meta, keys.stats, keys.producer, keys.stream):
        assert redis_client.ttl(kept) == -1, kept  # the job stays known, for good
    assert float(redis_client.hget(keys.stats, ARCHIVED_FIELD) or 0) == pytest.approx(time.time() + 3600, abs=60)
    # The files hold all of it: every letter whole, payload included.
    rows = [json.loads(line) for line in (out / DEAD_LETTERS_FILE).read_text().splitlines()]
    assert [from_file_row(row, keys.job) for row in rows] == list_dead(redis_client, keys)
    assert max(len(entry.letter.payload) for entry in list_dead(redis_client, keys)) == JUNK
    assert len(json.loads((out / MANIFEST_FILE).read_text())["parts"]) == len(manifest_entries(redis_client, keys))

    # A replay may not change the job while its copies may expire: it is restored from the output first.
    with pytest.raises(UsageError, match="restores them from the output first"):
        replay(redis_client, keys, list_dead(redis_client, keys))
    assert redis_client.xlen(keys.stream) == 0 and len(list_dead(redis_client, keys)) == 3

    redis_client.delete(keys.manifest, keys.dead)  # as their TTL will
    left = job_memory(redis_client, keys)
    assert left is not None and left < 8 * 1024  # the record, counters, cursor and empty stream: for good
    print(f"\njob of {N_DOCS} documents and 1 MiB of junk: {before:,} B in Redis before its compaction, {after:,} B "
          f"after, {left:,} B once the manifest and dead letters expired")


def test_once_redis_let_them_expire_status_dead_letter_list_and_verify_work_from_the_output(
        redis_client: redis.Redis, keys: JobKeys, tiny: ModelInfo, tiny_engine: Engine, tmp_path: Path,
        gloss_texts: list[str], redis_url: str) -> None:
    _, out = expired_job(redis_client, keys, tiny, tiny_engine, tmp_path, gloss_texts)

    status = json.loads(embedq("status", "--job", keys.job, "--json", "--redis", redis_url).stdout)
    assert status["complete"] and status["state"] == "complete" and status["dead_documents"] == len(DEAD_IDS)
    assert status["dead_letters"] is None and status["archived_until"] <= time.time()
    assert status["redis_bytes"] == job_memory(redis_client, keys) and status["redis_bytes"] > 0
    shown = embedq("status", "--job", keys.job, "--redis", redis_url).stdout
    assert "(complete)" in shown and "left Redis at" in shown, shown

    listed = embedq("dead-letter", "list", "--job", keys.job, "--json", "--redis", redis_url)
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert sorted(i for row in rows for i in row["doc_ids"]) == DEAD_IDS
    assert redis_client.exists(keys.dead) == 0  # listing restores nothing

    verified = embedq("verify", "--job", keys.job, "--out", str(out), "--allow-dead-letters", "--redis", redis_url)
    assert verified.returncode == 0 and "OK" in verified.stdout, verified.stdout + verified.stderr
    assert f"output rows        {N_DOCS - len(DEAD_IDS)}" in verified.stdout and "repaired" not in verified.stdout
    assert len(read_output(out)) == N_DOCS - len(DEAD_IDS)  # recovery set no committed part aside
    # Verify brought them back from the output to check them, and its finalization archived them again.
    assert redis_client.ttl(keys.manifest) > 3600 and len(list_dead(redis_client, keys)) == 3
    assert redis_client.hexists(keys.stats, ARCHIVED_FIELD)


def test_a_replay_after_they_expired_restores_them_and_the_job_finishes_again(
        redis_client: redis.Redis, keys: JobKeys, tiny: ModelInfo, tiny_engine: Engine, tmp_path: Path,
        gloss_texts: list[str], redis_url: str) -> None:
    record, out = expired_job(redis_client, keys, tiny, tiny_engine, tmp_path, gloss_texts)
    parts = json.loads((out / MANIFEST_FILE).read_text())["parts"]

    replayed = embedq("dead-letter", "replay", "--job", keys.job, "--redis", redis_url)

    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert "back in Redis from" in replayed.stdout and "replayed 20 documents" in replayed.stdout, replayed.stdout
    # The job changes again: whole copies, without a TTL, and no longer archived.
    assert redis_client.ttl(keys.manifest) == -1 and redis_client.ttl(keys.dead) == -1
    assert not redis_client.hexists(keys.stats, ARCHIVED_FIELD)
    assert sorted(manifest_entries(redis_client, keys)) == sorted(p["file"].removesuffix(".parquet") for p in parts)
    assert dead_letters_file(out) == ["d5"]

    run_worker(redis_client, keys, record, tiny, tiny_engine, out)  # it finalizes the job at its end

    assert redis_client.hget(keys.stats, FINALIZED_FIELD) == b"1" and redis_client.ttl(keys.manifest) > 0
    assert len(read_output(out)) == N_DOCS - 1 and dead_letters_file(out) == ["d5"]


def test_recovery_refuses_to_run_without_the_manifest_rather_than_set_committed_parts_aside(
        redis_client: redis.Redis, keys: JobKeys, tiny: ModelInfo, tiny_engine: Engine, tmp_path: Path,
        gloss_texts: list[str], redis_url: str) -> None:
    _, out = expired_job(redis_client, keys, tiny, tiny_engine, tmp_path, gloss_texts)
    (out / MANIFEST_FILE).rename(tmp_path / "kept.json")
    (out / DEAD_LETTERS_FILE).unlink()

    with pytest.raises(OutputError, match=r"_manifest\.json is missing: without it, committed parts cannot be told"):
        reconcile(redis_client, keys, open_output(out), live_workers=set())
    assert len(read_output(out)) == N_DOCS - len(DEAD_IDS)  # every part still in sight
    listed = embedq("dead-letter", "list", "--job", keys.job, "--redis", redis_url)
    assert listed.returncode != 0 and "_dead_letters.jsonl is missing: put the file back" in listed.stderr

    (tmp_path / "kept.json").rename(out / MANIFEST_FILE)  # the manifest alone is not enough: dead letters expired
    with pytest.raises(OutputError, match="21 dead-lettered documents have expired"):
        reconcile(redis_client, keys, open_output(out), live_workers=set())
    assert redis_client.hexists(keys.stats, ARCHIVED_FIELD)


def test_a_dead_letter_row_of_the_file_holds_the_whole_letter() -> None:
    letter = for_unreadable("j", "1-0", b"\x00\xffnot msgpack", reason="malformed", error="(test)", worker="w",
                            code="malformed")
    row = json.loads(json.dumps(file_row(DeadEntry("5-1", letter))))
    assert from_file_row(row, "j") == DeadEntry("5-1", letter)
