"""One worker of `embedq bench --gpus N`, in its own process: `python -m embedq.bench.fleet_worker SPEC`.

It builds its engine and warms it (a batch through every profile, so each CUDA graph is captured
before the timing starts, as in the single-GPU bench), says it is ready, waits for the go that the
bench gives every worker at once, runs the real worker over the job until it is complete, and
prints its figures as one JSON line. Timing starts at the go, so each GPU is timed as `embedq bench`
times one: from a warm engine over a filled stream, with no start-up in the figure. Its tokens are
sampled as it runs, so its steady rate (without the ramp of its first windows and the tail of its
last) can be told apart from the whole run's.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class FleetWorkerSpec:
    """What one bench worker runs: the job, the model, its device and engine, its tokenizer pool."""

    redis_url: str
    job: str
    ready_key: str
    go_key: str
    model_path: str
    out_dir: str
    device: str
    precision: str
    token_budget: int
    seq_lens: tuple[int, ...]
    cuda_graphs: bool
    unpad: str
    pretokenize: bool
    window_docs: int
    tokenizer_processes: int | None  # None: the worker's default for its share of the cores

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> FleetWorkerSpec:
        data = json.loads(text)
        data["seq_lens"] = tuple(data["seq_lens"])
        return cls(**data)


READY_TIMEOUT_S = 600  # building engines (CUDA graphs for every profile) takes tens of seconds


def run(spec: FleetWorkerSpec) -> dict[str, Any]:
    """Warm up, wait for the go, work the job to its end; the figures of this worker."""
    import redis

    from embedq.bench.ceilings import warm_up
    from embedq.bench.sampling import Gpu, Sampler, gpu_busy, steady_rate
    from embedq.bench.scenarios import BENCH_BACKEND, JOB_SETTINGS
    from embedq.engines.device import peak_memory_allocated
    from embedq.engines.factory import EngineSpec, engine_for
    from embedq.job import require
    from embedq.keys import JobKeys
    from embedq.model import load_model_info
    from embedq.tokenization import TokenizerPool, default_tokenizer_processes
    from embedq.worker.output import open_output
    from embedq.worker.worker import Worker, WorkerOptions

    client = redis.Redis.from_url(spec.redis_url)
    keys = JobKeys(spec.job)
    model = load_model_info(spec.model_path)
    record = require(client, keys)
    engine_spec = EngineSpec(backend=BENCH_BACKEND, device=spec.device, precision=spec.precision,
                             token_budget=spec.token_budget, seq_lens=spec.seq_lens, cuda_graphs=spec.cuda_graphs,
                             unpad=spec.unpad)
    processes = spec.tokenizer_processes
    if processes is None:
        processes = default_tokenizer_processes(spec.device, model.tokenizer_file)
    with contextlib.ExitStack() as stack:
        engine = stack.enter_context(engine_for(model, engine_spec))
        warm_up(engine, model.pad_token_id)  # the single-GPU bench's engine is warm from its GPU-only pass
        pool = stack.enter_context(TokenizerPool.for_model(model, processes, chunked=bool(record.chunk_tokens)))
        pool.wait_ready()
        worker = Worker(client, keys, record, model, engine, open_output(spec.out_dir),
                        WorkerOptions.from_settings(JOB_SETTINGS, window_docs=spec.window_docs),
                        encode=None if spec.pretokenize else pool.encode)
        client.rpush(spec.ready_key, worker.id)
        _wait_for_go(client, spec.go_key)
        stages, gpu = worker.report.stages, Gpu(spec.device)
        with Sampler(lambda: {"tokens": stages.tokens_embedded, "committed": stages.committed, **gpu.read()},
                     every=0.2) as sampler:
            started = time.time()
            report = worker.run(install_signals=False)
            ended = time.time()
        return {"worker": worker.id, "device": spec.device, "visible_gpus": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                "documents": report.documents, "tokens": report.tokens, "started": started, "ended": ended,
                "tokenizer_processes": processes, "padding_ratio": report.engine.padding_ratio,
                "peak_gpu_bytes": peak_memory_allocated(spec.device) or 0,
                "steady_tokens_per_s": steady_rate(sampler.samples), "gpu_busy": gpu_busy(sampler.samples),
                "timeline": [[round(s["t"], 2), s["tokens"], s.get("gpu_util", -1.0)] for s in sampler.samples]}


def _wait_for_go(client: Any, go_key: str) -> None:
    """BLPOP in 1 s steps: redis-py 8 gives up on a socket read after 5 s, and the others' engines
    can take longer than that to warm up."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while client.blpop([go_key], timeout=1) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no go within {READY_TIMEOUT_S} s")


def main() -> None:
    spec = FleetWorkerSpec.from_json(sys.argv[1])
    figures = run(spec)
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
