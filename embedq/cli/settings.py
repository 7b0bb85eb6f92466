"""From a command's flags to what it runs on: `Settings`, the source spec, Redis and the job's keys.

Every command turns its flags into settings the same way, through `settings_from(ctx)`: the
parameters of the command that are `Settings` fields (by name; `--redis` is `redis_url`), so a new
setting needs its option declared and added to a command's signature, nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import TYPE_CHECKING, Any

import typer

from embedq.config import Settings, load_settings
from embedq.errors import UsageError

if TYPE_CHECKING:
    import redis

    from embedq.keys import JobKeys
    from embedq.model import ModelInfo
    from embedq.producer.sources import SourceSpec

# Parameters whose name is not the setting they set.
_RENAMED = {"redis": "redis_url"}
_SETTING_NAMES = frozenset(f.name for f in fields(Settings))
_TEXT_UNITS = ("line", "file")


def setting_flags(params: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters among `params` that are settings, under their setting names."""
    renamed = ((_RENAMED.get(name, name), value) for name, value in params.items())
    return {name: value for name, value in renamed if name in _SETTING_NAMES}


def settings_from(ctx: typer.Context, **overrides: Any) -> Settings:
    """The settings for this command: its flags (those given), over `EMBEDQ_*` and `embedq.toml`;
    `overrides` (setting names) over all of them."""
    return load_settings({**setting_flags(ctx.params), **overrides})


def connect(settings: Settings) -> redis.Redis:
    """A client of the Redis the settings name, checked to answer."""
    from embedq.connection import connect as connect_redis

    return connect_redis(settings.redis())


def job_in_redis(ctx: typer.Context, job: str) -> tuple[redis.Redis, JobKeys]:
    """A checked client and the job's keys, for the commands that only talk to Redis."""
    settings = settings_from(ctx)
    return connect(settings), job_keys(job, settings)


def job_keys(job: str, settings: Settings) -> JobKeys:
    """The Redis keys of `job` under the settings' key prefix."""
    from embedq.keys import JobKeys

    return JobKeys(job, settings.key_prefix)


def source_spec(params: Mapping[str, Any]) -> SourceSpec:
    """How to read SOURCE, from the command's source argument and `Source` options."""
    from embedq.producer.sources import SourceSpec

    if params["text_unit"] not in _TEXT_UNITS:
        raise UsageError(f"--text-unit must be 'line' or 'file', got {params['text_unit']!r}")
    return SourceSpec(path=params["source"], format=params["fmt"], id_field=params["id_field"],
                      text_field=params["text_field"], text_unit=params["text_unit"])


def load_model(settings: Settings, path: str | None = None) -> ModelInfo:
    """The model at `path`, else the settings' model (else the bundled one), with the settings'
    pooling, normalization and maximum length."""
    from embedq.model import load_model_info

    return load_model_info(path if path is not None else settings.model, pooling=settings.pooling,
                           normalize=settings.normalize, max_seq_len=settings.max_seq_len)
