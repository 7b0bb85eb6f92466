"""`status`: complete only once the output is final, and the command that finishes a job that needs one.

Against a private Redis that loses the writes acknowledged after a mark (`tests/lossy_redis.py`): the
finalization of a job's output can be lost like any other write, and status must then say so again.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from embedq import job as job_record
from embedq.job import JobRecord
from embedq.keys import JobKeys
from embedq.model import load_model_info
from embedq.status import JobStatus, read_status
from tests.embedq.test_cli import embedq
from tests.lossy_redis import LossyRedis
from tests.support import embedq_process, produce, write_jsonl

N_DOCS = 120


@pytest.fixture
def tiny(tiny_model: Path):  # type: ignore[no-untyped-def]
    return load_model_info(tiny_model)


def status_of(url: str, job: str) -> tuple[dict, str]:  # type: ignore[type-arg]
    """`embedq status --json` and the text `embedq status` prints."""
    as_json = embedq("status", "--job", job, "--json", "--redis", url)
    text = embedq("status", "--job", job, "--redis", url)
    assert as_json.returncode == 0 and text.returncode == 0, as_json.stderr + text.stderr
    return json.loads(as_json.stdout), text.stdout


def run_advice(url: str, command: str, log: Path) -> None:
    """Run the command status advised, as an operator pastes it (Redis from the environment)."""
    args = shlex.split(command)
    assert args[0] == "embedq"
    code = embedq_process(*args[1:], env={"EMBEDQ_REDIS_URL": url}, log=log).wait(timeout=120)
    assert code == 0, log.read_text()[-3000:]


def test_status_says_complete_only_once_the_output_is_final_and_again_not_after_redis_lost_that(
        tmp_path: Path, tiny, tiny_model: Path, gloss_texts: list[str]) -> None:
    source = write_jsonl(tmp_path / "docs.jsonl", list(range(N_DOCS)), gloss_texts[:N_DOCS])
    out, log = tmp_path / "out", tmp_path / "commands.log"
    with LossyRedis(tmp_path / "redis") as server:
        client, keys = server.client(), JobKeys("final")
        produce(client, keys, tiny, source, batch_size=40)
        worker = embedq_process("work", "--job", keys.job, "--out", str(out), "--redis", server.url, "--model",
                                str(tiny_model), "--lease-seconds", "2", log=log)
        assert worker.wait(timeout=120) == 0, log.read_text()[-3000:]
        # Settled, not finalized: as when the last worker dies between its last settle and finalizing.
        client.hdel(keys.stats, job_record.FINALIZED_FIELD)
        client.hset(keys.stats, job_record.OUTPUT_FIELD, str(out.resolve()))  # what workers record at start
        shown, text = status_of(server.url, keys.job)
        assert shown["settled"] and not shown["complete"] and shown["state"] == "not finalized"
        assert shown["command"] == f"embedq gc --job final --out {out.resolve()}"
        assert "(not finalized)" in text and shown["command"] in text and "not final yet" in text
        server.mark()
        run_advice(server.url, shown["command"], log)
        shown, text = status_of(server.url, keys.job)
        assert shown["complete"] and shown["state"] == "complete" and shown["command"] is None
        assert "(complete)" in text and "action" not in text
        assert server.lose_writes() > 0  # Redis loses its last second: the finalization with it
        shown, _ = status_of(server.url, keys.job)
        assert shown["settled"] and not shown["complete"] and shown["state"] == "not finalized"
        run_advice(server.url, shown["command"], log)
        assert read_status(server.client(), keys).complete


def _record(**fields: object) -> JobRecord:
    base: dict[str, object] = dict(
        job="j", model="m", model_digest="d", model_path="/models/m", dimension=8, pooling="mean", normalize=True,
        max_seq_len=128, source="docs.csv (csv)", source_fingerprint="f", id_type="string", documents=10,
        batch_size=512, pretokenized=False, max_doc_bytes=1 << 20, max_message_bytes=32 << 20,
        source_spec={"path": "/data/my docs.csv", "format": "auto", "id_field": "doc", "text_field": "body",
                     "text_unit": "line", "csv_delimiter": None})
    base.update(fields)
    return JobRecord(**base)  # type: ignore[arg-type]


def test_the_produce_command_repeats_every_setting_the_job_record_fixes() -> None:
    command = job_record.produce_command(_record(batch_size=50, pretokenized=True, allow_empty=True,
                                                 max_message_bytes=1000), JobKeys("j", "tenant1"))
    assert command == ("EMBEDQ_MAX_MESSAGE_BYTES=1000 embedq produce '/data/my docs.csv' --job j --key-prefix tenant1 "
                       "--id-field doc --text-field body --model /models/m --pooling mean --normalize "
                       "--max-seq-len 128 --batch-size 50 --allow-empty --pretokenize")
    plain = job_record.produce_command(_record(normalize=False, source_spec={"path": "-"}), JobKeys("j"))
    assert plain.startswith("embedq produce - --job j --model /models/m --pooling mean --no-normalize")
    assert "pipe the same input" in job_record.stall_advice(_record(source_spec={"path": "-"}), JobKeys("j"),
                                                            published=4)


@pytest.mark.parametrize(("fields", "state", "needs"), [
    ({"producer_done": False, "producer_lock": None, "stall_advice": "run it"}, "stalled", "produce"),
    ({"producer_done": False, "producer_lock": "host:1:ab"}, "waiting for workers", None),
    ({"producer_done": True, "stream_entries": 2}, "waiting for workers", None),
    ({"producer_done": True, "finalized": False}, "not finalized", "gc"),
    ({"producer_done": True, "finalized": False, "workers": {"w": {}}}, "finalizing", "gc"),
    ({"producer_done": True, "finalized": True}, "complete", None),
    ({"producer_done": False, "finalized": True, "stall_advice": "run it"}, "stalled", "produce"),
])
def test_each_state_names_what_an_operator_must_run(fields: dict, state: str, needs: str | None) -> None:  # type: ignore[type-arg]
    status = JobStatus(job="j", exists=True, produce_command="embedq produce x --job j", output="/o", **fields)
    assert status.state == state
    command = status.command
    assert (command is None) if needs is None else (command is not None and command.split()[1] == needs)
    assert status.as_dict()["command"] == command and (status.action is None) == (command is None)
