"""Faults a long job meets: signals, killed workers, a restarted Redis, a full or read-only disk.
Real processes, a real Redis, real files; the worker runs a small random BERT to go fast."""

from __future__ import annotations

import errno
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis

from embedq.connection import RedisServer
from embedq.errors import OutputError
from embedq.keys import GROUP, JobKeys
from embedq.model import load_model_info
from embedq.verify import verify_job
from embedq.worker.commit import manifest_entries
from embedq.worker.output import open_output
from tests.support import committed, embedq_process, produce, run_worker, wait_until, write_jsonl

N_DOCS = 3000


@pytest.fixture
def keys(job_name: str) -> JobKeys:
    return JobKeys(job_name)


@pytest.fixture
def tiny(tiny_model: Path):  # type: ignore[no-untyped-def]
    return load_model_info(tiny_model)


@pytest.fixture
def source(tmp_path: Path, gloss_texts: list[str]) -> Path:
    return write_jsonl(tmp_path / "docs.jsonl", list(range(N_DOCS)), gloss_texts[:N_DOCS])


def worker_args(keys: JobKeys, out: Path, url: str, tiny_model: Path, *extra: str) -> list[str]:
    return ["work", "--job", keys.job, "--out", str(out), "--redis", url, "--model", str(tiny_model),
            "--window-docs", "200", "--lease-seconds", "2", *extra]


def assert_exactly_once(client: redis.Redis, keys: JobKeys, out: Path, n_docs: int = N_DOCS) -> None:
    result = verify_job(client, keys, str(out))
    assert result.ok, result.render()
    assert result.output_rows == n_docs


def finish_with_one_more_worker(keys: JobKeys, out: Path, url: str, tiny_model: Path, log: Path) -> None:
    code = embedq_process(*worker_args(keys, out, url, tiny_model), log=log).wait(timeout=300)
    assert code == 0, log.read_text()[-3000:]


def test_sigterm_commits_what_is_in_flight_and_exits_0(redis_client, keys, tiny, tiny_model, source,
                                                       tmp_path: Path, redis_url: str) -> None:
    produce(redis_client, keys, tiny, source, batch_size=50)
    out, log = tmp_path / "out", tmp_path / "worker.log"
    worker = embedq_process(*worker_args(keys, out, redis_url, tiny_model), log=log)
    wait_until(lambda: committed(redis_client, keys) > 0, 120, "a first commit")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 0, log.read_text()[-3000:]
    assert "finishing and committing" in log.read_text()
    # What it had read is committed, or handed back: pending, but reclaimable at once (idle past the
    # lease), not after another lease.
    for row in redis_client.xpending_range(keys.stream, GROUP, min="-", max="+", count=1000):
        assert row["time_since_delivered"] >= 2000, row
    finish_with_one_more_worker(keys, out, redis_url, tiny_model, log)
    assert_exactly_once(redis_client, keys, out)


def test_a_second_signal_exits_at_once_and_loses_nothing(redis_client, keys, model_info, corpus_dir: Path,
                                                        tmp_path: Path, redis_url: str) -> None:
    # The real model on passages (about a second of CPU work per batch of 100): the worker is surely
    # mid-window when the signals come, even with its first windows of one batch each. (With glosses
    # it drained within 60 ms, and the second signal met the process already exiting.)
    import pyarrow.parquet as pq

    texts = pq.read_table(corpus_dir / "passages.parquet", columns=["text"]).column("text").to_pylist()[:600]
    source = write_jsonl(tmp_path / "passages.jsonl", list(range(len(texts))), texts)
    produce(redis_client, keys, model_info, source, batch_size=100)
    out, log = tmp_path / "out", tmp_path / "worker.log"
    # Windows of up to 30 s of work: the first signal finds one on the engine and waits for it.
    worker = embedq_process("work", "--job", keys.job, "--out", str(out), "--redis", redis_url, "--window-docs",
                            "1000", "--window-seconds", "30", "--lease-seconds", "90", log=log)
    wait_until(lambda: committed(redis_client, keys) > 0, 120, "a first commit")
    worker.send_signal(signal.SIGTERM)
    time.sleep(0.2)  # two separate signals (the kernel merges a signal sent while the same one is pending)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 130, log.read_text()[-3000:]
    assert committed(redis_client, keys) < len(texts)
    finisher = embedq_process("work", "--job", keys.job, "--out", str(out), "--redis", redis_url, "--lease-seconds",
                              "2", log=log)
    assert finisher.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert_exactly_once(redis_client, keys, out, n_docs=len(texts))


