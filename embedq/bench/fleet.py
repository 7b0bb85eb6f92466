"""`embedq bench --gpus 1,2,...`: one job over N GPUs of this node, one worker process per GPU.

For each N, the producer first fills a fresh job's stream (as `embedq bench` does for one GPU); then
N worker processes (`fleet_worker`), each pinned to its share of the cores as `embedq work --gpus`
pins them (`supervisor.plan_slots`), build and warm their engines and start together on a go. The
aggregate rate is every worker's tokens over the span from the go to the last worker's end, and
the scaling efficiency is that rate over N times the one-GPU rate of the same run (1 is always run
first), and the same for each worker's steady rate (without its start and its last window).
Alongside: Redis's CPU (cores busy, from INFO's main-thread CPU seconds), its peak memory and bytes
on the wire, the host's CPU, and `embedq verify` on each job's output.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from embedq.bench.corpus import load_corpus, write_corpus
from embedq.bench.end_to_end import BenchJob
from embedq.bench.fleet_worker import FleetWorkerSpec
from embedq.bench.sampling import Sampler, redis_cpu_seconds
from embedq.bench.scenarios import Scenario
from embedq.bench.workload import Workload
from embedq.keys import JobKeys
from embedq.model import ModelInfo
from embedq.supervisor import isolate_gpu, pin_to, plan_slots
from embedq.tokenization import usable_cores

log = logging.getLogger("embedq.bench")


@dataclass
class FleetResult:
    """One scenario on N GPUs."""

    label: str
    gpus: int
    documents: int = 0
    rows: int = 0  # rows written: the documents, or in a chunked job their chunks
    tokens: int = 0
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    docs_per_s: float = 0.0
    scaling_efficiency: float | None = None  # against N x the one-GPU rate of the same run
    per_worker_tokens_per_s: list[float] = field(default_factory=list)
    # The same without each worker's ramp and tail (its first and last tenth of the documents): apart
    # from fixed costs, which weigh more in a shorter run, so in the N-GPU run than in the one-GPU run.
    steady_tokens_per_s: float | None = None
    steady_scaling_efficiency: float | None = None
    per_worker_gpu_busy: list[float | None] = field(default_factory=list)
    redis_cpu_cores: float = 0.0  # Redis's main-thread CPU seconds per second of the run
    redis_peak_bytes: int = 0
    redis_net_bytes_per_s: float = 0.0
    host_cpu_busy: float = 0.0  # fraction of all the host's cores
    produce_seconds: float = 0.0
    verify_ok: bool = False
    workers: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def run_fleet(scenario: Scenario, model: ModelInfo, corpus_path: Path, redis_url: str, work_dir: Path, *,
              gpu_counts: list[int], out_dir: Path, tokenizer_processes: int | None, token_budget: int,
              window_docs: int) -> list[FleetResult]:
    """The scenario on each GPU count (1 first), each on a fresh job over the same corpus."""
    ids, texts = load_corpus(corpus_path, scenario.repeat, scenario.limit)
    seq_lens = Workload.of_scenario(model, texts, scenario).seq_lens()
    results: list[FleetResult] = []
    for n in sorted({1, *gpu_counts}):
        source = work_dir / f"corpus-{uuid.uuid4().hex[:6]}.parquet"
        write_corpus(source, ids, texts)
        result = _one_count(scenario, model, source, redis_url, out_dir, n, seq_lens=seq_lens,
                            tokenizer_processes=tokenizer_processes, token_budget=token_budget,
                            window_docs=window_docs)
        if results:
            one = results[0]
            result.scaling_efficiency = result.tokens_per_s / (n * one.tokens_per_s)
            if result.steady_tokens_per_s and one.steady_tokens_per_s:
                result.steady_scaling_efficiency = result.steady_tokens_per_s / (n * one.steady_tokens_per_s)
        results.append(result)
        log.info("bench: %s on %d GPU(s): %.0f tokens/s (%.0f docs/s), efficiency %s (steady %s), Redis %.2f cores, "
                 "verify %s", scenario.label, n, result.tokens_per_s, result.docs_per_s,
                 _percent(result.scaling_efficiency), _percent(result.steady_scaling_efficiency),
                 result.redis_cpu_cores, "OK" if result.verify_ok else "FAILED")
    return results


def _one_count(scenario: Scenario, model: ModelInfo, source: Path, redis_url: str, out_dir: Path, n: int, *,
               seq_lens: tuple[int, ...], tokenizer_processes: int | None, token_budget: int,
               window_docs: int) -> FleetResult:
    import redis as redis_lib

    from embedq.producer.producer import Producer, ProducerOptions
    from embedq.producer.sources import SourceSpec, open_source
    from embedq.tokenization import TokenizerPool
    from embedq.verify import verify_job

    keys = JobKeys(f"bench-{uuid.uuid4().hex[:8]}")
    job = BenchJob(redis_lib.Redis.from_url(redis_url), keys, source, out_dir / f"out-{keys.job}")
    client = job.client
    result = FleetResult(label=scenario.label, gpus=n)
    processes = max(1, len(usable_cores()) - 2)
    with TokenizerPool.for_model(model, processes, chunked=bool(scenario.chunk_tokens)) as pool, \
            open_source(SourceSpec(str(source))) as opened:
        producer = Producer(client, keys, opened, model, ProducerOptions.from_settings(scenario.job_settings),
                            tokenizer=pool if scenario.pretokenize else None)
        started = time.perf_counter()
        producer.prepare()
        producer.run()
        result.produce_seconds = time.perf_counter() - started
    client.config_resetstat()
    ready, go = f"{keys.stream}:bench-ready", f"{keys.stream}:bench-go"
    devices = [f"cuda:{i}" for i in range(n)] if scenario.device.startswith("cuda") else [scenario.device] * n
    slots = plan_slots(devices, sorted(usable_cores()))
    with contextlib.ExitStack() as stack:
        children = []
        for slot in slots:
            device, isolation = isolate_gpu(slot.device, dict(os.environ))
            spec = FleetWorkerSpec(
                redis_url=redis_url, job=keys.job, ready_key=ready, go_key=go, model_path=str(model.path),
                out_dir=str(job.output_dir), device=device, precision=scenario.precision,
                token_budget=token_budget, seq_lens=tuple(seq_lens), cuda_graphs=scenario.cuda_graphs,
                unpad=scenario.unpad, pretokenize=scenario.pretokenize, window_docs=window_docs,
                tokenizer_processes=tokenizer_processes)
            child = subprocess.Popen([sys.executable, "-m", "embedq.bench.fleet_worker", spec.to_json()],
                                     stdout=subprocess.PIPE, env={**os.environ, **isolation},
                                     preexec_fn=pin_to(slot.cores))
            stack.callback(_end, child)
            children.append(child)
        _wait_ready(client, ready, n, children)
        before, host_before = _redis_counters(client), _host_cpu()
        redis_memory = stack.enter_context(Sampler(lambda: {"redis": float(client.info("memory")["used_memory"])},
                                                   every=0.2))
        client.rpush(go, *["go"] * n)
        outputs = [child.communicate()[0] for child in children]
        after, host_after = _redis_counters(client), _host_cpu()
    failed = [c.returncode for c in children if c.returncode != 0]
    if failed:
        raise RuntimeError(f"bench workers failed (exit codes {failed}); their errors are above")
    import json

    result.workers = [json.loads(out.decode().strip().splitlines()[-1]) for out in outputs]
    span = max(w["ended"] for w in result.workers) - min(w["started"] for w in result.workers)
    result.documents = sum(int(w["documents"]) for w in result.workers)
    result.tokens = sum(int(w["tokens"]) for w in result.workers)
    result.seconds = span
    result.tokens_per_s, result.docs_per_s = result.tokens / span, result.documents / span
    result.per_worker_tokens_per_s = [w["tokens"] / max(1e-9, w["ended"] - w["started"]) for w in result.workers]
    steady = [float(w["steady_tokens_per_s"]) for w in result.workers if w.get("steady_tokens_per_s")]
    result.steady_tokens_per_s = sum(steady) if len(steady) == len(result.workers) else None
    result.per_worker_gpu_busy = [w.get("gpu_busy") for w in result.workers]
    result.redis_cpu_cores = (after["cpu"] - before["cpu"]) / span
    result.redis_net_bytes_per_s = (after["net"] - before["net"]) / span
    result.redis_peak_bytes = int(max((s["redis"] for s in redis_memory.samples), default=0))
    result.host_cpu_busy = _busy_fraction(host_before, host_after)
    verification = verify_job(client, keys, str(job.output_dir))
    result.rows, result.verify_ok = verification.output_rows, verification.ok
    job.delete()
    return result


def _wait_ready(client: Any, ready: str, n: int, children: list[subprocess.Popen[bytes]]) -> None:
    """Until every worker has warmed its engine; a worker that dies first fails the bench."""
    from embedq.bench.fleet_worker import READY_TIMEOUT_S

    deadline = time.monotonic() + READY_TIMEOUT_S
    while int(client.llen(ready)) < n:
        dead = [c.returncode for c in children if c.poll() is not None]
        if dead:
            raise RuntimeError(f"a bench worker exited before it was ready (exit {dead[0]})")
        if time.monotonic() > deadline:
            raise TimeoutError(f"bench workers not ready within {READY_TIMEOUT_S} s")
        time.sleep(0.1)


def _end(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        child.kill()
        child.wait()


def _redis_counters(client: Any) -> dict[str, float]:
    cpu, stats = client.info("cpu"), client.info("stats")
    return {"cpu": redis_cpu_seconds(cpu),
            "net": float(stats["total_net_input_bytes"]) + float(stats["total_net_output_bytes"])}


def _host_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of all cores, from /proc/stat (zeros where there is none)."""
    try:
        fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except OSError:
        return 0.0, 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return sum(fields) - idle, sum(fields)


