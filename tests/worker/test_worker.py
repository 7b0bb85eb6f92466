"""The worker against a real Redis, the real model and real Parquet: exactly once, whatever happens."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import redis

from embedq.deadletter import list_dead
from embedq.errors import JobMismatch
from embedq.keys import GROUP, JobKeys
from embedq.protocol import COMPRESSED, PAYLOAD_FIELD
from embedq.verify import verify_job
from embedq.worker.consumer import StreamConsumer, ensure_group
from embedq.worker.output import open_output
from embedq.worker.worker import Worker, WorkerOptions
from tests.support import FaultyEngine, SerializedEngine, produce, read_output, run_worker, run_workers, write_jsonl


@pytest.fixture
def keys(job_name: str) -> JobKeys:
    return JobKeys(job_name)


@pytest.fixture
def corpus(tmp_path: Path, gloss_texts: list[str]) -> Path:
    texts = gloss_texts[:600]
    return write_jsonl(tmp_path / "docs.jsonl", [f"d{i}" for i in range(len(texts))], texts)


def test_one_worker_embeds_every_document_exactly_once(redis_client, keys, model_info, cpu_engine, corpus,
                                                      tmp_path: Path, gloss_texts) -> None:
    record, _ = produce(redis_client, keys, model_info, corpus)
    out = tmp_path / "out"
    report = run_worker(redis_client, keys, record, model_info, cpu_engine, out)
    assert report.job_complete and report.documents == 600
    rows = read_output(out)
    assert set(rows) == {f"d{i}" for i in range(600)}
    assert np.allclose(np.linalg.norm(np.stack(list(rows.values())), axis=1), 1.0, atol=1e-4)
    result = verify_job(redis_client, keys, str(out))
    assert result.ok, result.render()
    assert (out / "_manifest.json").exists()
    assert not list(out.glob(".*.tmp"))


def test_a_compressed_job_is_embedded_exactly_once_with_the_vectors_of_an_uncompressed_one(
        redis_client, keys, model_info, cpu_engine, corpus, tmp_path: Path) -> None:
    record, _ = produce(redis_client, keys, model_info, corpus, batch_size=100, compress=True)
    payloads = [fields[PAYLOAD_FIELD] for _, fields in redis_client.xrange(keys.stream)]
    assert len(payloads) == 6 and all(p.startswith(COMPRESSED) for p in payloads)
    out = tmp_path / "out"
    reports = run_workers(2, redis_client, keys, record, model_info, SerializedEngine(cpu_engine), out, window_docs=150)
    assert sum(r.documents for r in reports) == 600
    assert verify_job(redis_client, keys, str(out)).ok
    plain_keys = JobKeys(keys.job + "-plain")
    plain_record, _ = produce(redis_client, plain_keys, model_info, corpus, batch_size=100)
    run_worker(redis_client, plain_keys, plain_record, model_info, cpu_engine, tmp_path / "plain")
    got, want = read_output(out), read_output(tmp_path / "plain")
    assert set(got) == set(want)
    assert np.allclose(np.stack([got[i] for i in want]), np.stack(list(want.values())), rtol=0, atol=1e-6)
    for key in redis_client.scan_iter(match=f"*{{{plain_keys.job}}}*"):
        redis_client.delete(key)


def test_three_workers_share_a_job_without_duplicates(redis_client, keys, model_info, cpu_engine, corpus,
                                                     tmp_path: Path) -> None:
    record, _ = produce(redis_client, keys, model_info, corpus, batch_size=20)
    out = tmp_path / "out"
    reports = run_workers(3, redis_client, keys, record, model_info, SerializedEngine(cpu_engine), out,
                          window_docs=60)
    assert sum(r.documents for r in reports) == 600
    assert len(read_output(out)) == 600
    assert verify_job(redis_client, keys, str(out)).ok


def test_a_worker_that_lost_its_lease_drops_its_duplicate_part(redis_client, keys, model_info, cpu_engine,
                                                              corpus, tmp_path: Path) -> None:
    record, _ = produce(redis_client, keys, model_info, corpus, batch_size=100)
    out = tmp_path / "out"
    ensure_group(redis_client, keys)
    # A slow worker takes two batches and stalls past its lease...
    slow = StreamConsumer(redis_client, keys, "slow-worker", lease_ms=1000)
    taken = slow.read_new(2, block_ms=100)
    assert len(taken) == 2
    time.sleep(1.2)
    # ...a live worker reclaims and commits them (and the rest of the job)...
    run_worker(redis_client, keys, record, model_info, cpu_engine, out, lease_seconds=1.0)
    # ...then the slow worker wakes up and tries to commit the same batches: it must be refused.
    from embedq.worker.commit import Committer, Outcome, Settlement

    settled = Committer(redis_client, keys, "slow-worker").settle(Settlement(entries=[d.entry_id for d in taken]))
    assert settled.outcome is Outcome.GONE and set(settled.gone) == {d.entry_id for d in taken}
    assert len(read_output(out)) == 600


def test_a_poison_document_is_dead_lettered_and_its_batch_mates_are_committed(
        redis_client, keys, model_info, cpu_engine, tmp_path: Path, gloss_texts) -> None:
    from embedq.tokenization import Tokenizer

    texts = [*gloss_texts[:100], "the zyzzyva is a tropical weevil"]
    poison_token = int(Tokenizer(model_info.tokenizer_file, 64).encode(["zyzzyva"]).tokens[1])
    source = write_jsonl(tmp_path / "docs.jsonl", list(range(101)), texts)
    record, _ = produce(redis_client, keys, model_info, source, batch_size=101)
    out = tmp_path / "out"
    report = run_worker(redis_client, keys, record, model_info, FaultyEngine(cpu_engine, poison_token), out)
    assert report.job_complete and report.documents == 100 and report.dead_documents == 1
    dead = list_dead(redis_client, keys)
    assert [d.letter.doc_ids for d in dead] == [[100]]
    assert dead[0].letter.reason == "embedding failed" and "injected failure" in dead[0].letter.error
    assert dead[0].letter.failures == 3
    assert set(read_output(out)) == set(range(100))
    assert verify_job(redis_client, keys, str(out), allow_dead=True).ok
    assert not verify_job(redis_client, keys, str(out)).ok  # dead letters are not output


def test_a_document_whose_embedding_is_not_finite_is_dead_lettered(redis_client, keys, model_info, cpu_engine,
                                                                  tmp_path: Path, gloss_texts) -> None:
    from embedq.tokenization import Tokenizer

    texts = [*gloss_texts[:50], "a xylophone solo"]
    poison_token = int(Tokenizer(model_info.tokenizer_file, 64).encode(["xylophone"]).tokens[1])
    source = write_jsonl(tmp_path / "docs.jsonl", list(range(51)), texts)
    record, _ = produce(redis_client, keys, model_info, source)
    out = tmp_path / "out"
    engine = FaultyEngine(cpu_engine, poison_token, fault=lambda rows: rows * np.nan)
    report = run_worker(redis_client, keys, record, model_info, engine, out)
    assert report.dead_documents == 1 and report.documents == 50
    assert list_dead(redis_client, keys)[0].letter.reason == "non-finite embedding"


def test_an_engine_that_fails_on_everything_stops_the_worker_instead_of_dead_lettering(
        redis_client, keys, model_info, cpu_engine, corpus, tmp_path: Path) -> None:
    record, _ = produce(redis_client, keys, model_info, corpus)
    broken = FaultyEngine(cpu_engine, poison_token=101)  # [CLS]: every document holds it
    from embedq.errors import EngineError

    with pytest.raises(EngineError, match="canary"):
        run_worker(redis_client, keys, record, model_info, broken, tmp_path / "out")
    assert list_dead(redis_client, keys) == []
    assert redis_client.xlen(keys.stream) > 0  # nothing acknowledged: the batches wait for a working engine


def test_malformed_messages_are_dead_lettered_and_the_job_completes(redis_client, keys, model_info, cpu_engine,
                                                                   corpus, tmp_path: Path) -> None:
    import msgspec

    record, _ = produce(redis_client, keys, model_info, corpus, batch_size=100)
    redis_client.xadd(keys.stream, {b"m": b"\xc1 not msgpack"})
    redis_client.xadd(keys.stream, {b"m": msgspec.msgpack.encode({"v": 99, "job": keys.job})})
    redis_client.xadd(keys.stream, {b"other": b"no payload field"})
    redis_client.xadd(keys.stream, {b"m": msgspec.msgpack.encode(
        {"v": 1, "job": "another-job", "seq": 0, "pos": 0, "ids": ["x"], "texts": ["x"]})})
    out = tmp_path / "out"
    report = run_worker(redis_client, keys, record, model_info, cpu_engine, out)
    assert report.job_complete and report.documents == 600
    reasons = sorted(d.letter.error for d in list_dead(redis_client, keys))
    assert len(reasons) == 4
    assert any("not valid msgpack" in r for r in reasons) and any("schema version 99" in r for r in reasons)
    assert any("no payload" in r for r in reasons) and any("another-job" in r for r in reasons)
    assert all(not d.letter.replayable for d in list_dead(redis_client, keys))


def die_while_working(client: redis.Redis, keys: JobKeys, worker: str, entries: list[str]) -> None:
    """What a worker killed while tokenizing or embedding `entries` leaves: them in its working set,
    no lease key."""
    client.sadd(keys.worker_working(worker), *entries)


def kill_workers_on(client: redis.Redis, keys: JobKeys, deaths: int, *, working: bool) -> None:
    """`deaths` workers take the job's entries in turn and die, working on them or merely holding them."""
    ensure_group(client, keys)
    for k in range(deaths):
        consumer = StreamConsumer(client, keys, f"dying-{k}", lease_ms=0)
        got = consumer.reclaim(10) if k else consumer.read_new(10, 100)
        assert got, "nothing to take over"
        if working:
            die_while_working(client, keys, f"dying-{k}", [d.entry_id for d in got])


