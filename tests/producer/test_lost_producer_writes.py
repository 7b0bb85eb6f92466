"""Redis loses the end of the publishing: a job must not stall silently, and must complete exactly once.

On a private Redis that loses the writes acknowledged after a mark (`tests/lossy_redis.py`, SIGKILL
and the AOF cut back, as a crash under `appendfsync everysec` or a failover leaves it): the producer
publishes the first batches, the test marks, the producer publishes the last batches and its `done`
mark, and Redis then loses them. Workers would wait forever for batches that never come. `status`
must call the job stalled and give the command that finishes it; `produce --until-complete` and
`embedq run` must finish it by themselves. Real processes throughout, a small random BERT.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from embedq.job import producer_stalled
from embedq.keys import GROUP, JobKeys
from embedq.status import read_status
from tests.lossy_redis import LossyRedis
from tests.support import embedq_process, read_output, wait_until, write_jsonl

N_DOCS, BATCH, BACKLOG = 300, 50, 4  # six batches; the producer waits for room after the fourth


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LossyRedis]:
    with LossyRedis(tmp_path / "redis") as lossy:
        yield lossy


@pytest.fixture
def source(tmp_path: Path, gloss_texts: list[str]) -> Path:
    return write_jsonl(tmp_path / "docs.jsonl", list(range(N_DOCS)), gloss_texts[:N_DOCS])


def cli(url: str, *args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """The CLI in its own process, its Redis given as an operator's environment gives it."""
    return embedq_process(*args, env={"EMBEDQ_REDIS_URL": url, **(env or {})}, log=log)


def produce_args(source: Path, job: str, tiny_model: Path, *extra: str) -> list[str]:
    return ["produce", str(source), "--job", job, "--model", str(tiny_model), "--batch-size", str(BATCH),
            "--backlog", str(BACKLOG), *extra]


def work(url: str, job: str, out: Path, tiny_model: Path, log: Path) -> None:
    code = cli(url, "work", "--job", job, "--out", str(out), "--model", str(tiny_model), "--lease-seconds", "2",
               log=log).wait(timeout=180)
    assert code == 0, log.read_text()[-3000:]


