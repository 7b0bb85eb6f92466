"""The command line's options, declared once each and shared by the commands that take them.

A parameter's name is the `Settings` field it sets (`settings.settings_from` relies on that), except
`--redis`, which sets `redis_url`. Every setting's option reads its `EMBEDQ_*` variable and shows
it, its default and its choices in `--help`: the defaults in a command's signature are `DEFAULTS`,
the settings' own, and `settings_from` takes only the values the user gave (flag or variable), so
`embedq.toml` still applies under them. Defaults that depend on the machine or the model are None,
shown as what decides them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import typer

from embedq.config import Backend, OutputDtype, Pooling, Precision, Settings, Unpad

DEFAULTS = Settings()
"""The defaults, for the commands' signatures (`batch_size: BatchSizeOpt = DEFAULTS.batch_size`)."""

# The panels of `--help`.
_REDIS = "Redis"
_SOURCE = "Source"
_MODEL = "Model"
_PRODUCER = "Producer"
_WORKER = "Worker"
_OPERATIONS = "Operations"
_NODE = "Node"
_OUTPUT = "Output"

# Choices, as the types of their options: `--help` lists them and a wrong one is a usage error.
Format = Literal["auto", "parquet", "jsonl", "csv", "text"]
TextUnit = Literal["line", "file"]


def setting(setting_name: str, *flags: str, help: str, panel: str, metavar: str = "",
            default: str | None = None) -> Any:
    """The option of a setting: `EMBEDQ_<NAME>` as its variable, `metavar` for its value ("" for
    flags and choices), and `default` as the text of a default that is not a plain value."""
    return typer.Option(*flags, help=help, rich_help_panel=panel, envvar=f"EMBEDQ_{setting_name.upper()}",
                        show_envvar=True, metavar=metavar or None,
                        show_default=default if default is not None else True)


def flag(*flags: str, help: str, panel: str | None = None, setting_name: str | None = None) -> Any:
    """A yes/no option (no value shown in `--help`), a setting's when `setting_name` is given."""
    if setting_name is None:
        return typer.Option(*flags, help=help, rich_help_panel=panel, metavar="")
    return typer.Option(*flags, help=help, rich_help_panel=panel, metavar="", show_envvar=True,
                        envvar=f"EMBEDQ_{setting_name.upper()}")


# -- what a command works on: the source, the job, the output

SourceArg = Annotated[str, typer.Argument(help="File, directory, or - for stdin.", show_default=False,
                                          metavar="SOURCE")]
JobOpt = Annotated[str, typer.Option("--job", "-j", help="Job name.", show_default=False, metavar="NAME")]
OutOpt = Annotated[str, typer.Option("--out", "-o", help="Where the Parquet parts go: a directory, or an object "
                                     "store (s3://BUCKET/PREFIX, gs://..., with `run` only beside a named --redis).",
                                     show_default=False, metavar="DIR|URI")]
AsJsonOpt = Annotated[bool, flag("--json", help="Print JSON for scripts.")]

# -- Redis

RedisOpt = Annotated[str, setting(
    "redis_url", "--redis", help="Redis URL (redis://, rediss:// for TLS, unix://).", panel=_REDIS, metavar="URL")]
PrefixOpt = Annotated[str, setting(
    "key_prefix", "--key-prefix", help="Prefix of every Redis key (to separate tenants).", panel=_REDIS,
    metavar="PREFIX")]
TlsCaOpt = Annotated[str | None, setting("tls_ca", "--tls-ca", help="CA certificate file for rediss://.",
                                         panel=_REDIS, metavar="FILE", default="system CAs")]
TlsCertOpt = Annotated[str | None, setting("tls_cert", "--tls-cert", help="Client certificate file for rediss://.",
                                           panel=_REDIS, metavar="FILE", default="none")]
TlsKeyOpt = Annotated[str | None, setting("tls_key", "--tls-key", help="Client key file for rediss://.",
                                          panel=_REDIS, metavar="FILE", default="none")]

# -- Source (how SOURCE is read; not settings: see `settings.source_spec`)

FormatOpt = Annotated[Format, typer.Option(
    "--format", help="Source format; auto picks it by file suffix.", rich_help_panel=_SOURCE)]
IdFieldOpt = Annotated[str | None, typer.Option(
    "--id-field", help="Column/field holding document ids.", rich_help_panel=_SOURCE, metavar="NAME",
    show_default="'id' if present, else positions 0, 1, ...")]
TextFieldOpt = Annotated[str, typer.Option("--text-field", help="Column/field holding the text.",
                                           rich_help_panel=_SOURCE, metavar="NAME")]
TextUnitOpt = Annotated[TextUnit, typer.Option(
    "--text-unit", help="For text files: one document per line or per file.", rich_help_panel=_SOURCE)]

# -- Model

ModelOpt = Annotated[str | None, setting(
    "model", "--model", "-m", help="Model directory (sentence-transformers or Hugging Face, on disk).",
    panel=_MODEL, metavar="DIR", default="the bundled all-MiniLM-L6-v2")]
