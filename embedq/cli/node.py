"""`embedq work --gpus/--workers`: every GPU of a node (or several CPU workers) under one supervisor.

The supervisor (`embedq.supervisor`) starts one plain `embedq work` per slot. A child gets the
parent's effective settings as `EMBEDQ_*` variables (flags, variables and `embedq.toml` already
merged, so it runs with exactly what the parent would have), its own device, and its share of the
cores; tokenizer processes and, on CPU, inference threads follow from that share.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys

import typer

from embedq.config import Settings, as_environment
from embedq.errors import UsageError
from embedq.supervisor import Slot, Supervisor, isolate_gpu, parse_gpus, plan_slots
from embedq.tokenization import usable_cores

log = logging.getLogger("embedq.supervisor")

# The supervisor's own options: a child must not supervise again.
_NODE_VARIABLES = ("EMBEDQ_GPUS", "EMBEDQ_WORKERS")


def node_devices(gpus: str | None, workers: int | None, device: str) -> list[str]:
    """The device of each child: `workers` (default 1) per GPU of `gpus`, or `workers` on `device`."""
    per_device = 1 if workers is None else workers
    if per_device < 1:
        raise UsageError(f"--workers must be at least 1; got {workers}")
    if gpus is None:
        return [device] * per_device
    if device not in ("auto", "cuda"):
        raise UsageError(f"--gpus picks the devices itself; leave --device out (got --device {device})")
    from embedq.engines.device import cuda_device_count

    return [f"cuda:{gpu}" for gpu in parse_gpus(gpus, cuda_device_count()) for _ in range(per_device)]


def child_environment(settings: Settings, slot: Slot, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of `slot`'s child: the parent's, with every setting made explicit and the
    slot's device (its GPU alone: `isolate_gpu`), metrics port and (on CPU) threads."""
    environment = {k: v for k, v in (os.environ if base is None else base).items() if k not in _NODE_VARIABLES}
    device, isolation = isolate_gpu(slot.device, environment)
    environment.update(isolation)
    changes: dict[str, object] = {"device": device}
    if settings.metrics_port:  # one port per child, counted up from the one given (0: each its own free one)
        changes["metrics_port"] = settings.metrics_port + slot.index
    if slot.device == "cpu" and settings.threads is None and slot.cores:
        changes["threads"] = len(slot.cores)
    environment.update(as_environment(dataclasses.replace(settings, **changes)))  # type: ignore[arg-type]
    return environment


def child_command(ctx: typer.Context, job: str, out: str, wait: bool) -> list[str]:
    """`python -m embedq [the parent's log flags] work --job JOB --out OUT`: the rest travels as variables."""
    root = ctx.find_root().params
    flags = ["-v"] * int(root.get("verbose") or 0) + (["--quiet"] if root.get("quiet") else [])
    flags += ["--log-format", str(root.get("log_format") or "text")]
    return [sys.executable, "-m", "embedq", *flags, "work", "--job", job, "--out", out,
            "--wait" if wait else "--no-wait"]


def supervise_work(ctx: typer.Context, settings: Settings, *, job: str, out: str, wait: bool, gpus: str | None,
                   workers: int | None) -> None:
    """Run the node's workers to the end and exit with the supervisor's code (`SupervisorReport`)."""
    slots = plan_slots(node_devices(gpus, workers, settings.device), sorted(usable_cores()))
    log.info("supervising %d workers (%s) on job %s; a signal drains them all, a second stops them", len(slots),
             ", ".join(slot.device for slot in slots), job)
    command = child_command(ctx, job, out, wait)
    report = Supervisor(slots, lambda _slot: command,
                        lambda slot: child_environment(settings, slot)).run()
    ended = "all finished" if report.exit_code == 0 else f"exit {report.exit_code}"
    given_up = [c.slot.name for c in report.children if c.gave_up]
    typer.echo(f"node: {len(slots)} workers, {ended}, {report.restarts} restart(s)"
               + (f"; given up: {', '.join(given_up)}" if given_up else ""))
    raise typer.Exit(report.exit_code)
