"""Samples of a running fleet: the job's counters, Redis's CPU and network counters, and the CPU
time of the host and of each role's process tree; `Window` turns two samples into rates and costs.

Redis's CPU is its main thread's (`used_cpu_*_main_thread`, Redis 7): one core is its ceiling for
commands, whatever threads it has besides. Costs are per million documents, the figure that
carries over from a small machine to a large one; rates are only as good as the machine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import psutil
import redis

from embedq.bench.sampling import redis_cpu_seconds
from embedq.keys import JobKeys


@dataclass(frozen=True)
class Sample:
    """One look at the fleet."""

    t: float
    committed: int  # documents committed (the stats hash)
    published: int  # documents published (the producer's cursor)
    produced: bool  # the producer has published the whole source
    redis_cpu: float  # seconds, Redis's main thread
    net_in: int  # bytes Redis received
    net_out: int  # bytes Redis sent
    commands: int  # commands Redis processed (a script counts its calls too)
    host_busy: float  # CPU seconds of all cores, not idle
    roles_cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds of each role's processes


class Probe:
    """Takes samples of one job and the processes that work on it."""

    def __init__(self, client: redis.Redis, keys: JobKeys, roles: dict[str, list[int]]) -> None:
        self.client = client
        self.keys = keys
        self.roles = {role: [psutil.Process(pid) for pid in pids] for role, pids in roles.items()}
        self._seen: dict[str, dict[int, float]] = {role: {} for role in roles}  # CPU seconds by pid, kept
        # after a process exits (a producer that finished, a worker's pool), so role totals never fall

    def sample(self) -> Sample:
        pipe = self.client.pipeline(transaction=False)
        pipe.hget(self.keys.stats, "docs_committed")
        pipe.hmget(self.keys.producer, ["docs", "done"])
        pipe.info("cpu")
        pipe.info("stats")
        committed, (published, done), cpu, stats = pipe.execute()
        redis_cpu = redis_cpu_seconds(cpu)
        times = psutil.cpu_times()
        busy = sum(times) - times.idle - getattr(times, "iowait", 0.0)
        return Sample(time.monotonic(), int(committed or 0), int(published or 0), done == b"1", redis_cpu,
                      int(stats["total_net_input_bytes"]), int(stats["total_net_output_bytes"]),
                      int(stats["total_commands_processed"]), busy,
                      {role: self._role_cpu(role) for role in self.roles})

    def _role_cpu(self, role: str) -> float:
        seen = self._seen[role]
        for process in self.roles[role]:
            seen.update(_tree_cpu(process))
        return sum(seen.values())


def _tree_cpu(process: psutil.Process) -> dict[int, float]:
    """CPU seconds of a process and its children (a worker's tokenizer pool and device), by pid."""
    try:
        members = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    found = {}
    for member in members:
        try:
            times = member.cpu_times()
        except psutil.NoSuchProcess:
            continue
        found[member.pid] = times.user + times.system
    return found


@dataclass(frozen=True)
class Window:
    """What happened between two samples, per second and per million documents."""

    start: Sample
    end: Sample
    counted: str = "committed"  # which documents the costs are per: "committed" or "published"

    @property
    def seconds(self) -> float:
        return max(1e-9, self.end.t - self.start.t)

    @property
    def documents(self) -> int:
        return getattr(self.end, self.counted) - getattr(self.start, self.counted)

    def figures(self, mean_tokens: float) -> dict[str, float]:
        """Rates, Redis's share of a core, and costs per million documents."""
        a, b, s = self.start, self.end, self.seconds
        docs = max(1, self.documents)
        per_m = 1e6 / docs
        figures = {
            "seconds": s,
            "documents": self.documents,
            "docs_per_s": self.documents / s,
            "tokens_per_s": self.documents * mean_tokens / s,
            "published_docs_per_s": (b.published - a.published) / s,
            "redis_core_busy": (b.redis_cpu - a.redis_cpu) / s,
            "redis_cpu_s_per_m_docs": (b.redis_cpu - a.redis_cpu) * per_m,
            "redis_in_bytes_per_doc": (b.net_in - a.net_in) / docs,
            "redis_out_bytes_per_doc": (b.net_out - a.net_out) / docs,
            "redis_in_mb_per_s": (b.net_in - a.net_in) / s / 1e6,
            "redis_out_mb_per_s": (b.net_out - a.net_out) / s / 1e6,
            "redis_commands_per_doc": (b.commands - a.commands) / docs,
            "host_cores_busy": (b.host_busy - a.host_busy) / s,
        }
        for role in b.roles_cpu:
            used = b.roles_cpu[role] - a.roles_cpu.get(role, 0.0)
            figures[f"{role}_cores_busy"] = used / s
            figures[f"{role}_cpu_s_per_m_docs"] = used * per_m
        return figures
