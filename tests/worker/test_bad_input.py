"""The bad-input suite: crafted stream entries go through a real worker alongside a normal job.

Every bad entry is injected with XADD next to a produced corpus and meets one real worker (real
Redis, real Parquet, a small random BERT). Each ends as one dead letter whose error names the
problem (a whole unusable message, or the one unusable document, its batch-mates embedded), and
the job completes. Ids that collide with another batch cannot be seen by a worker (it holds one
window, not the job), so there it is `embedq verify` that must say so. A model mismatch between
job and worker is a clear error of the CLI (exit 7).
"""

from __future__ import annotations

import pickle
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import redis

from embedq.deadletter import DeadEntry, list_dead
from embedq.engines.base import Engine
from embedq.job import JobRecord
from embedq.keys import JobKeys
from embedq.model import ModelInfo, load_model_info
from embedq.protocol import (
    BAD_TOKENS,
    INVALID_UTF8,
    MESSAGE_TOO_LARGE,
    NO_DOCUMENTS,
    NO_PAYLOAD,
    NOT_A_BATCH,
    NOT_MSGPACK,
    PAYLOAD_FIELD,
    SCHEMA_VERSION_UNSUPPORTED,
    SHAPE_MISMATCH,
    WRONG_JOB,
    Limits,
)
from embedq.verify import verify_job
from tests.embedq.test_cli import embedq
from tests.support import add_vouched, produce, run_worker, write_jsonl

N_DOCS = 600
LIMITS = Limits(max_message_bytes=64 << 10, max_doc_bytes=4096)  # small, so "oversized" stays cheap
VOCAB = 30522  # MiniLM's vocabulary, which the tiny model shares
CLS, SEP = 101, 102
SEQ = 10_000  # the crafted entries' sequence number; they are recorded in the ledger as embedq's own
SCHEMA = "message does not match the batch schema"  # embedq's words; what follows them is msgspec's


@dataclass(frozen=True)
class BadEntry:
    """One crafted stream entry and what the worker must say about it."""

    name: str
    fields: dict[bytes, bytes]
    error: str  # a fragment of the dead letter's error, in embedq's own words
    code: str = ""  # for a refused message, the dead letter's reason code (`embedq.protocol`)
    bad_ids: tuple[str, ...] = ()  # documents dead-lettered one by one (the rest of the message is embedded)
    good_ids: tuple[str, ...] = ()  # documents of the same message that must reach the output


def message(job: str, ids: list[Any], texts: list[Any] | None = None, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"v": 1, "job": job, "seq": SEQ, "pos": 10_000, "ids": ids, **fields}
    if texts is not None:
        body["texts"] = texts
    return body


def entry(body: Any) -> dict[bytes, bytes]:
    return {PAYLOAD_FIELD: msgspec.msgpack.encode(body)}


def tokens(rows: list[list[int]], *, lengths: list[int] | None = None) -> dict[str, Any]:
    """The token fields of a pretokenized message (int32 little-endian arrays as bytes)."""
    flat = np.array([t for row in rows for t in row], dtype="<i4")
    return {"tokens": flat.tobytes(),
            "lengths": np.array(lengths if lengths is not None else [len(r) for r in rows], dtype="<i4").tobytes(),
            "truncated": bytes(len(rows))}


def output_ids(out: Path) -> list[Any]:
    """Every id in the visible parts, repeats included (read as a glob reader would)."""
    import pyarrow.dataset as ds

    return ds.dataset(str(out), format="parquet").to_table(columns=["id"]).column("id").to_pylist()


