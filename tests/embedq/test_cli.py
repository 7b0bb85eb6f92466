"""The command line: the main job end to end, and a clear error and exit code for each bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from embedq.cli import app
from embedq.connection import free_port
from tests.support import write_jsonl

SAMPLE = Path(__file__).resolve().parents[2] / "embedq" / "data" / "sample.jsonl"


def embedq(*args: str, env: dict[str, str] | None = None, stdin: bytes | None = None,
           timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the installed CLI as a user would."""
    full_env = {**os.environ, "EMBEDQ_BACKEND": "torch", "EMBEDQ_THREADS": "2", **(env or {})}
    return subprocess.run([sys.executable, "-m", "embedq", *args], capture_output=True, text=True,
                          env=full_env, input=stdin.decode() if stdin else None, timeout=timeout)


def test_run_embeds_the_bundled_sample_end_to_end_and_verify_agrees(tmp_path: Path, redis_url: str,
                                                                    job_name: str) -> None:
    out = tmp_path / "out"
    result = embedq("run", str(SAMPLE), "--out", str(out), "--job", job_name, "--redis", redis_url)
    assert result.returncode == 0, result.stderr
    assert "1,000 documents embedded" in result.stdout
    # Not a terminal: plain progress lines on stderr, no escape codes, the summary once.
    assert "\x1b[" not in result.stderr + result.stdout
    assert f"embed {job_name}: 1,000/1,000 docs (100.0%)" in result.stderr
    assert result.stdout.count("documents embedded") == 1
    assert not re.search(r"worker \S+: [\d,]+ documents, ", result.stderr)  # the display says it already
    assert "Loading weights" not in result.stderr
    assert re.search(r"start-up: python and imports [\d.]+ s, model files .* first vector [\d.]+ s \(first vector",
                     result.stderr), result.stderr[-2000:]
    status = embedq("status", "--job", job_name, "--json", "--redis", redis_url)
    counts = json.loads(status.stdout)
    assert counts["complete"] and counts["committed_documents"] == 1000 and counts["dead_documents"] == 0
    checked = embedq("verify", "--job", job_name, "--out", str(out), "--redis", redis_url)
    assert checked.returncode == 0 and "OK" in checked.stdout, checked.stdout + checked.stderr
    import duckdb

    rows = duckdb.sql(f"select count(*), count(distinct id), min(len(embedding)) from '{out}/*.parquet'").fetchall()[0]
    assert rows == (1000, 1000, 384)
    import pandas
    import polars

    frame = polars.scan_parquet(str(out / "*.parquet")).collect()
    assert frame.height == 1000 and frame["id"].n_unique() == 1000
    assert pandas.read_parquet(out).shape == (1000, 4)


def test_run_starts_a_private_redis_when_none_answers(tmp_path: Path) -> None:
    out = tmp_path / "out"
    source = write_jsonl(tmp_path / "few.jsonl", [1, 2, 3], ["one", "two", "three"])
    dead_port = free_port()
    result = embedq("run", str(source), "--out", str(out), "--redis", f"redis://127.0.0.1:{dead_port}/0")
    assert result.returncode == 0, result.stderr
    assert "started a private redis-server" in result.stderr
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["complete"] and manifest["documents"] == 3


def test_produce_and_work_split_the_job_over_processes(tmp_path: Path, redis_url: str, job_name: str) -> None:
    out = tmp_path / "out"
    produced = embedq("produce", str(SAMPLE), "--job", job_name, "--batch-size", "100", "--redis", redis_url)
    assert produced.returncode == 0 and "published 1,000 documents in 10 batches" in produced.stdout
    worked = embedq("work", "--job", job_name, "--out", str(out), "--redis", redis_url)
    assert worked.returncode == 0 and "job complete" in worked.stdout, worked.stderr
    assert embedq("verify", "--job", job_name, "--out", str(out), "--redis", redis_url).returncode == 0


