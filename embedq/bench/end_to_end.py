"""One scenario end to end: a real Redis stream filled by the producer, then one worker timed over it
(its tokenizer pool or pretokenized messages, real Parquet parts, commits) and its output verified,
with the ceilings around it measured on the same sequences (each document's, or in a chunked
scenario each chunk's), engine and buckets."""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from embedq.bench.ceilings import measure_gpu_only, measure_sentence_transformers, measure_tokenizers
from embedq.bench.corpus import load_corpus, write_corpus
from embedq.bench.sampling import Gpu, Reading, Sampler, gpu_busy, process_tree_rss
from embedq.bench.scenarios import Result, Scenario
from embedq.bench.workload import Workload
from embedq.engines.device import peak_memory_allocated, reset_peak_memory
from embedq.engines.factory import engine_for
from embedq.keys import JobKeys
from embedq.model import ModelInfo

if TYPE_CHECKING:
    import redis

    from embedq.engines.base import Engine
    from embedq.worker.options import StageCounters

log = logging.getLogger("embedq.bench")


@dataclass(frozen=True)
class BenchJob:
    """One scenario's job: its source file, its keys in Redis and its output directory."""

    client: redis.Redis
    keys: JobKeys
    source_file: Path
    output_dir: Path

    def delete(self) -> None:
        """Remove every key of the job, its output and its source file."""
        for key in self.client.scan_iter(match=f"*{{{self.keys.job}}}*"):
            self.client.delete(key)
        shutil.rmtree(self.output_dir, ignore_errors=True)
        self.source_file.unlink()


def run_scenario(scenario: Scenario, model: ModelInfo, corpus_path: Path, redis_url: str, work_dir: Path,
                 *, out_dir: Path, tokenizer_processes: int, baselines: bool, token_budget: int,
                 window_docs: int) -> Result:
    """One scenario, end to end."""
    import redis as redis_lib

    result = Result(scenario=scenario)
    ids, texts = load_corpus(corpus_path, scenario.repeat, scenario.limit)
    source_file = work_dir / f"corpus-{uuid.uuid4().hex[:6]}.parquet"
    write_corpus(source_file, ids, texts)
    # One copy as the worker embeds it: the buckets and the ceilings run the same sequences.
    workload = Workload.of_scenario(model, texts, scenario)
    seq_lens = workload.seq_lens()
    result.seq_lens = list(seq_lens)
    engine = engine_for(model, scenario.engine_spec(token_budget, seq_lens))
    if baselines:
        _record_baselines(result, workload, tokenizer_processes)
    keys = JobKeys(f"bench-{uuid.uuid4().hex[:8]}")
    job = BenchJob(redis_lib.Redis.from_url(redis_url), keys, source_file, out_dir / f"out-{keys.job}")
    with engine:
        seconds = measure_gpu_only(engine, workload.sequences, model.pad_token_id)
        result.gpu_only_tokens_per_s = workload.tokens / seconds
        result.gpu_only_docs_per_s = workload.documents / seconds
        _time_end_to_end(result, job, model, engine, tokenizer_processes=tokenizer_processes,
                         window_docs=window_docs)
    _verify(result, job)
    job.delete()
    return result


def _record_baselines(result: Result, workload: Workload, tokenizer_processes: int) -> None:
    """The tokenizer alone and sentence-transformers, on one copy of the corpus (documents/s are
    source documents', tokens/s the embedded sequences')."""
    scenario = result.scenario
    tok = measure_tokenizers(workload.model, workload.texts, tokenizer_processes,
                             chunked=workload.chunking is not None)
    result.tokenizer_all_cores_tokens_per_s = tok.get("all_cores_tokens_per_s")
    result.tokenizer_all_cores_docs_per_s = tok.get("all_cores_docs_per_s")
    result.tokenizer_pool_tokens_per_s = tok.get("pool_tokens_per_s")
    result.tokenizer_pool_docs_per_s = tok.get("pool_docs_per_s")
    seconds = measure_sentence_transformers(workload.model, workload.sentence_texts(), workload.tokens,
                                            scenario.device, scenario.precision)
    result.st_tokens_per_s, result.st_docs_per_s = workload.tokens / seconds, workload.documents / seconds