JobModelOpt = Annotated[str | None, setting(
    "model", "--model", "-m", help="Model directory, for a job whose model is not at the path it recorded.",
    panel=_MODEL, metavar="DIR", default="the job's model")]
PoolingOpt = Annotated[Pooling | None, setting(
    "pooling", "--pooling", help="How token vectors become one embedding.", panel=_MODEL,
    default="the model's configuration")]
NormalizeOpt = Annotated[bool | None, typer.Option(
    "--normalize/--no-normalize", help="L2-normalize embeddings.", rich_help_panel=_MODEL, metavar="",
    envvar="EMBEDQ_NORMALIZE", show_envvar=True, show_default="the model's configuration")]
MaxSeqOpt = Annotated[int | None, setting(
    "max_seq_len", "--max-seq-len", help="Truncate documents to this many tokens.", panel=_MODEL, metavar="TOKENS",
    default="the model's maximum")]

PromptOpt = Annotated[str | None, setting(
    "prompt", "--prompt", help="Text put before every document, counted in its tokens (\"\" for none); wins over "
    "--prompt-name.", panel=_MODEL, metavar="TEXT", default="the model's default prompt, if it has one")]
PromptNameOpt = Annotated[str | None, setting(
    "prompt_name", "--prompt-name", help="Put the model's prompt of this name (its "
    "config_sentence_transformers.json `prompts`, such as query or document) before every document.",
    panel=_MODEL, metavar="NAME", default="the model's default_prompt_name")]

# -- Output (fixed by the job's producer: every worker writes the job's parts alike)

TruncateDimOpt = Annotated[int | None, setting(
    "truncate_dim", "--truncate-dim", help="Keep the first N dimensions (Matryoshka models), renormalized when the "
    "model normalizes.", panel=_OUTPUT, metavar="N", default="all")]
ChunkOpt = Annotated[int, setting(
    "chunk_tokens", "--chunk", help="Cut documents longer than this many tokens (special and prompt tokens "
    "included) into chunks, each a row with chunk_index, n_chunks and token offsets, instead of truncating "
    "(0: truncate at max-seq-len).", panel=_OUTPUT, metavar="TOKENS")]
OverlapOpt = Annotated[int, setting(
    "chunk_overlap", "--overlap", help="Text tokens that neighbouring chunks share (with --chunk).",
    panel=_OUTPUT, metavar="TOKENS")]
CalibrationOpt = Annotated[str | None, setting(
    "calibration", "--calibration", help="For int8/uint8 output: the ranges, as a .npy or .json [[min...], "
    "[max...]], or a Parquet file of float embeddings to take them from.", panel=_OUTPUT, metavar="FILE",
    default="from --calibration-docs documents of the source")]
CalibrationDocsOpt = Annotated[int, setting(
    "calibration_docs", "--calibration-docs", help="Documents of the source embedded to calibrate int8/uint8 "
    "output (in runs spread over the source).", panel=_OUTPUT, metavar="N")]

# -- Producer

BatchSizeOpt = Annotated[int, setting("batch_size", "--batch-size", help="Documents per stream message.",
                                      panel=_PRODUCER, metavar="N")]
BacklogOpt = Annotated[int, setting(
    "backlog", "--backlog", help="Unsettled messages in the stream before the producer waits (bounds Redis "
    "memory).", panel=_PRODUCER, metavar="N")]
MaxDocOpt = Annotated[int, setting(
    "max_doc_bytes", "--max-doc-bytes", help="Documents larger than this are dead-lettered.", panel=_PRODUCER,
    metavar="BYTES")]
AllowEmptyOpt = Annotated[bool, flag(
    "--allow-empty/--no-allow-empty", help="Embed empty documents instead of dead-lettering them.",
    panel=_PRODUCER, setting_name="allow_empty")]
AllowDupOpt = Annotated[bool, flag(
    "--allow-duplicate-ids/--no-allow-duplicate-ids",
    help="Embed the first of several documents with the same id and dead-letter the others, instead of "
    "refusing the source.", panel=_PRODUCER, setting_name="allow_duplicate_ids")]
UntilCompleteOpt = Annotated[bool, flag(
    "--until-complete/--exit-when-published", help="Stay after publishing until the job is complete (settled "
    "and its output final), publishing again whatever a Redis crash or failover lost; for services.",
    panel=_PRODUCER)]
PretokOpt = Annotated[bool, flag(
    "--pretokenize/--no-pretokenize", help="Tokenize in the producer, so token ids travel in the messages "
    "(moves tokenization to CPU nodes).", panel=_PRODUCER, setting_name="pretokenize")]
CompressOpt = Annotated[bool, flag(
    "--compress/--no-compress", help="Compress each message with zstd (a third of the bytes of text, about half "
    "of token ids), so one Redis server feeds more GPUs, for some producer CPU; workers read both forms.",
    panel=_PRODUCER, setting_name="compress")]

# -- Operations

MetricsPortOpt = Annotated[int | None, setting(
    "metrics_port", "--metrics-port", help="Serve Prometheus metrics at http://HOST:PORT/metrics (0: any free "
    "port, logged).", panel=_OPERATIONS, metavar="PORT", default="none")]

# -- Worker

