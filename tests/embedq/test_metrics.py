"""Prometheus metrics (`--metrics-port`): scraped over HTTP during a real job, and at its end equal
to the job's totals; served by the CLI while a worker still waits for its job."""

from __future__ import annotations

import socket
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from embedq.cli.exporter import serve_metrics
from embedq.keys import JobKeys
from embedq.worker.output import open_output
from embedq.worker.worker import Worker, WorkerOptions

from ..support import embedq_process, produce, wait_until, write_jsonl


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_a_job_scraped_while_it_runs_ends_with_its_totals(
    redis_client: Any, job_name: str, model_info: Any, cpu_engine: Any, gloss_texts: list[str], tmp_path: Path
) -> None:
    texts = [*gloss_texts[:600], ""]  # an empty document: dead-lettered by the producer
    source = write_jsonl(tmp_path / "docs.jsonl", list(range(len(texts))), texts)
    keys = JobKeys(job_name)
    record, producer = produce(redis_client, keys, model_info, source, batch_size=40)
    worker = Worker(redis_client, keys, record, model_info, cpu_engine, open_output(tmp_path / "out"),
                    WorkerOptions(window_docs=100, lease_seconds=5.0, idle_exit_seconds=20.0))
    during: list[dict[Any, float]] = []
    with serve_metrics(0, redis_client, keys, worker=lambda: worker, producer=lambda: producer) as port:
        assert port
        thread = threading.Thread(target=lambda: worker.run(install_signals=False))
        thread.start()
        try:
            while thread.is_alive():
                during.append(scrape(port))
                thread.join(timeout=0.3)
        finally:
            thread.join(timeout=120)
        after = scrape(port)

    report = worker.report
    assert report.job_complete and report.documents == 600
    assert len(during) >= 2, "the job ended before it was scraped twice"
    documents = [value(s, "embedq_documents_total", job=job_name, role="worker") for s in during]
    assert documents == sorted(documents), "a counter went down"
    assert value(after, "embedq_up", job=job_name) == 1
    assert value(after, "embedq_documents_total", job=job_name, role="worker") == 600
    assert value(after, "embedq_documents_total", job=job_name, role="producer") == 600
    assert value(after, "embedq_dead_letters_total", job=job_name, role="producer") == 1
    assert value(after, "embedq_dead_letters_total", job=job_name, role="worker") == 0
    assert value(after, "embedq_tokens_total", job=job_name) == report.tokens
    assert value(after, "embedq_parts_total", job=job_name) == report.parts >= 6
    assert value(after, "embedq_engine_batches_total", job=job_name) == report.engine.batches
    # 601 documents in batches of 40: the 16th held only the empty one, and was not published.
    assert value(after, "embedq_deliveries_total", job=job_name) == producer.report.batches == 15
    assert value(after, "embedq_reclaims_total", job=job_name) == 0
    assert value(after, "embedq_errors_total", job=job_name, kind="redis") == 0
    assert value(after, "embedq_stream_batches_published_total", job=job_name) == 15
    assert value(after, "embedq_stream_lag", job=job_name) == 0
    assert value(after, "embedq_stream_pending", job=job_name) == 0
    assert value(after, "embedq_padding_ratio", job=job_name) >= 1.0
    for stage in ("fetch", "tokenize", "engine_batch", "engine_window", "commit"):
        count = value(after, "embedq_stage_seconds_count", job=job_name, stage=stage)
        assert count > 0, stage
        assert value(after, "embedq_stage_seconds_bucket", job=job_name, stage=stage, le="+Inf") == count
    assert value(after, "embedq_stage_seconds_count", job=job_name, stage="commit") == report.parts


def test_the_worker_serves_metrics_while_it_waits_for_its_job(job_name: str, tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port free now (the worker's own bind says if it is taken since)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = embedq_process("work", "--job", job_name, "--out", str(tmp_path / "out"), "--metrics-port", str(port),
                             log=tmp_path / "work.log")
    try:
        samples: dict[Any, float] = {}

        def served() -> bool:
            nonlocal samples
            try:
                samples = scrape(port)
            except OSError:
                return False
            return True

        wait_until(served, 60, "the worker's /metrics")
        assert value(samples, "embedq_up", job=job_name) == 1
        assert not any(name == "embedq_documents_total" for name, _ in samples)  # no worker yet
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_port_out_of_range_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from embedq.cli import app

    monkeypatch.setenv("EMBEDQ_METRICS_PORT", "70000")
    result = CliRunner().invoke(app, ["work", "--job", "x", "--out", str(tmp_path / "out")])

    assert result.exit_code != 0
    assert "EMBEDQ_METRICS_PORT must be a TCP port (0 to 65535); got 70000" in str(result.exception or result.output)