def _busy_fraction(before: tuple[float, float], after: tuple[float, float]) -> float:
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else 0.0


def _percent(value: float | None) -> str:
    return f"{value:.1%}" if value is not None else "-"


def render_fleet(results: list[FleetResult]) -> str:
    """The table `embedq bench --gpus` prints."""
    lines = ["| scenario | GPUs | end to end tokens/s | docs/s | scaling | steady tokens/s | steady scaling | "
             "Redis CPU (cores) | Redis peak MiB | host CPU | verify |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        baseline = r.scaling_efficiency is None
        scaling = "(baseline)" if baseline else _percent(r.scaling_efficiency)
        steady_scaling = "(baseline)" if baseline else _percent(r.steady_scaling_efficiency)
        steady = f"{r.steady_tokens_per_s / 1e6:.2f}M" if r.steady_tokens_per_s else "-"
        lines.append(f"| {r.label} | {r.gpus} | {r.tokens_per_s / 1e6:.2f}M | {r.docs_per_s / 1e3:.1f}k | {scaling} | "
                     f"{steady} | {steady_scaling} | {r.redis_cpu_cores:.2f} | {r.redis_peak_bytes / 2**20:.0f} | "
                     f"{r.host_cpu_busy:.0%} | {'OK' if r.verify_ok else 'FAILED'} |")
    return "\n".join(lines)
