"""What an operator reads: `embedq config show` (each value with its source, precedence flag >
variable > file > default) and `--log-format json` (every line a JSON object)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from embedq.cli import app
from embedq.config import settings_and_origins
from embedq.errors import UsageError

from ..support import embedq_process, wait_until


def test_precedence_is_flag_then_variable_then_file_then_default(tmp_path: Path) -> None:
    config = tmp_path / "embedq.toml"
    config.write_text("batch_size = 77\nwindow_docs = 500\nlease_seconds = 12\n")
    environ = {"EMBEDQ_WINDOW_DOCS": "900", "EMBEDQ_LEASE_SECONDS": "13"}

    settings, where = settings_and_origins({"lease_seconds": 14.0}, environ=environ, config_file=config)

    assert (settings.batch_size, where["batch_size"]) == (77, f"{config}: batch_size")
    assert (settings.window_docs, where["window_docs"]) == (900, "EMBEDQ_WINDOW_DOCS")
    assert (settings.lease_seconds, where["lease_seconds"]) == (14.0, "--lease-seconds")
    assert settings.backlog == 512 and "backlog" not in where


def test_config_show_prints_each_value_with_its_source(tmp_path: Path) -> None:
    config = tmp_path / "site.toml"
    config.write_text("[embedq]\nbatch_size = 77\n")
    env = {"EMBEDQ_CONFIG": str(config), "EMBEDQ_WINDOW_DOCS": "900",
           "EMBEDQ_REDIS_URL": "redis://user:secret@example.org:6380/0"}

    result = CliRunner().invoke(app, ["config", "show", "--json"], env=env)

    assert result.exit_code == 0, result.output
    rows = {row["setting"]: row for row in json.loads(result.output)}
    assert rows["batch_size"] == {"setting": "batch_size", "value": 77, "from": f"{config}: batch_size"}
    assert rows["window_docs"] == {"setting": "window_docs", "value": 900, "from": "EMBEDQ_WINDOW_DOCS"}
    assert rows["backlog"] == {"setting": "backlog", "value": 512, "from": "default"}
    assert "secret" not in result.output and rows["redis_url"]["from"] == "EMBEDQ_REDIS_URL"
    table = CliRunner().invoke(app, ["config", "show"], env=env).output
    assert any(line.split() == ["window_docs", "900", "EMBEDQ_WINDOW_DOCS"] for line in table.splitlines())


@pytest.mark.parametrize(("env", "message"), [
    ({"EMBEDQ_WINDOW_DOCS": "many"}, "EMBEDQ_WINDOW_DOCS must be an integer; got 'many'"),
    ({"EMBEDQ_UNPAD": "always"}, "EMBEDQ_UNPAD must be one of auto, on, off; got 'always'"),
])
def test_config_show_names_the_source_of_a_bad_value(env: dict[str, str], message: str, tmp_path: Path) -> None:
    (tmp_path / "empty.toml").write_text("")
    result = CliRunner().invoke(app, ["config", "show", "--config", str(tmp_path / "empty.toml")], env=env)

    assert result.exit_code != 0
    assert message in str(result.exception)


def test_json_logs_are_one_object_per_line(job_name: str, tmp_path: Path) -> None:
    log = tmp_path / "work.log"
    process = embedq_process("--log-format", "json", "-v", "work", "--job", job_name, "--out", str(tmp_path / "out"),
                             "--metrics-port", "0", "--lease-seconds", "7", log=log)
    try:
        wait_until(lambda: "waiting for a producer" in log.read_text(), 60, "the worker's waiting line")
    finally:
        process.terminate()
        process.wait(timeout=30)

    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    messages = [line["message"] for line in lines]
    assert any(m.startswith("metrics: http://0.0.0.0:") for m in messages)
    assert any("lease_seconds=7.0 (--lease-seconds)" in m for m in messages)


def test_finished_ttl_is_a_setting_and_zero_keeps_a_finished_jobs_copies() -> None:
    assert settings_and_origins({}, environ={"EMBEDQ_FINISHED_TTL": "60"}, config_file=None)[0].finished_ttl == 60
    assert settings_and_origins({}, environ={"EMBEDQ_FINISHED_TTL": "0"})[0].finished_ttl == 0
    with pytest.raises(UsageError, match=r"EMBEDQ_FINISHED_TTL must be 0 \(keep them\) or a number of seconds; got -1"):
        settings_and_origins({}, environ={"EMBEDQ_FINISHED_TTL": "-1"})
