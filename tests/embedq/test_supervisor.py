"""`embedq work --gpus/--workers`: the plan (devices, cores, restart backoff) as plain functions, and
the supervisor with real `embedq work` children on CPU: all of them finish one job exactly once, a
killed child is restarted, SIGTERM drains them all, a configuration error stops the node."""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import typer
from typer.testing import CliRunner

from embedq.cli.node import child_command, child_environment, node_devices
from embedq.config import Settings, load_settings
from embedq.errors import UsageError
from embedq.keys import JobKeys
from embedq.model import load_model_info
from embedq.producer.slices import Slice
from embedq.supervisor import Backoff, Slot, Supervisor, isolate_gpu, parse_cpu_list, parse_gpus, plan_slots
from embedq.verify import verify_job
from tests.support import committed, embedq_process, produce, wait_until, write_jsonl

N_DOCS = 3000


# -- the plan


def test_gpus_all_or_a_list_checked_against_the_machine() -> None:
    assert parse_gpus("all", 4) == [0, 1, 2, 3]
    assert parse_gpus("0,2", 4) == [0, 2]
    assert parse_gpus(" 1 ", 2) == [1]
    with pytest.raises(UsageError, match="no CUDA GPU"):
        parse_gpus("all", 0)
    with pytest.raises(UsageError, match=r"has 2 CUDA GPU.*no GPU 3"):
        parse_gpus("0,3", 2)
    with pytest.raises(UsageError, match="twice"):
        parse_gpus("1,1", 2)
    with pytest.raises(UsageError, match="GPU numbers"):
        parse_gpus("first", 2)


def _alone(cpu: int) -> frozenset[int]:
    return frozenset({cpu})


def test_each_worker_gets_a_contiguous_share_of_the_cores() -> None:
    slots = plan_slots(["cuda:0", "cuda:1"], list(range(32)), siblings=_alone)
    assert [s.cores for s in slots] == [tuple(range(16)), tuple(range(16, 32))]
    uneven = plan_slots(["cuda:0", "cuda:1", "cuda:2"], [0, 1, 2, 3, 4, 5, 6], siblings=_alone)
    assert [len(s.cores) for s in uneven] == [3, 2, 2] and sorted(c for s in uneven for c in s.cores) == list(range(7))
    assert plan_slots(["cpu"] * 3, [0, 1]) == [Slot(0, "cpu"), Slot(1, "cpu"), Slot(2, "cpu")]  # too few to pin


def test_a_physical_cores_hyperthreads_go_to_one_worker() -> None:
    # 16 cores of two threads each, numbered as Linux usually numbers them: CPU i and i + 16 share a core.
    def smt(cpu: int) -> frozenset[int]:
        return frozenset({cpu % 16, cpu % 16 + 16})

    slots = plan_slots(["cuda:0", "cuda:1"], list(range(32)), siblings=smt)
    assert [s.cores for s in slots] == [(*range(8), *range(16, 24)), (*range(8, 16), *range(24, 32))]
    # Two cores of two threads for three workers: whole cores cannot go round, so threads are shared out.
    assert [s.cores for s in plan_slots(["cpu"] * 3, [0, 1, 2, 3], siblings=lambda c: frozenset({c % 2, c % 2 + 2}))
            ] == [(0, 1), (2,), (3,)]
    assert parse_cpu_list("0,16\n") == {0, 16} and parse_cpu_list("0-2,8-9") == {0, 1, 2, 8, 9}


def test_workers_multiply_per_gpu_or_run_on_the_device_given() -> None:
    assert node_devices(None, 3, "cpu") == ["cpu", "cpu", "cpu"]
    with pytest.raises(UsageError, match="at least 1"):
        node_devices(None, 0, "cpu")
    with pytest.raises(UsageError, match="leave --device out"):
        node_devices("0", None, "cuda:1")


