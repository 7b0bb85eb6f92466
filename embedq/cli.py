"""The `embedq` command line.

    embedq run SOURCE --out DIR            embed a corpus end to end on this machine
    embedq produce SOURCE --job NAME       publish a corpus as a job
    embedq work --job NAME --out DIR       embed a job's batches (run one per GPU, on any node)
    embedq status --job NAME               counts, workers and throughput
    embedq verify --job NAME --out DIR     every id exactly once, right dimension, finite values
    embedq dead-letter list|replay         inspect and replay documents set aside
    embedq gc --job NAME --out DIR         remove orphan parts
    embedq delete --job NAME               remove a job's keys from Redis

Settings come from flags, then `EMBEDQ_*` variables, then `embedq.toml`. Exit codes: 0 success,
1 unexpected error, 2 usage, 3 source, 4 model, 5 Redis, 6 output, 7 job mismatch, 8 verification
failed, 10 engine, 130 interrupted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from embedq import __version__
from embedq.config import Settings, load_settings
from embedq.errors import EmbedqError, JobMismatch, RedisUnavailable, UsageError

log = logging.getLogger("embedq")

app = typer.Typer(
    name="embedq",
    help="Bulk text embedding over Redis streams: producers publish batches, workers embed them into "
         "Parquet, every document exactly once.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
dead_app = typer.Typer(help="Inspect and replay dead-lettered documents.", no_args_is_help=True,
                       rich_markup_mode="markdown")
app.add_typer(dead_app, name="dead-letter")

# -- shared options -------------------------------------------------------------------------------

SourceArg = Annotated[str, typer.Argument(help="File, directory, or - for stdin.", show_default=False,
                                          metavar="SOURCE")]

_REDIS = "Redis"
_SOURCE = "Source"
_MODEL = "Model"
_PRODUCER = "Producer"
_WORKER = "Worker"

RedisOpt = Annotated[str | None, typer.Option(
    "--redis", help="Redis URL (redis://, rediss:// for TLS, unix://). Default: EMBEDQ_REDIS_URL or "
    "redis://127.0.0.1:6379/0.", rich_help_panel=_REDIS, show_default=False)]
PrefixOpt = Annotated[str | None, typer.Option(
    "--key-prefix", help="Prefix of every Redis key (to separate tenants). Default: embedq.",
    rich_help_panel=_REDIS, show_default=False)]
TlsCaOpt = Annotated[str | None, typer.Option("--tls-ca", help="CA certificate file for rediss://.",
                                              rich_help_panel=_REDIS, show_default=False)]
TlsCertOpt = Annotated[str | None, typer.Option("--tls-cert", help="Client certificate file for rediss://.",
                                                rich_help_panel=_REDIS, show_default=False)]
TlsKeyOpt = Annotated[str | None, typer.Option("--tls-key", help="Client key file for rediss://.",
                                               rich_help_panel=_REDIS, show_default=False)]
JobOpt = Annotated[str, typer.Option("--job", "-j", help="Job name.", show_default=False)]
OutOpt = Annotated[str, typer.Option("--out", "-o", help="Output directory for the Parquet parts.",
                                     show_default=False)]

FormatOpt = Annotated[str, typer.Option(
    "--format", help="Source format: auto (by file suffix), parquet, jsonl, csv, text.", rich_help_panel=_SOURCE)]
IdFieldOpt = Annotated[str | None, typer.Option(
    "--id-field", help="Column/field holding document ids. Default: 'id' if present, else positions 0, 1, ...",
    rich_help_panel=_SOURCE, show_default=False)]
TextFieldOpt = Annotated[str, typer.Option("--text-field", help="Column/field holding the text.",
                                           rich_help_panel=_SOURCE)]
TextUnitOpt = Annotated[str, typer.Option(
    "--text-unit", help="For text files: one document per 'line' or per 'file'.", rich_help_panel=_SOURCE)]

ModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", help="Model directory (sentence-transformers or Hugging Face, on disk). Default: the "
    "bundled all-MiniLM-L6-v2 (for `work`: the job's model).", rich_help_panel=_MODEL, show_default=False)]
PoolingOpt = Annotated[str | None, typer.Option(
    "--pooling", help="mean, cls or last. Default: what the model's configuration says.",
    rich_help_panel=_MODEL, show_default=False)]
NormalizeOpt = Annotated[bool | None, typer.Option(
    "--normalize/--no-normalize", help="L2-normalize embeddings. Default: as the model is configured.",
    rich_help_panel=_MODEL, show_default=False)]
MaxSeqOpt = Annotated[int | None, typer.Option(
    "--max-seq-len", help="Truncate documents to this many tokens. Default: the model's maximum.",
    rich_help_panel=_MODEL, show_default=False)]

BatchSizeOpt = Annotated[int | None, typer.Option(
    "--batch-size", help="Documents per stream message. Default: 512.", rich_help_panel=_PRODUCER,
    show_default=False)]
BacklogOpt = Annotated[int | None, typer.Option(
    "--backlog", help="Unsettled messages in the stream before the producer waits (bounds Redis memory). "
    "Default: 512.", rich_help_panel=_PRODUCER, show_default=False)]
MaxDocOpt = Annotated[int | None, typer.Option(
    "--max-doc-bytes", help="Documents larger than this are dead-lettered. Default: 1 MiB.",
    rich_help_panel=_PRODUCER, show_default=False)]
AllowEmptyOpt = Annotated[bool | None, typer.Option(
    "--allow-empty/--no-allow-empty", help="Embed empty documents instead of dead-lettering them.",
    rich_help_panel=_PRODUCER, show_default=False)]
AllowDupOpt = Annotated[bool | None, typer.Option(
    "--allow-duplicate-ids/--no-allow-duplicate-ids",
    help="Embed the first of several documents with the same id and dead-letter the others, instead of "
    "refusing the source.", rich_help_panel=_PRODUCER, show_default=False)]
PretokOpt = Annotated[bool | None, typer.Option(
    "--pretokenize/--no-pretokenize", help="Tokenize in the producer, so token ids travel in the messages "
    "(moves tokenization to CPU nodes).", rich_help_panel=_PRODUCER, show_default=False)]

BackendOpt = Annotated[str | None, typer.Option(
    "--backend", help="auto, torch, onnxruntime or tensorrt. Default: auto (the fastest available).",
    rich_help_panel=_WORKER, show_default=False)]
DeviceOpt = Annotated[str | None, typer.Option(
    "--device", help="auto, cpu, cuda or cuda:N. Default: auto (cuda if present).", rich_help_panel=_WORKER,
    show_default=False)]
PrecisionOpt = Annotated[str | None, typer.Option(
    "--precision", help="auto, fp32, fp16 or bf16. Default: fp16 on GPUs, fp32 on CPUs.",
    rich_help_panel=_WORKER, show_default=False)]
ThreadsOpt = Annotated[int | None, typer.Option(
    "--threads", help="CPU threads for inference on CPU. Default: all cores.", rich_help_panel=_WORKER,
    show_default=False)]
TokenBudgetOpt = Annotated[int | None, typer.Option(
    "--token-budget", help="Padded tokens per engine batch. Default: 4096 on CPU, 65536 on GPU.",
    rich_help_panel=_WORKER, show_default=False)]
SeqLensOpt = Annotated[str | None, typer.Option(
    "--seq-lens", help="Bucket sequence lengths, comma-separated (`embedq profile SOURCE` proposes them). "
    "Default: a table of steps of about 1.4x up to the model's maximum.", rich_help_panel=_WORKER,
    show_default=False)]
TokProcOpt = Annotated[int | None, typer.Option(
    "--tokenizer-processes", help="Processes that tokenize for the worker. Default: all cores but two on a "
    "GPU node, 0 (in the worker) on a CPU node.", rich_help_panel=_WORKER, show_default=False)]
GraphsOpt = Annotated[bool | None, typer.Option(
    "--cuda-graphs/--no-cuda-graphs", help="Capture one CUDA graph per profile (on CUDA). Default: on.",
    rich_help_panel=_WORKER, show_default=False)]
WindowOpt = Annotated[int | None, typer.Option(
    "--window-docs", help="Documents sorted by length together and written as one part. Default: 16384.",
    rich_help_panel=_WORKER, show_default=False)]
LeaseOpt = Annotated[float | None, typer.Option(
    "--lease-seconds", help="A worker silent this long loses its batches to others. Default: 30.",
    rich_help_panel=_WORKER, show_default=False)]
FailuresOpt = Annotated[int | None, typer.Option(
    "--max-failures", help="Failed attempts before a document is dead-lettered. Default: 3.",
    rich_help_panel=_WORKER, show_default=False)]
DeliveriesOpt = Annotated[int | None, typer.Option(
    "--max-deliveries", help="Deliveries without a commit (workers dying on it) before a batch is split to "
    "find the culprit. Default: 5.", rich_help_panel=_WORKER, show_default=False)]
ShutdownOpt = Annotated[float | None, typer.Option(
    "--shutdown-timeout", help="Seconds to finish in-flight work after SIGTERM. Default: 60.",
    rich_help_panel=_WORKER, show_default=False)]
DtypeOpt = Annotated[str | None, typer.Option(
    "--output-dtype", help="float32 or float16 embeddings in the Parquet output. Default: float32.",
    rich_help_panel=_WORKER, show_default=False)]


def _settings(**flags: Any) -> Settings:
    mapping = {"redis": "redis_url"}
    return load_settings({mapping.get(k, k): v for k, v in flags.items()})


def _connect(settings: Settings):
    from embedq.connection import connect

    return connect(settings.redis())


def _redis_client(redis: str | None, key_prefix: str | None, tls_ca: str | None, tls_cert: str | None,
                  tls_key: str | None) -> tuple[Settings, Any]:
    """Settings and a checked client for the commands that only talk to Redis."""
    settings = _settings(redis=redis, key_prefix=key_prefix, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
    return settings, _connect(settings)


def _keys(job: str, settings: Settings):
    from embedq.keys import JobKeys

    return JobKeys(job, settings.key_prefix)


def _source_spec(source: str, fmt: str, id_field: str | None, text_field: str, text_unit: str):
    from embedq.producer.sources import SourceSpec

    if text_unit not in ("line", "file"):
        raise UsageError(f"--text-unit must be 'line' or 'file', got {text_unit!r}")
    return SourceSpec(path=source, format=fmt, id_field=id_field, text_field=text_field, text_unit=text_unit)


def _model(settings: Settings, path: str | None = None):
    from embedq.model import load_model_info

    return load_model_info(path if path is not None else settings.model, pooling=settings.pooling,
                           normalize=settings.normalize, max_seq_len=settings.max_seq_len)


# -- produce --------------------------------------------------------------------------------------

@contextlib.contextmanager
def _producer(client, keys, source, model, settings: Settings, stopping=lambda: False):
    """A producer for the job; with --pretokenize, a tokenizer pool on all cores but one goes with it."""
    from embedq.producer.producer import Producer, ProducerOptions
    from embedq.protocol import Limits
    from embedq.tokenization import TokenizerPool

    options = ProducerOptions(
        batch_size=settings.batch_size, backlog=settings.backlog, allow_empty=settings.allow_empty,
        allow_duplicate_ids=settings.allow_duplicate_ids, redis_retry_seconds=settings.redis_retry_seconds,
        limits=Limits(max_message_bytes=settings.max_message_bytes, max_doc_bytes=settings.max_doc_bytes))
    with contextlib.ExitStack() as stack:
        pool = None
        if settings.pretokenize:
            processes = settings.tokenizer_processes
            if processes is None:
                processes = max(0, (os.cpu_count() or 1) - 1)
            pool = stack.enter_context(TokenizerPool(model.tokenizer_file, model.max_seq_len, processes))
        yield Producer(client, keys, source, model, options, tokenizer=pool, stopping=stopping)


@app.command()
def produce(
    source: SourceArg,
    job: JobOpt,
    fmt: FormatOpt = "auto", id_field: IdFieldOpt = None, text_field: TextFieldOpt = "text",
    text_unit: TextUnitOpt = "line",
    model: ModelOpt = None, pooling: PoolingOpt = None, normalize: NormalizeOpt = None, max_seq_len: MaxSeqOpt = None,
    batch_size: BatchSizeOpt = None, backlog: BacklogOpt = None, max_doc_bytes: MaxDocOpt = None,
    allow_empty: AllowEmptyOpt = None, allow_duplicate_ids: AllowDupOpt = None, pretokenize: PretokOpt = None,
    redis: RedisOpt = None, key_prefix: PrefixOpt = None, tls_ca: TlsCaOpt = None, tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    """Publish SOURCE as job NAME: batches go to the job's Redis stream for workers to embed.

    Safe to kill and run again: it resumes after the last batch it published, never twice.
    """
    from embedq.producer.sources import open_source
    from embedq.progress import ProgressReport

    settings = _settings(model=model, pooling=pooling, normalize=normalize, max_seq_len=max_seq_len,
                         batch_size=batch_size, backlog=backlog, max_doc_bytes=max_doc_bytes,
                         allow_empty=allow_empty, allow_duplicate_ids=allow_duplicate_ids,
                         pretokenize=pretokenize, redis=redis, key_prefix=key_prefix, tls_ca=tls_ca,
                         tls_cert=tls_cert, tls_key=tls_key)
    client = _connect(settings)
    keys = _keys(job, settings)
    info = _model(settings)
    with open_source(_source_spec(source, fmt, id_field, text_field, text_unit)) as src, \
            _producer(client, keys, src, info, settings) as producer:
        record = producer.prepare()
        with ProgressReport(f"produce {job}", record.documents) as bar:
            report = producer.run(progress=lambda done, total: bar.update(done))
    if report.already_done:
        typer.echo(f"job {job}: already fully produced ({record.documents:,} documents); nothing to do")
        return
    typer.echo(f"job {job}: published {report.published_documents:,} documents in {report.batches:,} batches "
               f"({report.rejected:,} dead-lettered by the producer) in {report.seconds:.1f} s"
               + (f", resumed at document {report.resumed_from:,}" if report.resumed_from else ""))


# -- work -----------------------------------------------------------------------------------------

def _wait_for_job(client, keys, wait: bool):
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


def check_model(record, info) -> None:
    from embedq.job import check_model as check

    check(record, info)


def _worker_model(settings: Settings, record):
    """The model a worker loads: --model, else the job's model path if it exists here, else the default."""
    if settings.model is not None:
        return _model(settings)
    from embedq.model import load_model_info

    path = record.model_path if Path(record.model_path).is_dir() else None
    info = load_model_info(path, pooling=record.pooling, normalize=record.normalize,
                           max_seq_len=record.max_seq_len)
    if info.digest != record.model_digest:
        raise JobMismatch(
            f"Job {record.job!r} was produced with model {record.model} ({record.model_digest}), which is not at "
            f"{record.model_path} on this machine. Pass --model with a copy of it."
        )
    return info


