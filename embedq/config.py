"""Settings, resolved in the order: command-line flags > `EMBEDQ_*` environment > `embedq.toml` > defaults.

`embedq.toml` is read from the current directory, or from the file `EMBEDQ_CONFIG` names; its keys
are the field names below, at top level or under an `[embedq]` table.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_type_hints

import tomllib

from embedq.connection import DEFAULT_URL, RedisSettings
from embedq.errors import UsageError
from embedq.protocol import Limits

CONFIG_FILE = "embedq.toml"

# The settings that take one of a few words (what each means: `embedq work --help`).
Backend = Literal["auto", "torch", "onnxruntime", "tensorrt"]
Precision = Literal["auto", "fp32", "fp16", "bf16"]
Pooling = Literal["mean", "cls", "last"]
OutputDtype = Literal["float32", "float16", "int8", "uint8", "binary", "ubinary"]
Unpad = Literal["auto", "on", "off"]
_Options = TypeVar("_Options")


@dataclass(frozen=True)
class Settings:
    """Every tunable of embedq, with the defaults a first run should use."""

    # Redis
    redis_url: str = DEFAULT_URL
    key_prefix: str = "embedq"
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    # Model
    model: str | None = None  # None: the bundled all-MiniLM-L6-v2 (or, for a worker, the job's model)
    pooling: Pooling | None = None  # None: what the model's configuration says
    normalize: bool | None = None
    max_seq_len: int | None = None
    # The prompt put before every text: `prompt` itself, else the model's prompt named `prompt_name`,
    # else the model's default prompt (sentence-transformers' `default_prompt_name`); "" for none.
    prompt: str | None = None
    prompt_name: str | None = None
    # Output (fixed by the job's producer; see `embedq.quantization`)
    truncate_dim: int | None = None  # keep the first N dimensions (Matryoshka models), renormalized
    calibration: str | None = None  # int8/uint8 ranges from this file; None: from a sample of the source
    calibration_docs: int = 1000  # documents of that sample
    # Long documents: cut into chunks of this many tokens (0: truncate at max_seq_len instead), each a
    # row of its own, neighbours sharing `chunk_overlap` tokens (`embedq.chunking`)
    chunk_tokens: int = 0
    chunk_overlap: int = 0
    # Producer
    batch_size: int = 512  # documents per stream message
    max_doc_bytes: int = Limits.max_doc_bytes
    max_message_bytes: int = Limits.max_message_bytes
    backlog: int = 512  # stream entries not yet acknowledged before the producer waits
    allow_empty: bool = False
    allow_duplicate_ids: bool = False
    pretokenize: bool = False
    compress: bool = False  # zstd on each message (embedq.protocol): fewer bytes through Redis, more producer CPU
    # Worker
    backend: Backend = "auto"
    device: str = "auto"
    precision: Precision = "auto"
    threads: int | None = None
    token_budget: int | None = None  # padded tokens per engine batch; None: by device
    seq_lens: str | None = None  # comma-separated profile lengths (from `embedq profile`); None: default table
    tokenizer_processes: int | None = None  # None: on a GPU node 2 (nanotoken) or all cores but two; none on CPU
    # One CUDA graph per profile: with them the H200 ran the gloss corpus end to end at 148k docs/s,
    # without them at 38k (the engine thread's per-kernel Python dispatch starves under the other
    # threads; `embedq bench`, 2026-11-28). Only used on CUDA.
    cuda_graphs: bool = True
    # BERT-family models on packed tokens without their padding (variable-length flash attention),
    # eager. "auto": for models of hidden size 768 and up. On the H200 (2026-11-30) BERT-base ran
    # faster so in every scenario (passages pretokenized 1.96M against 1.69M tokens/s end to end);
    # MiniLM's GPU-only figure rose too (9.3M against 7.8M), but end to end the engine thread's
    # Python dispatch of ~100 small kernels per batch held it back (worker-tokenized passages 2.03M
    # against 2.35M in CUDA graphs). Other architectures run padded (in CUDA graphs, as above).
    unpad: Unpad = "auto"
    # A cached TensorRT plan built from anything else (model, ONNX, tokenizer, profiles, precision,
    # TensorRT, GPU) is built again; off, the worker refuses it and says what differs.
    rebuild_engines: bool = True
    window_docs: int = 16384  # at most this many documents sorted and bucketed together, and written as one part
    # ... and about this many seconds of engine work: a window closes at whichever comes first, so a
    # CPU worker (hundreds of documents a second) commits every few seconds and keeps its lease,
    # while a GPU worker fills whole windows. Measured speed decides; capped at a third of the lease.
    window_seconds: float = 5.0
    prefetch: int = 2  # windows prepared ahead of the engine
    commit_threads: int = 2  # parts written in parallel
    lease_seconds: float = 30.0
    max_failures: int = 3
    max_deliveries: int = 5
    shutdown_timeout: float = 60.0
    disk_retry_seconds: float = 300.0
    redis_retry_seconds: float = 600.0
    output_dtype: OutputDtype = "float32"
    # Operations
    metrics_port: int | None = None  # serve Prometheus metrics on this port (0: any free one)
    # Seconds a finished job's manifest and dead letters stay in Redis once the output records them
    # (`_manifest.json`, `_dead_letters.jsonl`); 0 keeps them. The job's record and counters stay.
    finished_ttl: int = 7 * 24 * 3600

    def redis(self) -> RedisSettings:
        return RedisSettings(url=self.redis_url, tls_ca=self.tls_ca, tls_cert=self.tls_cert, tls_key=self.tls_key)

    def limits(self) -> Limits:
        return Limits(max_message_bytes=self.max_message_bytes, max_doc_bytes=self.max_doc_bytes)

    def options_for(self, cls: type[_Options], **overrides: Any) -> _Options:
        """An options dataclass (`WorkerOptions`, `ProducerOptions`...) with every field it shares with
        the settings taken from them: the one mapping from settings to a component's options."""
        names = {f.name for f in fields(Settings)}
        shared = {f.name: getattr(self, f.name) for f in fields(cls) if f.name in names}  # type: ignore[arg-type]
        return cls(**{**shared, **overrides})

    def validate(self) -> Settings:
        """Check every value; a `UsageError` names the setting and the form it takes."""
        for f in fields(self):
            problem = check(f.name, getattr(self, f.name))
            if problem is not None:
                raise UsageError(f"{f.name.replace('_', '-')} {problem}")
        if self.max_deliveries < 2:
            raise UsageError("max-deliveries must be at least 2 (the first delivery counts as one)")
        return self


