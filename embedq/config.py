"""Settings, resolved in the order: command-line flags > `EMBEDQ_*` environment > `embedq.toml` > defaults.

`embedq.toml` is read from the current directory, or from the file `EMBEDQ_CONFIG` names; its keys
are the field names below, at top level or under an `[embedq]` table.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

import tomllib

from embedq.connection import DEFAULT_URL, RedisSettings
from embedq.errors import UsageError
from embedq.protocol import Limits

CONFIG_FILE = "embedq.toml"
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
    pooling: str | None = None  # None: what the model's configuration says
    normalize: bool | None = None
    max_seq_len: int | None = None
    # Producer
    batch_size: int = 512  # documents per stream message
    max_doc_bytes: int = Limits.max_doc_bytes
    max_message_bytes: int = Limits.max_message_bytes
    backlog: int = 512  # stream entries not yet acknowledged before the producer waits
    allow_empty: bool = False
    allow_duplicate_ids: bool = False
    pretokenize: bool = False
    # Worker
    backend: str = "auto"
    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    token_budget: int | None = None  # padded tokens per engine batch; None: by device
    seq_lens: str | None = None  # comma-separated profile lengths (from `embedq profile`); None: default table
    tokenizer_processes: int | None = None  # None: all cores but two on a GPU node, none on a CPU node
    # One CUDA graph per profile: with them the H200 ran the gloss corpus end to end at 148k docs/s,
    # without them at 38k (the engine thread's per-kernel Python dispatch starves under the other
    # threads; `embedq bench`, 2026-11-28). Only used on CUDA.
    cuda_graphs: bool = True
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
    output_dtype: str = "float32"

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
        positive = ("batch_size", "max_doc_bytes", "max_message_bytes", "backlog", "window_docs",
                    "prefetch", "max_failures", "max_deliveries")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UsageError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.max_deliveries < 2:
            raise UsageError("max-deliveries must be at least 2 (the first delivery counts as one)")
        if self.window_seconds <= 0:
            raise UsageError(f"window-seconds must be positive, got {self.window_seconds}")
        if self.lease_seconds < 1:
            raise UsageError(f"lease-seconds must be at least 1, got {self.lease_seconds}")
        if self.output_dtype not in ("float32", "float16"):
            raise UsageError(f"output-dtype must be float32 or float16, got {self.output_dtype!r}")
        if self.precision not in ("auto", "fp32", "fp16", "bf16"):
            raise UsageError(f"precision must be auto, fp32, fp16 or bf16, got {self.precision!r}")
        if self.pooling not in (None, "mean", "cls", "last"):
            raise UsageError(f"pooling must be mean, cls or last, got {self.pooling!r}")
        if self.seq_lens is not None:
            parse_seq_lens(self.seq_lens)
        return self


def load_settings(flags: dict[str, Any] | None = None, *, environ: dict[str, str] | None = None,
                  config_file: str | os.PathLike[str] | None = None) -> Settings:
    """Merge defaults, the config file, the environment and the flags that were given (not None)."""
    environ = dict(os.environ) if environ is None else environ
    hints = get_type_hints(Settings)
    values: dict[str, Any] = {}
    path = Path(config_file or environ.get("EMBEDQ_CONFIG") or CONFIG_FILE)
    if path.is_file():
        values.update(_read_config_file(path, hints))
    elif config_file is not None or "EMBEDQ_CONFIG" in environ:
        raise UsageError(f"Configuration file {path} does not exist.")
    for field in fields(Settings):
        raw = environ.get(f"EMBEDQ_{field.name.upper()}")
        if raw is not None and raw != "":
            values[field.name] = _parse(field.name, raw, hints[field.name], f"EMBEDQ_{field.name.upper()}")
    values.update({k: v for k, v in (flags or {}).items() if v is not None})
    unknown = set(values) - {f.name for f in fields(Settings)}
    if unknown:
        raise UsageError(f"Unknown setting(s): {', '.join(sorted(unknown))}")
    return dataclasses.replace(Settings(), **values).validate()


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
            raise UsageError(f"{path}: unknown setting {key!r}")
        out[name] = _parse(name, value, hints[name], str(path)) if isinstance(value, str) else value
    return out


def _parse(name: str, raw: str, hint: Any, where: str) -> Any:
    text = str(hint)
    try:
        if "bool" in text:
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if "int" in text:
            return int(raw)
        if "float" in text:
            return float(raw)
    except ValueError as exc:
        raise UsageError(f"{where}: {name} = {raw!r} is not a valid {text}") from exc
    return raw


def parse_seq_lens(text: str) -> tuple[int, ...]:
    """`"16,32,64"` -> (16, 32, 64): the sequence lengths of the bucket profiles."""
    try:
        values = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError as exc:
        raise UsageError(f"seq-lens must be comma-separated integers, got {text!r}") from exc
    if not values or values[0] < 1:
        raise UsageError(f"seq-lens must be positive integers, got {text!r}")
    return values
