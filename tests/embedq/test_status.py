"""`status`: complete only once the output is final, and the command that finishes a job that needs one;
a worker that stopped renewing its lease shown as such; `--watch` in the form its reader needs.

Against a private Redis that loses the writes acknowledged after a mark (`tests/lossy_redis.py`): the
finalization of a job's output can be lost like any other write, and status must then say so again.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from embedq import job as job_record
from embedq.heartbeat import liveness
from embedq.job import JobRecord
from embedq.keys import JobKeys
from embedq.model import load_model_info
from embedq.progress import byte_size
from embedq.status import JobStatus, read_status, render
from embedq.worker.consumer import StreamConsumer
from embedq.worker.lease import InFlight, Lease
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
                       "--max-seq-len 128 --prompt '' --batch-size 50 --allow-empty --pretokenize")
    plain = job_record.produce_command(_record(normalize=False, source_spec={"path": "-"}), JobKeys("j"))
    assert plain.startswith("embedq produce - --job j --model /models/m --pooling mean --no-normalize")
    assert "pipe the same input" in job_record.stall_advice(_record(source_spec={"path": "-"}), JobKeys("j"),
                                                            published=4)
    prompted = job_record.produce_command(_record(prompt="passage: "), JobKeys("j"))
    assert "--prompt 'passage: '" in prompted
    sliced = job_record.stall_advice(_record(), JobKeys("j"), published=40, slices=4)
    assert "--slice K/4` for each slice K from 0 to 3" in sliced


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


# -- workers that stopped renewing their lease ----------------------------------------------------

def fields_of(text: str) -> dict[str, str]:
    """The rows of `render`'s output, by name."""
    rows = [re.fullmatch(r"\s*(\S.*?)\s{2,}(\S.*)", line) for line in text.splitlines()]
    return {row[1]: row[2] for row in rows if row is not None}


def heartbeat(client: redis.Redis, keys: JobKeys, worker: str, lease_seconds: float) -> Lease:
    """A worker's lease, renewed once (as a worker does when it starts) by the worker's own code."""
    lease = Lease(client, keys, worker, StreamConsumer(client, keys, worker, int(lease_seconds * 1000)), InFlight(),
                  lease_seconds, status=lambda: {"state": "committing", "backend": "torch", "device": "cuda:0",
                                                 "precision": "fp16", "documents": 500, "docs_per_s": 100.0})
    lease.beat()
    return lease


def test_a_worker_whose_heartbeat_stopped_is_shown_stale_and_not_counted_alive(redis_client: redis.Redis,
                                                                             job_name: str) -> None:
    keys = JobKeys(job_name)
    job_record.create_or_check(redis_client, keys, _record(job=job_name))
    killed = "gpu_1_aaaaaa"
    heartbeat(redis_client, keys, killed, lease_seconds=3.0)  # renews every 1 s; stale after 2 s, gone after 3 s
    assert read_status(redis_client, keys).workers[killed]["stale"] is False
    time.sleep(2.2)  # killed: its heartbeat thread renews nothing
    heartbeat(redis_client, keys, "gpu_2_bbbbbb", lease_seconds=3.0)  # a live one has just renewed
    shown = read_status(redis_client, keys)
    silent, alive = shown.workers[killed], shown.workers["gpu_2_bbbbbb"]
    assert silent["stale"] and 2.0 < silent["age_s"] < 3.0 and 0 < silent["lease_expires_in_s"] < 1.0
    assert not alive["stale"] and alive["age_s"] < 1.0
    as_json = json.loads(json.dumps(shown.as_dict()))
    assert as_json["workers_alive"] == 1 and as_json["workers_not_responding"] == 1
    assert as_json["docs_per_s"] == 100.0  # the silent worker's last rate is not throughput any more
    fields = fields_of(render(shown))
    assert fields["workers alive"] == "1 alive, 1 not responding"
    assert re.fullmatch(r"stale \(no heartbeat for 2 s, was committing; lease expires in [01] s\), torch on cuda:0 "
                        r"fp16, 500 documents, 100 docs/s", fields[killed]), fields[killed]
    assert fields["gpu_2_bbbbbb"].startswith("committing, torch on cuda:0")


def test_staleness_starts_after_two_missed_renewals_and_a_heartbeat_without_a_stamp_is_never_stale() -> None:
    beat = {"beat_redis_s": 1000.0, "lease_s": 30.0}  # renewed every 10 s
    assert not liveness(beat, now=1019.9).stale and liveness(beat, now=1020.1).stale
    assert liveness(beat, now=1012.0).lease_expires_in_s == 18.0
    assert liveness(beat, now=999.0).age_s == 0.0  # a beat that landed after the reader read the clock
    assert not liveness({"state": "embedding"}, now=10**10).stale  # an older worker's heartbeat


# -- status --watch --------------------------------------------------------------------------------

HEADER = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  ", re.MULTILINE)
WATCH_ENV = {**os.environ, "EMBEDQ_BACKEND": "torch", "PYTHONUNBUFFERED": "1", "COLUMNS": "100", "LINES": "40",
             "TERM": "xterm"}


@pytest.fixture
def running_job(redis_client: redis.Redis, job_name: str) -> Iterator[JobKeys]:
    """A job whose producer has not finished; `complete` completes it."""
    keys = JobKeys(job_name)
    job_record.create_or_check(redis_client, keys, _record(job=job_name))
    yield keys


def complete(client: redis.Redis, keys: JobKeys) -> None:
    """The producer finished, every batch settled, the output finalized."""
    client.hset(keys.producer, "done", 1)
    client.hset(keys.stats, job_record.FINALIZED_FIELD, 1)