CHOICES: dict[str, tuple[str | None, ...]] = {
    "backend": get_args(Backend), "precision": get_args(Precision), "pooling": (None, *get_args(Pooling)),
    "output_dtype": get_args(OutputDtype), "unpad": get_args(Unpad),
}
_POSITIVE = ("batch_size", "max_doc_bytes", "max_message_bytes", "backlog", "window_docs", "prefetch",
             "commit_threads", "max_failures", "max_deliveries", "window_seconds", "shutdown_timeout",
             "token_budget", "max_seq_len", "threads", "disk_retry_seconds", "redis_retry_seconds",
             "truncate_dim", "calibration_docs")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check(name: str, value: Any) -> str | None:
    """What is wrong with `value` for the setting `name` ("must be ..."), or None if it is right."""
    if name in CHOICES and value not in CHOICES[name]:
        words = [c for c in CHOICES[name] if c is not None]
        return f"must be one of {', '.join(words)}; got {value!r}"
    if name == "device" and not _DEVICE.match(str(value)):
        return f"must be auto, cpu, cuda or cuda:N (N a GPU number); got {value!r}"
    if name in _POSITIVE and value is not None and value <= 0:
        return f"must be positive; got {value}"
    if name == "metrics_port" and value is not None and not 0 <= value <= 65535:
        return f"must be a TCP port (0 to 65535); got {value}"
    if name == "finished_ttl" and value < 0:
        return f"must be 0 (keep them) or a number of seconds; got {value}"
    if name == "tokenizer_processes" and value is not None and value < 0:
        return f"must be 0 (tokenize in the worker) or more; got {value}"
    if name in ("chunk_tokens", "chunk_overlap") and value < 0:
        return f"must be 0 or more; got {value}"
    if name == "lease_seconds" and value < 1:
        return f"must be at least 1; got {value}"
    if name == "seq_lens" and value is not None:
        try:
            parse_seq_lens(value)
        except UsageError as exc:
            return str(exc).removeprefix("seq-lens ")
    return None


