"""Readings taken while a job runs: counters and resource use sampled in a thread, NVML, host RSS."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

log = logging.getLogger("embedq.bench")

Reading = Callable[[], dict[str, float]]


class Sampler:
    """Samples counters and resource use every `every` seconds in a thread."""

    def __init__(self, read: Reading, every: float = 0.25) -> None:
        self.read = read
        self.every = every
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="embedq-bench-sampler")

    def _run(self) -> None:
        started = time.monotonic()
        while True:
            stopping = self._stop.is_set()  # one last sample after the stop: the run's final counts
            with contextlib.suppress(Exception):
                self.samples.append({"t": time.monotonic() - started, **self.read()})
            if stopping:
                return
            self._stop.wait(self.every)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def redis_cpu_seconds(cpu_info: dict[str, Any]) -> float:
    """CPU seconds of Redis's main thread, from `INFO cpu`: the thread that runs every command, so one
    core is its ceiling whatever other threads it has (Redis 7 reports it apart; before, the process's)."""
    main = ("used_cpu_sys_main_thread", "used_cpu_user_main_thread")
    keys = main if main[0] in cpu_info else ("used_cpu_sys", "used_cpu_user")
    return sum(float(cpu_info[key]) for key in keys)


def process_tree_rss() -> int:
    """Resident memory of this process and all its children (the tokenizer pool), in bytes."""
    import psutil

    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += child.memory_info().rss
    return int(total)


class Gpu:
    """NVML readings of one GPU (utilization, memory), or nothing where NVML is missing."""

    def __init__(self, device: str) -> None:
        self.handle = None
        self._nvml: Any = None
        if not device.startswith("cuda"):
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = _nvml_handle(pynvml, device)
            self._nvml = pynvml
        except Exception as exc:  # NVML absent or not permitted: report no GPU figures
            log.warning("NVML unavailable (%s): no GPU busy fraction", exc)

    def read(self) -> dict[str, float]:
        if self.handle is None:
            return {}
        util = self._nvml.nvmlDeviceGetUtilizationRates(self.handle)
        memory = self._nvml.nvmlDeviceGetMemoryInfo(self.handle)
        return {"gpu_util": float(util.gpu), "gpu_mem": float(memory.used)}


def _nvml_handle(pynvml: Any, device: str) -> Any:
    """The NVML handle of `device` as CUDA numbers it: NVML ignores CUDA_VISIBLE_DEVICES, so cuda:0
    of a worker that sees only GPU 3 (`embedq work --gpus`, the systemd units) is NVML's 3."""
    index = int(device.split(":")[1]) if ":" in device else 0
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if index < len(visible):
        entry = visible[index]
        if entry.isdigit():
            return pynvml.nvmlDeviceGetHandleByIndex(int(entry))
        return pynvml.nvmlDeviceGetHandleByUUID(entry)  # GPU-... or MIG-... names
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def steady(samples: list[dict[str, float]]) -> list[dict[str, float]]:
    """The samples between the first and last tenth of the documents committed."""
    if not samples:
        return []
    total = samples[-1]["committed"]
    return [s for s in samples if 0.1 * total <= s["committed"] <= 0.9 * total]


def steady_rate(samples: list[dict[str, float]], key: str = "tokens") -> float | None:
    """`key` per second over the steady part of a run, without its start and its tail (None with
    fewer than two steady samples): how fast a worker runs, apart from its fixed costs."""
    middle = steady(samples)
    if len(middle) < 2 or middle[-1]["t"] <= middle[0]["t"]:
        return None
    return (middle[-1][key] - middle[0][key]) / (middle[-1]["t"] - middle[0]["t"])


def gpu_busy(samples: list[dict[str, float]]) -> float | None:
    """The mean GPU utilization (0 to 1) over the steady part of a run; None without NVML readings."""
    busy = [s["gpu_util"] for s in steady(samples) if "gpu_util" in s]
    return float(np.mean(busy)) / 100.0 if busy else None
