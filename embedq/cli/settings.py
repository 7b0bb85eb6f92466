"""From a command's flags to what it runs on: `Settings`, the source spec, Redis and the job's keys.

Every command turns its flags into settings the same way, through `settings_from(ctx)`: the
parameters of the command that are `Settings` fields (by name; `--redis` is `redis_url`), so a new
setting needs its option declared and added to a command's signature, nothing else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Mapping
from dataclasses import fields
from typing import TYPE_CHECKING, Any

import typer

from embedq.config import Settings, settings_and_origins
from embedq.connection import DEFAULT_URL, redact
from embedq.progress import Startup

if TYPE_CHECKING:
    import redis

    from embedq.keys import JobKeys
    from embedq.model import ModelInfo
    from embedq.producer.sources import SourceSpec

log = logging.getLogger("embedq")
STARTUP = Startup()
"""This command's start-up steps (`embedq run` and `work` log them once the job is done)."""

# Parameters whose name is not the setting they set.
_RENAMED = {"redis": "redis_url"}
_SETTING_NAMES = frozenset(f.name for f in fields(Settings))


def setting_flags(params: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters among `params` that are settings, under their setting names."""
    renamed = ((_RENAMED.get(name, name), value) for name, value in params.items())
    return {name: value for name, value in renamed if name in _SETTING_NAMES}


def given(ctx: typer.Context, sources: tuple[str, ...] = ("COMMANDLINE", "ENVIRONMENT")) -> dict[str, Any]:
    """The command's parameters that the user gave, as a flag or through their `EMBEDQ_*` variable
    (click's parameter `sources`): not those left at their defaults, so that `embedq.toml` applies
    under them."""
    def source(name: str) -> str | None:
        found = ctx.get_parameter_source(name)
        return None if found is None else found.name

    return {name: value for name, value in ctx.params.items() if source(name) in sources}


def settings_from(ctx: typer.Context, **overrides: Any) -> Settings:
    """The settings for this command: its flags (those given), over `EMBEDQ_*` and `embedq.toml`;
    `overrides` (setting names) over all of them."""
    from_variables = {name: f"EMBEDQ_{name.upper()}" for name in setting_flags(given(ctx, ("ENVIRONMENT",)))}
    settings, where = settings_and_origins({**setting_flags(given(ctx)), **overrides}, origins=from_variables)
    if where and not overrides:
        shown = {name: redact(value) if name == "redis_url" else value
                 for name, value in dataclasses.asdict(settings).items() if name in where}
        log.debug("settings other than the defaults: %s",
                  ", ".join(f"{name}={value!r} ({where[name]})" for name, value in shown.items()))
    return settings


def redis_named(ctx: typer.Context, settings: Settings) -> bool:
    """Whether the user named a Redis (flag, variable or file), rather than leaving the default."""
    return "redis" in given(ctx) or settings.redis_url != DEFAULT_URL


def connect(settings: Settings) -> redis.Redis:
    """A client of the Redis the settings name, checked to answer."""
    from embedq.connection import connect as connect_redis

    return connect_redis(settings.redis())


def job_in_redis(ctx: typer.Context, job: str) -> tuple[redis.Redis, JobKeys]:
    """A checked client and the job's keys, for the commands that only talk to Redis."""
    settings = settings_from(ctx)
    return connect(settings), job_keys(job, settings)


@contextlib.contextmanager
def job_at_output(ctx: typer.Context, job: str, out: str) -> Iterator[tuple[redis.Redis, JobKeys]]:
    """Like `job_in_redis`, for a command given the job's output directory: where `embedq run` kept
    its private Redis's data there (and no Redis was named), that Redis is started for the command."""
    from embedq.connection import kept_state, redis_for_run

    settings = settings_from(ctx)
    if kept_state(out) is None or redis_named(ctx, settings):
        yield connect(settings), job_keys(job, settings)
        return
    with redis_for_run(settings.redis_url, output_dir=out, log=logging.getLogger("embedq").info) as url:
        settings = settings_from(ctx, redis_url=url)
        yield connect(settings), job_keys(job, settings)


def job_keys(job: str, settings: Settings) -> JobKeys:
    """The Redis keys of `job` under the settings' key prefix."""
    from embedq.keys import JobKeys

    return JobKeys(job, settings.key_prefix)


def source_spec(params: Mapping[str, Any]) -> SourceSpec:
    """How to read SOURCE, from the command's source argument and `Source` options."""
    from embedq.producer.sources import SourceSpec

    return SourceSpec(path=params["source"], format=params["fmt"], id_field=params["id_field"],
                      text_field=params["text_field"], text_unit=params["text_unit"])


def load_model(settings: Settings, path: str | None = None) -> ModelInfo:
    """The model at `path`, else the settings' model (else the bundled one), with the settings'
    pooling, normalization, maximum length and prompt."""
    from embedq.model import load_model_info

    return load_model_info(path if path is not None else settings.model, pooling=settings.pooling,
                           normalize=settings.normalize, max_seq_len=settings.max_seq_len, prompt=settings.prompt,
                           prompt_name=settings.prompt_name)