def test_a_killed_workers_batches_are_reclaimed_by_another(redis_client, keys, tiny, tiny_model, source,
                                                           tmp_path: Path, redis_url: str) -> None:
    produce(redis_client, keys, tiny, source, batch_size=50)
    out, log = tmp_path / "out", tmp_path / "worker.log"
    victim = embedq_process(*worker_args(keys, out, redis_url, tiny_model), log=log)
    wait_until(lambda: committed(redis_client, keys) > 0, 120, "a first commit")
    victim.kill()
    victim.wait()
    pending = redis_client.xpending(keys.stream, GROUP)["pending"]
    assert pending > 0, f"the victim held no batches when it died: {log.read_text()[-3000:]}"
    finish_with_one_more_worker(keys, out, redis_url, tiny_model, log)
    assert_exactly_once(redis_client, keys, out)


@pytest.mark.parametrize("appendfsync", ["always", "everysec"])
def test_the_job_completes_exactly_once_across_a_redis_restart(tiny, tiny_model, tmp_path: Path, gloss_texts,
                                                               appendfsync: str) -> None:
    n_docs = 40000
    source = write_jsonl(tmp_path / "docs.jsonl", list(range(n_docs)), gloss_texts[:n_docs])
    with RedisServer(appendonly=True, appendfsync=appendfsync, directory=tmp_path / "redis") as server:
        client = redis.Redis.from_url(server.url)
        keys = JobKeys("restart")
        produce(client, keys, tiny, source, batch_size=100)
        out, log = tmp_path / "out", tmp_path / "worker.log"
        worker = embedq_process(*worker_args(keys, out, server.url, tiny_model), log=log)
        wait_until(lambda: committed(client, keys) > 0, 120, "a first commit")
        server.stop(kill=True)  # SIGKILL: only what the AOF already holds survives
        time.sleep(2.0)  # an outage longer than the client library's own quick retries
        server.start()
        assert committed(redis.Redis.from_url(server.url), keys) < n_docs, "the job ended before the restart"
        code = worker.wait(timeout=300)
        assert code == 0, log.read_text()[-3000:]
        assert "Redis unreachable" in log.read_text() or "heartbeat failed" in log.read_text()
        assert_exactly_once(redis.Redis.from_url(server.url), keys, out, n_docs)


def test_a_write_error_stops_the_worker_and_acknowledges_nothing_unwritten(
        redis_client, keys, tiny, tiny_model, source, tmp_path: Path, monkeypatch, redis_url: str) -> None:
    from embedq.engines import create_engine
    from embedq.engines.base import EngineConfig
    from embedq.engines.profiles import profile_table

    record = produce(redis_client, keys, tiny, source, batch_size=50)[0]
    import embedq.worker.writer as writer_module

    original = writer_module.pq.write_table
    calls = {"n": 0}

    def failing_write(table, where, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:  # the device fails halfway through the third part
            where.write(b"PAR1 half a part")
            raise OSError(errno.EIO, "Input/output error")
        return original(table, where, **kwargs)

    monkeypatch.setattr(writer_module.pq, "write_table", failing_write)
    engine = create_engine("torch", EngineConfig(model=tiny, profiles=profile_table(tiny.max_seq_len, 4096)))
    out = tmp_path / "out"
    with engine, pytest.raises(OutputError, match="Input/output error"):
        run_worker(redis_client, keys, record, tiny, engine, out)
    visible_rows = sum(pq_rows(p) for p in out.glob("*.parquet"))
    assert 0 < committed(redis_client, keys) == visible_rows < N_DOCS  # the two parts durably written
    assert len(list(out.glob("*.parquet"))) == 2 and not list(out.glob(".*.tmp"))
    monkeypatch.setattr(writer_module.pq, "write_table", original)
    with engine:
        run_worker(redis_client, keys, record, tiny, engine, out)
    assert_exactly_once(redis_client, keys, out)


def test_a_rename_that_fails_after_the_commit_stops_the_worker_and_the_next_one_rolls_it_forward(
        redis_client, keys, tiny, source, tmp_path: Path, monkeypatch) -> None:
    from embedq.engines import create_engine
    from embedq.engines.base import EngineConfig
    from embedq.engines.profiles import profile_table
    from embedq.worker import output as output_module

    record = produce(redis_client, keys, tiny, source, batch_size=50)[0]
    original = output_module.os.replace
    calls = {"n": 0}

    def failing_replace(src, dst):  # type: ignore[no-untyped-def]
        if str(src).endswith(".parquet.tmp"):
            calls["n"] += 1
            if calls["n"] == 2:  # the filesystem turns read-only between the commit and the rename
                raise OSError(errno.EROFS, "Read-only file system")
        return original(src, dst)

    monkeypatch.setattr(output_module.os, "replace", failing_replace)
    engine = create_engine("torch", EngineConfig(model=tiny, profiles=profile_table(tiny.max_seq_len, 4096)))
    out = tmp_path / "out"
    with engine:
        with pytest.raises(OutputError, match=r"not writable.*is committed"):
            run_worker(redis_client, keys, record, tiny, engine, out)
        manifest = manifest_entries(redis_client, keys)
        staged = {p.name[1:-len(".parquet.tmp")] for p in out.glob(".part-*.parquet.tmp")}
        assert staged and staged <= set(manifest), "the part whose rename failed is committed"
        assert {p.stem for p in out.glob("*.parquet")} <= set(manifest)
        monkeypatch.setattr(output_module.os, "replace", original)
        run_worker(redis_client, keys, record, tiny, engine, out)
    assert not list(out.glob(".*.tmp"))
    assert_exactly_once(redis_client, keys, out)


def pq_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def test_a_full_disk_pauses_then_stops_the_worker_with_nothing_partial_visible(
        redis_client, keys, tiny, tiny_model, source, small_disk: Path, tmp_path: Path, redis_url: str) -> None:
    produce(redis_client, keys, tiny, source, batch_size=50)
    out, log = small_disk / "out", tmp_path / "worker.log"
    open_output(out)
    ballast = small_disk / "ballast"
    ballast.write_bytes(b"\0" * (2 * 1024 * 1024 - 160 * 1024))  # leave room for a few parts only
    worker = embedq_process(*worker_args(keys, out, redis_url, tiny_model),
                            env={"EMBEDQ_DISK_RETRY_SECONDS": "3"}, log=log)
    assert worker.wait(timeout=180) == 6, log.read_text()[-3000:]
    text = log.read_text()
    assert "is full" in text and "Pausing" in text
    assert not list(out.glob(".*.tmp")), "a partial part was left behind"
    visible = sum(pq_rows(p) for p in out.glob("*.parquet"))
    assert 0 < committed(redis_client, keys) == visible < N_DOCS
    ballast.unlink()  # the operator frees space; the job resumes where it stopped
    finish_with_one_more_worker(keys, out, redis_url, tiny_model, log)
    assert_exactly_once(redis_client, keys, out)


def remount_read_only(mount_point: Path, seconds: float = 30) -> None:
    """Remount a filesystem read-only, retrying while it is busy: the kernel refuses (EBUSY, mount
    exits 32) while a file on it is open for writing, as a part is for a moment per window."""
    deadline = time.monotonic() + seconds
    while True:
        done = subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], capture_output=True, text=True)
        if done.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"could not remount {mount_point} read-only: {done.stderr}")
        time.sleep(0.02)


