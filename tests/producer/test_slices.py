"""Several producers for one job, each publishing one slice of the source (`--slice K/N`)."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from embedq.errors import UsageError
from embedq.job import job_settled
from embedq.keys import JobKeys
from embedq.producer.producer import Producer, ProducerOptions
from embedq.producer.slices import SEQ_BITS, SLICE_LOCK_PREFIX, Slice, parse_slice
from embedq.producer.sources import SourceSpec, open_source
from embedq.protocol import BatchMessage
from tests.support import read_output, run_workers, write_jsonl

N_DOCS = 95


@pytest.fixture
def keys(job_name: str) -> JobKeys:
    return JobKeys(job_name)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "docs.jsonl", [f"id{i}" for i in range(N_DOCS)],
                       [f"document {i}" for i in range(N_DOCS)])


def producer_for(client, keys, model, path: Path, part: Slice = Slice(), **options) -> Producer:  # type: ignore[no-untyped-def]
    stopping = options.pop("stopping", lambda: False)
    return Producer(client, keys, open_source(SourceSpec(str(path))), model,
                    ProducerOptions(**{"batch_size": 10, "part": part, **options}), stopping=stopping)


def published(client, keys) -> list[BatchMessage]:  # type: ignore[no-untyped-def]
    return [msgspec.msgpack.decode(fields[b"m"], type=BatchMessage) for _, fields in client.xrange(keys.stream)]


@given(documents=st.integers(0, 10**7), count=st.integers(1, 64))
def test_the_slices_cover_the_source_once_in_order(documents: int, count: int) -> None:
    bounds = [Slice(k, count).bounds(documents) for k in range(count)]
    assert bounds[0][0] == 0 and bounds[-1][1] == documents
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


def test_a_slice_is_written_k_of_n_and_anything_else_is_refused() -> None:
    assert parse_slice("2/8") == Slice(2, 8) and parse_slice(" 0/1 ").whole
    for bad in ("8/8", "3", "-1/4", "1/0", "a/b", "1/5000"):
        with pytest.raises(UsageError):
            parse_slice(bad)


def test_three_producers_publish_every_document_once_and_the_last_one_marks_the_job(
        redis_client, keys, model_info, source) -> None:
    reports = []

    def run(k: int) -> None:
        reports.append(producer_for(redis_client, keys, model_info, source, Slice(k, 3)).run())

    threads = [threading.Thread(target=run, args=(k,)) for k in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    messages = published(redis_client, keys)
    assert sorted(i for m in messages for i in m.ids) == sorted(f"id{i}" for i in range(N_DOCS))
    assert sorted(r.documents for r in reports) == [31, 32, 32]
    for k in range(3):  # each slice numbers its batches consecutively from its own first seq
        mine = sorted(m.seq for m in messages if m.seq >> SEQ_BITS == k)
        assert mine == list(range(k << SEQ_BITS, (k << SEQ_BITS) + len(mine)))
    for m in messages:  # within its slice's positions
        start, stop = Slice(m.seq >> SEQ_BITS, 3).bounds(N_DOCS)
        assert start <= m.pos and m.pos + len(m) <= stop
    producer = redis_client.hgetall(keys.producer)
    assert producer[b"done"] == b"1" and int(producer[b"docs"]) == N_DOCS and producer[b"slices"] == b"3"
    assert len(redis_client.hgetall(keys.ledger)) == len(messages)  # every entry vouched for
    assert redis_client.get(keys.producer_lock) is None  # the last slice to stop let the job's lock go


def test_the_job_is_produced_only_when_every_slice_is(redis_client, keys, model_info, source) -> None:
    for k in (2, 0):
        producer_for(redis_client, keys, model_info, source, Slice(k, 3)).run()
        assert redis_client.hget(keys.producer, "done") is None and not job_settled(redis_client, keys)
    producer_for(redis_client, keys, model_info, source, Slice(1, 3)).run()
    assert redis_client.hget(keys.producer, "done") == b"1"


def test_a_slice_stopped_midway_resumes_at_its_next_batch(redis_client, keys, model_info, source) -> None:
    calls = {"n": 0}

    def stopping() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    first = producer_for(redis_client, keys, model_info, source, Slice(1, 2), stopping=stopping).run()
    assert first.batches == 2
    again = producer_for(redis_client, keys, model_info, source, Slice(1, 2)).run()
    assert again.resumed_from == 47 + 20 and again.batches == 3
    ids = [i for m in published(redis_client, keys) for i in m.ids]
    assert sorted(ids) == sorted(f"id{i}" for i in range(47, N_DOCS))


def test_a_whole_source_producer_and_slices_never_mix_in_one_job(redis_client, keys, model_info, source,
                                                                  job_name: str) -> None:
    producer_for(redis_client, keys, model_info, source, Slice(0, 2)).run()
    with pytest.raises(UsageError, match=r"2 producers.*Slices not yet done: 1/2"):
        producer_for(redis_client, keys, model_info, source).run()
    with pytest.raises(UsageError, match="2 producers"):
        producer_for(redis_client, keys, model_info, source, Slice(0, 3)).run()
    other = JobKeys(job_name + "-whole")
    try:
        calls = itertools.count()
        producer_for(redis_client, other, model_info, source, stopping=lambda: next(calls) > 0).run()
        with pytest.raises(UsageError, match="one producer over the whole source"):
            producer_for(redis_client, other, model_info, source, Slice(1, 2)).run()
    finally:
        for key in redis_client.scan_iter(match=f"*{{{other.job}}}*"):
            redis_client.delete(key)


def test_slices_hold_the_jobs_lock_so_a_whole_source_producer_waits(redis_client, keys, model_info,
                                                                      source) -> None:
    holder = producer_for(redis_client, keys, model_info, source, Slice(0, 2))
    holder.prepare()
    assert holder.publisher.acquire()
    assert redis_client.get(keys.producer_lock).decode().startswith(SLICE_LOCK_PREFIX)
    whole = producer_for(redis_client, keys, model_info, source)
    with pytest.raises(UsageError, match="Another producer"):
        whole.publisher.acquire(wait=0.3)
    second = producer_for(redis_client, keys, model_info, source, Slice(0, 2))
    with pytest.raises(UsageError, match=r"slice 0/2"):
        second.publisher.acquire(wait=0.3)
    assert producer_for(redis_client, keys, model_info, source, Slice(1, 2)).publisher.acquire(wait=0.3)


def test_workers_embed_a_sliced_job_exactly_once(redis_client, keys, model_info, cpu_engine, tmp_path: Path,
                                                 source) -> None:
    producers = [producer_for(redis_client, keys, model_info, source, Slice(k, 2), batch_size=7) for k in range(2)]
    for producer in producers:
        producer.run()
    record = producers[0].prepare()
    run_workers(2, redis_client, keys, record, model_info, cpu_engine, tmp_path / "out", window_docs=30)
    assert sorted(read_output(tmp_path / "out")) == sorted(f"id{i}" for i in range(N_DOCS))
    assert job_settled(redis_client, keys) and redis_client.hget(keys.stats, "docs_committed") == str(N_DOCS).encode()


def test_embedq_produce_slice_k_of_n_from_the_command_line(redis_client, keys, redis_url: str, source: Path,
                                                           tmp_path: Path) -> None:
    """Two `embedq produce --slice K/2` publish one job together; a third without --slice is refused."""
    from typer.testing import CliRunner

    from embedq.cli import app

    def produce(*extra: str):  # type: ignore[no-untyped-def]
        return CliRunner().invoke(app, ["produce", str(source), "--job", keys.job, "--redis", redis_url,
                                        "--batch-size", "10", *extra])

    first = produce("--slice", "0/2")
    assert first.exit_code == 0, first.output
    assert not job_settled(redis_client, keys)
    from embedq.status import read_status

    advice = read_status(redis_client, keys).stall_advice  # no producer runs, slice 1 is still to come
    assert advice is not None and "--slice K/2` for each slice K from 0 to 1" in advice, advice
    whole = produce()
    assert whole.exit_code != 0 and "slice" in str(whole.exception)
    assert produce("--slice", "1/2").exit_code == 0
    ids = [i for m in published(redis_client, keys) for i in m.ids]
    assert sorted(ids) == sorted(f"id{i}" for i in range(N_DOCS))
    bad = produce("--slice", "2/2")
    assert bad.exit_code != 0 and "does not exist" in str(bad.exception)
