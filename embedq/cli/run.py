"""`embedq run`: a job end to end in one process, with a progress display, resumable.

The producer publishes in a thread while the worker embeds in the main one; the Redis is the one
named, else the private one whose data an earlier run kept in the output directory, else the one
that answers at the default address, else a new private one keeping its data there
(`embedq.connection.redis_for_run`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from embedq.cli.exporter import serve_metrics
from embedq.cli.incremental import DedupeOpt, IncrementalOpt, NewRecordOpt, StateOpt
from embedq.cli.jobs import EngineStarting, log_startup, producer_for, refuse_chunked_incremental, worker_for
from embedq.cli.options import (
    DEFAULTS,
    AllowDeadOpt,
    AllowDupOpt,
    AllowEmptyOpt,
    BackendOpt,
    BacklogOpt,
    BatchSizeOpt,
    CalibrationDocsOpt,
    CalibrationOpt,
    ChunkOpt,
    CompressOpt,
    DeviceOpt,
    DtypeOpt,
    FormatOpt,
    GraphsOpt,
    IdFieldOpt,
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
    WindowOpt,
    WindowSecondsOpt,
)
from embedq.cli.settings import STARTUP, connect, job_keys, load_model, redis_named, settings_from, source_spec
from embedq.config import Settings
from embedq.connection import DEFAULT_URL, redact
from embedq.errors import JobMismatch, RedisUnavailable, UsageError, VerificationFailed
from embedq.keys import default_job_name

if TYPE_CHECKING:
    import redis

    from embedq.job import JobRecord
    from embedq.keys import JobKeys
    from embedq.model import ModelInfo
    from embedq.producer.producer import Producer
    from embedq.producer.spec import SourceSpec
    from embedq.status import JobStatus
    from embedq.worker.output import OutputDir
    from embedq.worker.worker import Worker, WorkerReport

log = logging.getLogger("embedq")
_Status = TypeVar("_Status")


def run(
    ctx: typer.Context,
    source: SourceArg,
    out: OutOpt,
    job: Annotated[str | None, typer.Option("--job", "-j", help="Job name. Default: derived from the source, "
                                            "so running again resumes.", show_default=False)] = None,
    fmt: FormatOpt = "auto", id_field: IdFieldOpt = None, text_field: TextFieldOpt = "text",
    text_unit: TextUnitOpt = "line",
    model: ModelOpt = None, pooling: PoolingOpt = None, normalize: NormalizeOpt = None, max_seq_len: MaxSeqOpt = None,
    prompt: PromptOpt = None, prompt_name: PromptNameOpt = None,
    batch_size: BatchSizeOpt = DEFAULTS.batch_size, backlog: BacklogOpt = DEFAULTS.backlog,
    max_doc_bytes: MaxDocOpt = DEFAULTS.max_doc_bytes,
    allow_empty: AllowEmptyOpt = DEFAULTS.allow_empty, allow_duplicate_ids: AllowDupOpt = DEFAULTS.allow_duplicate_ids,
    backend: BackendOpt = DEFAULTS.backend, device: DeviceOpt = DEFAULTS.device,
    precision: PrecisionOpt = DEFAULTS.precision, threads: ThreadsOpt = None,
    token_budget: TokenBudgetOpt = None, seq_lens: SeqLensOpt = None, tokenizer_processes: TokProcOpt = None,
    cuda_graphs: GraphsOpt = DEFAULTS.cuda_graphs, unpad: UnpadOpt = DEFAULTS.unpad,

    rebuild_engines: RebuildOpt = DEFAULTS.rebuild_engines, window_docs: WindowOpt = DEFAULTS.window_docs,
    window_seconds: WindowSecondsOpt = DEFAULTS.window_seconds, lease_seconds: LeaseOpt = DEFAULTS.lease_seconds,
    output_dtype: DtypeOpt = DEFAULTS.output_dtype, truncate_dim: TruncateDimOpt = None,
    chunk_tokens: ChunkOpt = DEFAULTS.chunk_tokens, chunk_overlap: OverlapOpt = DEFAULTS.chunk_overlap,
    calibration: CalibrationOpt = None, calibration_docs: CalibrationDocsOpt = DEFAULTS.calibration_docs,
    pretokenize: PretokOpt = DEFAULTS.pretokenize, compress: CompressOpt = DEFAULTS.compress,
    redis: RedisOpt = DEFAULTS.redis_url,
    key_prefix: PrefixOpt = DEFAULTS.key_prefix,
    tls_ca: TlsCaOpt = None, tls_cert: TlsCertOpt = None, tls_key: TlsKeyOpt = None,
    allow_dead_letters: AllowDeadOpt = False, metrics_port: MetricsPortOpt = None,
    incremental: IncrementalOpt = False, state: StateOpt = None, new_record: NewRecordOpt = False,
    dedupe: DedupeOpt = False,
) -> None:
    """Embed SOURCE into the --out directory, end to end on this machine (producer and worker in one process).

    Rows come out in length order, not in the source's order: join on the id column. Interrupted
    (Ctrl-C), it commits what it embedded; run the same command again to resume. It uses the Redis at
    --redis if one answers, otherwise a private redis-server that keeps its data in DIR/.embedq-redis,
    so resuming and `embedq verify` work there too; an object-store --out (s3://BUCKET/PREFIX) needs
    --redis. Exits 8 if documents were dead-lettered, unless --allow-dead-letters.

    With --incremental --state DIR, it embeds only the documents that are new or changed since the
    last run with that state, into a new folder under --out, and records deletions; `embedq snapshot`
    writes the full view.
    """
    if incremental or state is not None:
        from embedq.cli.incremental import run_incremental

        refuse_chunked_incremental(chunk_tokens)
        run_incremental(ctx, source_spec(ctx.params), out, job, state, embed=embed_job, new_record=new_record,
                        dedupe=dedupe, allow_dead_letters=allow_dead_letters)
        return
    embed_job(ctx, source_spec(ctx.params), out, job, allow_dead_letters)


def embed_job(ctx: typer.Context, spec: SourceSpec, out: str, job: str | None, allow_dead_letters: bool) -> None:
    """`embedq run`'s job: the source `spec` into `out` as job `job` (None: named from the source)."""
    from embedq import job as job_record
    from embedq.cli.calibration import job_output_format
    from embedq.connection import redis_for_run
    from embedq.producer.sources import open_source
    from embedq.status import read_status
    from embedq.worker.local_dir import LocalDir
    from embedq.worker.output import open_output

    settings = settings_from(ctx)
    _check_redis_for_a_bucket(ctx, settings, out)  # before the bucket is touched or the model loads
    output = open_output(out)
    info = load_model(settings)
    STARTUP.mark("model files")
    with contextlib.ExitStack() as stack:
        # The engine starts now, in a thread: Redis, the source scan and the job's creation need none.
        starting = stack.enter_context(contextlib.closing(EngineStarting(settings, info)))
        src = stack.enter_context(open_source(spec))
        url = stack.enter_context(
            redis_for_run(settings.redis_url, output_dir=output.path, explicit=redis_named(ctx, settings), log=log.info)
            if isinstance(output, LocalDir) else contextlib.nullcontext(settings.redis_url))
        # What `verify` needs to find this Redis: nothing for the default or the private one.
        hint = "" if url == DEFAULT_URL or url != settings.redis_url else f" --redis {redact(url)}"
        settings = settings_from(ctx, redis_url=url)  # the Redis that answered, or the private one
        client = connect(settings)
        STARTUP.mark("Redis")
        scan = src.scan()
        name = job or default_job_name(spec.path, scan.fingerprint)
        keys = job_keys(name, settings)
        before = read_status(client, keys)
        _check_output(client, keys, output, before.output)  # before anything is published
        if before.complete:
            _say_done(before, output, hint, allow_dead_letters, again=True)
            return
        # The producer thread stays until the job is complete: if Redis loses the end of its
        # publishing (a restart without its last second), it publishes that again while the worker waits.
        stored = job_output_format(settings, info, src, job_record.load(client, keys), engine=starting.started)
        producer = stack.enter_context(producer_for(client, keys, src, info, settings, until_complete=True,
                                                    output=stored))
        producer.scan = scan
        workers: list[Worker] = []  # the worker, once its engine has started
        stack.enter_context(serve_metrics(settings.metrics_port, client, keys, producer=lambda: producer,
                                          worker=lambda: workers[0] if workers else None))
        record = producer.prepare()
        STARTUP.mark("source and job")
        report = _embed_here(client, keys, record, info, output, settings, producer, before.settled_documents,
                             starting, workers)
        final = read_status(client, keys)
    log_startup(report)
    if report.stopped_by_signal and not final.complete:
        # A first signal is a clean stop: what was embedded is committed, the rest handed back.
        typer.echo(f"job {name}: interrupted with {final.settled_documents:,} of {final.documents:,} documents "
                   f"done; run the same command again to resume", err=True)
        raise typer.Exit(130)
    if not final.complete:
        typer.echo(f"job {name}: stopped before it was complete ({final.settled_documents:,} of "
                   f"{final.documents:,} documents done); run the same command again to resume", err=True)
        raise typer.Exit(1)
    _say_done(final, output, hint, allow_dead_letters, seconds=report.seconds, embedded=report.documents)


def _check_redis_for_a_bucket(ctx: typer.Context, settings: Settings, out: str) -> None:
    """An object-store --out takes only a Redis the user named, and that answers: `embedq run`'s
    private Redis keeps its data in OUT/.embedq-redis, and a Redis cannot keep its data in a bucket."""
    from embedq.worker.object_store import redact_uri
    from embedq.worker.output import is_remote

    if not is_remote(out):
        return
    advice = (f"--out {redact_uri(out)} is in an object store, where `embedq run` cannot keep the data of a private "
              "Redis (OUT/.embedq-redis): pass --redis URL (or set EMBEDQ_REDIS_URL) naming a Redis that answers "
              "and keeps the job's state, or write to a local directory.")
    if not redis_named(ctx, settings):
        raise UsageError(advice)
    try:
        connect(settings).close()
    except RedisUnavailable as exc:
        raise RedisUnavailable(f"{exc} {advice}") from exc


def _check_output(client: redis.Redis, keys: JobKeys, output: OutputDir, recorded: str) -> None:
    """Refuse an output directory that belongs to another job, another directory than the one this
    job already writes to (`recorded`), or one that holds parts of this job while Redis has no
    record of it (its state was lost: embedding again would set them aside)."""
    from embedq import job as job_record

    if recorded and not output.is_at(recorded):
        raise JobMismatch(
            f"job {keys.job!r} writes to {recorded}, not {output.location}: run with --out {recorded} to resume or "
            f"check it, or give this run another --job name (or remove the job: embedq delete --job {keys.job}).")
    output.claim(keys.job)
    parts = output.part_names()
    if parts and job_record.load(client, keys) is None:
        raise JobMismatch(
            f"{output.location} holds {len(parts):,} parts of job {keys.job!r}, but this Redis has no record of the "
            "job (its state was lost, or the job ran against another Redis: pass that one with --redis). To embed "
            "again from scratch, remove the directory or choose another --out.")


def _embed_here(client: redis.Redis, keys: JobKeys, record: JobRecord, info: ModelInfo, output: OutputDir,
                settings: Settings, producer: Producer, done_before: int, starting: EngineStarting,
                workers: list[Worker]) -> WorkerReport:
    """Publish in a thread and embed in this one, with a progress display; the worker's report."""
    from embedq.progress import ProgressReport
    from embedq.status import read_status

    stop = threading.Event()
    producer.stopping = stop.is_set
    failure: list[BaseException] = []
    publisher = threading.Thread(target=_run_guarded, args=(producer.run, failure, stop, workers), daemon=True,
                                 name="embedq-producer")
    publisher.start()  # before the engine is built: a resumed job has a producer from the start
    try:
        with _quiet("embedq.worker.progress"), ProgressReport(f"embed {keys.job}", record.documents) as bar:
            bar.update(done_before, phase="starting the engine")
            with worker_for(client, keys, record, info, output, settings, starting) as worker:
                workers.append(worker)
                if failure:
                    worker.stop()

                def show(status: JobStatus) -> None:  # per engine batch, not per commit
                    engine = worker.report.engine
                    bar.update(max(status.settled_documents, done_before + engine.done_documents), engine.done_tokens,
                               dead=status.dead_documents, phase="waiting for batches")

                with _poll(lambda: read_status(client, keys), show):
                    report = worker.run()
    finally:
        stop.set()
        publisher.join(timeout=30)
    if failure:
        raise failure[0]
    return report


def _say_done(status: JobStatus, output: OutputDir, redis_hint: str, allow_dead_letters: bool, *, again: bool = False,
              seconds: float = 0.0, embedded: int = 0) -> None:
    """The summary of a complete job, and exit 8 if documents were dead-lettered (unless allowed)."""
    from embedq.progress import duration, plural

    if again:
        typer.echo(f"job {status.job}: already complete, nothing to do; {status.committed_documents:,} documents "
                   f"embedded in {plural(status.committed_parts, 'part')} in {output.location}")
    else:
        rate = f", {embedded / seconds:,.0f} docs/s" if seconds >= 1 and embedded else ""
        typer.echo(f"job {status.job}: {status.committed_documents:,} documents embedded, "
                   f"{status.dead_documents:,} dead-lettered, {plural(status.committed_parts, 'part')} in "
                   f"{output.location} ({duration(seconds)}{rate}); rows are in length order, not source order")
    typer.echo(f"check it with: embedq verify --job {status.job} --out {output.location}{redis_hint}")
    if status.dead_documents:
        typer.echo(f"{plural(status.dead_documents, 'document was', 'documents were')} dead-lettered: see "
                   f"{output.where('_dead_letters.jsonl')} or `embedq dead-letter list --job {status.job}`", err=True)
        if not allow_dead_letters:
            raise typer.Exit(VerificationFailed.exit_code)


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Only warnings from `logger` within the block (a progress display says the same)."""
    target = logging.getLogger(logger)
    level = target.level
    target.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        target.setLevel(level)


def _run_guarded(call: Callable[[], object], failure: list[BaseException], stop: threading.Event,
                 workers: list[Worker]) -> None:
    """Run `call` (the producer's thread); on any failure, keep it for the main thread, set `stop`
    and stop the worker (it would otherwise wait for batches that will not come)."""
    try:
        call()
    except BaseException as exc:
        failure.append(exc)
        stop.set()
        for worker in workers:
            worker.stop()


@contextlib.contextmanager
def _poll(read: Callable[[], _Status], show: Callable[[_Status], object], every: float = 0.5) -> Iterator[None]:
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
