"""One private Redis and the processes of one case: a producer and N workers against one job.

Schedules:
    producer  the producer alone, publishing into an unbounded backlog: its ceiling, and what
              publishing costs Redis
    live      the producer and the workers start together, with the default backlog: what a user
              meets, limited by whichever part is slowest
    drain     the producer publishes first (for up to the time limit), then the workers drain the
              stream: their ceiling and Redis's, with the producer out of the way

Every process sets itself up before the orchestrator says go, so start-up is never timed, and
every phase ends when its work is done or at the time limit, whichever is first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from embedq.keys import JobKeys
from tests.fleetsim.corpus import CorpusFacts
from tests.fleetsim.probe import Probe, Sample, Window
from tests.fleetsim.roles import PRODUCER, PROTOCOL, WORKER, RoleSpec, command

PRODUCER_ALONE, LIVE, DRAIN = "producer", "live", "drain"
DEVICE = "device"  # workers: the real worker on a simulated device; PROTOCOL: Redis traffic only


@dataclass(frozen=True)
class Case:
    corpus: str
    pretokenized: bool
    workers: int
    mode: str  # DEVICE or PROTOCOL
    schedule: str  # PRODUCER_ALONE, LIVE or DRAIN
    producers: int = 1  # each publishes one slice of the source

    def label(self) -> str:
        tokens = "pretokenized" if self.pretokenized else "texts"
        return f"{self.corpus} {tokens} {self.schedule} {self.producers}p {self.workers}x{self.mode}"


@dataclass(frozen=True)
class FleetOptions:
    """Settings shared by every case of a run."""

    rates: dict[str, float]  # corpus -> the simulated device's padded tokens/s
    seconds: float = 6.0  # measured time of a phase, after the warm-up
    warmup: float = 2.0
    window_docs: int = 16384
    batch_size: int = 512
    backlog: int = 512
    producer_processes: int = 1  # tokenizer processes of each pretokenizing producer
    compress: bool = False  # producers compress each message (`embedq produce --compress`)
    sample_every: float = 0.25
    limit_factor: float = 2.0  # a phase with workers stops at this many times (warm-up + seconds)
    start_timeout: float = 180.0


    @property
    def time_limit(self) -> float:
        return self.limit_factor * (self.warmup + self.seconds)


class Fleet:
    """Runs cases against one private redis-server; a case's keys go with it (FLUSHALL)."""

    def __init__(self, options: FleetOptions, redis_url: str, work_dir: Path) -> None:
        self.options = options
        self.client = redis.Redis.from_url(redis_url)
        self.redis_url = redis_url
        self.work_dir = work_dir
        (work_dir / "logs").mkdir(parents=True, exist_ok=True)
        self._logs: dict[int, Path] = {}

    def run(self, case: Case, facts: CorpusFacts, source: Path, documents: int) -> dict[str, Any]:
        """Run one case over `source` (`documents` long); its figures, or the error that stopped it."""
        keys = JobKeys(f"fleet-{uuid.uuid4().hex[:8]}")
        output = self.work_dir / f"out-{keys.job}"
        started = time.monotonic()
        processes = self._start(case, keys, facts, source, output)
        result: dict[str, Any] = {"case": case.label(), "corpus": case.corpus, "pretokenized": case.pretokenized,
                                  "producers": case.producers, "workers": case.workers, "mode": case.mode,
                                  "schedule": case.schedule, "source_documents": documents}
        try:
            self._wait_ready(keys, processes)
            result["start_seconds"] = time.monotonic() - started
            k = case.producers
            probe = Probe(self.client, keys, {"producer": [p.pid for p in processes[:k]],
                                              "workers": [p.pid for p in processes[k:]]})
            result.update(self._phases(case, keys, probe, processes, facts, documents))
        except RuntimeError as exc:
            result["error"] = str(exc)
        finally:
            stopping = time.monotonic()
            _stop(processes)
            result["stop_seconds"] = time.monotonic() - stopping
            self.client.flushall()
            shutil.rmtree(output, ignore_errors=True)
            shutil.rmtree(source, ignore_errors=True)
        return result

    # -- phases ---------------------------------------------------------------------------------

    def _phases(self, case: Case, keys: JobKeys, probe: Probe, processes: list[subprocess.Popen[bytes]],
                facts: CorpusFacts, documents: int) -> dict[str, Any]:
        o, n, k = self.options, case.workers, case.producers
        go_producer, go_workers = _go_keys(keys)
        result: dict[str, Any] = {}
        if case.schedule == LIVE:
            self.client.rpush(go_producer, *[1] * k)
            if n:
                self.client.rpush(go_workers, *[1] * n)
            samples = self._watch(probe, processes, lambda s: s.committed >= documents, o.time_limit)
            result.update(_fleet_figures(samples, documents, o.warmup, facts.mean_tokens))
            result["producer_finished"] = samples[-1].produced
        else:
            self.client.rpush(go_producer, *[1] * k)
            samples = self._watch(probe, processes[:k], lambda s: s.produced, o.seconds)
            result["producer"] = Window(samples[0], samples[-1], "published").figures(facts.mean_tokens)
            result["producer_finished"] = samples[-1].produced
            if n:
                _stop(processes[:k])
                published = probe.sample().published
                self.client.rpush(go_workers, *[1] * n)
                samples = self._watch(probe, processes[k:], lambda s: s.committed >= published, o.time_limit)
                result.update(_fleet_figures(samples, published, o.warmup, facts.mean_tokens))
        if n and case.mode == DEVICE and "fleet" in result:
            ceiling = n * facts.device_docs_per_s(o.rates[case.corpus])
            result["device_ceiling_docs_per_s"] = ceiling
            result["devices_fed"] = result["fleet"]["docs_per_s"] / ceiling
        return result

    def _watch(self, probe: Probe, processes: list[subprocess.Popen[bytes]], done: Any,
               seconds: float) -> list[Sample]:
        """Sample until `done(sample)` or `seconds` have passed; a process that fails ends the case."""
        samples = [probe.sample()]
        while not done(samples[-1]) and samples[-1].t - samples[0].t < seconds:
            time.sleep(self.options.sample_every)
            samples.append(probe.sample())
            failed = [p for p in processes if p.poll() not in (None, 0)]
            if failed:
                raise RuntimeError(f"a fleet process exited with {failed[0].returncode}: {self._log_tail(failed[0])}")
        return samples

    # -- processes ------------------------------------------------------------------------------

    def _start(self, case: Case, keys: JobKeys, facts: CorpusFacts, source: Path,
               output: Path) -> list[subprocess.Popen[bytes]]:
        o = self.options
        go_producer, go_workers = _go_keys(keys)
        common = {"redis_url": self.redis_url, "job": keys.job, "ready_key": f"fleetsim:ready:{keys.job}",
                  "batch_size": o.batch_size}
        backlog = o.backlog if case.schedule == LIVE else 10**9
        specs = [RoleSpec(role=PRODUCER, go_key=go_producer, source=str(source), backlog=backlog,
                          tokenizer_processes=o.producer_processes if case.pretokenized else 0,
                          slice_index=k, slice_count=case.producers, compress=o.compress, **common)
                 for k in range(case.producers)]
        role = WORKER if case.mode == DEVICE else PROTOCOL
        specs += [RoleSpec(role=role, go_key=go_workers, rate=o.rates[case.corpus], output=str(output),
                           profiles=[(p.max_seq_len, p.max_batch) for p in facts.profiles],
                           window_docs=o.window_docs, **common) for _ in range(case.workers)]
        processes = []
        for i, spec in enumerate(specs):
            path = self.work_dir / "logs" / f"{keys.job}-{spec.role}-{i}.log"
            with path.open("wb") as log:
                processes.append(subprocess.Popen(command(spec), stdout=log, stderr=subprocess.STDOUT,
                                                  start_new_session=True, cwd=Path(__file__).parents[2]))
            self._logs[processes[-1].pid] = path
        return processes

    def _log_tail(self, process: subprocess.Popen[bytes]) -> str:
        """The end of a process's output, for the error that a failed process ends its case with."""
        path = self._logs.get(process.pid)
        text = path.read_text(errors="replace") if path is not None and path.exists() else ""
        return text[-1500:] or "no output"

    def _wait_ready(self, keys: JobKeys, processes: list[subprocess.Popen[bytes]]) -> None:
        deadline = time.monotonic() + self.options.start_timeout
        while int(self.client.get(f"fleetsim:ready:{keys.job}") or 0) < len(processes):
            exited = [p for p in processes if p.poll() is not None]
            if exited:
                raise RuntimeError(f"a fleet process exited while starting: {self._log_tail(exited[0])}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the fleet did not start within {self.options.start_timeout:.0f} s")
            time.sleep(0.05)


