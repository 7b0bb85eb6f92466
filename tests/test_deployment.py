"""The deployment files say what embedq does: the systemd units load as systemd loads them and drain as
the worker drains, the images lint clean and run as non-root with a health check that asks Redis, the
Kubernetes manifests match Kubernetes' schemas and embedq's key names, and the alert rules parse and
use the metrics embedq serves."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import tomllib
import yaml

from embedq.config import Settings
from embedq.errors import JobMismatch, UsageError
from embedq.keys import GROUP, JobKeys
from tests.support import write_jsonl

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # where the dev install put embedq, hadolint and yamllint
DOCKERFILES = ["Dockerfile", "Dockerfile.cpu"]


def tool(name: str) -> str:
    found = shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.fail(f"{name} not found: it is a dev dependency (pip install -e '.[dev]')")
    return found


def run(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.run(args, cwd=cwd, env={**os.environ, "PATH": path, **(env or {})},
                          capture_output=True, text=True, timeout=120)


def documents(name: str) -> list[dict[str, Any]]:
    with (ROOT / "deploy" / name).open() as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def manifests() -> dict[str, dict[str, Any]]:
    docs = documents("worker.yaml") + documents("keda.yaml")
    kinds = [doc["kind"] for doc in docs]
    assert sorted(kinds) == ["ConfigMap", "Deployment", "ScaledObject", "Secret"]
    return {doc["kind"]: doc for doc in docs}


# systemd


def unit(name: str) -> dict[str, list[str]]:
    """A unit file as `Section.Key` -> its values in order (keys such as Environment= repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in (ROOT / "systemd" / name).read_text().splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            settings.setdefault(f"{section}.{key}", []).append(value)
    return settings


def one(settings: dict[str, list[str]], key: str) -> str:
    values = settings.get(key, [])
    assert len(values) == 1, f"{key}: expected one value, got {values}"
    return values[0]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_the_units_pass_systemd_analyze_verify_as_installed_on_a_node() -> None:
    result = run("bash", ".ci/verify-units")
    assert result.returncode == 0, result.stderr
    assert "embedq-worker@0.service" in result.stdout and "embedq-worker.target" in result.stdout


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
@pytest.mark.parametrize(("line", "says"), [
    ("Restart=bogus", "Failed to parse service restart specifier"),  # verify itself exits 0 on this
    ("KillMod=mixed", "Unknown key"),
    ("ExecStartPre=/usr/local/bin/no-such-program", "is not executable"),
])
def test_verify_units_fails_on_a_unit_line_systemd_would_ignore_or_cannot_run(tmp_path: Path, line: str,
                                                                               says: str) -> None:
    for path in (ROOT / "systemd").iterdir():
        shutil.copy(path, tmp_path / path.name)
    worker = tmp_path / "embedq-worker@.service"
    worker.write_text(worker.read_text().replace("[Service]\n", f"[Service]\n{line}\n"))
    result = run("bash", ".ci/verify-units", str(tmp_path))
    assert result.returncode != 0 and says in result.stderr, result.stderr


def test_the_worker_unit_runs_one_worker_per_gpu_as_a_service_user_from_an_environment_file() -> None:
    worker = unit("embedq-worker@.service")
    assert one(worker, "Service.User") not in ("root", "0")
    assert one(worker, "Service.EnvironmentFile") == "/etc/embedq/embedq.env"
    environment = " ".join(worker["Service.Environment"]).split()
    assert "CUDA_VISIBLE_DEVICES=%i" in environment
    assert "--device cuda:0" in one(worker, "Service.ExecStart")  # the one GPU it sees
    assert one(worker, "Unit.PartOf") == "embedq-worker.target"
    assert one(worker, "Install.WantedBy") == "embedq-worker.target"
    target = unit("embedq-worker.target")
    assert one(target, "Install.WantedBy") == "multi-user.target"


def test_the_worker_unit_outlasts_the_drain_and_restarts_on_failure_with_limits() -> None:
    worker = unit("embedq-worker@.service")
    drain = re.search(r"--shutdown-timeout (\d+)", one(worker, "Service.ExecStart"))
    assert drain is not None, "the unit pins --shutdown-timeout next to TimeoutStopSec"
    assert float(drain.group(1)) == Settings().shutdown_timeout
    assert int(one(worker, "Service.TimeoutStopSec")) > float(drain.group(1))
    # SIGTERM to embedq alone, as docker stop and Kubernetes send it; a clean drain exits 0.
    assert one(worker, "Service.KillSignal") == "SIGTERM"
    assert one(worker, "Service.KillMode") == "mixed"
    assert one(worker, "Service.Restart") == "on-failure"
    assert int(one(worker, "Service.RestartSec")) > 0
    assert int(one(worker, "Unit.StartLimitBurst")) > 1 and int(one(worker, "Unit.StartLimitIntervalSec")) > 0
    assert set(one(worker, "Service.RestartPreventExitStatus").split()) == {
        str(UsageError.exit_code), str(JobMismatch.exit_code)}


def test_the_node_unit_supervises_every_gpu_and_lets_the_supervisor_forward_the_stop() -> None:
    from embedq.errors import ModelError
    from embedq.supervisor import FATAL_EXIT_CODES

    node = unit("embedq-node.service")
    assert one(node, "Service.User") not in ("root", "0")
    start = one(node, "Service.ExecStart")
    assert "work --gpus all" in start and "--device" not in start
    drain = re.search(r"--shutdown-timeout (\d+)", start)
    assert drain is not None and int(one(node, "Service.TimeoutStopSec")) > float(drain.group(1))
    # SIGTERM to the supervisor only: a worker signalled twice stops at once instead of draining.
    assert one(node, "Service.KillMode") == "mixed" and one(node, "Service.KillSignal") == "SIGTERM"
    assert one(node, "Unit.Conflicts") == "embedq-worker.target"
    assert set(one(node, "Service.RestartPreventExitStatus").split()) == {str(c) for c in FATAL_EXIT_CODES} == {
        str(UsageError.exit_code), str(ModelError.exit_code), str(JobMismatch.exit_code)}


def test_the_producer_unit_runs_as_a_service_user_and_restarts_on_failure() -> None:
    producer = unit("embedq-produce@.service")
    assert one(producer, "Service.User") not in ("root", "0")
    assert "/etc/embedq/embedq.env" in producer["Service.EnvironmentFile"]
    assert one(producer, "Service.Restart") == "on-failure"
    assert "--until-complete" in one(producer, "Service.ExecStart")


# Docker


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / name).read_text())
    rows = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(row.split(None, 1)[0].upper(), row.split(None, 1)[1]) for row in rows]


