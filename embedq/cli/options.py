"""The command line's options, declared once each and shared by the commands that take them.

A parameter's name is the `Settings` field it sets (`settings.settings_from` relies on that), except
`--redis`, which sets `redis_url`. A default of None means "not given": the setting then comes from
`EMBEDQ_*` or `embedq.toml`.
"""

from __future__ import annotations

from typing import Annotated

import typer

# The panels of `--help`.
_REDIS = "Redis"
_SOURCE = "Source"
_MODEL = "Model"
_PRODUCER = "Producer"
_WORKER = "Worker"

# -- what a command works on: the source, the job, the output

SourceArg = Annotated[str, typer.Argument(help="File, directory, or - for stdin.", show_default=False,
                                          metavar="SOURCE")]
JobOpt = Annotated[str, typer.Option("--job", "-j", help="Job name.", show_default=False)]
OutOpt = Annotated[str, typer.Option("--out", "-o", help="Output directory for the Parquet parts.",
                                     show_default=False)]
AsJsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]

# -- Redis

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

# -- Source (how SOURCE is read; not settings: see `settings.source_spec`)

FormatOpt = Annotated[str, typer.Option(
    "--format", help="Source format: auto (by file suffix), parquet, jsonl, csv, text.", rich_help_panel=_SOURCE)]
IdFieldOpt = Annotated[str | None, typer.Option(
    "--id-field", help="Column/field holding document ids. Default: 'id' if present, else positions 0, 1, ...",
    rich_help_panel=_SOURCE, show_default=False)]
TextFieldOpt = Annotated[str, typer.Option("--text-field", help="Column/field holding the text.",
                                           rich_help_panel=_SOURCE)]
TextUnitOpt = Annotated[str, typer.Option(
    "--text-unit", help="For text files: one document per 'line' or per 'file'.", rich_help_panel=_SOURCE)]

# -- Model

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

# -- Producer

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
UntilCompleteOpt = Annotated[bool, typer.Option(
    "--until-complete/--exit-when-published", help="Stay after publishing until the job is complete (settled "
    "and its output final), publishing again whatever a Redis crash or failover lost; for services.",
    rich_help_panel=_PRODUCER)]
PretokOpt = Annotated[bool | None, typer.Option(
    "--pretokenize/--no-pretokenize", help="Tokenize in the producer, so token ids travel in the messages "
    "(moves tokenization to CPU nodes).", rich_help_panel=_PRODUCER, show_default=False)]

# -- Worker

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
    "--window-docs", help="At most this many documents sorted by length together and written as one part. "
    "Default: 16384.", rich_help_panel=_WORKER, show_default=False)]
WindowSecondsOpt = Annotated[float | None, typer.Option(
    "--window-seconds", help="A window also closes after about this many seconds of engine work at the measured "
    "speed (at most a third of the lease), so slow devices commit often. Default: 5.", rich_help_panel=_WORKER,
    show_default=False)]
LeaseOpt = Annotated[float | None, typer.Option(
    "--lease-seconds", help="A worker silent this long loses its batches to others. Default: 30.",
    rich_help_panel=_WORKER, show_default=False)]
FailuresOpt = Annotated[int | None, typer.Option(
    "--max-failures", help="Failed attempts before a document is dead-lettered. Default: 3.",
    rich_help_panel=_WORKER, show_default=False)]
DeliveriesOpt = Annotated[int | None, typer.Option(
    "--max-deliveries", help="Workers that died while working on a batch before it is split to find the culprit "
    "(a lone document is then dead-lettered); workers that merely held it do not count. Default: 5.",
    rich_help_panel=_WORKER, show_default=False)]
ShutdownOpt = Annotated[float | None, typer.Option(
    "--shutdown-timeout", help="Seconds to finish the work on the engine after SIGTERM or Ctrl-C; the rest is "
    "handed back at once. Default: 60.",
    rich_help_panel=_WORKER, show_default=False)]
DtypeOpt = Annotated[str | None, typer.Option(
    "--output-dtype", help="float32 or float16 embeddings in the Parquet output. Default: float32.",
    rich_help_panel=_WORKER, show_default=False)]