def _go_keys(keys: JobKeys) -> tuple[str, str]:
    return f"fleetsim:go-producer:{keys.job}", f"fleetsim:go-workers:{keys.job}"


def _fleet_figures(samples: list[Sample], documents: int, warmup: float, mean_tokens: float) -> dict[str, Any]:
    """Rates after the warm-up; costs over the whole run, which are unbiased only when the run
    completed (a run stopped at the time limit leaves documents read and not yet committed)."""
    return {"fleet": _steady(samples, warmup).figures(mean_tokens),
            "fleet_whole": Window(samples[0], samples[-1]).figures(mean_tokens),
            "complete": samples[-1].committed >= documents}


def _steady(samples: list[Sample], warmup: float) -> Window:
    """The samples after the warm-up (all of them if the phase ended sooner)."""
    start = next((s for s in samples if s.t - samples[0].t >= warmup), samples[0])
    if start is samples[-1]:
        start = samples[0]
    return Window(start, samples[-1])


def _stop(processes: list[subprocess.Popen[bytes]], timeout: float = 20.0) -> None:
    """SIGTERM each process this fleet started (a worker drains, as in production), then SIGKILL
    its process group: a tokenizer pool or simulated device left behind."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + timeout
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the group: a pool or device left behind
        process.wait()