def _engine(settings: Settings, info):
    from embedq.config import parse_seq_lens
    from embedq.engines import create_engine, resolve_backend
    from embedq.engines.base import EngineConfig
    from embedq.engines.device import resolve_device
    from embedq.engines.profiles import DEFAULT_SEQ_LENS, profile_table

    device = resolve_device(settings.device)
    on_gpu = device.startswith("cuda")
    precision = settings.precision if settings.precision != "auto" else ("fp16" if on_gpu else "fp32")
    # CPU: 1k-4k token batches ran as fast as larger ones (2 cores, MiniLM); GPU: 64k-token batches
    # kept the H200 busiest in eager mode (engine measurements, 2026-11-28).
    budget = settings.token_budget or (65536 if on_gpu else 4096)
    backend = resolve_backend(settings.backend, device)
    seq_lens = parse_seq_lens(settings.seq_lens) if settings.seq_lens else DEFAULT_SEQ_LENS
    profiles = profile_table(info.max_seq_len, budget, seq_lens)
    config = EngineConfig(model=info, profiles=profiles, device=device, precision=precision,
                          threads=settings.threads)
    options = {"cuda_graphs": True} if settings.cuda_graphs and backend == "torch" and on_gpu else {}
    return create_engine(backend, config, **options)


@contextlib.contextmanager
def _tokenizer(settings: Settings, info, device: str) -> Iterator[Any]:
    """The worker's tokenizer: a pool of processes on GPU nodes, in-process on CPU nodes."""
    from embedq.tokenization import TokenizerPool, default_tokenizer_processes

    processes = settings.tokenizer_processes
    if processes is None:
        processes = default_tokenizer_processes(device)
    with TokenizerPool(info.tokenizer_file, info.max_seq_len, processes) as pool:
        yield pool.encode


