"""`embedq run --incremental --state DIR`: embed only what changed since the last run with that state.

The steps of embedq.incremental.state, driven here: a finished generation left by an earlier run is
committed first; the source is diffed against the record; the delta is embedded as an ordinary job
(`embed`, which is `embedq run`'s own job runner) into OUT/<generation>/; the record advances.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from embedq.errors import UsageError, VerificationFailed

if TYPE_CHECKING:
    from embedq.incremental.diff import Delta
    from embedq.incremental.state import Generation, Record
    from embedq.producer.spec import SourceSpec

log = logging.getLogger("embedq")

IncrementalOpt = Annotated[bool, typer.Option(
    "--incremental", help="Embed only the documents that are new or changed since the last run with --state, "
    "into a new folder under --out; record the ids gone from the source. Needs --state.")]
StateOpt = Annotated[str | None, typer.Option(
    "--state", metavar="DIR|URI", show_default=False,
    help="Where the incremental record lives (a directory or an object-store URI): per model and settings, "
    "each id's content hash and the generation that holds its vector.")]
NewRecordOpt = Annotated[bool, typer.Option(
    "--new-record", help="Start a record for these model settings when --state holds records of other settings "
    "only (everything is embedded again).")]
IncrementalOutOpt = Annotated[str | None, typer.Option(
    "--out", "-o", metavar="DIR|URI", show_default=False,
    help="With --incremental: where the workers write, each generation into a folder of its own.")]
DedupeOpt = Annotated[bool, typer.Option(
    "--dedupe", help="With --incremental: embed identical texts under different ids once and share the vector.")]

Embed = Callable[["typer.Context", "SourceSpec", str, "str | None", bool], None]


def run_incremental(ctx: typer.Context, spec: SourceSpec, out: str, job: str | None, state: str | None, *,
                    embed: Embed, new_record: bool, dedupe: bool, allow_dead_letters: bool) -> None:
    """The incremental `embedq run`: commit a finished earlier generation, diff, embed the delta, advance."""
    from embedq.producer.spec import SourceSpec

    started = time.monotonic()
    found = _diff(ctx, spec, out, job, state, new_record=new_record, dedupe=dedupe)
    if found is None:
        return
    record, delta = found
    generation = delta.generation
    diffed = time.monotonic() - started
    if generation.documents:
        embed(ctx, SourceSpec(path=str(delta_path(record, generation)), format="parquet", id_field="id",
                              text_field="text"), generation.output, generation.job, True)
    committed = commit_finished(record, only=generation)
    if committed is None:
        raise typer.Exit(1)
    dead = generation.documents - committed.embedded
    typer.echo(f"generation {committed.number} committed: {committed.embedded:,} documents embedded"
               + (f" ({delta.aliases:,} more share their vectors)" if delta.aliases else "")
               + f", {committed.tombstones:,} deleted, {committed.records:,} ids in the record; diff took "
               f"{diffed:.1f} s. Full view: embedq snapshot --state {state} --out SNAPSHOT.parquet")
    if dead:
        typer.echo(f"{dead:,} documents were dead-lettered (see {generation.output}); the next incremental run "
                   "tries them again", err=True)
        if not allow_dead_letters:
            raise typer.Exit(VerificationFailed.exit_code)


Publish = Callable[["typer.Context", "SourceSpec", str], None]


def produce_incremental(ctx: typer.Context, spec: SourceSpec, out: str | None, job: str, state: str | None, *,
                        publish: Publish, new_record: bool, dedupe: bool) -> None:
    """The incremental `embedq produce`: commit a finished earlier generation, diff, and publish the
    delta as its own job for workers anywhere (`embedq work --job ... --out OUT/<generation>`). The
    record advances once that job is complete, at the next incremental run, produce, snapshot or load."""
    from embedq.producer.spec import SourceSpec

    if out is None:
        raise UsageError("produce --incremental needs --out DIR|URI: the workers write each generation's vectors "
                         "into a folder of its own there, which the record points at.")
    found = _diff(ctx, spec, out, job, state, new_record=new_record, dedupe=dedupe)
    if found is None:
        return
    record, delta = found
    generation = delta.generation
    if not generation.documents:  # only deletions: nothing for workers; commit it now
        commit_finished(record, only=generation)
        return
    publish(ctx, SourceSpec(path=str(delta_path(record, generation)), format="parquet", id_field="id",
                            text_field="text"), generation.job)
    typer.echo(f"generation {generation.number}: run workers with `embedq work --job {generation.job} "
               f"--out {generation.output}`; the record advances at the next incremental run, produce, snapshot "
               "or load after its job is complete")


def _diff(ctx: typer.Context, spec: SourceSpec, out: str, job: str | None, state: str | None, *, new_record: bool,
          dedupe: bool) -> tuple[Record, Delta] | None:
    """Open the record, commit what finished, diff the source against it; None if nothing changed."""
    from embedq.cli.settings import load_model, settings_from
    from embedq.incremental.diff import plan
    from embedq.incremental.state import Record, RecordSettings
    from embedq.producer.sources import open_source

    if state is None:
        raise UsageError("--incremental needs --state DIR (or URI): where the record of what was embedded lives.")
    if spec.path == "-":
        raise UsageError("--incremental reads its source twice and compares it with the last run's: give a file "
                         "or directory, not stdin.")
    settings = settings_from(ctx)
    record = Record.open(state, RecordSettings.of(load_model(settings), settings.output_dtype), new_record=new_record)
    commit_finished(record)
    with open_source(spec) as source:
        stem = job or _stem(spec.path)
        delta = plan(record, source, job_stem=stem, output_root=out, dedupe=dedupe)
    base = record.current()
    if delta is None:
        typer.echo(f"nothing changed since generation {base.number if base else 0} "
                   f"({base.records if base else 0:,} ids in the record): nothing to embed")
        return None
    generation = delta.generation
    for other in record.pending():  # sealed by a run whose source has changed since: never to be committed
        if other.name != generation.name:
            log.warning("abandoning generation %s: the source changed since it was sealed; its output %s is no "
                        "longer needed", other.name, other.output)
            record.abandon(other.name)
    typer.echo(f"generation {generation.number}: {delta.added:,} added, {delta.changed:,} changed, "
               f"{delta.deleted:,} deleted, {delta.unchanged:,} unchanged"
               + (f"; {delta.aliases:,} duplicate texts share a vector (--dedupe)" if dedupe else "")
               + (" (resuming its job)" if delta.resumed else ""), err=True)
    return record, delta


def commit_finished(record: Record, *, only: Generation | None = None) -> Generation | None:
    """Commit the sealed generations on the record whose jobs have finished (or just `only`); the
    last one committed, or None if none was ready."""
    from embedq.incremental.advance import advance, finished_parts

    committed = None
    for generation in [only] if only is not None else record.pending():
        parts = finished_parts(generation)
        if parts is None:
            if only is not None:
                typer.echo(f"generation {generation.number}'s job {generation.job} is not complete; run the same "
                           "command again to finish it", err=True)
            continue
        committed = advance(record, generation, parts)
        log.info("committed generation %d of %s (%d ids)", committed.number, record.store, committed.records)
    return committed


def delta_path(record: Record, generation: Generation) -> Path:
    """A local path of the generation's delta.parquet: the file itself in a local state, else a copy
    in the user's cache; its mtime fixed, so a resumed job sees the same source."""
    from embedq.incremental.state import DELTA

    folder = record.store.child(generation.name)
    if folder.filesystem is None:
        target = Path(folder.path(DELTA))
    else:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "embedq" / "deltas"
        target = cache / record.settings.key / generation.name / DELTA
        if not target.exists():
            folder.fetch(DELTA, target)
    # The job's source fingerprint covers the file's mtime: one fixed by the generation's name makes it
    # the same for every run of this generation, even one whose delta was written again before it was
    # sealed (a crash in `diff`) or copied anew.
    fixed = int(generation.name.rsplit("-", 1)[1][:7], 16) * 1_000_000_000
    os.utime(target, ns=(fixed, fixed))
    return target


def _stem(path: str) -> str:
    from embedq.keys import default_job_name

    return default_job_name(path, "x").rsplit("-", 1)[0]
