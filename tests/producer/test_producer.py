"""The producer against a real Redis: every batch published once, resumable, bounded backlog."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import msgspec
import pytest

from embedq.deadletter import list_dead
from embedq.errors import JobMismatch, SourceError
from embedq.keys import GROUP, JobKeys
from embedq.producer.producer import Producer, ProducerOptions
from embedq.producer.sources import SourceSpec, open_source
from embedq.protocol import BatchMessage, Limits
from tests.support import write_jsonl


@pytest.fixture
def keys(job_name: str) -> JobKeys:
    return JobKeys(job_name)


def producer_for(client, keys, model, path: Path, **options) -> Producer:  # type: ignore[no-untyped-def]
    stopping = options.pop("stopping", lambda: False)
    return Producer(client, keys, open_source(SourceSpec(str(path))), model,
                    ProducerOptions(**{"batch_size": 10, **options}), stopping=stopping)


def published(client, keys) -> list[BatchMessage]:  # type: ignore[no-untyped-def]
    return [msgspec.msgpack.decode(fields[b"m"], type=BatchMessage) for _, fields in client.xrange(keys.stream)]


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "docs.jsonl", [f"id{i}" for i in range(95)], [f"document {i}" for i in range(95)])


def test_every_batch_is_published_once_with_sequence_numbers_from_source_positions(
        redis_client, keys, model_info, source) -> None:
    report = producer_for(redis_client, keys, model_info, source).run()
    messages = published(redis_client, keys)
    assert report.batches == 10 and [m.seq for m in messages] == list(range(10))
    assert [m.pos for m in messages] == list(range(0, 95, 10))
    assert [i for m in messages for i in m.ids] == [f"id{i}" for i in range(95)]
    assert redis_client.hget(keys.producer, "done") == b"1"


def test_running_the_producer_again_publishes_nothing_twice(redis_client, keys, model_info, source) -> None:
    producer_for(redis_client, keys, model_info, source).run()
    again = producer_for(redis_client, keys, model_info, source).run()
    assert again.already_done and again.batches == 0
    assert redis_client.xlen(keys.stream) == 10


@pytest.mark.parametrize("stop_after", [1, 4, 9])
def test_a_producer_stopped_midway_resumes_at_the_next_batch(redis_client, keys, model_info, source,
                                                             stop_after: int) -> None:
    count = {"n": 0}

    def stopping() -> bool:
        count["n"] += 1
        return count["n"] > stop_after

    first = producer_for(redis_client, keys, model_info, source, stopping=stopping).run()
    assert first.batches == stop_after and redis_client.hget(keys.producer, "done") is None
    second = producer_for(redis_client, keys, model_info, source).run()
    assert second.resumed_from == stop_after * 10
    assert [m.seq for m in published(redis_client, keys)] == list(range(10))


def test_a_publish_whose_reply_was_lost_is_not_repeated(redis_client, keys, model_info, source) -> None:
    producer = producer_for(redis_client, keys, model_info, source)
    producer.prepare()
    first = producer.publisher.publish(0, 10, b"payload", 10, [], 0)
    retried = producer.publisher.publish(0, 10, b"payload", 10, [], 0)
    assert first.accepted and not retried.accepted and retried.cursor.next_seq == 1
    assert redis_client.xlen(keys.stream) == 1


def test_when_redis_lost_recent_batches_the_producer_publishes_them_again(redis_client, keys, model_info,
                                                                          source) -> None:
    producer_for(redis_client, keys, model_info, source).run()
    # Simulate a Redis that came back from its AOF without the last three batches.
    entries = redis_client.xrange(keys.stream)
    redis_client.xdel(keys.stream, *[e for e, _ in entries[7:]])
    redis_client.hset(keys.producer, mapping={"next_seq": 7, "next_pos": 70})
    redis_client.hdel(keys.producer, "done")
    again = producer_for(redis_client, keys, model_info, source).run()
    assert again.resumed_from == 70 and again.batches == 3
    assert sorted(m.seq for m in published(redis_client, keys)) == list(range(10))


def test_the_backlog_bound_holds_while_workers_are_slow(redis_client, keys, model_info, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "big.jsonl", list(range(400)), ["text"] * 400)
    producer = producer_for(redis_client, keys, model_info, source, backlog=5)
    producer.prepare()
    redis_client.xgroup_create(keys.stream, GROUP, id="0", mkstream=True)
    peak = {"len": 0}
    done = threading.Event()

    def slow_worker() -> None:  # settles one entry at a time, as a worker's commit does
        while not done.is_set():
            peak["len"] = max(peak["len"], redis_client.xlen(keys.stream))
            reply = redis_client.xreadgroup(GROUP, "w", {keys.stream: ">"}, count=1, block=50)
            for _, entries in reply or []:
                for entry_id, _ in entries:
                    time.sleep(0.002)
                    redis_client.xack(keys.stream, GROUP, entry_id)
                    redis_client.xdel(keys.stream, entry_id)

    thread = threading.Thread(target=slow_worker)
    thread.start()
    report = producer.run()
    done.set()
    thread.join()
    assert report.batches == 40 and report.waited_seconds > 0
    assert peak["len"] <= 5


def test_duplicate_ids_are_refused_with_examples(redis_client, keys, model_info, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "dup.jsonl", ["a", "b", "a", "c", "b"], ["1", "2", "3", "4", "5"])
    with pytest.raises(SourceError, match=r"2 duplicate id\(s\).*'a' \(positions 0 and 2\)"):
        producer_for(redis_client, keys, model_info, source).run()
    assert redis_client.exists(keys.stream) == 0


def test_allowed_duplicate_ids_keep_the_first_and_dead_letter_the_rest(redis_client, keys, model_info,
                                                                       tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "dup.jsonl", ["a", "b", "a", "c", "b"], ["1", "2", "3", "4", "5"])
    producer_for(redis_client, keys, model_info, source, allow_duplicate_ids=True).run()
    assert [i for m in published(redis_client, keys) for i in m.ids] == ["a", "b", "c"]
    dead = list_dead(redis_client, keys)
    assert sorted((d.letter.doc_ids[0], d.letter.pos, d.letter.reason) for d in dead) == [
        ("a", 2, "duplicate id"), ("b", 4, "duplicate id")]


def test_unusable_documents_are_dead_lettered_by_the_producer_and_nothing_is_lost(
        redis_client, keys, model_info, tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"id": 1, "text": "fine"}\n{"id": 2, "text": ""}\n{"id": 3, "text": "   "}\n'
                     b'{"id": 4, "text": "bad \xff\xfe bytes"}\n{"id": 5}\n{"id": 6, "text": "' + b"x" * 2000 + b'"}\n'
                     b'{"id": 7, "text": "also fine"}\n')
    report = producer_for(redis_client, keys, model_info, path, limits=Limits(max_doc_bytes=1000)).run()
    assert [i for m in published(redis_client, keys) for i in m.ids] == [1, 7]
    reasons = {d.letter.doc_ids[0]: d.letter.reason for d in list_dead(redis_client, keys)}
    assert reasons[2] == reasons[3] == "empty text"
    assert reasons[4].startswith("invalid UTF-8") and reasons[5] == "missing text"
    assert reasons[6] == "document over the size limit"
    assert report.rejected == 5
    assert int(redis_client.hget(keys.stats, "docs_dead")) == 5


def test_allow_empty_publishes_empty_documents(redis_client, keys, model_info, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "e.jsonl", [1, 2], ["", "text"])
    producer_for(redis_client, keys, model_info, source, allow_empty=True).run()
    assert [t for m in published(redis_client, keys) for t in m.texts or []] == ["", "text"]


def test_pretokenized_batches_carry_the_models_token_ids(redis_client, keys, model_info, source) -> None:
    from embedq.tokenization import Tokenizer

    tokenizer = Tokenizer(model_info.tokenizer_file, model_info.max_seq_len)
    producer = Producer(redis_client, keys, open_source(SourceSpec(str(source))), model_info,
                        ProducerOptions(batch_size=10), encode=tokenizer.encode)
    producer.run()
    first = published(redis_client, keys)[0]
    tokens, lengths, truncated = first.token_arrays()
    expected = tokenizer.encode([f"document {i}" for i in range(10)])
    assert first.texts is None and tokens.tolist() == expected.tokens.tolist()
    assert lengths.tolist() == expected.lengths.tolist() and not truncated.any()


def test_resuming_with_other_settings_is_refused(redis_client, keys, model_info, source) -> None:
    producer_for(redis_client, keys, model_info, source).run()
    with pytest.raises(JobMismatch, match="batch_size"):
        producer_for(redis_client, keys, model_info, source, batch_size=20).run()


def test_a_second_producer_on_the_same_job_is_refused_while_the_first_holds_the_lock(
        redis_client, keys, model_info, source) -> None:
    from embedq.errors import UsageError

    first = producer_for(redis_client, keys, model_info, source)
    first.prepare()
    first.publisher.acquire()
    second = producer_for(redis_client, keys, model_info, source)
    with pytest.raises(UsageError, match="Another producer"):
        second.publisher.acquire(wait=0.5)
    first.publisher.release()
    second.publisher.acquire(wait=0.5)
