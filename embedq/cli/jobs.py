"""The commands that move a job: `produce` publishes a source, `work` embeds it, `run` does both here.

Each command's parameters are its flags; they become settings through `settings_from(ctx)`, so a
flag is named in its signature only.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from embedq.cli.exporter import serve_metrics
from embedq.cli.incremental import DedupeOpt, IncrementalOpt, IncrementalOutOpt, NewRecordOpt, StateOpt
from embedq.cli.options import (
    DEFAULTS,
    AllowDupOpt,
    AllowEmptyOpt,
    BackendOpt,
    BacklogOpt,
    BatchSizeOpt,
    CalibrationDocsOpt,
    CalibrationOpt,
    ChunkOpt,
    CompressOpt,
    DeliveriesOpt,
    DeviceOpt,
    DtypeOpt,
    FailuresOpt,
    FormatOpt,
    GpusOpt,
    GraphsOpt,
    IdFieldOpt,
    JobModelOpt,
    JobOpt,
    LeaseOpt,
    MaxDocOpt,
    MaxSeqOpt,
    MetricsPortOpt,
    ModelOpt,
    NormalizeOpt,
    OutOpt,
    OverlapOpt,
    PoolingOpt,
    PrecisionOpt,
    PrefixOpt,
    PretokOpt,
    PromptNameOpt,
    PromptOpt,
    RebuildOpt,
    RedisOpt,
    SeqLensOpt,
    ShutdownOpt,
    SourceArg,
    TextFieldOpt,
    TextUnitOpt,
    ThreadsOpt,
    TlsCaOpt,
    TlsCertOpt,
    TlsKeyOpt,
    TokenBudgetOpt,
    TokProcOpt,
    TruncateDimOpt,
    UnpadOpt,
    UntilCompleteOpt,
    WindowOpt,
    WindowSecondsOpt,
    WorkersOpt,
)
from embedq.cli.settings import STARTUP, connect, job_keys, load_model, settings_from, source_spec
from embedq.config import Settings
from embedq.errors import JobMismatch, UsageError

if TYPE_CHECKING:
    import redis

    from embedq.engines.base import Engine
    from embedq.job import JobRecord
    from embedq.keys import JobKeys
    from embedq.model import ModelInfo
    from embedq.producer.producer import Producer
    from embedq.producer.slices import Slice
    from embedq.producer.sources import Source
    from embedq.producer.spec import SourceSpec
    from embedq.quantization import OutputFormat
    from embedq.tokenization import Encode
    from embedq.worker.output import OutputDir
    from embedq.worker.worker import Worker, WorkerReport

log = logging.getLogger("embedq")
_Status = TypeVar("_Status")


# -- produce --------------------------------------------------------------------------------------

@contextlib.contextmanager
def producer_for(client: redis.Redis, keys: JobKeys, source: Source, model: ModelInfo, settings: Settings,
              stopping: Callable[[], bool] = lambda: False, *, until_complete: bool = False,
              output: OutputFormat | None = None, part: Slice | None = None) -> Iterator[Producer]:
    """A producer for the job (whose vectors are stored as `output`, `cli.calibration`'s); with
    --pretokenize, a tokenizer pool on all cores but one goes with it."""
    from embedq.producer.producer import Producer, ProducerOptions
    from embedq.tokenization import TokenizerPool, usable_cores

    with contextlib.ExitStack() as stack:
        pool = None
        if settings.pretokenize:
            processes = settings.tokenizer_processes
            if processes is None:
                processes = max(0, len(usable_cores()) - 1)  # the cores this process may run on (taskset)
            # A chunked job's producer sends whole documents: the worker cuts them (`embedq.chunking`).
            pool = stack.enter_context(TokenizerPool.for_model(model, processes, chunked=bool(settings.chunk_tokens)))
        options = ProducerOptions.from_settings(settings)
        options = dataclasses.replace(options, until_complete=until_complete, output=output or options.output,
                                      part=part or options.part)
        yield Producer(client, keys, source, model, options, tokenizer=pool, stopping=stopping)


def produce(
    ctx: typer.Context,
    source: SourceArg,
    job: JobOpt,
    fmt: FormatOpt = "auto", id_field: IdFieldOpt = None, text_field: TextFieldOpt = "text",
    text_unit: TextUnitOpt = "line",
    model: ModelOpt = None, pooling: PoolingOpt = None, normalize: NormalizeOpt = None, max_seq_len: MaxSeqOpt = None,
    prompt: PromptOpt = None, prompt_name: PromptNameOpt = None,
    output_dtype: DtypeOpt = DEFAULTS.output_dtype, truncate_dim: TruncateDimOpt = None,
    chunk_tokens: ChunkOpt = DEFAULTS.chunk_tokens, chunk_overlap: OverlapOpt = DEFAULTS.chunk_overlap,
    calibration: CalibrationOpt = None, calibration_docs: CalibrationDocsOpt = DEFAULTS.calibration_docs,
    batch_size: BatchSizeOpt = DEFAULTS.batch_size, backlog: BacklogOpt = DEFAULTS.backlog,
    max_doc_bytes: MaxDocOpt = DEFAULTS.max_doc_bytes,
    allow_empty: AllowEmptyOpt = DEFAULTS.allow_empty, allow_duplicate_ids: AllowDupOpt = DEFAULTS.allow_duplicate_ids,
    pretokenize: PretokOpt = DEFAULTS.pretokenize, compress: CompressOpt = DEFAULTS.compress,
    until_complete: UntilCompleteOpt = False, metrics_port: MetricsPortOpt = None,
    slice_of: Annotated[str | None, typer.Option(
        "--slice", help="Publish only slice K of N of the source (counted from 0), so N producers on N hosts "
        "publish one job together; every producer of the job must give the same N.", metavar="K/N",
        envvar="EMBEDQ_SLICE", show_envvar=True, show_default="the whole source")] = None,
    incremental: IncrementalOpt = False, state: StateOpt = None, out: IncrementalOutOpt = None,
    new_record: NewRecordOpt = False, dedupe: DedupeOpt = False,
    redis: RedisOpt = DEFAULTS.redis_url, key_prefix: PrefixOpt = DEFAULTS.key_prefix, tls_ca: TlsCaOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    """Publish SOURCE as job NAME: batches go to the job's Redis stream for workers to embed.

    Safe to kill and run again: it resumes after the last batch it published, never twice. With
    --until-complete it stays until the job is complete and publishes again what Redis loses. With
    --incremental --state DIR --out DIR it publishes only what changed since the last incremental
    run, as a job of its own (the command to run its workers is printed).
    """
    if incremental or state is not None:
        from embedq.cli.incremental import produce_incremental

        refuse_chunked_incremental(chunk_tokens)
        if slice_of is not None:
            raise UsageError("--slice and --incremental do not go together: the delta is one small job")
        produce_incremental(ctx, source_spec(ctx.params), out, job, state, new_record=new_record, dedupe=dedupe,
                            publish=lambda ctx, spec, job: publish_source(ctx, spec, job, until_complete))
        return
    from embedq.producer.slices import parse_slice

    publish_source(ctx, source_spec(ctx.params), job, until_complete,
                   part=parse_slice(slice_of) if slice_of is not None else None)


def refuse_chunked_incremental(chunk_tokens: int) -> None:
    """--chunk with --incremental: the incremental state keeps one vector per id, not chunks."""
    if chunk_tokens:
        raise UsageError("--chunk and --incremental do not go together yet: the incremental state keeps one "
                         "vector per id; run the chunked job as an ordinary one")


def publish_source(ctx: typer.Context, spec: SourceSpec, job: str, until_complete: bool = False,
                   part: Slice | None = None) -> None:
    """`embedq produce`'s publishing: `spec` (slice `part` of it) as job `job`, with the command's settings."""
    from embedq import job as job_record
    from embedq.cli.calibration import job_output_format
    from embedq.producer.sources import open_source
    from embedq.progress import ProgressReport

    settings = settings_from(ctx)
    client = connect(settings)
    keys = job_keys(job, settings)
    info = load_model(settings)
    with open_source(spec) as src, \
            producer_for(client, keys, src, info, settings, until_complete=until_complete, output=job_output_format(
                settings, info, src, job_record.load(client, keys)), part=part) as producer, \
            serve_metrics(settings.metrics_port, client, keys, producer=lambda: producer):
        record = producer.prepare()
        with ProgressReport(f"produce {job}", record.documents) as bar:
            report = producer.run(progress=lambda done, total: bar.update(done))
    if report.complete:
        typer.echo(f"job {job}: complete; published {report.published_documents:,} documents in "
                   f"{report.batches:,} batches in this run ({report.seconds:.1f} s)")
        return
    if report.already_done:
        typer.echo(f"job {job}: already fully produced ({record.documents:,} documents); nothing to do")
        return
    typer.echo(f"job {job}: published {report.published_documents:,} documents in {report.batches:,} batches "
               f"({report.rejected:,} dead-lettered by the producer) in {report.seconds:.1f} s"
               + (f", resumed at document {report.resumed_from:,}" if report.resumed_from else ""))


# -- work -----------------------------------------------------------------------------------------

def _wait_for_job(client: redis.Redis, keys: JobKeys, wait: bool) -> JobRecord:
    from embedq import job as job_record

    record = job_record.load(client, keys)
    announced = False
    while record is None and wait:
        if not announced:
            log.info("job %s does not exist yet; waiting for a producer to create it", keys.job)
            announced = True
        time.sleep(1.0)
        record = job_record.load(client, keys)
    if record is None:
        raise UsageError(f"Job {keys.job!r} does not exist; run `embedq produce SOURCE --job {keys.job}` first.")
    return record


def _worker_model(settings: Settings, record: JobRecord) -> ModelInfo:
    """The model a worker loads: --model, else the job's model path if it exists here, else the default."""
    if settings.model is not None:
        return load_model(settings).with_overrides(prompt=record.prompt)  # the job's prompt, not the default
    from embedq.model import load_model_info

    path = record.model_path if Path(record.model_path).is_dir() else None
    info = load_model_info(path, pooling=record.pooling, normalize=record.normalize,
                           max_seq_len=record.max_seq_len, prompt=record.prompt)
    if info.digest != record.model_digest:
        raise JobMismatch(
            f"Job {record.job!r} was produced with model {record.model} ({record.model_digest}), which is not at "
            f"{record.model_path} on this machine. Pass --model with a copy of it."
        )
    return info


def _engine(settings: Settings, info: ModelInfo) -> Engine:
    """The engine the settings ask for (policy: `engines.factory`); not yet started."""
    from embedq.engines.factory import EngineSpec, engine_for

    return engine_for(info, EngineSpec.from_settings(settings))


@contextlib.contextmanager
def _tokenizer(settings: Settings, info: ModelInfo, device: str, chunked: bool = False) -> Iterator[Encode]:
    """The worker's tokenizer: a pool of processes on GPU nodes, in-process on CPU nodes; for a
    `chunked` job it keeps every token (the worker cuts the documents)."""
    from embedq.tokenization import TokenizerPool, default_tokenizer_processes

    processes = settings.tokenizer_processes
    if processes is None:
        processes = default_tokenizer_processes(device, info.tokenizer_file)
    with TokenizerPool.for_model(info, processes, chunked=chunked) as pool:
        yield pool.encode


class EngineStarting:
    """The engine, starting in a thread of its own (torch import, CUDA, weights) while the start-up
    steps that need no engine run: Redis, the source scan, the tokenizer pool. `started()` waits for
    it; `close()` stops it (after waiting for its start, which cannot be cut short)."""

    def __init__(self, settings: Settings, info: ModelInfo) -> None:
        self.engine = _engine(settings, info)
        self._done: concurrent.futures.Future[Engine] = concurrent.futures.Future()
        threading.Thread(target=self._start, name="embedq-engine-start", daemon=True).start()

    def _start(self) -> None:
        try:
            self._done.set_result(self.engine.__enter__())
            STARTUP.mark("engine")
        except BaseException as exc:
            self._done.set_exception(exc)

    def started(self) -> Engine:
        return self._done.result()

    def close(self) -> None:
        if self._done.exception() is None:
            self.engine.__exit__(None, None, None)


@contextlib.contextmanager
def worker_for(client: redis.Redis, keys: JobKeys, record: JobRecord, info: ModelInfo, output: OutputDir,
               settings: Settings, starting: EngineStarting | None = None) -> Iterator[Worker]:
    """A worker with its engine and tokenizer, both started (and stopped after the block); the engine
    is `starting`'s, or one started here. The tokenizer pool starts while the engine does."""
    from embedq.worker.worker import Worker, WorkerOptions

    with contextlib.ExitStack() as stack:
        if starting is None:
            starting = stack.enter_context(contextlib.closing(EngineStarting(settings, info)))
        encode = stack.enter_context(_tokenizer(settings, info, starting.engine.config.device,
                                                chunked=bool(record.chunk_tokens)))
        engine = starting.started()
        yield Worker(client, keys, record, info, engine, output, WorkerOptions.from_settings(settings),
                     encode=encode)


def work(
    ctx: typer.Context,
    job: JobOpt, out: OutOpt,
    model: JobModelOpt = None, backend: BackendOpt = DEFAULTS.backend, device: DeviceOpt = DEFAULTS.device,
    precision: PrecisionOpt = DEFAULTS.precision,
    threads: ThreadsOpt = None, token_budget: TokenBudgetOpt = None, seq_lens: SeqLensOpt = None,
    tokenizer_processes: TokProcOpt = None, cuda_graphs: GraphsOpt = DEFAULTS.cuda_graphs,
    unpad: UnpadOpt = DEFAULTS.unpad,
    rebuild_engines: RebuildOpt = DEFAULTS.rebuild_engines,
    window_docs: WindowOpt = DEFAULTS.window_docs,
    window_seconds: WindowSecondsOpt = DEFAULTS.window_seconds,
    lease_seconds: LeaseOpt = DEFAULTS.lease_seconds, max_failures: FailuresOpt = DEFAULTS.max_failures,
    max_deliveries: DeliveriesOpt = DEFAULTS.max_deliveries,
    shutdown_timeout: ShutdownOpt = DEFAULTS.shutdown_timeout, output_dtype: DtypeOpt = DEFAULTS.output_dtype,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait for the job to be created.")] = True,
    metrics_port: MetricsPortOpt = None,
    gpus: GpusOpt = None, workers: WorkersOpt = None,
    redis: RedisOpt = DEFAULTS.redis_url, key_prefix: PrefixOpt = DEFAULTS.key_prefix, tls_ca: TlsCaOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    """Embed job NAME's batches into the --out directory until the job is complete.

    Run any number of workers on the same job, on any nodes: --gpus all starts one per GPU of this
    node. SIGTERM finishes and commits what is in flight, then exits 0 (while the worker is still
    starting, it stops at once, also with 0); a killed worker's batches are taken over by the
    others after the lease.
    """
    from embedq.job import check_model
    from embedq.worker.output import open_output
    from embedq.worker.signals import StoppedWhileStarting, stop_while_starting

    settings = settings_from(ctx)
    if gpus is not None or workers is not None:
        from embedq.cli.node import supervise_work

        supervise_work(ctx, settings, job=job, out=out, wait=wait, gpus=gpus, workers=workers)
    client = connect(settings)
    keys = job_keys(job, settings)
    output = open_output(out)
    started: list[Worker] = []  # metrics are served from now on; the worker's figures once it exists
    with serve_metrics(settings.metrics_port, client, keys, worker=lambda: started[0] if started else None), \
            contextlib.ExitStack() as stack:
        try:
            with stop_while_starting():  # until the worker runs, which drains on a signal instead
                record = _wait_for_job(client, keys, wait)
                STARTUP.mark("Redis and job")
                info = _worker_model(settings, record)
                STARTUP.mark("model files")
                check_model(record, info)  # before the engine: building one can take minutes
                _check_output_dtype(record, settings)
                started.append(stack.enter_context(worker_for(client, keys, record, info, output, settings)))
        except StoppedWhileStarting as stopped:
            log.warning("%s while starting: stopped before reading anything from job %s (nothing to drain)",
                        stopped, keys.job)
            return
        report = started[0].run()
    log_startup(report)
    from embedq.progress import duration, plural

    state = "job complete" if report.job_complete else ("stopped by signal" if report.stopped_by_signal
                                                        else "stopped")
    typer.echo(f"worker {report.worker}: {report.documents:,} documents in {plural(report.parts, 'part')}, "
               f"{report.dead_documents:,} dead-lettered, {duration(report.seconds)} ({state})")


def _check_output_dtype(record: JobRecord, settings: Settings) -> None:
    """A worker asked for another output type than its job's (the producer fixes it, for all parts alike)."""
    if settings.output_dtype not in (record.output_dtype, DEFAULTS.output_dtype):
        raise JobMismatch(f"Job {record.job!r} stores {record.output_dtype} vectors, not {settings.output_dtype}: "
                          "the output type is fixed when the job is produced (`embedq produce --output-dtype`); "
                          "leave --output-dtype out of `embedq work`.")


def log_startup(report: WorkerReport) -> None:
    """The start-up line, once the first vector is known."""
    if report.engine.first_result_at is not None:
        STARTUP.mark("first vector", at=report.engine.first_result_at)
    log.info("%s", STARTUP.line())
