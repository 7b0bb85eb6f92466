"""The entry ledger: entries embedq added pass, entries written straight into the stream are refused.

Crash isolation's split (`Committer.split`) and `dead-letter replay` (`deadletter.replay`) add
entries too; theirs must pass, and a hostile entry split in halves must stay refused.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import redis

from embedq import deadletter
from embedq.keys import GROUP, JobKeys
from embedq.ledger import (
    SEQ_BEYOND_CURSOR,
    SEQ_MISMATCH,
    SEQ_REUSED,
    EntryLedger,
    read_ledger,
)
from embedq.producer.producer import Producer, ProducerOptions
from embedq.producer.sources import SourceSpec, open_source
from embedq.protocol import PAYLOAD_FIELD, SCHEMA_VERSION, BatchMessage, encode_batch
from embedq.worker.commit import Committer
from tests.lossy_redis import LossyRedis
from tests.support import produce, write_jsonl


@pytest.fixture
def keys(job_name: str) -> JobKeys:
    return JobKeys(job_name)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "docs.jsonl", list(range(30)), [f"document {i}" for i in range(30)])


def entries(client: redis.Redis, keys: JobKeys) -> dict[str, BatchMessage]:
    return {entry_id.decode(): msgspec.msgpack.decode(fields[PAYLOAD_FIELD], type=BatchMessage)
            for entry_id, fields in client.xrange(keys.stream)}


def refusals(client: redis.Redis, keys: JobKeys) -> dict[str, str | None]:
    """Each stream entry's refusal code (None: it passes), as a worker would check a window of them."""
    found = entries(client, keys)
    ledger = read_ledger(client, keys, list(found))
    return {entry_id: getattr(ledger.refusal(entry_id, message.seq), "code", None)
            for entry_id, message in found.items()}


def hostile(client: redis.Redis, keys: JobKeys, seq: int, pos: int) -> str:
    """An entry written straight into the stream, as a client with write access could."""
    message = BatchMessage(v=SCHEMA_VERSION, job=keys.job, seq=seq, pos=pos, ids=[0, 1], texts=["a", "b"])
    return client.xadd(keys.stream, {PAYLOAD_FIELD: encode_batch(message)}).decode()


def test_published_entries_pass_and_entries_written_straight_into_the_stream_are_refused(
        redis_client, keys, model_info, source) -> None:
    produce(redis_client, keys, model_info, source, batch_size=10)
    assert set(refusals(redis_client, keys).values()) == {None}
    reused = hostile(redis_client, keys, seq=0, pos=0)
    beyond = hostile(redis_client, keys, seq=3, pos=30)
    found = refusals(redis_client, keys)
    assert found.pop(reused) == SEQ_REUSED and found.pop(beyond) == SEQ_BEYOND_CURSOR
    assert set(found.values()) == {None}


def test_split_halves_and_replayed_letters_pass_and_a_split_hostile_entry_stays_refused(
        redis_client, keys, model_info, source) -> None:
    produce(redis_client, keys, model_info, source, batch_size=10)
    bad = hostile(redis_client, keys, seq=1, pos=10)
    redis_client.xgroup_create(keys.stream, GROUP, id="0")
    redis_client.xreadgroup(GROUP, "w", {keys.stream: ">"}, count=10)
    committer = Committer(redis_client, keys, "w")
    published = entries(redis_client, keys)
    first, message = next(iter(published.items()))
    for entry_id, msg in ((first, message), (bad, published[bad])):
        halves = [encode_batch(deadletter.subset(msg, range(0, 1))), encode_batch(deadletter.subset(msg, range(1, 2)))]
        assert committer.split(entry_id, halves)
    letter = deadletter.for_documents(message, [5], entry_id=first, reason="embedding failed", error="boom",
                                      worker="w")
    redis_client.xadd(keys.dead, {deadletter.DEAD_FIELD: deadletter.encode(letter)})
    assert deadletter.replay(redis_client, keys, deadletter.list_dead(redis_client, keys))[0] == 1
    found, codes = entries(redis_client, keys), refusals(redis_client, keys)
    assert first not in found and bad not in found
    same_seq = [e for e, m in found.items() if m.seq == message.seq]
    assert len(same_seq) == 3 and all(codes[e] is None for e in same_seq)  # two halves and one replay
    assert sorted(codes[e] for e, m in found.items() if m.seq == 1 and len(m.ids) == 1 and m.texts in (["a"], ["b"])
                  ) == [SEQ_REUSED, SEQ_REUSED]
    assert redis_client.hget(keys.ledger, first) is None  # the replaced entry's record went with it


def test_a_publish_redis_lost_loses_its_record_with_it_and_the_republished_entry_passes(
        tmp_path: Path, model_info, source) -> None:
    with LossyRedis(tmp_path / "redis") as server:
        client, keys = server.client(), JobKeys("ledger")
        Producer(client, keys, open_source(SourceSpec(str(source))), model_info, ProducerOptions(batch_size=10),
                 stopping=_after(1)).run()
        server.mark()
        produce(client, keys, model_info, source, batch_size=10)
        assert server.lose_writes() > 0
        client = server.client()
        assert client.xlen(keys.stream) == client.hlen(keys.ledger) == 1
        produce(client, keys, model_info, source, batch_size=10)
        assert client.xlen(keys.stream) == client.hlen(keys.ledger) == 3
        assert set(refusals(client, keys).values()) == {None}


def _after(batches: int):  # type: ignore[no-untyped-def]
    calls = {"n": 0}

    def stopping() -> bool:
        calls["n"] += 1
        return calls["n"] > batches

    return stopping


def test_the_check_is_pure_and_leaves_jobs_without_a_ledger_unchecked() -> None:
    ledger = EntryLedger(recorded={"1-0": 0, "2-0": 1}, next_seq=2, checked_from=0)
    assert ledger.refusal("1-0", 0) is None and ledger.refusal("2-0", 1) is None
    assert ledger.refusal("2-0", 0).code == SEQ_MISMATCH  # type: ignore[union-attr]
    assert ledger.refusal("3-0", 0).code == SEQ_REUSED  # type: ignore[union-attr]
    assert ledger.refusal("3-0", 2).code == SEQ_BEYOND_CURSOR  # type: ignore[union-attr]
    legacy = EntryLedger(recorded={}, next_seq=2, checked_from=None)
    assert legacy.refusal("3-0", 0) is None
    upgraded = EntryLedger(recorded={}, next_seq=9, checked_from=5)  # resumed by an embedq with the ledger
    assert upgraded.refusal("3-0", 4) is None and upgraded.refusal("3-0", 5).code == SEQ_REUSED  # type: ignore[union-attr]


def test_a_refused_entrys_dead_letter_is_not_replayable_and_claims_no_document() -> None:
    ledger = EntryLedger(recorded={}, next_seq=3, checked_from=0)
    refusal = ledger.refusal("9-0", 0)
    assert refusal is not None
    letter = deadletter.for_refused_entry("job", "9-0", b"raw", 0, refusal, worker="w", deliveries=1)
    assert not letter.replayable and letter.doc_ids == [] and letter.code == SEQ_REUSED and letter.seq == 0
    assert deadletter.why_not_replayable(letter, allow_empty=False) is not None
    assert "already published" in letter.reason and "9-0" in letter.error