def test_a_gpu_worker_sees_only_its_gpu_as_cuda_0() -> None:
    assert isolate_gpu("cuda:3", {}) == ("cuda:0", {"CUDA_VISIBLE_DEVICES": "3"})
    # numbered through the supervisor's own view, as CUDA numbers them
    assert isolate_gpu("cuda:1", {"CUDA_VISIBLE_DEVICES": "4,6"}) == ("cuda:0", {"CUDA_VISIBLE_DEVICES": "6"})
    assert isolate_gpu("cpu", {"CUDA_VISIBLE_DEVICES": "4"}) == ("cpu", {})
    env = child_environment(Settings(), Slot(1, "cuda:1", (8, 9)), base={"CUDA_VISIBLE_DEVICES": "2,5"})
    assert env["CUDA_VISIBLE_DEVICES"] == "5" and env["EMBEDQ_DEVICE"] == "cuda:0"


def test_gpu_figures_read_the_gpu_cuda_numbers_through_cuda_visible_devices(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """NVML numbers GPUs physically and ignores CUDA_VISIBLE_DEVICES (a stand-in records the calls:
    there is no NVML on this machine)."""
    from embedq.bench.sampling import _nvml_handle

    class Nvml:
        def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
            return f"index {index}"

        def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
            return f"uuid {uuid}"

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert _nvml_handle(Nvml(), "cuda:0") == "index 3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8f2e,GPU-11aa")
    assert _nvml_handle(Nvml(), "cuda:1") == "uuid GPU-11aa"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert _nvml_handle(Nvml(), "cuda:2") == "index 2"


def test_restarts_back_off_doubling_to_a_ceiling() -> None:
    backoff = Backoff(first=1.0, longest=60.0)
    assert [backoff.delay(n) for n in (1, 2, 3, 4, 7, 20)] == [1.0, 2.0, 4.0, 8.0, 60.0, 60.0]


def test_a_child_gets_the_parents_effective_settings_and_its_own_device_and_port(tmp_path: Path) -> None:
    empty = tmp_path / "embedq.toml"
    empty.write_text("")
    settings = load_settings({"lease_seconds": 7.0, "metrics_port": 9400, "cuda_graphs": False},
                             environ={}, config_file=empty)
    env = child_environment(settings, Slot(2, "cpu", (4, 5, 6)), base={"EMBEDQ_GPUS": "all", "PATH": "/bin",
                                                                          "EMBEDQ_LEASE_SECONDS": "99"})
    assert "EMBEDQ_GPUS" not in env and env["PATH"] == "/bin"
    assert env["EMBEDQ_LEASE_SECONDS"] == "7.0" and env["EMBEDQ_CUDA_GRAPHS"] == "false"
    assert env["EMBEDQ_DEVICE"] == "cpu" and env["EMBEDQ_METRICS_PORT"] == "9402" and env["EMBEDQ_THREADS"] == "3"
    # what the child reads back is what the parent had
    child = load_settings(environ=env, config_file=empty)
    assert child.lease_seconds == 7.0 and child.cuda_graphs is False and child.device == "cpu"


# -- real children


@pytest.fixture
def job(redis_client: redis.Redis, job_name: str, tiny_model: Path, tmp_path: Path,
        gloss_texts: list[str]) -> JobKeys:
    keys = JobKeys(job_name)
    source = write_jsonl(tmp_path / "docs.jsonl", list(range(N_DOCS)), gloss_texts[:N_DOCS])
    produce(redis_client, keys, load_model_info(tiny_model), source, batch_size=100)
    return keys


@pytest.fixture
def half_job(redis_client: redis.Redis, job_name: str, tiny_model: Path, tmp_path: Path,
             gloss_texts: list[str]) -> tuple[JobKeys, Callable[[], None]]:
    """A job whose producer has published only the first half so far (slice 0 of 2): workers embed
    it, then wait for more, so a signal finds them alive whatever the machine's speed; and the
    function that publishes the rest."""
    keys = JobKeys(job_name)
    source = write_jsonl(tmp_path / "docs.jsonl", list(range(N_DOCS)), gloss_texts[:N_DOCS])
    model = load_model_info(tiny_model)
    produce(redis_client, keys, model, source, batch_size=100, part=Slice(0, 2))

    def publish_the_rest() -> None:
        produce(redis_client, keys, model, source, batch_size=100, part=Slice(1, 2))

    return keys, publish_the_rest