def test_stdin_is_a_source(tmp_path: Path, redis_url: str, job_name: str) -> None:
    lines = b'{"id": "a", "text": "first"}\n{"id": "b", "text": "second"}\n'
    result = embedq("run", "-", "--out", str(tmp_path / "out"), "--job", job_name, "--redis", redis_url,
                    stdin=lines)
    assert result.returncode == 0, result.stderr
    assert "2 documents embedded" in result.stdout


def test_verify_fails_with_exit_code_8_when_an_id_is_missing(tmp_path: Path, redis_url: str,
                                                            job_name: str) -> None:
    out = tmp_path / "out"
    source = write_jsonl(tmp_path / "docs.jsonl", list(range(20)), [f"text {i}" for i in range(20)])
    assert embedq("run", str(source), "--out", str(out), "--job", job_name, "--redis", redis_url).returncode == 0
    write_jsonl(source, list(range(21)), [f"text {i}" for i in range(21)])  # the source grew afterwards
    result = embedq("verify", "--job", job_name, "--out", str(out), "--redis", redis_url, "--source", str(source))
    assert result.returncode == 8
    assert "missing            1" in result.stdout and "20" in result.stdout


@pytest.mark.parametrize(("make_args", "code", "message"), [
    (lambda t: ["produce", str(t / "nope.parquet"), "--job", "x"], 3, "does not exist"),
    (lambda t: ["produce", str(write_jsonl(t / "d.jsonl", [1], ["x"])), "--job", "x", "--text-field", "body"], 3,
     "body"),
    (lambda t: ["produce", str(write_jsonl(t / "d.jsonl", [1, 1], ["x", "y"])), "--job", "x"], 3, "duplicate id"),
    (lambda t: ["produce", str(write_jsonl(t / "d.jsonl", [1], ["x"])), "--job", "x", "--redis",
                f"redis://127.0.0.1:{free_port()}/0"], 5, "does not answer"),
    (lambda t: ["produce", str(write_jsonl(t / "d.jsonl", [1], ["x"])), "--job", "x", "--model", str(t)], 4,
     "not a model directory"),
    (lambda t: ["produce", str(write_jsonl(t / "d.jsonl", [1], ["x"])), "--job", "bad name!"], 2,
     "not valid"),
    (lambda t: ["work", "--job", "x", "--out", str(write_jsonl(t / "file", [1], ["x"]))], 6, "not a directory"),
    (lambda t: ["work", "--job", "x", "--out", "/proc/embedq-out"], 6, "cannot be created"),
    (lambda t: ["run", str(write_jsonl(t / "d.jsonl", [1], ["x"])), "--out", str(t / "o"), "--precision", "fp8"],
     2, "precision"),
    (lambda t: ["verify", "--job", "no-such-job", "--out", str(t)], 2, "does not exist"),
])
def test_bad_input_gets_a_clear_error_and_exit_code(tmp_path: Path, redis_url: str, make_args, code: int,
                                                    message: str) -> None:
    args = make_args(tmp_path)
    if "--redis" not in args:
        args += ["--redis", redis_url]
    result = embedq(*args, timeout=120)
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert re.search(message, result.stderr), result.stderr
    assert "Traceback" not in result.stderr


def test_an_output_directory_on_a_read_only_filesystem_is_refused(read_only_dir: Path, redis_url: str) -> None:
    result = embedq("work", "--job", "x", "--out", str(read_only_dir / "out"), "--redis", redis_url, timeout=120)
    assert result.returncode == 6 and "not writable" in result.stderr, result.stderr
    result = embedq("work", "--job", "x", "--out", str(read_only_dir), "--redis", redis_url, timeout=120)
    assert result.returncode == 6 and "not writable" in result.stderr, result.stderr


def test_every_command_has_help() -> None:
    result = embedq("--help", timeout=60)  # the installed CLI starts and answers as a process ...
    assert result.returncode == 0 and "Usage" in result.stdout, result.stderr
    # ... and every command's help, in this process (a process each added 0.5 s, and proved no more).
    for command in (["run", "--help"], ["produce", "--help"], ["work", "--help"], ["status", "--help"],
                    ["verify", "--help"], ["dead-letter", "list", "--help"], ["dead-letter", "replay", "--help"],
                    ["gc", "--help"], ["delete", "--help"]):
        invoked = CliRunner().invoke(app, command)
        assert invoked.exit_code == 0 and "Usage" in invoked.stdout, (command, invoked.output)