def load_settings(flags: dict[str, Any] | None = None, *, environ: dict[str, str] | None = None,
                  config_file: str | os.PathLike[str] | None = None,
                  origins: dict[str, str] | None = None) -> Settings:
    """Merge defaults, the config file, the environment and the flags that were given (not None).

    A wrong value is a `UsageError` that names where it came from: the flag (or, through `origins`,
    the variable a flag was read from), the `EMBEDQ_*` variable, or the file and key.
    """
    return settings_and_origins(flags, environ=environ, config_file=config_file, origins=origins)[0]


def settings_and_origins(flags: dict[str, Any] | None = None, *, environ: dict[str, str] | None = None,
                         config_file: str | os.PathLike[str] | None = None,
                         origins: dict[str, str] | None = None) -> tuple[Settings, dict[str, str]]:
    """`load_settings`, and where each value that is not a default came from ("--flag",
    "EMBEDQ_NAME", "FILE: key"): what `embedq config show` prints."""
    environ = dict(os.environ) if environ is None else environ
    hints = get_type_hints(Settings)
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    path = Path(config_file or environ.get("EMBEDQ_CONFIG") or CONFIG_FILE)
    if path.is_file():
        for name, value in _read_config_file(path, hints).items():
            values[name], where[name] = value, f"{path}: {name}"
    elif config_file is not None or "EMBEDQ_CONFIG" in environ:
        raise UsageError(f"Configuration file {path} does not exist.")
    for field in fields(Settings):
        variable = f"EMBEDQ_{field.name.upper()}"
        raw = environ.get(variable)
        if raw is not None and raw != "":
            values[field.name], where[field.name] = _parse(raw, hints[field.name], variable), variable
    for name, value in (flags or {}).items():
        if value is not None:
            values[name] = value
            where[name] = (origins or {}).get(name) or f"--{name.replace('_', '-')}"
    unknown = set(values) - {f.name for f in fields(Settings)}
    if unknown:
        raise UsageError(f"Unknown setting(s): {', '.join(sorted(unknown))}")
    for name, value in values.items():
        problem = check(name, value)
        if problem is not None:
            raise UsageError(f"{where[name]} {problem}")
    return dataclasses.replace(Settings(), **values).validate(), where


def as_environment(settings: Settings) -> dict[str, str]:
    """The `EMBEDQ_*` variables that give a child process exactly these settings, whatever its
    environment and `embedq.toml` say (a variable ranks above the file; None is left unset)."""
    variables = {}
    for f in fields(Settings):
        value = getattr(settings, f.name)
        if value is None:
            continue
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        variables[f"EMBEDQ_{f.name.upper()}"] = text
    return variables


def _read_config_file(path: Path, hints: dict[str, Any]) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"Cannot read {path}: {exc}") from exc
    table = data.get("embedq", data)
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in hints:
            raise UsageError(f"{path}: unknown setting {key!r}; the settings are listed in the README")
        out[name] = _parse(value, hints[name], f"{path}: {key}")
    return out


_FORMS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _parse(raw: Any, hint: Any, where: str) -> Any:
    """`raw` (a variable's text, or a TOML value) as the setting's type; a `UsageError` naming
    `where` and the expected form if it is not one."""
    kinds = [k for k in (bool, int, float, str) if k in (get_args(hint) or (hint,))]
    kind = kinds[0] if kinds else str
    if not isinstance(raw, str):  # TOML already typed it: check the type
        if _is_a(raw, kind):
            return float(raw) if kind is float else raw
        raise UsageError(f"{where} must be {_FORMS[kind]}; got {raw!r}")
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
    except ValueError:
        form = _FORMS[kind] + (" (1/0, yes/no, on/off also work)" if kind is bool else "")
        raise UsageError(f"{where} must be {form}; got {raw!r}") from None
    return raw


def _is_a(value: Any, kind: type) -> bool:
    if isinstance(value, bool):  # a bool is an int to isinstance
        return kind is bool
    return isinstance(value, (int, float)) if kind is float else isinstance(value, kind)


def parse_seq_lens(text: str) -> tuple[int, ...]:
    """`"16,32,64"` -> (16, 32, 64): the sequence lengths of the bucket profiles."""
    try:
        values = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError as exc:
        raise UsageError(f"seq-lens must be comma-separated integers, got {text!r}") from exc
    if not values or values[0] < 1:
        raise UsageError(f"seq-lens must be positive integers, got {text!r}")
    return values
