"""`embedq config show`: the settings a command would start from, and where each value came from."""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated

import typer

from embedq.cli.options import AsJsonOpt


def show(
    as_json: AsJsonOpt = False,
    config: Annotated[str | None, typer.Option(
        "--config", help="Read this file instead of ./embedq.toml (or $EMBEDQ_CONFIG).", metavar="FILE",
        show_default=False)] = None,
) -> None:
    """Print every setting's effective value and where it came from: an EMBEDQ_* variable, the file
    (embedq.toml, or $EMBEDQ_CONFIG) and its key, or the default. A flag given to a command overrides
    all of these for that command; `-v` logs the settings a command runs with, flags included.
    An invalid value is an error that names its source.
    """
    from embedq.config import Settings, settings_and_origins
    from embedq.connection import redact

    settings, where = settings_and_origins(config_file=config)
    rows = []
    for field in dataclasses.fields(Settings):
        value = getattr(settings, field.name)
        if field.name == "redis_url":
            value = redact(value)
        rows.append({"setting": field.name, "value": value, "from": where.get(field.name, "default")})
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    width = max(len(r["setting"]) for r in rows)
    shown = max(len(_text(r["value"])) for r in rows)
    for row in rows:
        typer.echo(f"{row['setting']:<{width}}  {_text(row['value']):<{shown}}  {row['from']}")


def _text(value: object) -> str:
    return "-" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