class OpensAFile:
    """Unpickling this calls open(path, 'w'): proof, by a file appearing, that a payload was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def bad_entries(job: str, marker: Path) -> list[BadEntry]:
    ok = message(job, ["ok-0"], ["a fine text"])
    good = "a perfectly ordinary sentence"
    text_raw = msgspec.msgpack.encode(message(job, ["bad-utf8"], ["AAAA"]))
    surrogate_raw = msgspec.msgpack.encode(message(job, ["bad-surrogate"], ["BBBB"]))
    return [
        # The message itself is unusable: the whole entry is dead-lettered, not replayable.
        BadEntry("not msgpack", {PAYLOAD_FIELD: b"\xc1\xc1\xc1"}, "not valid msgpack", code=NOT_MSGPACK),
        BadEntry("truncated msgpack", {PAYLOAD_FIELD: msgspec.msgpack.encode(ok)[:-4]}, "not valid msgpack",
                 code=NOT_MSGPACK),
        BadEntry("msgpack array, not a map", entry([1, job, 0, 0, ["x"], ["x"]]), SCHEMA, code=NOT_A_BATCH),
        BadEntry("msgpack nil", entry(None), SCHEMA, code=NOT_A_BATCH),
        BadEntry("wrong schema version", entry({**ok, "v": 2}), "schema version 2 is not supported",
                 code=SCHEMA_VERSION_UNSUPPORTED),
        BadEntry("wrong job", entry({**ok, "job": "someone-else"}), "belongs to job 'someone-else'", code=WRONG_JOB),
        BadEntry("missing field", entry({k: v for k, v in ok.items() if k != "ids"}), SCHEMA, code=NOT_A_BATCH),
        BadEntry("unknown field", entry({**ok, "priority": 1}), SCHEMA, code=NOT_A_BATCH),
        BadEntry("field of the wrong type", entry({**ok, "seq": "7"}), SCHEMA, code=NOT_A_BATCH),
        BadEntry("negative sequence number", entry({**ok, "seq": -1}), "negative sequence number", code=NOT_A_BATCH),
        BadEntry("oversized message",
                 entry(message(job, [f"m{i}" for i in range(30)], ["y" * 2500] * 30)),
                 f"over the limit of {LIMITS.max_message_bytes}", code=MESSAGE_TOO_LARGE),
        BadEntry("oversized document", entry(message(job, ["huge", "ok-9"], ["z" * 5000, "fine"])),
                 "document over the size limit", bad_ids=("huge",), good_ids=("ok-9",)),
        BadEntry("invalid UTF-8 in a msgpack str", {PAYLOAD_FIELD: text_raw.replace(b"AAAA", b"\xff\xfeAA")},
                 "not valid UTF-8", code=INVALID_UTF8),
        BadEntry("lone surrogate (CESU-8 bytes)", {PAYLOAD_FIELD: surrogate_raw.replace(b"BBBB", b"\xed\xa0\x80B")},
                 "not valid UTF-8", code=INVALID_UTF8),
        BadEntry("boolean id", entry(message(job, [True], ["x"])), SCHEMA, code=NOT_A_BATCH),
        BadEntry("float id", entry(message(job, [1.5], ["x"])), SCHEMA, code=NOT_A_BATCH),
        BadEntry("null id", entry(message(job, [None], ["x"])), SCHEMA, code=NOT_A_BATCH),
        BadEntry("text that is not a string", entry(message(job, ["x"], [12])), SCHEMA, code=NOT_A_BATCH),
        BadEntry("msgpack extension type as text", entry(message(job, ["x"], [msgspec.msgpack.Ext(5, b"..")])),
                 SCHEMA, code=NOT_A_BATCH),
        BadEntry("ids and texts of different lengths", entry(message(job, ["a", "b"], ["only one"])),
                 "2 ids but 1 texts", code=SHAPE_MISMATCH),
        BadEntry("no documents", entry(message(job, [], [])), "holds no documents", code=NO_DOCUMENTS),
        BadEntry("texts and token ids both", entry(message(job, ["x"], ["x"], **tokens([[CLS, SEP]]))),
                 "both texts and token ids", code=NOT_A_BATCH),
        BadEntry("neither texts nor token ids", entry(message(job, ["x"])), "neither texts nor token ids",
                 code=NOT_A_BATCH),
        BadEntry("token lengths not matching the token array",
                 entry(message(job, ["x", "y"], **tokens([[CLS, 7, SEP], [CLS, SEP]], lengths=[3, 9]))),
                 "do not add up", code=SHAPE_MISMATCH),
        BadEntry("token arrays not matching the documents",
                 entry(message(job, ["x", "y"], **{**tokens([[CLS, SEP], [CLS, SEP]]), "truncated": b"\0"})),
                 "do not match the number of documents", code=SHAPE_MISMATCH),
        # Mean pooling over zero tokens is 0/0: the one NaN-producing input; refused before the engine.
        BadEntry("pretokenized document with zero tokens",
                 entry(message(job, ["x", "y"], **tokens([[CLS, SEP], []]))), "no token ids", code=BAD_TOKENS),
        BadEntry("negative token id", entry(message(job, ["x"], **tokens([[CLS, -3, SEP]]))), "negative token id",
                 code=BAD_TOKENS),
        BadEntry("entry without a payload field", {b"other": b"hello"}, "no payload field", code=NO_PAYLOAD),
        BadEntry("pickle payload (protocol 5)", {PAYLOAD_FIELD: pickle.dumps(OpensAFile(marker), protocol=5)},
                 SCHEMA, code=NOT_A_BATCH),
        BadEntry("pickle payload (protocol 0)", {PAYLOAD_FIELD: pickle.dumps(OpensAFile(marker), protocol=0)},
                 SCHEMA, code=NOT_A_BATCH),
        # One document is unusable: it alone is dead-lettered, its batch-mate is embedded.
        BadEntry("empty text", entry(message(job, ["bad-empty", "ok-empty"], ["", good])), "empty text",
                 bad_ids=("bad-empty",), good_ids=("ok-empty",)),
        BadEntry("whitespace-only text", entry(message(job, ["bad-blank", "ok-blank"], [" \t\n ", good])),
                 "empty text", bad_ids=("bad-blank",), good_ids=("ok-blank",)),
        BadEntry("token id out of the vocabulary",
                 entry(message(job, ["bad-vocab", "ok-vocab"], **tokens([[CLS, VOCAB + 5, SEP], [CLS, 2023, SEP]]))),
                 f"out of the model's vocabulary ({VOCAB})", bad_ids=("bad-vocab",), good_ids=("ok-vocab",)),
        BadEntry("more token ids than max_seq_len",
                 entry(message(job, ["bad-long", "ok-long"], **tokens([[CLS, *[2023] * 200, SEP], [CLS, 2023, SEP]]))),
                 "more than max_seq_len (128) token ids", bad_ids=("bad-long",), good_ids=("ok-long",)),
    ]


def small_job(redis_client: redis.Redis, job_name: str, tiny_model: Path, gloss_texts: list[str], tmp_path: Path,
              ids: list[Any]) -> tuple[JobKeys, ModelInfo, JobRecord]:
    """A produced job of `ids` (batches of 50, small LIMITS) on the tiny model: (keys, model, record)."""
    keys = JobKeys(job_name)
    tiny = load_model_info(tiny_model)
    source = write_jsonl(tmp_path / "docs.jsonl", ids, gloss_texts[:len(ids)])
    record, _ = produce(redis_client, keys, tiny, source, batch_size=50, limits=LIMITS)
    return keys, tiny, record


@pytest.fixture(scope="module")
def tiny_engine(tiny_model: Path) -> Iterator[Engine]:
    from embedq.engines import create_engine
    from embedq.engines.base import EngineConfig
    from embedq.engines.profiles import profile_table

    info = load_model_info(tiny_model)
    engine = create_engine("torch", EngineConfig(model=info, profiles=profile_table(info.max_seq_len, 4096),
                                                 device="cpu", precision="fp32", threads=2))
    with engine:
        yield engine


def test_every_bad_entry_is_dead_lettered_with_its_reason_and_the_rest_of_the_job_completes(
        redis_client, job_name: str, tiny_model: Path, tiny_engine, gloss_texts: list[str], tmp_path: Path,
        redis_url: str) -> None:
    ids = [f"d{i}" for i in range(N_DOCS)]
    keys, tiny, record = small_job(redis_client, job_name, tiny_model, gloss_texts, tmp_path, ids)
    marker = tmp_path / "unpickled"
    cases = bad_entries(job_name, marker)
    assert len(cases) >= 20
    injected = {add_vouched(redis_client, keys, case.fields, SEQ): case for case in cases}
    # Ids that collide: one with a document of another batch, one repeated inside a single message.
    add_vouched(redis_client, keys, entry(message(job_name, ["d5", "ok-collide"], ["another d5", "fine"])), SEQ)
    add_vouched(redis_client, keys, entry(message(job_name, ["twice", "twice"], ["once", "and again"])), SEQ)

    out = tmp_path / "out"
    report = run_worker(redis_client, keys, record, tiny, tiny_engine, out)

    assert report.job_complete
    assert not marker.exists(), "a pickle read from Redis was unpickled"
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(OpensAFile(control)))  # the same payload does act when unpickled
    assert control.exists()
    letters: dict[str, list[DeadEntry]] = {}
    for dead in list_dead(redis_client, keys):
        letters.setdefault(dead.letter.entry_id, []).append(dead)
    assert set(letters) == set(injected), "a bad entry has no dead letter, or a good one has one"
    for entry_id, case in injected.items():
        (dead,) = letters[entry_id]
        letter = dead.letter
        assert case.error in letter.error, f"{case.name}: {letter.error!r}"
        assert letter.code == case.code, f"{case.name}: {letter.code!r}"
        assert letter.worker == report.worker and letter.deliveries == 1, case.name
        if case.bad_ids:
            assert case.error in letter.reason and letter.doc_ids == list(case.bad_ids), case.name
            assert letter.replayable, case.name
        else:
            assert letter.reason == "malformed message" and letter.doc_ids == [], case.name
            assert not letter.replayable, case.name

    embedded = output_ids(out)
    batch_mates = {i for case in cases for i in case.good_ids}
    assert set(embedded) == set(ids) | batch_mates | {"ok-collide", "twice"}
    assert sorted(i for i in embedded if embedded.count(i) > 1) == ["d5", "d5", "twice", "twice"]

    # What a worker cannot see, verify reports: checked against the source plus the injected ids.
    dead_ids = [i for case in cases for i in case.bad_ids]
    everything = [*ids, *sorted(batch_mates), "ok-collide", "twice", *dead_ids]
    listing = write_jsonl(tmp_path / "everything.jsonl", everything, ["x"] * len(everything))
    result = verify_job(redis_client, keys, str(out), source=str(listing), allow_dead=True)
    assert not result.ok
    assert (result.duplicated, result.missing, result.unexpected) == (2, 0, 0), result.render()
    assert result.dead_documents == len(dead_ids)
    assert sorted(result.examples["duplicated"]) == ["d5", "twice"]
    cli = embedq("verify", "--job", job_name, "--out", str(out), "--source", str(listing), "--allow-dead-letters",
                  "--redis", redis_url)
    assert cli.returncode == 8, cli.stdout + cli.stderr
    assert "duplicated         2" in cli.stdout and "'d5'" in cli.stdout and "'twice'" in cli.stdout


def test_an_oversized_document_is_dead_lettered_alone_and_its_batch_mates_are_embedded(
        redis_client, job_name: str, tiny_model: Path, tiny_engine, gloss_texts: list[str], tmp_path: Path) -> None:
    keys, tiny, record = small_job(redis_client, job_name, tiny_model, gloss_texts, tmp_path,
                                   [f"d{i}" for i in range(100)])
    add_vouched(redis_client, keys, entry(message(job_name, ["huge", "ok-huge"], ["z" * 5000, "fine"])), SEQ)
    out = tmp_path / "out"
    assert run_worker(redis_client, keys, record, tiny, tiny_engine, out).job_complete
    (dead,) = list_dead(redis_client, keys)
    assert dead.letter.doc_ids == ["huge"] and "size limit" in dead.letter.error
    assert "ok-huge" in output_ids(out)


def _arrow_errors() -> tuple[type[BaseException], ...]:
    import pyarrow as pa

    return (pa.ArrowTypeError, pa.ArrowInvalid, OverflowError)


@pytest.mark.parametrize(("source_ids", "wrong_id"), [([f"d{i}" for i in range(100)], 7),
                                                      (list(range(100)), "seven"),
                                                      (list(range(100)), 2**64 - 1)],
                         ids=["int id in a job of string ids", "string id in a job of int ids",
                              "int id beyond int64"])
def test_an_id_of_the_wrong_type_is_dead_lettered_instead_of_stopping_the_worker(
        redis_client, job_name: str, tiny_model: Path, tiny_engine, gloss_texts: list[str], tmp_path: Path,
        source_ids: list[Any], wrong_id: Any) -> None:
    keys, tiny, record = small_job(redis_client, job_name, tiny_model, gloss_texts, tmp_path, source_ids)
    mate = source_ids[0] if isinstance(source_ids[0], str) else 10_000
    add_vouched(redis_client, keys, entry(message(job_name, [wrong_id, mate], ["wrong id type", "fine"])), SEQ)
    report = run_worker(redis_client, keys, record, tiny, tiny_engine, tmp_path / "out")
    assert report.job_complete
    (dead,) = list_dead(redis_client, keys)
    assert dead.letter.doc_ids == [wrong_id] and "id" in dead.letter.error


def test_a_worker_given_another_model_than_the_jobs_exits_7_with_both_models_named(
        tmp_path: Path, job_name: str, tiny_model: Path, redis_url: str) -> None:
    source = write_jsonl(tmp_path / "docs.jsonl", [1, 2, 3], ["one", "two", "three"])
    produced = embedq("produce", str(source), "--job", job_name, "--redis", redis_url)  # the bundled MiniLM
    assert produced.returncode == 0, produced.stderr
    worked = embedq("work", "--job", job_name, "--out", str(tmp_path / "out"), "--model", str(tiny_model),
                     "--redis", redis_url)
    assert worked.returncode == 7, worked.stdout + worked.stderr
    assert "does not match job" in worked.stderr and "all-MiniLM-L6-v2" in worked.stderr
    assert "Traceback" not in worked.stderr
    assert not list((tmp_path / "out").glob("*.parquet"))


def test_a_worker_without_the_jobs_model_on_its_machine_exits_7_and_says_where_it_looked(
        tmp_path: Path, job_name: str, tiny_model: Path, redis_url: str) -> None:
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    source = write_jsonl(tmp_path / "docs.jsonl", [1, 2, 3], ["one", "two", "three"])
    produced = embedq("produce", str(source), "--job", job_name, "--model", str(model), "--redis", redis_url)
    assert produced.returncode == 0, produced.stderr
    model.rename(tmp_path / "moved")  # the worker's machine does not have the model where the job says
    worked = embedq("work", "--job", job_name, "--out", str(tmp_path / "out"), "--redis", redis_url)
    assert worked.returncode == 7, worked.stdout + worked.stderr
    assert f"not at {model} on this machine" in worked.stderr and "--model" in worked.stderr
    assert "Traceback" not in worked.stderr