def test_an_output_directory_turned_read_only_stops_the_worker(redis_client, keys, tiny, tiny_model, source,
                                                               small_disk: Path, tmp_path: Path,
                                                               redis_url: str) -> None:
    produce(redis_client, keys, tiny, source, batch_size=50)
    out, log = small_disk / "out", tmp_path / "worker.log"
    worker = embedq_process(*worker_args(keys, out, redis_url, tiny_model), log=log)
    wait_until(lambda: committed(redis_client, keys) > 0, 120, "a first commit")
    remount_read_only(small_disk)
    try:
        assert worker.wait(timeout=120) == 6, log.read_text()[-3000:]
        assert "not writable" in log.read_text()
        # Every visible part is committed. A part committed just before the remount may still be
        # staged (its rename failed): the next worker rolls it forward.
        manifest = set(manifest_entries(redis_client, keys))
        assert {p.stem for p in out.glob("*.parquet")} <= manifest
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    finish_with_one_more_worker(keys, out, redis_url, tiny_model, log)
    assert_exactly_once(redis_client, keys, out)
    time.sleep(0.1)
    finish_with_one_more_worker(keys, out, redis_url, tiny_model, log)
    assert_exactly_once(redis_client, keys, out)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_while_the_worker_starts_stops_it_at_once_with_exit_0(signum: int, redis_client, keys,
                                                                       tmp_path: Path, redis_url: str) -> None:
    """A worker told to stop before it has read anything (here: waiting for its job; as well while it
    loads its model or builds its engine) has nothing to drain: it stops at once and ends as a
    drained worker does, with 0, not killed by the signal (what a supervisor would count as a failure)."""
    out, log = tmp_path / "out", tmp_path / "worker.log"
    worker = embedq_process("work", "--job", keys.job, "--out", str(out), "--redis", redis_url, log=log)
    wait_until(lambda: log.is_file() and "does not exist yet" in log.read_text(), 60, "the worker waiting for its job")
    worker.send_signal(signum)
    assert worker.wait(timeout=30) == 0, log.read_text()[-3000:]
    assert f"{signal.Signals(signum).name} while starting: stopped before reading anything" in log.read_text()
    assert not redis_client.exists(keys.stream)