def watch(redis_url: str, keys: JobKeys, *args: str, stdout: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen([sys.executable, "-m", "embedq", "status", "--job", keys.job, "--redis", redis_url,
                                "--watch", "0.2", *args], stdout=stdout, stderr=stdout, env=WATCH_ENV)
    watchdog = threading.Timer(60, process.kill)  # a hung watch fails the test, not the suite
    watchdog.daemon = True
    watchdog.start()
    return process


def read_piped(process: subprocess.Popen[bytes], client: redis.Redis, keys: JobKeys, first: str) -> str:
    """All `process` prints; the job is completed once it has printed `first` and a little more."""
    assert process.stdout is not None
    seen = b""
    while first.encode() not in seen:
        line = process.stdout.readline()
        assert line, seen.decode()
        seen += line
    time.sleep(0.5)  # more refreshes of the running job
    complete(client, keys)
    rest, _ = process.communicate(timeout=30)
    assert process.returncode == 0, (seen + rest).decode()
    return (seen + rest).decode()


def test_watch_into_a_pipe_appends_a_block_per_refresh_under_its_timestamp_until_complete(
        redis_url: str, redis_client: redis.Redis, running_job: JobKeys) -> None:
    output = read_piped(watch(redis_url, running_job, stdout=subprocess.PIPE), redis_client, running_job, "job ")
    assert "\x1b" not in output
    blocks = output.rstrip("\n").split("\n\n")
    assert len(blocks) >= 3 and all(HEADER.match(block) for block in blocks), output
    assert all("every 0.2 s" in block.splitlines()[0] for block in blocks[:-1])
    assert "stopped: job complete" in blocks[-1].splitlines()[0]
    assert fields_of(blocks[-1])["job"] == f"{running_job.job} (complete)"


def test_watch_with_json_prints_one_json_object_per_line_with_its_time(
        redis_url: str, redis_client: redis.Redis, running_job: JobKeys) -> None:
    output = read_piped(watch(redis_url, running_job, "--json", stdout=subprocess.PIPE), redis_client, running_job,
                        "\n")
    lines = [json.loads(line) for line in output.splitlines()]
    assert len(lines) >= 3 and all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", line["time"])
                                   for line in lines)
    assert [line["complete"] for line in lines] == [False] * (len(lines) - 1) + [True]


def terminal_screen(output: str) -> list[str]:
    """The lines a terminal shows after `output`: as much of VT100 as rich's Live uses (CR, LF, cursor up,
    erase line; other escape sequences are ignored)."""
    lines, row, col = [""], 0, 0
    for token in re.findall(r"\x1b\[[0-9;?]*[A-Za-z]|\r|\n|[^\x1b\r\n]+", output):
        if token == "\r":
            col = 0
        elif token == "\n":
            row, col = row + 1, 0
            lines += [""] * (row + 1 - len(lines))
        elif token.endswith("A") and token.startswith("\x1b["):
            row = max(0, row - int(token[2:-1] or 1))
        elif token == "\x1b[2K":
            lines[row] = ""
        elif not token.startswith("\x1b"):
            lines[row] = lines[row][:col].ljust(col) + token + lines[row][col + len(token):]
            col += len(token)
    return [line.rstrip() for line in lines if line.strip()]


def test_watch_on_a_terminal_redraws_in_place_and_leaves_the_final_frame(
        redis_url: str, redis_client: redis.Redis, running_job: JobKeys) -> None:
    main, secondary = pty.openpty()
    process = watch(redis_url, running_job, stdout=secondary)
    os.close(secondary)
    chunks: list[bytes] = []
    completed = False
    while True:  # read until the process closes the terminal (EIO on Linux)
        if not completed and b"".join(chunks).count(b"every 0.2 s") >= 3:  # three frames of the running job
            complete(redis_client, running_job)
            completed = True
        if not select.select([main], [], [], 30)[0]:
            break
        try:
            chunk = os.read(main, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main)
    assert process.wait(timeout=30) == 0
    output = b"".join(chunks).decode()
    assert completed, output
    assert "\x1b[1A" in output and "\x1b[2K" in output  # the cursor went back up over the last frame
    assert output.count(f"{running_job.job} (") >= 4  # the job line, drawn once per frame
    screen = terminal_screen(output)
    assert len([line for line in screen if HEADER.match(line)]) == 1, screen  # one frame left: the final one
    assert HEADER.match(screen[0]) and "stopped: job complete" in screen[0], screen
    assert fields_of("\n".join(screen))["job"] == f"{running_job.job} (complete)"
    assert sum(line.startswith("job ") for line in screen) == 1


def test_watch_needs_a_period_over_zero(redis_url: str) -> None:
    refused = embedq("status", "--job", "j", "--watch", "0", "--redis", redis_url)
    assert refused.returncode == 2 and "--watch takes a number of seconds greater than 0" in refused.stderr


def test_status_shows_the_jobs_redis_memory_and_says_so_where_memory_usage_is_refused(
        redis_client: redis.Redis, redis_url: str, running_job: JobKeys) -> None:
    import uuid

    shown = read_status(redis_client, running_job)
    assert shown.redis_bytes == job_record.job_memory(redis_client, running_job) and (shown.redis_bytes or 0) > 0
    assert f"redis memory   {byte_size(shown.redis_bytes or 0)}\n" in render(shown)
    user, password = f"t-nomemory-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    redis_client.acl_setuser(user, enabled=True, passwords=[f"+{password}"], keys=["*"],
                             commands=["+@all", "-memory"])
    try:
        narrow = redis.Redis.from_url(redis_url, username=user, password=password)
        refused = read_status(narrow, running_job)
        narrow.close()
    finally:
        redis_client.acl_deluser(user)
    assert refused.exists and refused.redis_bytes is None and refused.as_dict()["redis_bytes"] is None
    assert "redis memory   not known (this Redis user may not run MEMORY USAGE)" in render(refused)