def working(client: redis.Redis, job: JobKeys) -> int:
    """Workers in the job's workers hash: a worker enters it once its drain handlers are in (one
    still loading its model when a signal comes dies of it, with nothing to drain)."""
    return int(client.hlen(job.workers))


def node_args(job: JobKeys, out: Path, redis_url: str) -> list[str]:
    """`embedq work --workers 2` on CPU for `job`."""
    return ["work", "--workers", "2", "--device", "cpu", "--job", job.job, "--out", str(out), "--redis", redis_url,
            "--lease-seconds", "2", "--window-docs", "200"]


def children_env(redis_url: str) -> dict[str, str]:
    return {**os.environ, "EMBEDQ_REDIS_URL": redis_url, "EMBEDQ_BACKEND": "torch", "PYTHONUNBUFFERED": "1"}


def cpu_supervisor(keys: JobKeys, out: Path, redis_url: str, n: int, log: Path,
                   backoff: Backoff | None = None) -> Supervisor:
    settings = Settings(redis_url=redis_url, backend="torch", device="cpu", lease_seconds=2.0, window_docs=200)
    command = [sys.executable, "-m", "embedq", "work", "--job", keys.job, "--out", str(out)]
    sink = log.open("ab")

    def environment(slot: Slot) -> dict[str, str]:
        return child_environment(settings, slot, base=children_env(redis_url))

    return Supervisor(plan_slots(["cpu"] * n, [0]), lambda _slot: command, environment, backoff=backoff,
                      output=sink)


def assert_exactly_once(client: redis.Redis, keys: JobKeys, out: Path) -> None:
    result = verify_job(client, keys, str(out))
    assert result.ok and result.output_rows == N_DOCS, result.render()


def test_embedq_work_workers_3_finishes_the_job_exactly_once(redis_client: redis.Redis, job: JobKeys,
                                                              redis_url: str, tmp_path: Path) -> None:
    out, log = tmp_path / "out", tmp_path / "node.log"
    node = embedq_process("work", "--workers", "3", "--device", "cpu", "--job", job.job, "--out", str(out),
                          "--redis", redis_url, "--lease-seconds", "2", "--window-docs", "200", log=log)
    assert node.wait(timeout=300) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert len(set(re.findall(r"worker \d \(cpu\) started \(pid (\d+)", text))) == 3, text[-3000:]
    assert "node: 3 workers, all finished, 0 restart(s)" in text, text[-6000:]
    workers = set(re.findall(r"worker (\S+): [\d,]+ documents", text))
    assert len(workers) == 3, f"each child is a worker of its own: {text[-6000:]}"
    assert_exactly_once(redis_client, job, out)


def test_a_killed_worker_is_restarted_and_the_job_completes_exactly_once(
        redis_client: redis.Redis, job: JobKeys, redis_url: str, tmp_path: Path) -> None:
    out, log = tmp_path / "out", tmp_path / "node.log"
    supervisor = cpu_supervisor(job, out, redis_url, 2, log, backoff=Backoff(first=0.2))
    victim = supervisor.children[0]
    killed: list[int] = []

    def kill_once_it_commits() -> None:
        wait_until(lambda: committed(redis_client, job) > 0, 120, "a first commit")
        assert victim.process is not None
        killed.append(victim.process.pid)
        victim.process.kill()

    import threading

    killer = threading.Thread(target=kill_once_it_commits, daemon=True)
    killer.start()
    report = supervisor.run(install_signals=False)
    killer.join(timeout=5)
    assert killed and victim.restarts >= 1, report
    assert report.exit_code == 0 and [c.exit_code for c in report.children] == [0, 0]
    assert_exactly_once(redis_client, job, out)


