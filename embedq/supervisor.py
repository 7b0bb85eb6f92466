"""Several worker processes on one node under one supervisor: `embedq work --gpus` (and `--workers`).

Each child is a plain `embedq work` process on one device, pinned to its share of the node's CPU
cores: its tokenizer processes and torch threads are sized from that share, so two GPUs' workers
do not fight over the same cores. The supervisor adds nothing to the exactly-once protocol: the
children are ordinary workers of the job, and a child that dies is one more dead worker whose
batches the others (or its restarted self) take over after the lease.

- **Signals.** The children run in their own session, so a Ctrl-C at the terminal (or systemd's
  SIGTERM with `KillMode=mixed`) reaches the supervisor alone, which forwards each signal once to
  every child: the first drains them all (what is in flight is committed), a second stops them at
  once. If the supervisor itself dies, each child gets SIGTERM (Linux's parent-death signal) and
  drains.
- **Exits.** A child that exits 0 is done: the job is complete, or it drained. One that fails with
  a configuration error (exit 2 usage, 4 model, 7 job mismatch) stops the whole node, since every
  restart would fail the same way. Any other failure (a crash, an out-of-memory kill, Redis or the
  disk gone for longer than the worker's own retries) is restarted after a backoff that doubles from
  `Backoff.first` to `Backoff.longest` and starts over once a child has run `healthy_after`; a slot
  whose child fails `give_up_after` times in a row, each within `quick_failure` of its start, is
  given up (a broken GPU should not be restarted forever).

The plan (`parse_gpus`, `plan_slots`) and the restart policy (`Backoff`) are plain functions and
data, tested without processes; `Supervisor` is the thin part that starts and watches them.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from embedq.errors import UsageError

log = logging.getLogger("embedq.supervisor")

# usage, model, job mismatch (embedq.errors): a restart would fail the same way
FATAL_EXIT_CODES = frozenset({2, 4, 7})
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Slot:
    """One child: its number, its device, and the CPU cores it is pinned to (none: not pinned)."""

    index: int
    device: str
    cores: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        return f"worker {self.index} ({self.device})"


def isolate_gpu(device: str, environ: dict[str, str]) -> tuple[str, dict[str, str]]:
    """A child's device and the variables that give it only its GPU: `cuda:N` becomes `cuda:0` with
    CUDA_VISIBLE_DEVICES naming GPU N (mapped through the parent's own CUDA_VISIBLE_DEVICES), as
    the per-GPU systemd units do, so nothing in the child (a stream, a graph capture, a library's
    default device) can land on another worker's GPU. Other devices are left as they are."""
    if not device.startswith("cuda:"):
        return device, {}
    index = int(device.partition(":")[2])
    visible = [v.strip() for v in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return "cuda:0", {"CUDA_VISIBLE_DEVICES": visible[index] if index < len(visible) else str(index)}


def parse_gpus(spec: str, available: int) -> list[int]:
    """`all` or a comma-separated list of GPU numbers -> the GPU numbers, checked against the
    `available` count; a `UsageError` says what is wrong."""
    text = spec.strip().lower()
    if text == "all":
        if available == 0:
            raise UsageError("--gpus all: this machine has no CUDA GPU; run `embedq work --device cpu` "
                             "(with --workers N for several processes) instead.")
        return list(range(available))
    try:
        gpus = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--gpus takes `all` or GPU numbers such as 0,1; got {spec!r}") from None
    if not gpus or any(g < 0 for g in gpus):
        raise UsageError(f"--gpus takes `all` or GPU numbers such as 0,1; got {spec!r}")
    if len(set(gpus)) != len(gpus):
        raise UsageError(f"--gpus names a GPU twice: {spec!r} (use --workers N for several workers per GPU)")
    missing = [g for g in gpus if g >= available]
    if missing:
        raise UsageError(f"--gpus {spec}: this machine has {available} CUDA GPU(s) (0 to {available - 1}); "
                         f"no GPU {', '.join(map(str, missing))}")
    return gpus


def plan_slots(devices: Sequence[str], cores: Sequence[int],
               siblings: Callable[[int], frozenset[int]] | None = None) -> list[Slot]:
    """One slot per device (a device listed twice gets two), each pinned to a contiguous share of
    `cores` in whole physical cores: the hyperthreads of one core (`siblings`, from sysfs) go to the
    same slot, so two GPUs' workers never share a core's execution units (with the common numbering,
    CPUs i and i + n/2 are one core's two threads, and halves 0..n/2-1 and n/2..n-1 would pair
    every thread of one worker with one of the other). Contiguous, since neighbouring cores usually
    share a socket and its caches. With fewer cores than devices, nothing is pinned."""
    wanted = set(cores)
    groups: dict[int, set[int]] = {}
    for cpu in sorted(wanted):
        group = (siblings or _thread_siblings)(cpu) & wanted or frozenset({cpu})
        groups.setdefault(min(group), set()).update(group)
    physical = [sorted(groups[first]) for first in sorted(groups)]
    if len(physical) < len(devices):
        if len(wanted) < len(devices):
            return [Slot(i, device) for i, device in enumerate(devices)]
        physical = [[cpu] for cpu in sorted(wanted)]  # fewer whole cores than devices: share cores
    share, extra = divmod(len(physical), len(devices))
    slots, start = [], 0
    for i, device in enumerate(devices):
        size = share + (1 if i < extra else 0)
        slots.append(Slot(i, device, tuple(sorted(cpu for core in physical[start:start + size] for cpu in core))))
        start += size
    return slots


def _thread_siblings(cpu: int) -> frozenset[int]:
    """The CPUs that share `cpu`'s physical core (itself included), as Linux lists them; {cpu} where unknown."""
    try:
        with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as listing:
            return parse_cpu_list(listing.read()) or frozenset({cpu})
    except (OSError, ValueError):
        return frozenset({cpu})


def parse_cpu_list(text: str) -> frozenset[int]:
    """Linux's CPU list format: "0,16" or "0-1,32-33" -> the CPUs it names."""
    found: set[int] = set()
    for part in filter(None, text.strip().split(",")):
        low, _, high = part.partition("-")
        found.update(range(int(low), int(high or low) + 1))
    return frozenset(found)


@dataclass(frozen=True)
class Backoff:
    """When to restart a failed child (module docstring)."""

    first: float = 1.0
    longest: float = 60.0
    healthy_after: float = 300.0
    quick_failure: float = 30.0
    give_up_after: int = 5

    def delay(self, failures: int) -> float:
        """Seconds before the restart that follows the `failures`-th failure in a row (1, 2, ...)."""
        return min(self.longest, self.first * 2 ** max(0, failures - 1))


@dataclass
class Child:
    """A slot's current process and its failure history."""

    slot: Slot
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float | None = None  # a restart is due then
    failures_in_a_row: int = 0
    quick_failures_in_a_row: int = 0
    restarts: int = 0
    exit_code: int | None = None  # the last exit
    gave_up: bool = False

    @property
    def running(self) -> bool:
        return self.process is not None


@dataclass
class SupervisorReport:
    """How the children ended."""

    children: list[Child] = field(default_factory=list)
    signals: int = 0
    fatal_exit: int | None = None

    @property
    def exit_code(self) -> int:
        """0 when every child ended with 0; a configuration error's code; else the last failure's,
        a child killed by a signal as a shell reports it (128 + the signal's number: 137 for SIGKILL)."""
        if self.fatal_exit is not None:
            return self.fatal_exit
        failed = [c.exit_code for c in self.children if c.exit_code not in (0, None)]
        if not failed:
            return 0
        last = int(failed[-1])
        return 128 - last if last < 0 else last

    @property
    def restarts(self) -> int:
        return sum(c.restarts for c in self.children)


class Supervisor:
    """Starts a child per slot, forwards signals, restarts failures (module docstring)."""

    def __init__(self, slots: Sequence[Slot], command: Callable[[Slot], list[str]],
                 environment: Callable[[Slot], dict[str, str]], *, backoff: Backoff | None = None,
                 poll_seconds: float = 0.1, output: IO[bytes] | None = None) -> None:
        self.children = [Child(slot) for slot in slots]
        self._command = command
        self._environment = environment
        self.backoff = backoff or Backoff()
        self._poll = poll_seconds
        self._output = output  # the children's stdout and stderr; None: the supervisor's own
        self.report = SupervisorReport(children=self.children)
        self._stopping = False

    def run(self, *, install_signals: bool = True) -> SupervisorReport:
        """Run until every child has ended and none is due a restart."""
        handlers = self._forward_signals() if install_signals else contextlib.nullcontext()
        with handlers:
            for child in self.children:
                self._start(child)
            while any(c.running or c.restart_at is not None for c in self.children):
                now = time.monotonic()
                for child in self.children:
                    if child.process is not None and (code := child.process.poll()) is not None:
                        self._ended(child, code, now)
                    elif child.restart_at is not None and now >= child.restart_at and not self._stopping:
                        self._start(child)
                time.sleep(self._poll)
        return self.report

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Forward `signum` to every child and restart none from now on."""
        self._stopping = True
        self.report.signals += 1
        for child in self.children:
            child.restart_at = None
            if child.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signum)

    def _start(self, child: Child) -> None:
        slot = child.slot
        child.restart_at = None
        child.started_at = time.monotonic()
        child.process = subprocess.Popen(
            self._command(slot), env=self._environment(slot), start_new_session=True, stdout=self._output,
            stderr=None if self._output is None else subprocess.STDOUT,
            preexec_fn=pin_to(slot.cores))
        log.info("%s started (pid %d%s)", slot.name, child.process.pid,
                 f", cores {_ranges(slot.cores)}" if slot.cores else "")

    def _ended(self, child: Child, code: int, now: float) -> None:
        child.process = None
        child.exit_code = code
        ran = now - child.started_at
        slot = child.slot
        if code == 0:
            log.info("%s finished", slot.name)
            return
        described = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
        if code in FATAL_EXIT_CODES:
            log.error("%s failed (%s), a configuration error every restart would repeat: stopping the other "
                      "workers", slot.name, described)
            self.report.fatal_exit = self.report.fatal_exit or code
            if not self._stopping:
                self.stop(signal.SIGTERM)
            return
        if self._stopping:
            log.warning("%s ended (%s) while stopping", slot.name, described)
            return
        child.failures_in_a_row = 1 if ran >= self.backoff.healthy_after else child.failures_in_a_row + 1
        child.quick_failures_in_a_row = child.quick_failures_in_a_row + 1 if ran < self.backoff.quick_failure else 0
        if child.quick_failures_in_a_row >= self.backoff.give_up_after:
            child.gave_up = True
            log.error("%s failed (%s) %d times in a row within %.0f s of starting: giving it up", slot.name,
                      described, child.quick_failures_in_a_row, self.backoff.quick_failure)
            return
        delay = self.backoff.delay(child.failures_in_a_row)
        child.restart_at = now + delay
        child.restarts += 1
        log.warning("%s failed (%s) after %.0f s; restarting in %.0f s (its batches wait for it or for the "
                    "other workers)", slot.name, described, ran, delay)

    @contextlib.contextmanager
    def _forward_signals(self) -> Iterator[None]:
        def forward(signum: int, _frame: Any) -> None:
            again = " again: the workers stop at once" if self._stopping else ": the workers drain"
            log.warning("%s%s", signal.Signals(signum).name, again)
            self.stop(signum)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def pin_to(cores: tuple[int, ...]) -> Callable[[], None]:
    """What the child runs before it executes: pin it to its cores, and have Linux send it SIGTERM
    (a drain) if the supervisor dies."""
    def setup() -> None:
        if cores and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, cores)
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)

    return setup


def _ranges(cores: Sequence[int]) -> str:
    """(0, 1, 2, 5) -> "0-2,5"."""
    spans: list[list[int]] = []
    for core in sorted(cores):
        if spans and core == spans[-1][1] + 1:
            spans[-1][1] = core
        else:
            spans.append([core, core])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in spans)
