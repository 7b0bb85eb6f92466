"""The chaos controller: a real job through the real CLI while its processes are killed.

    producer  `python -m embedq produce`, paced by a small backlog so it publishes all along
    workers   `python -m embedq work` x N, one SIGKILLed every few seconds and started again
    Redis     a private redis-server with AOF, SIGKILLed once and started on the same port and dir

The controller ticks a few times a second: it reaps processes, fires the events that are due
(worker kills by time; the producer kill and the Redis restart by progress, so they always land
while the job is running), and stops when the job is complete. Faults aim where they hurt: a kill
takes a worker holding unsettled batches, Redis dies while a part is staged and not committed,
and a worker starts the moment Redis is back, while the others still retry their commits. Every
child is killed and reaped in `close`, also when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from embedq.connection import RedisServer
from embedq.job import job_complete
from embedq.keys import GROUP, JobKeys
from embedq.worker.commit import part_writer
from embedq.worker.output import STAGING_PREFIX, STAGING_SUFFIX

TICK = 0.2  # seconds between controller rounds
KILL_WAIT = 30.0  # seconds a SIGKILLed process may take to be reaped
EXIT_WAIT = 180.0  # seconds workers may take to notice the job is complete and exit


@dataclass(frozen=True)
class ChaosPlan:
    """One size of the chaos run: how much work, how much violence, how long to wait."""

    documents: int
    min_worker_kills: int  # the run does not count unless at least this many kills happened
    deadline: float  # seconds for the job to complete, from the producer's start
    workers: int = 3
    kill_every: tuple[float, float] = (2.0, 4.0)  # seconds between worker kills, drawn uniformly
    producer_kill_at: float = 0.3  # fraction of the documents published when the producer is killed
    redis_restart_at: float = 0.6  # fraction of the documents committed when Redis is killed
    redis_down_seconds: float = 2.0  # as long as the lease: every lease lapses while Redis is down
    appendfsync: str = "everysec"
    batch_size: int = 5  # small batches and windows: many entries, leases and commits to break
    window_docs: int | None = 50  # None: the default (windows sized by time)
    backlog: int = 16  # stream entries: the producer is paced by the workers, so it is killed mid-way
    lease_seconds: float = 2.0
    token_budget: int | None = 256  # None: the default for the device
    # Crashes are counted only for batches a worker was working on when it died, so the default
    # holds; the tiny-model runs keep a high value from before that, to test the commit protocol
    # alone.
    max_deliveries: int = 1000
    model: str = "tiny"  # "tiny" (a small random BERT) or "default" (all-MiniLM-L6-v2)
    violent: bool = True  # False: the same job without a single kill, for the rate to compare with
    # ONNX Runtime, from an export made once before the run: a worker restarts in about 1 CPU
    # second, against 5 for torch (its import), which at a kill every 3 s ate both cores.
    backend: str = "onnxruntime"
    seed: int = 4


@dataclass
class ChaosFigures:
    """What a chaos run did and found; printed, and written as JSON for the README."""

    documents: int
    workers: int
    appendfsync: str
    worker_kills: int = 0
    kills_holding_entries: int = 0  # victims that held unsettled batches when they died
    entries_held_by_victims: int = 0
    worker_restarts: int = 0
    producer_kills: int = 0
    producer_restarts: int = 0
    redis_restarts: int = 0
    redis_outage_seconds: float = 0.0
    pending_at_redis_kill: int = 0  # stream entries delivered and unsettled when Redis died
    staged_at_redis_kill: int = 0  # parts written and not yet committed when Redis died
    duplicates_dropped: int = 0  # documents of parts refused because another worker committed first
    parts: int = 0
    rows_read: int = 0  # by a DuckDB glob over the output directory, as the workers left it
    distinct_ids: int = 0
    seconds_to_complete: float = 0.0
    seconds_total: float = 0.0
    verify_exit_code: int | None = None
    verify_output: str = ""
    unexpected_exits: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)  # the timeline

    def summary(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Child:
    """A process the controller started."""

    role: str  # "producer" or "worker"
    number: int
    process: subprocess.Popen[bytes]
    log: Path
    killed: bool = False

    @property
    def name(self) -> str:
        return f"{self.role}-{self.number:02d}"


class Chaos:
    """Runs one job under a `ChaosPlan`; use as a context manager so every child is reaped."""

    def __init__(self, plan: ChaosPlan, *, source: Path, out: Path, model: Path, root: Path, job: str) -> None:
        self.plan = plan
        self.source = source
        self.out = out
        self.model = model
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.engines = root / "engines"  # the engine cache, shared by the workers of this run
        self.keys = JobKeys(job)
        self.server = RedisServer(appendonly=True, appendfsync=plan.appendfsync, directory=root / "redis")
        self.rng = random.Random(plan.seed)
        self.figures = ChaosFigures(documents=plan.documents, workers=plan.workers, appendfsync=plan.appendfsync)
        self.children: list[Child] = []
        self.finished: list[Child] = []  # exited (or killed) and reaped
        self._client: redis.Redis | None = None
        self._started = 0.0
        self._registered: dict[int, str] = {}  # pid -> worker id, from the job's worker registry
        self._seen_pids: set[int] = set()  # workers that registered with Redis at least once

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> Chaos:
        if self.plan.backend == "onnxruntime":
            from embedq.engines.onnx_export import export_onnx
            from embedq.model import load_model_info

            export_onnx(load_model_info(self.model), self.engines)
        self.server.start()
        self._client = redis.Redis.from_url(self.server.url, socket_timeout=5, socket_connect_timeout=2)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """SIGKILL and reap every child still running, then stop Redis."""
        for child in self.children:
            if child.process.poll() is None:
                _kill_group(child.process)
        for child in self.children:
            try:
                child.process.wait(timeout=KILL_WAIT)
            except subprocess.TimeoutExpired:  # pragma: no cover - a zombie we cannot reap
                self.note(f"{child.name} (pid {child.process.pid}) did not die")
        self.children.clear()
        if self._client is not None:
            self._client.close()
        self.server.stop()

    @property
    def client(self) -> redis.Redis:
        assert self._client is not None
        return self._client

    @property
    def url(self) -> str:
        return self.server.url

    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def note(self, event: str) -> None:
        self.figures.events.append(f"{self.elapsed():7.1f} s  {event}")

    # -- the run ------------------------------------------------------------------------------

    def run(self) -> ChaosFigures:
        """Start everything, wreak the plan's havoc until the job is complete, wait for the workers."""
        plan = self.plan
        self._started = time.monotonic()
        self._spawn("producer")
        for _ in range(plan.workers):
            self._spawn("worker")
        next_kill = plan.kill_every[1]  # the first kill once workers had time to start
        while True:
            time.sleep(TICK)
            if self.elapsed() > plan.deadline:
                raise AssertionError(f"the job did not complete within {plan.deadline:.0f} s")
            self._reap()
            progress = self._progress()
            if progress is None:
                continue
            produced, committed, complete = progress
            if complete:
                self.figures.seconds_to_complete = round(self.elapsed(), 1)
                self.note("job complete")
                break
            if not plan.violent:
                continue
            if not self.figures.producer_kills and produced >= plan.producer_kill_at * plan.documents \
                    and self._producer() is not None:
                self._kill_producer()
            elif not self.figures.redis_restarts and committed >= plan.redis_restart_at * plan.documents:
                # Worker kills pause until every worker is up: one starting during the outage would
                # fail its start-up (by design: a supervisor restarts it), which tests nothing.
                if not self._workers_starting():
                    self._restart_redis()
                    # A worker that held nothing dies with the outage and its supervisor starts it
                    # again as soon as Redis answers: the newcomer's start-up recovery meets the
                    # survivors still retrying the commits the outage cut off. They get time to.
                    self._kill_a_worker(idle=True)
                    next_kill = self.elapsed() + plan.kill_every[1]
            elif self.elapsed() >= next_kill:
                # A kill waits (a while) for a worker that holds batches: killing an idle one tests less.
                overdue = self.elapsed() - next_kill > plan.kill_every[1]
                if self._kill_a_worker(idle=overdue):
                    next_kill = self.elapsed() + self.rng.uniform(*plan.kill_every)
        self._wait_for_exits()
        return self.figures

    def _spawn(self, role: str) -> Child:
        number = 1 + sum(1 for c in self.children + self.finished if c.role == role)
        log = self.logs / f"{role}-{number:02d}.log"
        plan = self.plan
        if role == "producer":
            args = ["produce", str(self.source), "--job", self.keys.job, "--redis", self.url, "--model",
                    str(self.model), "--batch-size", str(plan.batch_size), "--backlog", str(plan.backlog)]
        else:
            args = ["work", "--job", self.keys.job, "--out", str(self.out), "--redis", self.url, "--model",
                    str(self.model), "--lease-seconds", str(plan.lease_seconds), "--max-deliveries",
                    str(plan.max_deliveries)]
            if plan.window_docs is not None:
                args += ["--window-docs", str(plan.window_docs)]
            if plan.token_budget is not None:
                args += ["--token-budget", str(plan.token_budget)]
        env = {**os.environ, "EMBEDQ_BACKEND": plan.backend, "EMBEDQ_DEVICE": "cpu", "EMBEDQ_THREADS": "1",
               "EMBEDQ_CACHE_DIR": str(self.engines), "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        with log.open("ab") as sink:
            # Its own session, so that close() can kill anything it started too (a tokenizer pool).
            process = subprocess.Popen([sys.executable, "-m", "embedq", *args], env=env, stdout=sink,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        child = Child(role, number, process, log)
        self.children.append(child)
        self.note(f"started {child.name} (pid {process.pid})")
        return child

    def _reap(self) -> None:
        """Collect children that exited by themselves; restart those that should not have."""
        for child in list(self.children):
            code = child.process.poll()
            if code is None:
                continue
            self.children.remove(child)
            self.finished.append(child)
            self.note(f"{child.name} exited with {code}")
            if code == 0:
                continue  # the producer finished publishing, or a worker found the job complete
            self.figures.unexpected_exits.append(f"{child.name} exited with {code}: {tail(child.log, 15)}")
            self._spawn(child.role)

    def _progress(self) -> tuple[int, int, bool] | None:
        """(documents published, documents committed, job complete), or None if Redis does not answer.

        Also notes which worker processes have registered with Redis (they are past their start-up).
        """
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.hget(self.keys.producer, "docs")
            pipe.hget(self.keys.stats, "docs_committed")
            pipe.hgetall(self.keys.workers)
            produced, committed, workers = pipe.execute()
            beats = {_text(k): json.loads(v) for k, v in workers.items()}
            self._registered = {int(beat["pid"]): name for name, beat in beats.items() if "pid" in beat}
            self._seen_pids |= self._registered.keys()
            return int(produced or 0), int(committed or 0), job_complete(self.client, self.keys)
        except redis.RedisError:
            return None

    def _workers(self) -> list[Child]:
        return [c for c in self.children if c.role == "worker"]

    def _workers_starting(self) -> bool:
        """Some worker has not registered yet: a Redis outage now would fail its start-up."""
        return any(c.process.pid not in self._seen_pids for c in self._workers())

    def _kill(self, child: Child, held: int = 0) -> None:
        _kill_group(child.process)
        child.process.wait(timeout=KILL_WAIT)
        child.killed = True
        self.children.remove(child)
        self.finished.append(child)
        self.note(f"SIGKILL {child.name} (pid {child.process.pid}), holding {held} unsettled batches")

    def _holders(self) -> dict[int, int]:
        """Unsettled batches (XPENDING) of each running worker that holds some, by pid."""
        try:
            pending = {_text(c["name"]): int(c["pending"])
                       for c in self.client.xpending(self.keys.stream, GROUP).get("consumers", [])}
        except redis.RedisError:
            return {}
        held = {c.process.pid: pending.get(self._registered.get(c.process.pid, ""), 0) for c in self._workers()}
        return {pid: n for pid, n in held.items() if n}

    def _kill_a_worker(self, *, idle: bool) -> bool:
        """SIGKILL a random worker holding batches, or with `idle` one holding none (else any); start another."""
        holders = self._holders()
        started = [c for c in self._workers() if c.process.pid in self._seen_pids]
        if idle:
            candidates = [c for c in started if c.process.pid not in holders] or started
        else:
            candidates = [c for c in started if c.process.pid in holders]
        if not candidates:
            return False
        victim = self.rng.choice(candidates)
        entries = holders.get(victim.process.pid, 0)
        self._kill(victim, entries)
        self.figures.worker_kills += 1
        self.figures.kills_holding_entries += entries > 0
        self.figures.entries_held_by_victims += entries
        self._spawn("worker")
        self.figures.worker_restarts += 1
        return True

    def _producer(self) -> Child | None:
        return next((c for c in self.children if c.role == "producer"), None)

    def _kill_producer(self) -> None:
        producer = self._producer()
        assert producer is not None
        self._kill(producer)
        self.figures.producer_kills += 1
        self._spawn("producer")  # it resumes after the last batch Redis has, once the lock expires
        self.figures.producer_restarts += 1

    def _restart_redis(self) -> None:
        """SIGKILL redis-server at the worst moment found within a few seconds: a part staged, not
        yet committed (its worker then retries the commit across the outage); start it again."""
        deadline = time.monotonic() + self.plan.kill_every[1]
        while not self._staged_parts() and time.monotonic() < deadline:
            time.sleep(0.002)
        staged = self._staged_parts()
        with contextlib.suppress(redis.RedisError):
            self.figures.pending_at_redis_kill = int(self.client.xpending(self.keys.stream, GROUP)["pending"])
        self.server.stop(kill=True)  # only what the AOF holds survives
        down = time.monotonic()
        self.figures.staged_at_redis_kill = len(staged)
        self.note(f"SIGKILL redis-server ({self.figures.pending_at_redis_kill} batches pending, "
                  f"{len(staged)} parts staged)")
        time.sleep(self.plan.redis_down_seconds)
        self.server.start(timeout=60)
        self.figures.redis_outage_seconds = round(time.monotonic() - down, 2)
        self.figures.redis_restarts += 1
        self.note(f"redis-server started again after {self.figures.redis_outage_seconds} s")

    def _staged_parts(self) -> list[str]:
        """Parts that running workers have written and not yet committed (not orphans of dead ones)."""
        running = {self._registered.get(c.process.pid) for c in self._workers()}
        names = [p.name[len(STAGING_PREFIX):-len(STAGING_SUFFIX)]
                 for p in self.out.glob(f"{STAGING_PREFIX}part-*{STAGING_SUFFIX}")] if self.out.is_dir() else []
        return [name for name in names if part_writer(name) in running]

    def _wait_for_exits(self) -> None:
        """Every process should now exit 0 by itself: the workers finalize the output directory."""
        deadline = time.monotonic() + EXIT_WAIT
        while self.children and time.monotonic() < deadline:
            time.sleep(TICK)
            self._reap()
        if self.children:
            raise AssertionError("still running after the job completed: "
                                 + ", ".join(c.name for c in self.children))
        self.figures.duplicates_dropped = sum(
            int(n) for c in self.finished if c.role == "worker"
            for n in re.findall(r"dropping (\d+) duplicate documents", c.log.read_text(errors="replace")))

    # -- diagnostics --------------------------------------------------------------------------

    def diagnostics(self, lines: int = 40) -> str:
        """The timeline, the tail of every log and of Redis's, for a failure message."""
        parts = ["timeline:", *self.figures.events]
        for child in self.finished + self.children:
            parts += [f"--- {child.name} (pid {child.process.pid}, exit {child.process.poll()}"
                      + (", killed" if child.killed else "") + ")", tail(child.log, lines)]
        parts += ["--- redis.log", tail(self.server.directory / "redis.log", 20)]
        return "\n".join(parts)


def tail(path: Path, lines: int) -> str:
    """The last `lines` non-blank lines of a log (progress bars' carriage returns made newlines)."""
    if not path.exists():
        return "(no log)"
    text = path.read_text(errors="replace").replace("\r", "\n")
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