def test_profile_proposes_bucket_lengths_under_ten_percent_padding(corpus_dir: Path) -> None:
    result = embedq("profile", str(corpus_dir / "passages.parquet"), "--sample", "3000", "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["documents"] == 3000 and report["padding"] <= 1.10
    assert report["padding"] <= report["default_padding"]
    assert report["seq_lens"][-1] == report["max_seq_len"] == 256


def test_bench_runs_end_to_end_on_cpu_and_writes_json_and_a_plot(tmp_path: Path, corpus_dir: Path,
                                                                 redis_url: str) -> None:
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    result = embedq("bench", "--device", "cpu", "--precision", "fp32", "--model", "tiny", "--corpus",
                    f"glosses={corpus_dir / 'glosses.parquet'}", "--limit", "3000", "--tokenize", "producer",
                    "--tokenize", "worker", "--tokenizer-processes", "0", "--token-budget", "4096",
                    "--window-docs", "1000", "--json", str(out_json), "--plot", str(out_png), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out_json.read_text())["results"]
    assert [r["documents"] for r in results] == [3000, 3000]
    assert all(r["e2e_tokens_per_s"] > 0 and r["gpu_only_tokens_per_s"] > 0 and r["tokenizer_all_cores_tokens_per_s"]
               for r in results[:1])
    assert all(1.0 <= r["padding_ratio"] < 1.2 for r in results)
    assert out_png.stat().st_size > 10_000 and "| tiny / glosses x1 / pretokenized" in result.stdout


def test_bench_gpus_runs_one_worker_process_per_device_and_reports_scaling(tmp_path: Path, corpus_dir: Path,
                                                                           redis_url: str) -> None:
    """`--gpus 2` on CPU: the fleet path (processes, the go barrier, aggregate figures, verify) with
    two CPU worker processes; 1 runs first as the baseline of the scaling efficiency."""
    out_json = tmp_path / "fleet.json"
    result = embedq("bench", "--gpus", "2", "--device", "cpu", "--precision", "fp32", "--model", "tiny", "--corpus",
                    f"glosses={corpus_dir / 'glosses.parquet'}", "--limit", "2000", "--tokenize", "producer",
                    "--tokenizer-processes", "0", "--token-budget", "4096", "--window-docs", "500",
                    "--json", str(out_json), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    fleet = json.loads(out_json.read_text())["fleet"]
    assert [r["gpus"] for r in fleet] == [1, 2]
    assert all(r["documents"] == 2000 and r["verify_ok"] and r["tokens_per_s"] > 0 for r in fleet)
    assert fleet[0]["scaling_efficiency"] is None and fleet[1]["scaling_efficiency"] > 0
    assert len(fleet[1]["workers"]) == 2 and len({w["worker"] for w in fleet[1]["workers"]}) == 2
    assert all(w["timeline"] and w["timeline"][-1][1] == w["tokens"] for w in fleet[1]["workers"])
    assert "| tiny / glosses x1 / pretokenized | 2 |" in result.stdout


def test_steady_rate_leaves_out_the_ramp_and_the_tail() -> None:
    """A run that starts slowly and ends with a pause: its steady rate is its middle's, not its mean."""
    from embedq.bench.sampling import steady_rate

    samples = [{"t": 0.0, "committed": 0, "tokens": 0}, {"t": 2.0, "committed": 5, "tokens": 50}]  # a slow ramp
    samples += [{"t": 2.0 + i, "committed": 5 + 10 * i, "tokens": 50 + 100 * i} for i in range(1, 10)]
    samples += [{"t": 14.0, "committed": 100, "tokens": 1000}]  # a tail: the last window and the final commit
    assert steady_rate(samples) == 100.0
    assert steady_rate(samples[:2]) is None