def test_a_batch_that_kills_its_workers_is_split_until_the_culprit_is_found(
        redis_client, keys, model_info, cpu_engine, tmp_path: Path, gloss_texts) -> None:
    source = write_jsonl(tmp_path / "docs.jsonl", list(range(8)), gloss_texts[:8])
    record, _ = produce(redis_client, keys, model_info, source, batch_size=8)
    kill_workers_on(redis_client, keys, 3, working=True)  # the third death is counted when it is reclaimed
    out = tmp_path / "out"
    report = run_worker(redis_client, keys, record, model_info, cpu_engine, out, max_deliveries=3,
                        lease_seconds=1.0)
    # It was split in halves (fresh entries, no crashes) and then embedded normally.
    assert report.job_complete and report.documents == 8 and report.dead_documents == 0
    assert set(read_output(out)) == set(range(8))
    assert redis_client.xlen(keys.stream) == 0


def test_workers_killed_while_merely_holding_a_batch_blame_nothing(
        redis_client, keys, model_info, cpu_engine, tmp_path: Path, gloss_texts) -> None:
    source = write_jsonl(tmp_path / "docs.jsonl", list(range(8)), gloss_texts[:8])
    record, _ = produce(redis_client, keys, model_info, source, batch_size=8)
    kill_workers_on(redis_client, keys, 6, working=False)  # delivered 6 times, never worked on
    (entry,) = [e.decode() for e, _ in redis_client.xrange(keys.stream)]
    report = run_worker(redis_client, keys, record, model_info, cpu_engine, tmp_path / "out", max_deliveries=3,
                        lease_seconds=1.0)
    assert report.job_complete and report.documents == 8 and report.dead_documents == 0
    assert redis_client.hget(keys.crashes, entry) is None  # not one crash was counted against it
    assert read_output(tmp_path / "out").keys() == set(range(8))


