"""A newcomer's first hour: `--help` as typer conventions have it, settings checked with messages that
name where a value came from, a live display on a terminal and plain lines elsewhere, `run`
resumable on its private Redis, and exit codes as documented."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis as redis_lib
import typer
from typer.testing import CliRunner

from embedq.cli import app
from embedq.cli.options import DEFAULTS, BacklogOpt, BatchSizeOpt
from embedq.cli.settings import settings_from
from embedq.config import load_settings
from embedq.connection import PRIVATE_STATE, free_port
from embedq.errors import UsageError
from tests.support import embedq_process, read_output, wait_until, write_jsonl

TEXTS = [f"document number {i} says " + "something longer " * (i % 7) for i in range(300)]


def help_text(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "250", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    return result.output


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "EMBEDQ_BACKEND": "torch", "EMBEDQ_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "embedq", *args], capture_output=True, text=True, env=full,
                          timeout=timeout)


# -- help -------------------------------------------------------------------------------------------

def test_help_shows_choices_defaults_and_variables_as_typer_does() -> None:
    text = help_text("work")
    assert "<auto|fp32|fp16|bf16>" in text and "<float32|float16|int8|uint8|binary|ubinary>" in text  # choices
    assert re.search(r"--window-docs\s+N\s", text) and "[env var: EMBEDQ_WINDOW_DOCS]" in text
    assert re.search(r"Default: \d", text) is None  # defaults are not in the prose ...
    for shown in ("[default: 16384]", "[default: 30.0]", "[default: auto]", "[default: cuda-graphs]",
                  "[env var: EMBEDQ_REDIS_URL]", "[default: redis://127.0.0.1:6379/0]", "[env var: EMBEDQ_DEVICE]"):
        assert shown in text, shown  # ... but where typer puts them
    assert not re.search(r"<(str|int|float|bool)>", text), "value types instead of names"
    assert "(the job's model)" in text and "bundled" not in text  # work's --model is the job's


def test_every_command_says_what_it_does_in_one_accurate_line() -> None:
    top = help_text()
    assert "[default: 0]" not in top and "<int>" not in top  # -v is a count, not a value
    assert "Exit codes:" in top
    assert "--out directory" in help_text("run") and "into DIR" not in help_text("run")
    assert "(for work" not in help_text("run") + help_text("produce")
    assert "length order" in help_text("run")


def test_verbosity_is_counted() -> None:
    result = CliRunner().invoke(app, ["-vv", "status", "--help"])
    assert result.exit_code == 0, result.output


# -- settings from the environment and embedq.toml ------------------------------------------------

@pytest.mark.parametrize(("environ", "message"), [
    ({"EMBEDQ_WINDOW_DOCS": "abc"}, "EMBEDQ_WINDOW_DOCS must be an integer; got 'abc'"),
    ({"EMBEDQ_NORMALIZE": "maybe"}, "EMBEDQ_NORMALIZE must be true or false"),
    ({"EMBEDQ_DEVICE": "gpu"}, "EMBEDQ_DEVICE must be auto, cpu, cuda or cuda:N"),
    ({"EMBEDQ_PRECISION": "fp8"}, "EMBEDQ_PRECISION must be one of auto, fp32, fp16, bf16; got 'fp8'"),
    ({"EMBEDQ_LEASE_SECONDS": "0.5"}, "EMBEDQ_LEASE_SECONDS must be at least 1"),
    ({"EMBEDQ_UNPAD": "yes"}, "EMBEDQ_UNPAD must be one of auto, on, off; got 'yes'"),
])
def test_a_bad_variable_is_named_with_the_form_it_takes(environ: dict[str, str], message: str,
                                                          tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        load_settings(environ=environ, config_file=_config(tmp_path, ""))


@pytest.mark.parametrize(("content", "message"), [
    ("window_docs = 'many'", "embedq.toml: window_docs must be an integer; got 'many'"),
    ("[embedq]\nbatch_size = true", "embedq.toml: batch_size must be an integer; got True"),
    ("batch_size = 0", "embedq.toml: batch_size must be positive; got 0"),
    ("pooling = 'max'", "embedq.toml: pooling must be one of mean, cls, last; got 'max'"),
    ("window_seconds = 2", None),  # an integer is a number
])
def test_a_bad_value_in_the_file_is_named_with_its_file_and_key(content: str, message: str | None,
                                                                  tmp_path: Path) -> None:
    path = _config(tmp_path, content)
    if message is None:
        assert load_settings(environ={}, config_file=path).window_seconds == 2.0
        return
    with pytest.raises(UsageError) as raised:
        load_settings(environ={}, config_file=path)
    assert str(raised.value) == f"{tmp_path}/{message}"


def _config(tmp_path: Path, content: str) -> Path:
    path = tmp_path / "embedq.toml"
    path.write_text(content + "\n")
    return path


def test_the_file_applies_under_flags_and_variables(tmp_path: Path) -> None:
    """Defaults in the commands' signatures must not hide embedq.toml (settings_from takes only what
    the user gave)."""
    (tmp_path / "embedq.toml").write_text("batch_size = 7\nbacklog = 9\n")
    seen: dict[str, object] = {}
    probe = typer.Typer()

    @probe.command()
    def show(ctx: typer.Context, batch_size: BatchSizeOpt = DEFAULTS.batch_size,
             backlog: BacklogOpt = DEFAULTS.backlog) -> None:
        settings = settings_from(ctx)
        seen.update(batch_size=settings.batch_size, backlog=settings.backlog)

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = CliRunner().invoke(probe, ["--batch-size", "3"], env={"EMBEDQ_BACKLOG": ""})
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    assert seen == {"batch_size": 3, "backlog": 9}


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--device", "gpu"], {}, "--device must be auto, cpu, cuda or cuda:N"),
    ([], {"EMBEDQ_WINDOW_DOCS": "abc"}, "EMBEDQ_WINDOW_DOCS"),
    (["--backend", "tensorflow"], {}, "'tensorflow' is not one of"),
])
def test_usage_errors_exit_2_before_any_work(args: list[str], env: dict[str, str], message: str,
                                             tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "d.jsonl", [1], ["x"])
    result = cli("run", str(source), "--out", str(tmp_path / "out"), *args, env=env)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_bench_without_a_gpu_says_so_and_exits_2(tmp_path: Path) -> None:
    result = cli("bench", "--model", "tiny", "--corpus", f"x={tmp_path / 'x.parquet'}",
                 env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2, result.stderr
    assert "no CUDA GPU; pass --device cpu" in result.stderr and "Traceback" not in result.stderr


# -- run: progress, summary, resuming, dead letters -----------------------------------------------

def test_run_in_a_terminal_draws_a_live_display_with_log_lines_above_it(tmp_path: Path, tiny_model: Path,
                                                                         redis_url: str, job_name: str) -> None:
    source = write_jsonl(tmp_path / "docs.jsonl", list(range(300)), TEXTS)
    args = ["run", str(source), "--out", str(tmp_path / "out"), "--job", job_name, "--redis", redis_url,
            "--model", str(tiny_model), "--batch-size", "20", "--window-docs", "60"]
    output, code = _in_a_terminal([sys.executable, "-m", "embedq", "-v", *args])
    assert code == 0, output[-3000:]
    assert "\x1b[2K" in output  # the display redraws its line in place
    lines = [line for chunk in output.split("\r\n") for line in chunk.split("\r")]
    bar = [line for line in lines if "docs (" in line]
    assert bar and any("1,000" in line or "300/300 docs" in line for line in bar), bar[-3:]
    logged = [line for line in lines if re.search(r"\d\d:\d\d:\d\d,\d+ (DEBUG|INFO|WARNING) ", line)]
    assert logged, "the log lines of -v"
    for line in logged:  # printed above the display, never into its line
        assert "docs (" not in line and "━" not in line, line
    assert "300 documents embedded" in output and "Loading weights" not in output


def _in_a_terminal(command: list[str], timeout: float = 180) -> tuple[str, int]:
    """Run `command` on a pseudo-terminal (80 columns); everything it wrote, and its exit code."""
    main, child = pty.openpty()
    env = {**os.environ, "EMBEDQ_BACKEND": "torch", "EMBEDQ_THREADS": "1", "COLUMNS": "160", "LINES": "40",
           "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    process = subprocess.Popen(command, stdin=child, stdout=child, stderr=child, env=env, close_fds=True)
    os.close(child)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main], [], [], 0.2)
        if ready:
            try:
                data = os.read(main, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif process.poll() is not None:
            break
    os.close(main)
    return b"".join(chunks).decode("utf-8", "replace"), process.wait(timeout=30)


def test_an_interrupted_run_resumes_on_its_private_redis_and_verify_works_after(tmp_path: Path,
                                                                                 tiny_model: Path) -> None:
    """No Redis answers: `run` starts its own, keeping the data beside the output; Ctrl-C, run again,
    and the job continues where it was, then `verify` finds that Redis by itself."""
    source = write_jsonl(tmp_path / "docs.jsonl", list(range(3000)), [TEXTS[i % 300] for i in range(3000)])
    out, log = tmp_path / "out", tmp_path / "run.log"
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    args = ["run", str(source), "--out", str(out), "--redis", nowhere, "--model", str(tiny_model),
            "--batch-size", "50", "--window-docs", "200", "--backlog", "8"]
    first = embedq_process(*args, env={"EMBEDQ_SHUTDOWN_TIMEOUT": "5"}, log=log)
    wait_until(lambda: len(list(out.glob("part-*.parquet"))) >= 2, 120, "two parts")
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=60) == 130, log.read_text()[-3000:]
    text = log.read_text()
    assert "run the same command again to resume" in text
    done_first = len(read_output(out))
    assert 0 < done_first < 3000
    assert not (out / PRIVATE_STATE / "server.pid").exists()  # its Redis stopped with it
    again = cli(*args, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming with the Redis data kept in" in again.stderr
    assert "3,000 documents embedded" in again.stdout and again.stdout.count("documents embedded") == 1
    assert sorted(read_output(out)) == list(range(3000))  # exactly once: the first run's parts were kept
    checked = cli("verify", "--job", _job_of(out), "--out", str(out))
    assert checked.returncode == 0 and "OK" in checked.stdout, checked.stdout + checked.stderr
    repeat = cli(*args)
    assert repeat.returncode == 0 and "already complete, nothing to do" in repeat.stdout, repeat.stderr


def _job_of(out: Path) -> str:
    return str(json.loads((out / "_embedq.json").read_text())["job"])


def test_an_output_directory_of_another_job_is_refused_before_anything_is_published(
        tmp_path: Path, tiny_model: Path, redis_url: str, job_name: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "_embedq.json").write_text(json.dumps({"job": "someone-else"}))
    source = write_jsonl(tmp_path / "d.jsonl", [1, 2], ["x", "y"])
    result = cli("run", str(source), "--out", str(out), "--job", job_name, "--redis", redis_url,
                 "--model", str(tiny_model))
    assert result.returncode == 6 and "belongs to job 'someone-else'" in result.stderr, result.stderr
    assert not list(redis_lib.Redis.from_url(redis_url).scan_iter(match=f"*{{{job_name}}}*"))


def test_dead_letters_make_run_exit_8_unless_allowed(tmp_path: Path, tiny_model: Path, redis_url: str,
                                                     job_name: str) -> None:
    source = write_jsonl(tmp_path / "d.jsonl", [1, 2, 3], ["one", "", "three"])  # empty: dead-lettered
    args = ["run", str(source), "--out", str(tmp_path / "out"), "--job", job_name, "--redis", redis_url,
            "--model", str(tiny_model)]
    result = cli(*args)
    assert result.returncode == 8, result.stderr
    assert "1 document was dead-lettered" in result.stderr and f"dead-letter list --job {job_name}" in result.stderr
    assert "2 documents embedded, 1 dead-lettered, 1 part " in result.stdout  # "1 part", not "1 parts"
    allowed = cli(*args, "--allow-dead-letters")
    assert allowed.returncode == 0 and "already complete" in allowed.stdout, allowed.stderr
    verified = cli("verify", "--job", job_name, "--out", str(tmp_path / "out"), "--redis", redis_url,
                   "--allow-dead-letters")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["verified"] and manifest["dead_letters"] == 1  # verify keeps what finalization wrote


def test_the_start_up_line_says_where_each_second_went() -> None:
    from embedq.progress import Startup

    startup = Startup()
    startup.origin = 100.0
    for step, at in (("imports", 102.0), ("engine", 105.5), ("tokenizer", 106.0), ("first vector", 107.0)):
        startup.mark(step, at=at)
    assert startup.steps() == {"imports": 2.0, "engine": 3.5, "tokenizer": 0.5, "first vector": 1.0}
    assert startup.line() == ("start-up: imports 2.0 s, engine 3.5 s, tokenizer 0.5 s, first vector 1.0 s "
                              "(first vector 7.0 s after the process started)")


def test_a_job_already_written_elsewhere_is_not_reported_done_in_another_directory(
        tmp_path: Path, tiny_model: Path, redis_url: str, job_name: str) -> None:
    source = write_jsonl(tmp_path / "d.jsonl", [1, 2], ["x", "y"])
    args = ["run", str(source), "--job", job_name, "--redis", redis_url, "--model", str(tiny_model)]
    assert cli(*args, "--out", str(tmp_path / "first")).returncode == 0
    again = cli(*args, "--out", str(tmp_path / "second"))
    assert again.returncode == 7 and f"writes to {tmp_path / 'first'}, not {tmp_path / 'second'}" in again.stderr
    assert not (tmp_path / "second" / "_embedq.json").exists()


def test_one_private_redis_at_a_time_on_an_output_directorys_data(tmp_path: Path) -> None:
    from embedq.connection import redis_for_run

    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    with redis_for_run(nowhere, output_dir=tmp_path) as url:
        assert redis_lib.Redis.from_url(url).ping()
        with pytest.raises(UsageError, match="Another embedq command is using the Redis data"), \
                redis_for_run(nowhere, output_dir=tmp_path):
            pass
    with redis_for_run(nowhere, output_dir=tmp_path) as url:  # free again once the first is done
        assert redis_lib.Redis.from_url(url).ping()