def _time_end_to_end(result: Result, job: BenchJob, model: ModelInfo, engine: Engine, *,
                     tokenizer_processes: int, window_docs: int) -> None:
    """Publish the job, then time one worker over the filled stream while sampling its stages."""
    from embedq.producer.producer import Producer, ProducerOptions
    from embedq.producer.sources import SourceSpec, open_source
    from embedq.tokenization import TokenizerPool
    from embedq.worker.output import open_output
    from embedq.worker.worker import Worker, WorkerOptions

    scenario = result.scenario
    pretokenize, settings = scenario.pretokenize, scenario.job_settings
    device = engine.config.device
    client = job.client
    with contextlib.ExitStack() as stack:
        # One pool for the producer (--pretokenize) and the worker, as `embedq run` builds them.
        pool = stack.enter_context(TokenizerPool.for_model(model, tokenizer_processes,
                                                           chunked=bool(scenario.chunk_tokens)))
        source = stack.enter_context(open_source(SourceSpec(str(job.source_file))))
        producer = Producer(client, job.keys, source, model, ProducerOptions.from_settings(settings),
                            tokenizer=pool if pretokenize else None)
        started = time.perf_counter()
        record = producer.prepare()
        producer.run()
        result.produce_seconds = time.perf_counter() - started
        client.config_resetstat()
        worker = Worker(client, job.keys, record, model, engine, open_output(job.output_dir),
                        WorkerOptions.from_settings(settings, window_docs=window_docs),
                        encode=None if pretokenize else pool.encode)
        read = _stage_reading(client, worker.report.stages, Gpu(device))
        reset_peak_memory(device)
        log.info("bench: end-to-end run starts (%d documents in the stream)", record.documents)
        with Sampler(read) as sampler:
            started = time.perf_counter()
            report = worker.run(install_signals=False)
            result.e2e_seconds = time.perf_counter() - started
        result.peak_gpu_bytes = peak_memory_allocated(device)
    result.documents = report.documents
    result.real_tokens = report.tokens
    result.e2e_tokens_per_s = report.tokens / result.e2e_seconds
    result.e2e_docs_per_s = report.documents / result.e2e_seconds
    result.padding_ratio = report.engine.padding_ratio
    result.timeline = sampler.samples
    result.peak_rss_bytes = int(max((s["rss"] for s in sampler.samples), default=process_tree_rss()))
    result.peak_redis_bytes = int(client.info("memory")["used_memory_peak"])
    result.gpu_busy = gpu_busy(sampler.samples)


def _verify(result: Result, job: BenchJob) -> None:
    """`embedq verify` on the scenario's output: the rows written, and whether every source document
    is there once (in a chunked job: all its chunks), none dead-lettered."""
    from embedq.verify import verify_job

    verification = verify_job(job.client, job.keys, str(job.output_dir))
    result.rows, result.verified = verification.output_rows, verification.ok
    if not verification.ok:
        log.warning("bench: %s: the output does not verify:\n%s", result.scenario.label, verification.render())


def _stage_reading(client: redis.Redis, stages: StageCounters, gpu: Gpu) -> Reading:
    """One sample: documents through each stage, tokens embedded, host RSS, Redis memory, NVML."""
    def read() -> dict[str, float]:
        info = client.info("memory")
        return {"fetched": stages.fetched, "tokenized": stages.tokenized, "embedded": stages.embedded,
                "committed": stages.committed, "tokens": stages.tokens_embedded,
                "rss": process_tree_rss(), "redis": float(info["used_memory"]), **gpu.read()}

    return read