def test_a_single_document_that_keeps_killing_workers_is_dead_lettered(redis_client, keys, model_info,
                                                                      cpu_engine, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "docs.jsonl", ["only"], ["a single document"])
    record, _ = produce(redis_client, keys, model_info, source)
    kill_workers_on(redis_client, keys, 3, working=True)
    report = run_worker(redis_client, keys, record, model_info, cpu_engine, tmp_path / "out", max_deliveries=3,
                        lease_seconds=1.0)
    assert report.job_complete and report.dead_documents == 1
    letter = list_dead(redis_client, keys)[0].letter
    assert letter.reason == "worker died processing it" and "3 workers died" in letter.error


def test_a_worker_never_reclaims_the_entries_it_still_holds(redis_client, keys, model_info, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "docs.jsonl", ["a", "b"], ["one text", "another"])
    produce(redis_client, keys, model_info, source, batch_size=1)
    ensure_group(redis_client, keys)
    me = StreamConsumer(redis_client, keys, "me", lease_ms=0)
    held = [d.entry_id for d in me.read_new(10, 100)]
    assert len(held) == 2
    assert me.reclaim(10, held) == []  # idle past its lease, but still its own: it is working on them
    # One it no longer holds (Redis lost the settle that acknowledged it) it takes back.
    assert [d.entry_id for d in me.reclaim(10, held[:1])] == held[1:]
    other = StreamConsumer(redis_client, keys, "other", lease_ms=0)
    assert len(other.reclaim(10)) == 2