def health_check(name: str) -> list[str]:
    args = [a for i, a in instructions(name) if i == "HEALTHCHECK"]
    assert len(args) == 1, f"{name}: one HEALTHCHECK"
    command = re.search(r"CMD (\[.*\])$", args[0])
    assert command is not None, f"{name}: HEALTHCHECK CMD in exec form"
    return list(yaml.safe_load(command.group(1)))


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_dockerfile_passes_hadolint(name: str) -> None:
    result = run(tool("hadolint"), "--failure-threshold", "style", name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_on_an_unpinned_package(tmp_path: Path) -> None:
    text = (ROOT / "Dockerfile.cpu").read_text().replace('"redis-server=5:7.0.*"', "redis-server")
    (tmp_path / "Dockerfile").write_text(text)
    result = run(tool("hadolint"), "--failure-threshold", "style", str(tmp_path / "Dockerfile"))
    assert result.returncode != 0 and "DL3008" in result.stdout


@pytest.mark.parametrize(("name", "base"), [
    ("Dockerfile", r"nvcr\.io/nvidia/tensorrt:2[56]\.\d\d-py3"),
    ("Dockerfile.cpu", r"python:3\.11-slim(-\w+)?"),
])
def test_the_image_has_its_base_a_numeric_non_root_user_and_a_health_check(name: str, base: str) -> None:
    steps = instructions(name)
    assert re.fullmatch(base, next(a for i, a in steps if i == "FROM"))
    user = [a for i, a in steps if i == "USER"][-1]
    assert re.fullmatch(r"\d+(:\d+)?", user) and user.split(":")[0] != "0"
    assert health_check(name)[:2] == ["sh", "-c"]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_image_installs_torch_at_the_dev_extras_pin(name: str) -> None:
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    pin = next(d for d in dev if d.startswith("torch==")).removeprefix("torch==")
    assert f"TORCH_VERSION={pin}" in [a for i, a in instructions(name) if i == "ARG"]


@pytest.fixture
def published_job(redis_url: str, job_name: str, tmp_path: Path) -> str:
    source = write_jsonl(tmp_path / "docs.jsonl", [1, 2, 3], ["one", "two", "three"])
    result = run("embedq", "-q", "produce", str(source), "--job", job_name, "--redis", redis_url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return job_name


def health_command(where: str) -> list[str]:
    """The image's HEALTHCHECK, or the Deployment's readiness probe."""
    if where in DOCKERFILES:
        return health_check(where)
    container = manifests()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    return list(container["readinessProbe"]["exec"]["command"])


@pytest.mark.parametrize("where", [*DOCKERFILES, "deploy/worker.yaml"])
def test_the_health_check_passes_only_while_redis_answers_and_knows_the_job(
        published_job: str, redis_url: str, tmp_path: Path, where: str) -> None:
    command = health_command(where)

    def check(job: str, url: str) -> int:
        return run(*command, cwd=tmp_path, env={"EMBEDQ_JOB": job, "EMBEDQ_REDIS_URL": url}).returncode

    assert check(published_job, redis_url) == 0
    assert check(f"{published_job}-absent", redis_url) != 0
    assert check(published_job, "redis://127.0.0.1:1/0") != 0


# Kubernetes, KEDA, Prometheus


def test_every_yaml_file_passes_yamllint() -> None:
    result = run(tool("yamllint"), "--strict", "-c", ".yamllint", "deploy", ".yamllint")
    assert result.returncode == 0, result.stdout


def test_the_manifests_match_kubernetes_schemas() -> None:
    import kubernetes_validate

    for doc in documents("worker.yaml"):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_the_deployment_gives_each_pod_one_gpu_and_outlasts_the_drain() -> None:
    found = manifests()
    config, secret, pod = found["ConfigMap"]["data"], found["Secret"]["stringData"], found["Deployment"]["spec"]
    spec = pod["template"]["spec"]
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["terminationGracePeriodSeconds"] > float(config["EMBEDQ_SHUTDOWN_TIMEOUT"])
    assert {source.get("configMapRef", source.get("secretRef"))["name"] for source in container["envFrom"]} == {
        found["ConfigMap"]["metadata"]["name"], found["Secret"]["metadata"]["name"]}
    assert container["args"] == ["work", "--job", "$(EMBEDQ_JOB)", "--out", "$(EMBEDQ_OUT)"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    image_user = [a for i, a in instructions("Dockerfile") if i == "USER"][-1]
    assert str(spec["securityContext"]["runAsUser"]) == image_user.split(":")[0]
    assert container["ports"][0]["containerPort"] == int(config["EMBEDQ_METRICS_PORT"])
    # Every EMBEDQ_* variable but the two this manifest reads is a setting embedq reads (a misspelt
    # one would be ignored).
    settings = {f"EMBEDQ_{name.upper()}" for name in Settings.__dataclass_fields__}
    given = {key for key in {**config, **secret} if key.startswith("EMBEDQ_")} - {"EMBEDQ_JOB", "EMBEDQ_OUT"}
    assert given <= settings, given - settings


KEDA_REDIS_STREAMS_KEYS = {"address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv",
                           "usernameFromEnv", "passwordFromEnv", "stream", "consumerGroup", "pendingEntriesCount",
                           "streamLength", "lagCount", "activationLagCount", "enableTLS", "unsafeSsl",
                           "databaseIndex"}


def test_keda_scales_the_deployment_on_the_jobs_stream_and_consumer_group() -> None:
    found = manifests()
    scaled, config = found["ScaledObject"], found["ConfigMap"]["data"]
    env = {**config, **found["Secret"]["stringData"]}
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == found["Deployment"]["metadata"]["name"]
    triggers = scaled["spec"]["triggers"]
    assert {t["type"] for t in triggers} == {"redis-streams"}
    url = urlsplit(env["EMBEDQ_REDIS_URL"])
    for trigger in triggers:
        meta = trigger["metadata"]
        assert set(meta) <= KEDA_REDIS_STREAMS_KEYS, set(meta) - KEDA_REDIS_STREAMS_KEYS
        assert all(isinstance(value, str) for value in meta.values()), "KEDA's metadata is strings only"
        assert meta["stream"] == JobKeys(config["EMBEDQ_JOB"]).stream
        assert meta["consumerGroup"] == GROUP
        # KEDA reads these from the worker's environment: the Redis embedq uses.
        assert env[meta["addressFromEnv"]] == url.netloc.rpartition("@")[2]
        assert env[meta["passwordFromEnv"]] == url.password
        assert meta["databaseIndex"] == url.path.strip("/")
    assert any("lagCount" in t["metadata"] for t in triggers)


def test_the_alert_rules_parse_and_use_only_metrics_embedq_serves() -> None:
    import promql_parser

    (rules_file,) = documents("alerts.yml")
    rules = [rule for group in rules_file["groups"] for rule in group["rules"]]
    assert {rule["alert"] for rule in rules} == {"EmbedqNoProgress", "EmbedqDeadLettersRising", "EmbedqLagGrowing"}
    exporter = (ROOT / "embedq" / "cli" / "exporter.py").read_text()
    for rule in rules:
        promql_parser.parse(rule["expr"])
        assert rule["labels"]["severity"] in ("warning", "critical") and rule["annotations"]["summary"]
        for metric in re.findall(r"\bembedq_\w+", rule["expr"]):
            assert f'"{metric.removesuffix("_total")}"' in exporter, f"{rule['alert']}: {metric} is not served"