BackendOpt = Annotated[Backend, setting(
    "backend", "--backend", help="Inference engine: auto (the fastest available), torch, onnxruntime or tensorrt.",
    panel=_WORKER, metavar="ENGINE")]
DeviceOpt = Annotated[str, setting(
    "device", "--device", help="auto (cuda if present), cpu, cuda or cuda:N.", panel=_WORKER, metavar="DEVICE")]
PrecisionOpt = Annotated[Precision, setting(
    "precision", "--precision", help="auto: fp16 on GPUs, fp32 on CPUs.", panel=_WORKER)]
ThreadsOpt = Annotated[int | None, setting(
    "threads", "--threads", help="CPU threads for inference on CPU.", panel=_WORKER, metavar="N",
    default="all cores")]
TokenBudgetOpt = Annotated[int | None, setting(
    "token_budget", "--token-budget", help="Padded tokens per engine batch.", panel=_WORKER, metavar="TOKENS",
    default="4096 on CPU, 65536 on GPU")]
SeqLensOpt = Annotated[str | None, setting(
    "seq_lens", "--seq-lens", help="Bucket sequence lengths, comma-separated (`embedq profile SOURCE` proposes "
    "them).", panel=_WORKER, metavar="N,N,...", default="steps of about 1.4x up to the model's maximum")]
TokProcOpt = Annotated[int | None, setting(
    "tokenizer_processes", "--tokenizer-processes", help="Processes that tokenize for the worker (0: in the "
    "worker).", panel=_WORKER, metavar="N",
    default="on a GPU node 2 for WordPiece models (nanotoken), else all cores but two; 0 on a CPU node")]
GraphsOpt = Annotated[bool, flag(
    "--cuda-graphs/--no-cuda-graphs", help="Capture one CUDA graph per profile (on CUDA).", panel=_WORKER,
    setting_name="cuda_graphs")]
UnpadOpt = Annotated[Unpad, setting(
    "unpad", "--unpad", help="Run BERT-family models on their real tokens only, without padding (on CUDA); "
    "auto: for models of hidden size 768 and up.", panel=_WORKER)]
GpusOpt = Annotated[str | None, typer.Option(
    "--gpus", help="One worker process per GPU: all, or GPU numbers such as 0,1. A supervisor divides the CPU "
    "cores between them, forwards signals (the first drains them all) and restarts a worker that crashed.",
    rich_help_panel=_NODE, envvar="EMBEDQ_GPUS", show_envvar=True, metavar="all|N,N,...", show_default="one worker")]
WorkersOpt = Annotated[int | None, typer.Option(
    "--workers", help="Worker processes per GPU of --gpus, or on --device (CPU nodes: the cores are divided "
    "between them), under one supervisor.", rich_help_panel=_NODE, envvar="EMBEDQ_WORKERS", show_envvar=True,
    metavar="N", show_default="1")]
RebuildOpt = Annotated[bool, flag(
    "--rebuild-engines/--no-rebuild-engines", help="Rebuild a cached TensorRT engine built from anything else "
    "(model, tokenizer, profiles, precision, TensorRT, GPU); with --no-rebuild-engines such a worker stops and "
    "says what differs.", panel=_WORKER, setting_name="rebuild_engines")]
WindowOpt = Annotated[int, setting(
    "window_docs", "--window-docs", help="At most this many documents sorted by length together and written as "
    "one part.", panel=_WORKER, metavar="N")]
WindowSecondsOpt = Annotated[float, setting(
    "window_seconds", "--window-seconds", help="A window also closes after about this many seconds of engine "
    "work at the measured speed (at most a third of the lease), so slow devices commit often.", panel=_WORKER,
    metavar="SECONDS")]
LeaseOpt = Annotated[float, setting(
    "lease_seconds", "--lease-seconds", help="A worker silent this long loses its batches to others.",
    panel=_WORKER, metavar="SECONDS")]
FailuresOpt = Annotated[int, setting(
    "max_failures", "--max-failures", help="Failed attempts before a document is dead-lettered.", panel=_WORKER,
    metavar="N")]
DeliveriesOpt = Annotated[int, setting(
    "max_deliveries", "--max-deliveries", help="Workers that died while working on a batch before it is split to "
    "find the culprit (a lone document is then dead-lettered); workers that merely held it do not count.",
    panel=_WORKER, metavar="N")]
ShutdownOpt = Annotated[float, setting(
    "shutdown_timeout", "--shutdown-timeout", help="Seconds to finish the work on the engine after SIGTERM or "
    "Ctrl-C; the rest is handed back at once.", panel=_WORKER, metavar="SECONDS")]
DtypeOpt = Annotated[OutputDtype, setting(
    "output_dtype", "--output-dtype", help="Type of the embeddings in the Parquet output (binary types: 8 "
    "dimensions a byte); fixed by the job's producer.", panel=_OUTPUT)]
AllowDeadOpt = Annotated[bool, flag(
    "--allow-dead-letters", help="Count dead-lettered documents as accounted for: exit 0 when the job is "
    "complete with dead letters (they are listed in the output's _dead_letters.jsonl), instead of 8.")]