def status_json(url: str, job: str) -> dict:  # type: ignore[type-arg]
    done = subprocess.run([sys.executable, "-m", "embedq", "status", "--job", job, "--json", "--redis", url],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def publish_the_end_after_a_mark(server: LossyRedis, client: redis.Redis, keys: JobKeys) -> None:
    """Mark while the producer waits for room after its first batches, then make room (as workers
    would) so that it publishes the last batches and marks the job produced: all after the mark."""
    wait_until(lambda: client.xlen(keys.stream) == BACKLOG, 120, "the producer to fill the backlog")
    assert client.hget(keys.producer, "done") is None
    server.mark()
    client.xdel(keys.stream, *[entry_id for entry_id, _ in client.xrange(keys.stream, count=2)])
    wait_until(lambda: client.hget(keys.producer, "done") == b"1", 60, "the producer to publish the rest")


def assert_exactly_once(out: Path) -> None:
    assert sorted(read_output(out)) == list(range(N_DOCS))  # read_output also asserts no id twice


def test_status_reports_a_job_stalled_by_lost_producer_writes_with_the_command_that_completes_it(
        server: LossyRedis, source: Path, tiny_model: Path, tmp_path: Path) -> None:
    client, keys, log = server.client(), JobKeys("stall"), tmp_path / "cli.log"
    producer = cli(server.url, *produce_args(source, keys.job, tiny_model), log=log)
    publish_the_end_after_a_mark(server, client, keys)
    assert producer.wait(timeout=60) == 0, log.read_text()[-3000:]
    server.lose_writes()
    client = server.client()
    assert client.hget(keys.producer, "done") is None and client.hget(keys.producer, "next_seq") == b"4"
    # The lock's release was lost too, so the lock came back; it expires within its 15 s: now, here.
    client.delete(keys.producer_lock)
    shown = status_json(server.url, keys.job)
    assert shown["state"] == "stalled" and shown["stalled"] and not shown["settled"]
    command = shown["command"]
    assert command.startswith(f"embedq produce {source} --job stall --model {tiny_model}"), command
    assert command in shown["action"] and "200 of 300 documents" in shown["action"]
    assert producer_stalled(client, keys) == shown["action"]  # what an idle worker logs
    args = shlex.split(command)
    assert cli(server.url, *args[1:], log=log).wait(timeout=120) == 0, log.read_text()[-3000:]
    assert producer_stalled(client, keys) is None and client.hget(keys.producer, "next_seq") == b"6"
    out = tmp_path / "out"
    work(server.url, keys.job, out, tiny_model, log)
    assert read_status(client, keys).settled
    assert_exactly_once(out)


def test_produce_until_complete_publishes_again_what_redis_lost_and_stays_until_the_job_is_complete(
        server: LossyRedis, source: Path, tiny_model: Path, tmp_path: Path) -> None:
    client, keys, log = server.client(), JobKeys("stay"), tmp_path / "producer.log"
    producer = cli(server.url, *produce_args(source, keys.job, tiny_model, "--until-complete"), log=log)
    publish_the_end_after_a_mark(server, client, keys)
    assert not read_status(client, keys).stalled  # it stays, holding the lock
    server.lose_writes()
    client = server.client()
    assert client.hget(keys.producer, "done") is None
    out = tmp_path / "out"
    work(server.url, keys.job, out, tiny_model, tmp_path / "worker.log")  # settles only if the rest comes again
    shown = read_status(client, keys)
    assert shown.settled and client.hget(keys.producer, "next_seq") == b"6", log.read_text()[-3000:]
    # Complete means final: the producer stays until the output is finalized too (by the worker that
    # settled the last batch, or by the command status names where none did).
    assert producer.poll() is None or shown.finalized
    if not shown.finalized:  # the last worker finalizes the output; where it did not, status says how
        assert shown.command is not None and shown.command.startswith("embedq gc")
        args = shlex.split(shown.command.replace("--out DIR", f"--out {out}"))
        assert cli(server.url, *args[1:], log=log).wait(timeout=120) == 0, log.read_text()[-3000:]
    assert producer.wait(timeout=30) == 0, log.read_text()[-3000:]
    assert "publishing again" in log.read_text()
    assert read_status(client, keys).complete
    assert_exactly_once(out)


def test_embedq_run_publishes_again_what_redis_lost_while_its_worker_waits(
        server: LossyRedis, tiny_model: Path, tmp_path: Path, gloss_texts: list[str]) -> None:
    n_docs, batch = 1500, 25
    source = write_jsonl(tmp_path / "docs.jsonl", list(range(n_docs)), gloss_texts[:n_docs])
    client, keys, log, out = server.client(), JobKeys("run"), tmp_path / "run.log", tmp_path / "out"
    client.xgroup_create(keys.stream, GROUP, id="0", mkstream=True)
    run = cli(server.url, "run", str(source), "--out", str(out), "--job", keys.job, "--model", str(tiny_model),
              "--batch-size", str(batch), "--backlog", str(BACKLOG), log=log, env={"EMBEDQ_LEASE_SECONDS": "3"})
    # A stalled consumer holds batches (it keeps resetting their idle time, so the worker cannot
    # reclaim them): the stream fills with them, the producer waits for room and the worker idles.
    hostage = Hostage(client, keys)
    hostage.take(BACKLOG)
    wait_until(lambda: client.xlen(keys.stream) == BACKLOG and hostage.alone(), 60, "the worker to go idle")
    assert client.hget(keys.producer, "done") is None, "the producer finished before the mark"
    server.mark()  # nothing after this survives: not the batches the worker commits from here on either
    hostage.give_back(BACKLOG - 1)  # keeps one, so the job cannot complete before the loss
    wait_until(lambda: client.hget(keys.producer, "done") == b"1" and client.xlen(keys.stream) == 1, 120,
               "the producer to publish the rest and the worker to settle it")
    hostage.stop()
    server.lose_writes()
    code = run.wait(timeout=180)
    assert code == 0, log.read_text()[-4000:]
    assert "publishing again" in log.read_text()
    assert sorted(read_output(out)) == list(range(n_docs))


class Hostage:
    """A consumer of the group that takes batches and never settles them, while refreshing their
    idle time so the worker cannot reclaim them, until it gives them back or stops."""

    def __init__(self, client: redis.Redis, keys: JobKeys) -> None:
        self.client, self.keys = client, keys
        self.held: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, daemon=True)
        self._thread.start()

    def take(self, n: int) -> None:
        def took() -> bool:
            reply = self.client.xreadgroup(GROUP, "hostage", {self.keys.stream: ">"}, count=1, block=100)
            self.held += [entry_id for _, entries in reply or [] for entry_id, _ in entries]
            return len(self.held) >= n

        wait_until(took, 60, f"the hostage to take {n} batches", every=0)

    def alone(self) -> bool:
        """Whether every pending entry is the hostage's."""
        summary = self.client.xpending(self.keys.stream, GROUP)
        return [c["name"] for c in summary["consumers"]] == [b"hostage"] and summary["pending"] == len(self.held)

    def give_back(self, n: int) -> None:
        """Settle `n` of them without embedding them (lost with the rest: they come back)."""
        back, self.held = self.held[:n], self.held[n:]
        self.client.xack(self.keys.stream, GROUP, *back)
        self.client.xdel(self.keys.stream, *back)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _refresh(self) -> None:
        while not self._stop.wait(0.3):
            if self.held:
                self.client.xclaim(self.keys.stream, GROUP, "hostage", 0, list(self.held), justid=True)