def test_sigterm_drains_every_worker_then_another_run_finishes_exactly_once(
        redis_client: redis.Redis, half_job: tuple[JobKeys, Callable[[], None]], redis_url: str,
        tmp_path: Path) -> None:
    job, publish_the_rest = half_job
    out, log = tmp_path / "out", tmp_path / "node.log"
    args = node_args(job, out, redis_url)
    node = embedq_process(*args, log=log)
    wait_until(lambda: committed(redis_client, job) == N_DOCS // 2, 120, "the first half committed")
    wait_until(lambda: working(redis_client, job) >= 2, 120, "both workers working")
    node.send_signal(signal.SIGTERM)
    assert node.wait(timeout=120) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert text.count("stopped by signal") == 2, text[-3000:]  # both drained, none killed
    publish_the_rest()
    finisher = embedq_process(*args, log=log)
    assert finisher.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert_exactly_once(redis_client, job, out)


def test_a_configuration_error_stops_the_node_without_restarts(redis_url: str, tmp_path: Path) -> None:
    log = tmp_path / "node.log"
    node = embedq_process("work", "--workers", "2", "--device", "cpu", "--job", "no-such-job", "--no-wait",
                          "--out", str(tmp_path / "out"), "--redis", redis_url, log=log)
    code = node.wait(timeout=120)
    text = log.read_text()
    assert code == 2 and "restarting" not in text, text[-3000:]


def test_the_child_command_forwards_the_log_flags() -> None:
    captured: list[list[str]] = []
    app = typer.Typer()

    @app.callback()
    def main(verbose: int = typer.Option(0, "-v", count=True), quiet: bool = False,
             log_format: str = "text") -> None:
        pass

    @app.command()
    def work(ctx: typer.Context) -> None:
        captured.append(child_command(ctx, "j", "o", wait=False))

    assert CliRunner().invoke(app, ["-v", "-v", "--log-format", "json", "work"]).exit_code == 0
    assert captured[0][3:] == ["-v", "-v", "--log-format", "json", "work", "--job", "j", "--out", "o", "--no-wait"]


def test_workers_drain_when_the_supervisor_is_killed(redis_client: redis.Redis,
                                                     half_job: tuple[JobKeys, Callable[[], None]], redis_url: str,
                                                     tmp_path: Path) -> None:
    """SIGKILL leaves the supervisor no time to forward anything: Linux's parent-death signal drains
    the children, so no worker is left running without its supervisor."""
    job, publish_the_rest = half_job
    out, log = tmp_path / "out", tmp_path / "node.log"
    args = node_args(job, out, redis_url)
    node = embedq_process(*args, log=log)
    wait_until(lambda: committed(redis_client, job) == N_DOCS // 2, 120, "the first half committed")
    wait_until(lambda: working(redis_client, job) >= 2, 120, "both workers working")
    pids = [int(p) for p in re.findall(r"started \(pid (\d+)", log.read_text())]
    assert len(pids) == 2
    node.kill()
    node.wait(timeout=10)

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{pid}/stat") as stat:  # a zombie (reaped by init shortly) counts as gone
            return stat.read().split(") ", 1)[1].startswith("Z")

    wait_until(lambda: all(gone(pid) for pid in pids), 120, "both workers to drain and exit")
    assert log.read_text().count("stopped by signal") == 2, log.read_text()[-3000:]
    publish_the_rest()
    finisher = embedq_process(*args, log=log)
    assert finisher.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert_exactly_once(redis_client, job, out)


def test_the_node_exits_as_a_shell_reports_a_child_killed_by_a_signal() -> None:
    """Popen gives -9 for a child killed by SIGKILL; the supervisor's own exit status must be one a
    shell and systemd read (137), not -9 wrapped to 247."""
    from embedq.supervisor import Child, SupervisorReport

    def report(*codes: int | None) -> SupervisorReport:
        return SupervisorReport(children=[Child(Slot(i, "cpu"), exit_code=code) for i, code in enumerate(codes)])

    assert report(0, -signal.SIGKILL).exit_code == 137
    assert report(0, 1).exit_code == 1
    assert report(0, None).exit_code == 0