def _worker_options(settings: Settings, **extra: Any):
    from embedq.worker.worker import WorkerOptions

    return WorkerOptions(
        lease_seconds=settings.lease_seconds, max_failures=settings.max_failures,
        max_deliveries=settings.max_deliveries, window_docs=settings.window_docs, prefetch=settings.prefetch,
        commit_threads=settings.commit_threads,
        shutdown_timeout=settings.shutdown_timeout, disk_retry_seconds=settings.disk_retry_seconds,
        redis_retry_seconds=settings.redis_retry_seconds, output_dtype=settings.output_dtype, **extra)


@app.command()
def work(
    job: JobOpt, out: OutOpt,
    model: ModelOpt = None, backend: BackendOpt = None, device: DeviceOpt = None, precision: PrecisionOpt = None,
    threads: ThreadsOpt = None, token_budget: TokenBudgetOpt = None, seq_lens: SeqLensOpt = None,
    tokenizer_processes: TokProcOpt = None, cuda_graphs: GraphsOpt = None, window_docs: WindowOpt = None,
    lease_seconds: LeaseOpt = None, max_failures: FailuresOpt = None, max_deliveries: DeliveriesOpt = None,
    shutdown_timeout: ShutdownOpt = None, output_dtype: DtypeOpt = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait for the job to be created.")] = True,
    redis: RedisOpt = None, key_prefix: PrefixOpt = None, tls_ca: TlsCaOpt = None, tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    """Embed job NAME's batches into DIR until the job is complete.

    Run any number of workers on the same job (one per GPU). SIGTERM finishes and commits what is in
    flight, then exits 0; a killed worker's batches are taken over by the others after the lease.
    """
    from embedq.worker.output import open_output
    from embedq.worker.worker import Worker

    settings = _settings(model=model, backend=backend, device=device, precision=precision, threads=threads,
                         token_budget=token_budget, seq_lens=seq_lens, tokenizer_processes=tokenizer_processes,
                         cuda_graphs=cuda_graphs, window_docs=window_docs, lease_seconds=lease_seconds,
                         max_failures=max_failures, max_deliveries=max_deliveries,
                         shutdown_timeout=shutdown_timeout, output_dtype=output_dtype, redis=redis,
                         key_prefix=key_prefix, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
    client = _connect(settings)
    keys = _keys(job, settings)
    output = open_output(out)
    record = _wait_for_job(client, keys, wait)
    info = _worker_model(settings, record)
    check_model(record, info)  # before the engine: building one can take minutes
    with _engine(settings, info) as engine, _tokenizer(settings, info, engine.config.device) as encode:
        worker = Worker(client, keys, record, info, engine, output, _worker_options(settings), encode=encode)
        report = worker.run()
    state = "job complete" if report.job_complete else ("stopped by signal" if report.stopped_by_signal
                                                        else "stopped")
    typer.echo(f"worker {report.worker}: {report.documents:,} documents in {report.parts:,} parts, "
               f"{report.dead_documents:,} dead-lettered, {report.seconds:.1f} s ({state})")


# -- run ------------------------------------------------------------------------------------------

@app.command()
def run(
    source: SourceArg,
    out: OutOpt,
    job: Annotated[str | None, typer.Option("--job", "-j", help="Job name. Default: derived from the source, "
                                            "so running again resumes.", show_default=False)] = None,
    fmt: FormatOpt = "auto", id_field: IdFieldOpt = None, text_field: TextFieldOpt = "text",
    text_unit: TextUnitOpt = "line",
    model: ModelOpt = None, pooling: PoolingOpt = None, normalize: NormalizeOpt = None, max_seq_len: MaxSeqOpt = None,
    batch_size: BatchSizeOpt = None, backlog: BacklogOpt = None, max_doc_bytes: MaxDocOpt = None,
    allow_empty: AllowEmptyOpt = None, allow_duplicate_ids: AllowDupOpt = None,
    backend: BackendOpt = None, device: DeviceOpt = None, precision: PrecisionOpt = None, threads: ThreadsOpt = None,
    token_budget: TokenBudgetOpt = None, seq_lens: SeqLensOpt = None, tokenizer_processes: TokProcOpt = None,
    cuda_graphs: GraphsOpt = None, window_docs: WindowOpt = None, output_dtype: DtypeOpt = None,
    pretokenize: PretokOpt = None, redis: RedisOpt = None, key_prefix: PrefixOpt = None,
    tls_ca: TlsCaOpt = None, tls_cert: TlsCertOpt = None, tls_key: TlsKeyOpt = None,
) -> None:
    """Embed SOURCE into DIR end to end on this machine (producer and worker in one process).

    Uses the Redis at --redis / EMBEDQ_REDIS_URL (default 127.0.0.1:6379) if one answers, otherwise
    starts a private redis-server for the run.
    """
    from embedq.connection import redis_for_run
    from embedq.producer.sources import open_source
    from embedq.progress import ProgressReport
    from embedq.status import read_status
    from embedq.worker.output import open_output
    from embedq.worker.worker import Worker

    flags = dict(model=model, pooling=pooling, normalize=normalize, max_seq_len=max_seq_len,
                 batch_size=batch_size, backlog=backlog, max_doc_bytes=max_doc_bytes, allow_empty=allow_empty,
                 allow_duplicate_ids=allow_duplicate_ids, backend=backend, device=device, precision=precision,
                 threads=threads, token_budget=token_budget, seq_lens=seq_lens,
                 tokenizer_processes=tokenizer_processes, cuda_graphs=cuda_graphs, window_docs=window_docs,
                 output_dtype=output_dtype, pretokenize=pretokenize, key_prefix=key_prefix, tls_ca=tls_ca,
                 tls_cert=tls_cert, tls_key=tls_key)
    settings = _settings(redis=redis, **flags)
    output = open_output(out)
    info = _model(settings)
    with contextlib.ExitStack() as stack:
        src = stack.enter_context(open_source(_source_spec(source, fmt, id_field, text_field, text_unit)))
        url = stack.enter_context(redis_for_run(settings.redis_url, log=log.info))
        settings = _settings(redis=url, **flags)
        client = _connect(settings)
        scan = src.scan()
        name = job or _default_job_name(source, scan.fingerprint)
        keys = _keys(name, settings)
        producer = stack.enter_context(_producer(client, keys, src, info, settings))
        producer.scan = scan
        record = producer.prepare()
        stop = threading.Event()
        failure: list[BaseException] = []
        publisher = threading.Thread(target=_run_guarded, args=(producer.run, failure, stop), daemon=True,
                                     name="embedq-producer")
        producer.stopping = stop.is_set
        with _engine(settings, info) as engine, _tokenizer(settings, info, engine.config.device) as encode:
            worker = Worker(client, keys, record, info, engine, output, _worker_options(settings), encode=encode)
            publisher.start()
            with ProgressReport(f"embed {name}", record.documents) as bar, _poll(
                    lambda: read_status(client, keys), lambda s: bar.update(s.settled_documents, s.tokens)):
                try:
                    report = worker.run()
                finally:
                    stop.set()
                    publisher.join(timeout=30)
        if failure:
            raise failure[0]
        final = read_status(client, keys)
    typer.echo(f"job {name}: {final.committed_documents:,} documents embedded, {final.dead_documents:,} "
               f"dead-lettered, {report.parts:,} parts in {output.path} ({report.seconds:.1f} s, "
               f"{report.documents / max(report.seconds, 1e-9):,.0f} docs/s)")
    if final.dead_documents:
        typer.echo(f"dead letters (ids and reasons) are listed in {output.path / '_dead_letters.jsonl'}")
    if not report.job_complete:
        raise typer.Exit(130 if report.stopped_by_signal else 1)


def _run_guarded(call, failure: list[BaseException], stop: threading.Event) -> None:
    try:
        call()
    except BaseException as exc:
        failure.append(exc)
        stop.set()


@contextlib.contextmanager
def _poll(read, show, every: float = 0.5) -> Iterator[None]:
    """Call show(read()) every `every` seconds in a thread while the block runs."""
    done = threading.Event()

    def loop() -> None:
        while not done.wait(every):
            with contextlib.suppress(Exception):
                show(read())

    thread = threading.Thread(target=loop, daemon=True, name="embedq-progress")
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=5)
        with contextlib.suppress(Exception):
            show(read())


def _default_job_name(source: str, fingerprint: str) -> str:
    stem = "stdin" if source == "-" else Path(source.rstrip("/")).name.split(".")[0]
    clean = "".join(c if c.isalnum() or c in "_.-" else "-" for c in stem).strip("-._")[:40] or "job"
    return f"{clean}-{fingerprint.split(':')[-1][:8]}"


@app.command()
def profile(
    source: SourceArg,
    fmt: FormatOpt = "auto", id_field: IdFieldOpt = None, text_field: TextFieldOpt = "text",
    text_unit: TextUnitOpt = "line", model: ModelOpt = None, max_seq_len: MaxSeqOpt = None,
    sample: Annotated[int, typer.Option("--sample", help="Documents to tokenize (the first N).")] = 100_000,
    target_waste: Annotated[float, typer.Option("--target-waste", help="Padding allowed over real tokens.")] = 0.10,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Propose bucket lengths (--seq-lens) for SOURCE from its token-length histogram.

    Pads at most --target-waste over the real tokens with the fewest profiles.
    """
    import numpy as np

    from embedq.producer.sources import open_source
    from embedq.tokenization import Tokenizer
    from embedq.engines.profiles import fit_seq_lens, profile_table, sequence_padding

    settings = _settings(model=model, max_seq_len=max_seq_len)
    info = _model(settings)
    tokenizer = Tokenizer(info.tokenizer_file, info.max_seq_len)
    lengths, truncated, seen = [], 0, 0
    with open_source(_source_spec(source, fmt, id_field, text_field, text_unit)) as src:
        for chunk in src.chunks(chunk_size=8192):
            texts = [t for i, t in enumerate(chunk.texts[: sample - seen]) if i not in chunk.problems]
            docs = tokenizer.encode(texts)
            lengths.append(docs.lengths)
            truncated += int(docs.truncated.sum())
            seen += len(chunk.texts)
            if seen >= sample:
                break
    all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int32)
    if not all_lengths.size:
        raise UsageError("no usable documents in the sample")
    default = tuple(p.max_seq_len for p in profile_table(info.max_seq_len, 1 << 16))
    proposed = fit_seq_lens(all_lengths, info.max_seq_len, target_waste=target_waste)
    report = {
        "documents": int(all_lengths.size), "tokens": int(all_lengths.sum()),
        "mean": float(all_lengths.mean()),
        "percentiles": {p: int(np.percentile(all_lengths, p)) for p in (50, 90, 99)},
        "max": int(all_lengths.max()), "truncated": truncated, "max_seq_len": info.max_seq_len,
        "default_seq_lens": list(default), "default_padding": sequence_padding(all_lengths, default),
        "seq_lens": list(proposed), "padding": sequence_padding(all_lengths, proposed),
    }
    if as_json:
        typer.echo(json.dumps(report, indent=1))
        return
    pct = report["percentiles"]
    typer.echo(f"{report['documents']:,} documents, {report['tokens']:,} tokens: mean {report['mean']:.1f}, "
               f"p50 {pct[50]}, p90 {pct[90]}, p99 {pct[99]}, max {report['max']} "
               f"({truncated:,} truncated at {info.max_seq_len})")
    typer.echo(f"default profiles pad to {report['default_padding']:.3f}x the real tokens")
    typer.echo(f"proposed profiles pad to {report['padding']:.3f}x with {len(proposed)} lengths:")
    typer.echo(f"  --seq-lens {','.join(map(str, proposed))}")


@app.command()
def bench(
    corpus: Annotated[list[str] | None, typer.Option(
        "--corpus", help="glosses, passages (from --corpus-dir) or NAME=PATH of a Parquet file with id and text "
        "columns; repeatable. Default: both.", show_default=False)] = None,
    corpus_dir: Annotated[str | None, typer.Option(
        "--corpus-dir", help="Where glosses.parquet and passages.parquet are (python shared/corpus/make.py DIR "
        "builds them). Default: EMBEDQ_CORPUS_DIR or ~/.cache/embedq-test-corpus.", show_default=False)] = None,
    model_names: Annotated[list[str] | None, typer.Option(
        "--model", help="minilm (the real all-MiniLM-L6-v2), bert-base or tiny (random weights of that shape, "
        "for speed only); repeatable. Default: minilm and bert-base.", show_default=False)] = None,
    model_path: Annotated[str | None, typer.Option(
        "--model-path", help="Directory of the MiniLM weights. Default: the bundled model.",
        show_default=False)] = None,
    tokenize: Annotated[list[str] | None, typer.Option(
        "--tokenize", help="Where tokenization happens: worker, producer (--pretokenize); repeatable. Default: both.",
        show_default=False)] = None,
    repeat: Annotated[int, typer.Option("--repeat", help="Corpus copies (ids made distinct).")] = 1,
    limit: Annotated[int | None, typer.Option("--limit", help="Use only the first N documents of a corpus.",
                                              show_default=False)] = None,
    device: Annotated[str, typer.Option("--device", help="cuda, cuda:N or cpu.")] = "cuda",
    precision: Annotated[str, typer.Option("--precision", help="fp16, bf16 or fp32.")] = "fp16",
    token_budget: Annotated[int, typer.Option("--token-budget", help="Padded tokens per engine batch.")] = 65536,
    window_docs: Annotated[int, typer.Option("--window-docs", help="Documents per window and part.")] = 32768,
    tokenizer_processes: Annotated[int | None, typer.Option(
        "--tokenizer-processes", help="Tokenizer pool size. Default: all cores but two.", show_default=False)] = None,
    cuda_graphs: Annotated[bool, typer.Option("--cuda-graphs/--no-cuda-graphs",
                                              help="Capture a CUDA graph per profile.")] = True,
    baselines: Annotated[bool, typer.Option("--baselines/--no-baselines",
                                            help="Also time sentence-transformers and the tokenizer alone.")] = True,
    check_precision: Annotated[bool, typer.Option(
        "--check-precision", help="Also compare fp16 and bf16 with fp32 on every document (GPU).")] = False,
    json_out: Annotated[str, typer.Option("--json", help="Where to write the results.")] = "bench.json",
    plot_out: Annotated[str, typer.Option("--plot", help="Where to draw throughput per stage.")] = "bench.png",
    out_dir: Annotated[str | None, typer.Option(
        "--out-dir", help="Where the worker writes its Parquet parts (fsynced). Default: a temporary directory.",
        show_default=False)] = None,
    replot: Annotated[list[str] | None, typer.Option(
        "--replot", help="Only draw --plot again from saved --json results (repeatable); runs nothing.",
        show_default=False)] = None,
    redis: RedisOpt = None,
) -> None:
    """Measure end-to-end throughput on this machine against the GPU-only ceiling, sentence-transformers
    and the tokenizer alone; print a table, write JSON and a plot."""
    from embedq.bench import SHAPES, run_bench

    if replot:
        from embedq.bench import replot as draw

        draw([Path(p) for p in replot], Path(plot_out))
        return
    base = Path(corpus_dir or os.environ.get("EMBEDQ_CORPUS_DIR") or Path.home() / ".cache" / "embedq-test-corpus")
    corpora = []
    for item in corpus or ["passages", "glosses"]:
        name, _, path = item.partition("=")
        resolved = Path(path) if path else base / f"{name}.parquet"
        if not resolved.is_file():
            raise UsageError(f"corpus {name!r}: {resolved} does not exist; build it with "
                             f"`python shared/corpus/make.py {base}` or pass NAME=PATH.")
        corpora.append((name, resolved))
    models = model_names or ["minilm", "bert-base"]
    for name in models:
        if name != "minilm" and name not in SHAPES:
            raise UsageError(f"--model {name!r}: choose minilm or one of {', '.join(SHAPES)}")
    modes = tokenize or ["producer", "worker"]
    if set(modes) - {"worker", "producer"}:
        raise UsageError("--tokenize takes worker or producer")
    processes = tokenizer_processes if tokenizer_processes is not None else max(1, (os.cpu_count() or 2) - 2)
    run_bench(corpora, models, modes, repeat=repeat, limit=limit, device=device, precision=precision,
              redis_url=redis, json_path=Path(json_out), plot_path=Path(plot_out), tokenizer_processes=processes,
              baselines=baselines, token_budget=token_budget, window_docs=window_docs,
              check_precision=check_precision, cuda_graphs=cuda_graphs, model_path=model_path,
              out_dir=Path(out_dir) if out_dir else None)


# -- status, verify, dead letters, gc, delete ------------------------------------------------------

@app.command()
def status(
    job: JobOpt,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    watch: Annotated[float | None, typer.Option("--watch", help="Refresh every N seconds until complete.",
                                                show_default=False)] = None,
    redis: RedisOpt = None, key_prefix: PrefixOpt = None, tls_ca: TlsCaOpt = None, tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    """Show a job's counts: produced, in the stream, committed, dead-lettered, workers, throughput."""
    from embedq.status import read_status, render, to_json

    settings, client = _redis_client(redis, key_prefix, tls_ca, tls_cert, tls_key)
    keys = _keys(job, settings)
    while True:
        current = read_status(client, keys)
        typer.echo(to_json(current) if as_json else render(current))
        if watch is None or current.complete or not current.exists:
            break
        time.sleep(watch)
        typer.echo("")
    if not current.exists:
        raise typer.Exit(2)


@app.command()
def verify(
    job: JobOpt, out: OutOpt,
    source: Annotated[str | None, typer.Option("--source", help="Check against this source instead of the one "
                                               "recorded in the job.", show_default=False)] = None,
    allow_dead: Annotated[bool, typer.Option("--allow-dead-letters", help="Count dead-lettered ids as "
                                             "accounted for (each must then be in exactly one place).")] = False,
    redis: RedisOpt = None, key_prefix: PrefixOpt = None, tls_ca: TlsCaOpt = None, tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    """Check the committed output: every source id exactly once, right dimension, finite values.

    Also rolls committed parts forward, removes orphan parts and writes _manifest.json. Exits 8 if
    anything is missing, duplicated or invalid.
    """
    from embedq.verify import verify_job

    settings, client = _redis_client(redis, key_prefix, tls_ca, tls_cert, tls_key)
    result = verify_job(client, _keys(job, settings), out, source=source, allow_dead=allow_dead)
    typer.echo(result.render())
    result.raise_for_failure()


@dead_app.command("list")
def dead_list(
    job: JobOpt,
    limit: Annotated[int, typer.Option("--limit", help="Show at most this many dead letters.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines for scripts.")] = False,
    redis: RedisOpt = None, key_prefix: PrefixOpt = None, tls_ca: TlsCaOpt = None, tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    """List dead letters: which documents, why, which worker, how many deliveries."""
    from embedq.deadletter import list_dead, summary

    settings, client = _redis_client(redis, key_prefix, tls_ca, tls_cert, tls_key)
    entries = list_dead(client, _keys(job, settings), count=limit)
    for entry in entries:
        letter = entry.letter
        if as_json:
            typer.echo(json.dumps(summary(entry)))
        else:
            ids = ", ".join(map(repr, letter.doc_ids[:5])) + (" ..." if len(letter.doc_ids) > 5 else "")
            typer.echo(f"{entry.dead_id}  {letter.reason}: {len(letter.doc_ids)} doc(s) [{ids}] seq={letter.seq} "
                       f"worker={letter.worker} deliveries={letter.deliveries}"
                       + ("" if letter.replayable else " (not replayable)") + f"\n    {letter.error}")
    if not entries and not as_json:
        typer.echo(f"job {job}: no dead letters")


@dead_app.command("replay")
def dead_replay(
    job: JobOpt,
    ids: Annotated[list[str] | None, typer.Option("--id", help="Dead letter id (repeatable). Default: all.",
                                                   show_default=False)] = None,
    redis: RedisOpt = None, key_prefix: PrefixOpt = None, tls_ca: TlsCaOpt = None, tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    """Put dead-lettered documents back into the job's stream (after a fix); then run workers again."""
    from embedq import job as job_record
    from embedq.deadletter import list_dead, replay

    settings, client = _redis_client(redis, key_prefix, tls_ca, tls_cert, tls_key)
    keys = _keys(job, settings)
    entries = list_dead(client, keys, ids=ids)
    if ids and len(entries) != len(ids):
        missing = set(ids) - {e.dead_id for e in entries}
        raise UsageError(f"No dead letter with id {', '.join(sorted(missing))} in job {job!r}.")
    record = job_record.require(client, keys)
    documents, skipped = replay(client, keys, entries, allow_empty=record.allow_empty)
    typer.echo(f"job {job}: replayed {documents:,} documents; run `embedq work --job {job}` to embed them"
               if documents else f"job {job}: nothing replayed")
    for dead_id, reason in skipped[:20]:
        typer.echo(f"  skipped {dead_id}: {reason}")
    if len(skipped) > 20:
        typer.echo(f"  ... and {len(skipped) - 20} more skipped")


@app.command()
def gc(
    job: JobOpt, out: OutOpt,
    redis: RedisOpt = None, key_prefix: PrefixOpt = None, tls_ca: TlsCaOpt = None, tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    """Remove orphan parts (written but never committed) and roll committed ones forward."""
    from embedq.job import live_workers
    from embedq.worker.commit import reconcile
    from embedq.worker.output import open_output
    from embedq.job import job_complete

    settings, client = _redis_client(redis, key_prefix, tls_ca, tls_cert, tls_key)
    keys = _keys(job, settings)
    output = open_output(out, create=False)
    result = reconcile(client, keys, output, live_workers=set(live_workers(client, keys)),
                       finished=job_complete(client, keys))
    typer.echo(f"job {job}: {len(result.parts)} committed parts; rolled forward {len(result.rolled_forward)}, "
               f"removed {len(result.orphans_removed)} visible and {len(result.staged_removed)} staged orphans; "
               f"kept {len(result.staged_kept)} staged parts of live workers")
    if result.missing:
        typer.echo(f"warning: {len(result.missing)} committed parts are missing from {output.path}: "
                   + ", ".join(result.missing[:10]), err=True)
        raise typer.Exit(8)


@app.command()
def delete(
    job: JobOpt,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    redis: RedisOpt = None, key_prefix: PrefixOpt = None, tls_ca: TlsCaOpt = None, tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    """Delete a job's keys from Redis (the output directory is left alone)."""
    settings, client = _redis_client(redis, key_prefix, tls_ca, tls_cert, tls_key)
    keys = _keys(job, settings)
    found = [k for pattern in keys.all_patterns() for k in client.scan_iter(match=pattern, count=1000)]
    if not found:
        typer.echo(f"job {job}: no keys")
        return
    if not yes and not typer.confirm(f"Delete {len(found)} keys of job {job!r}?"):
        raise typer.Exit(1)
    client.delete(*found)
    typer.echo(f"job {job}: deleted {len(found)} keys")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"embedq {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output (-vv: debug).")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if verbose < 2:
        for noisy in ("httpx", "urllib3", "transformers", "torch"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def main() -> None:
    """Entry point: run the CLI, turning embedq's errors into a message and an exit code."""
    import redis

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    try:
        code = app(standalone_mode=False)
    except EmbedqError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except redis.exceptions.NoPermissionError as exc:
        typer.echo(f"error: Redis refused a command ({exc}). The Redis user needs access to this job's keys "
                   "(~PREFIX:*, see --key-prefix) and to the commands listed in the README's security section.",
                   err=True)
        sys.exit(RedisUnavailable.exit_code)
    except redis.exceptions.RedisError as exc:
        typer.echo(f"error: Redis failed: {exc}", err=True)
        sys.exit(RedisUnavailable.exit_code)
    except Exception as exc:
        # Usage errors of click (typer carries its own copy of click, so match by shape, not class).
        exit_code = getattr(exc, "exit_code", None)
        if hasattr(exc, "show") and isinstance(exit_code, int):
            exc.show()
            sys.exit(exit_code)
        raise
    # standalone_mode=False makes click return the code of a typer.Exit instead of raising it.
    sys.exit(code if isinstance(code, int) else 0)