def test_a_worker_refuses_a_job_made_for_another_model(redis_client, keys, model_info, cpu_engine, corpus,
                                                      tmp_path: Path) -> None:
    record, _ = produce(redis_client, keys, model_info, corpus)
    other = model_info.with_overrides(pooling="cls")
    with pytest.raises(JobMismatch, match="pooling"):
        Worker(redis_client, keys, record, other, cpu_engine, open_output(tmp_path / "out"), WorkerOptions())


def test_a_committed_part_left_under_its_staging_name_is_rolled_forward(redis_client, keys, model_info,
                                                                       cpu_engine, corpus, tmp_path: Path) -> None:
    record, _ = produce(redis_client, keys, model_info, corpus)
    out = tmp_path / "out"
    run_worker(redis_client, keys, record, model_info, cpu_engine, out)
    # Simulate a crash between the commit and the rename: move a committed part back to staging.
    output = open_output(out)
    name = sorted(output.part_names())[0]
    output.final(name).rename(output.staging(name))
    (out / ".part-999999-deadworker.parquet.tmp").write_bytes(b"partial")  # an uncommitted orphan
    (out / "part-999998-lostcommit.parquet").write_bytes(b"orphan")  # a part whose commit Redis lost
    result = verify_job(redis_client, keys, str(out))
    assert result.ok, result.render()
    assert result.rolled_forward == 1 and result.orphans_removed == 1
    assert output.final(name).exists() and not list(out.glob(".*.tmp"))
    assert len(read_output(out)) == 600


def test_a_signal_during_the_workers_recovery_drains_it_before_it_reads_anything(
        redis_client, keys, model_info, cpu_engine, corpus, tmp_path: Path) -> None:
    """The drain handlers are in from the first step of `run`: a SIGTERM while the worker recovers
    earlier workers' parts lets the recovery finish, then the worker ends, stopped by the signal,
    having read nothing (before, a signal in that window killed the process)."""
    import os
    import signal

    record, _ = produce(redis_client, keys, model_info, corpus, batch_size=100)
    worker = Worker(redis_client, keys, record, model_info, cpu_engine, open_output(tmp_path / "out"),
                    WorkerOptions(window_docs=200, lease_seconds=5.0, idle_exit_seconds=20.0))
    recover = worker._recover

    def recover_and_get_a_signal(what: str):  # type: ignore[no-untyped-def]
        os.kill(os.getpid(), signal.SIGTERM)  # handled in the main thread before the next step
        return recover(what)

    def undrained(signum: int, _frame: object) -> None:
        raise AssertionError("the signal reached the process before the worker's drain handlers")

    worker._recover = recover_and_get_a_signal  # type: ignore[method-assign]
    previous = signal.signal(signal.SIGTERM, undrained)  # what a missing drain handler would leave in place
    try:
        report = worker.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert report.stopped_by_signal and not report.job_complete
    assert report.delivered == 0 and report.documents == 0
    assert redis_client.xpending(keys.stream, GROUP)["pending"] == 0
