"""Progress when windows are slow: a window holds a few seconds of work at the measured speed, the
lease is renewed batch by batch, a small job spreads over the workers that are there, and a stop
ends within the shutdown timeout, handing back what was not embedded."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from embedq.keys import GROUP, JobKeys
from embedq.worker.window import WindowSizer
from tests.support import (
    committed,
    embedq_process,
    produce,
    read_output,
    run_worker,
    run_workers,
    wait_until,
    write_jsonl,
)

N_STOP = 1500


def test_windows_start_at_one_batch_then_hold_about_window_seconds_of_measured_work() -> None:
    sizer = WindowSizer(window_docs=16384, window_seconds=5.0, lease_seconds=30.0, batch_size=512)
    assert sizer.next_window(0, 0.0) == 512  # nothing measured: one batch
    assert sizer.next_window(512, 2.0) == 1280  # 256 docs/s for 5 s
    assert sizer.next_window(10_000, 1.0) == 5120  # fast: grows at most 4x a step
    assert sizer.next_window(10_000, 1.0) == 16384  # then capped at window_docs
    slow = WindowSizer(window_docs=16384, window_seconds=60.0, lease_seconds=6.0, batch_size=100)
    slow.next_window(0, 0.0)
    assert slow.next_window(1000, 10.0) == 200  # 100 docs/s for a third of the 6 s lease
    assert slow.next_window(1, 100.0) == 100  # never under one batch


def test_a_cpu_worker_with_a_short_lease_keeps_it_through_long_work(redis_client, job_name: str, model_info,
                                                                    cpu_engine, gloss_texts: list[str],
                                                                    tmp_path: Path) -> None:
    """The real model on this CPU: a window of 4,000 documents would take far longer than the 3 s lease;
    windows sized by time, and a lease renewed per engine batch, mean nothing is taken over or redone."""
    keys = JobKeys(job_name)
    source = write_jsonl(tmp_path / "docs.jsonl", list(range(1500)), gloss_texts[:1500])
    record, _ = produce(redis_client, keys, model_info, source, batch_size=100)
    report = run_worker(redis_client, keys, record, model_info, cpu_engine, tmp_path / "out", window_docs=4000,
                        window_seconds=60.0, lease_seconds=3.0)
    assert report.job_complete and report.documents == 1500
    assert report.duplicates_dropped == 0  # nothing of its own was reclaimed and done twice
    assert report.parts > 2  # windows of about a second of work, not one window of everything
    assert sorted(read_output(tmp_path / "out")) == list(range(1500))


def test_a_job_small_enough_for_one_window_spreads_over_two_workers(redis_client, job_name: str, model_info,
                                                                    cpu_engine, gloss_texts: list[str],
                                                                    tmp_path: Path) -> None:
    keys = JobKeys(job_name)
    source = write_jsonl(tmp_path / "docs.jsonl", list(range(1000)), gloss_texts[:1000])
    record, _ = produce(redis_client, keys, model_info, source, batch_size=100)
    reports = run_workers(2, redis_client, keys, record, model_info, cpu_engine, tmp_path / "out",
                          window_docs=16384)
    assert sum(r.documents for r in reports) == 1000
    assert all(r.documents > 0 for r in reports), [r.documents for r in reports]


def test_ctrl_c_ends_within_the_shutdown_timeout_and_a_rerun_finishes_the_job(
        redis_client, job_name: str, model_info, gloss_texts: list[str], tmp_path: Path, redis_url: str) -> None:
    """The real model on this CPU, windows of up to a minute: the first signal must not wait for them
    (SIGTERM takes the same path; tests/worker/test_faults.py sends it)."""
    keys = JobKeys(job_name)
    source = write_jsonl(tmp_path / "docs.jsonl", list(range(N_STOP)), gloss_texts[:N_STOP])
    produce(redis_client, keys, model_info, source, batch_size=100)
    out, log = tmp_path / "out", tmp_path / "worker.log"
    args = ["work", "--job", keys.job, "--out", str(out), "--redis", redis_url, "--lease-seconds", "30"]
    worker = embedq_process(*args, "--shutdown-timeout", "3", env={"EMBEDQ_WINDOW_SECONDS": "60"}, log=log)
    wait_until(lambda: committed(redis_client, keys) > 0, 180, "a first commit")
    time.sleep(1.0)
    signalled = time.monotonic()
    worker.send_signal(signal.SIGINT)
    assert worker.wait(timeout=60) == 0, log.read_text()[-3000:]
    assert time.monotonic() - signalled < 3 + 10 + 5  # the timeout, the commit grace, the process exit
    assert committed(redis_client, keys) < N_STOP
    assert "run the same command again to resume" in log.read_text()
    # Handed back, not held: every pending entry is reclaimable at once.
    for row in redis_client.xpending_range(keys.stream, GROUP, min="-", max="+", count=1000):
        assert row["time_since_delivered"] >= 30_000, row
    again = embedq_process(*args, log=log)
    assert again.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert sorted(read_output(out)) == list(range(N_STOP))
