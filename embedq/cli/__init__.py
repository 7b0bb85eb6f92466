"""The `embedq` command line.

    embedq run SOURCE --out DIR            embed a corpus end to end on this machine
    embedq produce SOURCE --job NAME       publish a corpus as a job
    embedq work --job NAME --out DIR       embed a job's batches (run one per GPU, on any node)
    embedq status --job NAME               counts, workers and throughput
    embedq verify --job NAME --out DIR     every id exactly once, right dimension, finite values
    embedq dead-letter list|replay         inspect and replay documents set aside
    embedq gc --job NAME --out DIR         remove orphan parts
    embedq delete --job NAME               remove a job's keys from Redis
    embedq engine export|build             the ONNX graph, TensorRT engines ahead of time
    embedq snapshot --state DIR --out F    an incremental record's full view (`run --incremental`)
    embedq load --state DIR --into URI     keep a LanceDB table current with that view

Settings come from flags, then `EMBEDQ_*` variables, then `embedq.toml`. Exit codes: 0 success,
1 unexpected error, 2 usage, 3 source, 4 model, 5 Redis, 6 output, 7 job mismatch, 8 verification
failed or documents dead-lettered, 10 engine, 130 interrupted.

This module holds the app, the commands' registration and the mapping of errors to exit codes; the
commands live in `jobs` (produce, work, run), `admin` (status, verify, dead-letter, gc, delete),
`profile` and `bench`, their options in `options`, and flags become settings in `settings`. Modules
import their heavy libraries (torch, pyarrow, the wings) inside the commands, so `--help` stays fast.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any, Literal

import typer

from embedq import __version__
from embedq.cli import admin, bench, configuration, engine, index, jobs, logs, profile, run
from embedq.cli.settings import STARTUP
from embedq.errors import EmbedqError, RedisUnavailable

__all__ = ["app", "main"]

class _Command(typer.core.TyperCommand):
    """A command whose `--help` shows no value type for flags (typer prints `<bool>` for them)."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_without_type(super().get_params(ctx))


class _Group(typer.core.TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_without_type(super().get_params(ctx))


def _flags_without_type(params: list[Any]) -> list[Any]:
    for param in params:
        if (getattr(param, "is_flag", False) or getattr(param, "count", False)) and param.metavar is None:
            param.metavar = ""
        elif param.param_type_name == "argument" and param.metavar:  # its name says what it is
            param.display_type_rich = lambda ctx: None
    return params


app = typer.Typer(
    name="embedq",
    cls=_Group,
    help="Bulk text embedding over Redis streams: producers publish batches, workers embed them into "
         "Parquet, every document exactly once.",
    epilog="Settings come from flags, then EMBEDQ_* variables, then embedq.toml (see `embedq COMMAND --help`). "
           "Exit codes: 0 done, 1 unexpected error, 2 usage, 3 source, 4 model, 5 Redis, 6 output, 7 job mismatch, "
           "8 documents missing or dead-lettered, 10 engine or device, 130 interrupted.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
dead_app = typer.Typer(help="Inspect and replay dead-lettered documents.", no_args_is_help=True,
                       rich_markup_mode="markdown", cls=_Group)
app.add_typer(dead_app, name="dead-letter")
engine_app = typer.Typer(help="Export the ONNX graph and build TensorRT engines ahead of time.", no_args_is_help=True,
                         rich_markup_mode="markdown", cls=_Group)
app.add_typer(engine_app, name="engine")
config_app = typer.Typer(help="The effective configuration and where each value comes from.", no_args_is_help=True,
                         rich_markup_mode="markdown", cls=_Group)
app.add_typer(config_app, name="config")

# In the order `embedq --help` lists them.
for command in (jobs.produce, jobs.work, run.run, profile.profile, bench.bench, admin.status, admin.verify,
                admin.gc, admin.delete, index.snapshot, index.load):
    app.command(cls=_Command)(command)
dead_app.command("list", cls=_Command)(admin.dead_list)
dead_app.command("replay", cls=_Command)(admin.dead_replay)
engine_app.command("export", cls=_Command)(engine.export)
engine_app.command("build", cls=_Command)(engine.build)
config_app.command("show", cls=_Command)(configuration.show)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"embedq {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, show_default=False,
                                         help="More log output: -v adds embedq's debug lines, -vv also those "
                                         "of the libraries it uses (and their progress bars).")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
    log_format: Annotated[Literal["text", "json"], typer.Option(
        "--log-format", envvar="EMBEDQ_LOG_FORMAT", show_envvar=True,
        help="Log lines as text, or as JSON Lines (time, level, logger, message) for log shippers.")] = "text",
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    logs.configure(verbose, quiet, log_format)


def main() -> None:
    """Entry point: run the CLI, turning embedq's errors into a message and an exit code."""
    import redis

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    STARTUP.mark("python and imports")
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
