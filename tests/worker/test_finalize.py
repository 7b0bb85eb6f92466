"""Finalizing the output, and cleaning up after killed processes: "complete" means the output is final
(`embedq gc` finalizes a job whose last worker died between its settle and its rename); probe files
of killed processes go; `_dead_letters.jsonl` follows a dead-letter replay."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from embedq.deadletter import for_documents, list_dead
from embedq.engines.base import Engine
from embedq.errors import OutputError
from embedq.job import FINALIZED_FIELD, OUTPUT_FIELD, JobRecord, job_complete
from embedq.keys import GROUP, JobKeys
from embedq.model import ModelInfo
from embedq.protocol import Limits, decode_batch
from embedq.worker.commit import Committer, Outcome, Settlement, manifest_entries, reconcile
from embedq.worker.consumer import ensure_group
from embedq.worker.finalize import finalize_output, record_output
from embedq.worker.output import DEAD_LETTERS_FILE, MANIFEST_FILE, THIS_HOST, OutputDir, open_output
from tests.embedq.test_cli import embedq
from tests.support import produce, read_output, run_worker, write_jsonl

N_DOCS = 60  # three batches of 20; the last one is dead-lettered where a test asks


@pytest.fixture
def keys(job_name: str) -> JobKeys:
    return JobKeys(job_name)


def publish(client: redis.Redis, keys: JobKeys, tiny: ModelInfo, tmp_path: Path, texts: list[str]) -> JobRecord:
    ids, docs = [f"d{i}" for i in range(N_DOCS)], list(texts[:N_DOCS])
    docs[5] = ""  # set aside by the producer: a dead letter that cannot be replayed into this job
    return produce(client, keys, tiny, write_jsonl(tmp_path / "docs.jsonl", ids, docs), batch_size=20)[0]


def dead_letter_last_batch(client: redis.Redis, keys: JobKeys) -> None:
    """As a worker does when workers kept dying on a batch: dead-letter it, acknowledged in the same step."""
    ensure_group(client, keys)
    taken = client.xreadgroup(GROUP, "isolating", {keys.stream: ">"})[0][1]
    entry_id, fields = taken[-1]
    message = decode_batch(fields[b"m"], job=keys.job, limits=Limits())
    letter = for_documents(message, range(len(message.ids)), entry_id=entry_id.decode(),
                           reason="worker died processing it", error="(test) 9 workers died on it", worker="isolating")
    client.xclaim(keys.stream, GROUP, "isolating", 0, [e for e, _ in taken[:-1]], idle=10**7, justid=True)
    settled = Committer(client, keys, "isolating").settle(Settlement(entries=[entry_id.decode()], dead=[letter]))
    assert settled.outcome is Outcome.SETTLED


def dead_letters_file(out: Path) -> list[str]:
    return sorted(i for line in (out / DEAD_LETTERS_FILE).read_text().splitlines() for i in json.loads(line)["doc_ids"])


def test_gc_finalizes_a_job_whose_last_worker_died_between_its_settle_and_its_rename(
        redis_client: redis.Redis, keys: JobKeys, tiny: ModelInfo, tiny_engine: Engine, tmp_path: Path,
        gloss_texts: list[str], redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    record = publish(redis_client, keys, tiny, tmp_path, gloss_texts)
    out = tmp_path / "out"

    rename = OutputDir.publish

    def dies_at_the_last_rename(self: OutputDir, name: str) -> None:
        if job_complete(redis_client, keys):  # this part's settle was the job's last
            raise OutputError(f"(test) died before renaming {name}")
        rename(self, name)

    monkeypatch.setattr(OutputDir, "publish", dies_at_the_last_rename)
    with pytest.raises(OutputError, match="died before renaming"):
        run_worker(redis_client, keys, record, tiny, tiny_engine, out)
    monkeypatch.undo()
    # Every batch is settled, but the output is not final: a part is still staged, no _manifest.json.
    assert job_complete(redis_client, keys) and not redis_client.hexists(keys.stats, FINALIZED_FIELD)
    assert len(read_output(out)) < N_DOCS - 1 and not (out / MANIFEST_FILE).exists()
    # The last part, or the last two: both commit threads may have settled before either renamed.
    staged = len(open_output(out).staged_names())
    assert staged in (1, 2)

    collected = embedq("gc", "--job", keys.job, "--out", str(out), "--redis", redis_url)
    assert collected.returncode == 0, collected.stderr
    assert f"rolled forward {staged}" in collected.stdout and "its output final" in collected.stdout, collected.stdout
    assert redis_client.hget(keys.stats, FINALIZED_FIELD) == b"1"
    assert len(read_output(out)) == N_DOCS - 1  # the empty document is a dead letter
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["complete"] and manifest["documents"] == N_DOCS - 1 and manifest["dead_letters"] == 1
    assert dead_letters_file(out) == ["d5"]


def test_the_dead_letters_file_follows_a_replay_into_the_directory_the_workers_recorded(
        redis_client: redis.Redis, keys: JobKeys, tiny: ModelInfo, tiny_engine: Engine, tmp_path: Path,
        gloss_texts: list[str], redis_url: str) -> None:
    record = publish(redis_client, keys, tiny, tmp_path, gloss_texts)
    dead_letter_last_batch(redis_client, keys)
    out = tmp_path / "out"
    record_output(redis_client, keys, open_output(out))  # as the workers do when they start
    assert redis_client.hget(keys.stats, OUTPUT_FIELD) == str(out.resolve()).encode()
    run_worker(redis_client, keys, record, tiny, tiny_engine, out)
    finalize_output(redis_client, keys, open_output(out), record)
    assert redis_client.hget(keys.stats, FINALIZED_FIELD) == b"1"
    assert dead_letters_file(out) == sorted(["d5", *(f"d{i}" for i in range(40, 60))])

    # The replay finds the directory the workers recorded, and rewrites the file without those 20.
    replayed = embedq("dead-letter", "replay", "--job", keys.job, "--redis", redis_url)
    assert replayed.returncode == 0 and "replayed 20 documents" in replayed.stdout, replayed.stdout
    assert f"{DEAD_LETTERS_FILE} in {out.resolve()}: 1 documents left" in replayed.stdout
    assert dead_letters_file(out) == ["d5"]
    run_worker(redis_client, keys, record, tiny, tiny_engine, out)
    finalize_output(redis_client, keys, open_output(out), record)  # what the worker does at the job's end
    assert redis_client.hget(keys.stats, FINALIZED_FIELD) == b"1"
    assert len(read_output(out)) == N_DOCS - 1 and dead_letters_file(out) == ["d5"]


def test_a_settle_after_the_finalization_makes_the_output_not_final_again(
        redis_client: redis.Redis, keys: JobKeys) -> None:
    ensure_group(redis_client, keys)
    redis_client.hset(keys.stats, FINALIZED_FIELD, 1)
    entry = redis_client.xadd(keys.stream, {"m": b"a replayed batch"}).decode()
    redis_client.xreadgroup(GROUP, "w", {keys.stream: ">"})
    assert Committer(redis_client, keys, "w").settle(Settlement(entries=[entry])).outcome is Outcome.SETTLED
    assert not redis_client.hexists(keys.stats, FINALIZED_FIELD)


def test_a_replay_that_empties_the_dead_letters_removes_the_file_of_the_directory_given_with_out(
        redis_client: redis.Redis, keys: JobKeys, tiny: ModelInfo, tiny_engine: Engine, tmp_path: Path,
        gloss_texts: list[str], redis_url: str) -> None:
    ids = [f"d{i}" for i in range(N_DOCS)]
    record = produce(redis_client, keys, tiny, write_jsonl(tmp_path / "docs.jsonl", ids, gloss_texts[:N_DOCS]),
                     batch_size=20)[0]
    dead_letter_last_batch(redis_client, keys)
    out = tmp_path / "out"
    run_worker(redis_client, keys, record, tiny, tiny_engine, out)
    finalize_output(redis_client, keys, open_output(out), record)
    assert len(dead_letters_file(out)) == 20
    replayed = embedq("dead-letter", "replay", "--job", keys.job, "--redis", redis_url, "--out", str(out))
    assert replayed.returncode == 0 and f"{DEAD_LETTERS_FILE} in {out}: removed" in replayed.stdout, replayed.stdout
    assert not (out / DEAD_LETTERS_FILE).exists() and list_dead(redis_client, keys) == []


def test_probe_files_of_killed_processes_are_removed_when_the_output_is_opened_or_reconciled(
        redis_client: redis.Redis, keys: JobKeys, tmp_path: Path) -> None:
    out = open_output(tmp_path / "out")
    host = THIS_HOST
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    stale = {
        f".embedq-probe-{host}_{dead_pid}_0badf00d": 0.0,  # its writer was SIGKILLed a moment ago
        ".embedq-probe-1234abcd": 120.0,  # an old-style probe, two minutes old
        f".embedq-probe-otherhost_{dead_pid}_00c0ffee": 120.0,  # another host's, two minutes old
    }
    fresh = {
        f".embedq-probe-{host}_{os.getpid()}_5afe5afe": 0.0,  # a live process is probing right now
        f".embedq-probe-otherhost_{dead_pid}_abad1dea": 0.0,  # another host's: its pid means nothing here
    }
    for name, age in {**stale, **fresh}.items():
        (out.path / name).write_bytes(b"embedq")
        os.utime(out.path / name, (time.time() - age, time.time() - age))
    open_output(out.path)
    assert sorted(p.name for p in out.path.glob(".embedq-probe-*")) == sorted(fresh)
    (out.path / ".embedq-probe-5678abcd").write_bytes(b"embedq")
    os.utime(out.path / ".embedq-probe-5678abcd", (time.time() - 61, time.time() - 61))
    reconcile(redis_client, keys, out, live_workers=set())
    assert sorted(p.name for p in out.path.glob(".embedq-probe-*")) == sorted(fresh)
    assert manifest_entries(redis_client, keys) == {}


def test_a_final_job_keeps_in_redis_only_what_status_verify_and_replay_read(
        redis_client: redis.Redis, keys: JobKeys, tiny: ModelInfo, tiny_engine: Engine, tmp_path: Path,
        gloss_texts: list[str]) -> None:
    from embedq.job import compact_finished

    record = publish(redis_client, keys, tiny, tmp_path, gloss_texts)
    dead_letter_last_batch(redis_client, keys)
    redis_client.hset(keys.failures, "0-1", 1)  # as a failed attempt leaves it
    spent = [keys.ledger, keys.failures, keys.crashes, keys.condemned]
    assert compact_finished(redis_client, keys) is None  # not final: nothing is dropped
    assert redis_client.exists(keys.ledger, keys.failures) == 2

    # The worker that sees the job complete finalizes it, and the finalization compacts it.
    run_worker(redis_client, keys, record, tiny, tiny_engine, tmp_path / "out")

    assert redis_client.hget(keys.stats, FINALIZED_FIELD) == b"1"
    assert redis_client.exists(*spent) == 0
    for kept in (keys.meta, keys.stats, keys.producer, keys.manifest, keys.dead, keys.stream):
        assert redis_client.exists(kept), kept
    assert len(list_dead(redis_client, keys)) == 2  # the empty document and the dead-lettered batch
    assert len(read_output(tmp_path / "out")) == N_DOCS - 21
    again = compact_finished(redis_client, keys)  # idempotent, and it says what the job takes
    assert again is not None and again[0] == again[1] > 0
