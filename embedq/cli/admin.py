"""The commands that look after a job in Redis and its output: status, verify, dead letters, gc, delete.

They only talk to Redis (and read the output directory), so they take the Redis options and little else.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer

from embedq.cli.options import DEFAULTS, AsJsonOpt, JobOpt, OutOpt, PrefixOpt, RedisOpt, TlsCaOpt, TlsCertOpt, TlsKeyOpt
from embedq.cli.settings import job_at_output, job_in_redis, settings_from
from embedq.errors import UsageError

if TYPE_CHECKING:
    from redis import Redis

    from embedq.keys import JobKeys

# Skipped dead letters `dead-letter replay` lists one by one; the rest are counted.
_SKIPPED_SHOWN = 20


def status(
    ctx: typer.Context,
    job: JobOpt,
    as_json: AsJsonOpt = False,
    watch: Annotated[float | None, typer.Option("--watch", help="Refresh every N seconds until complete: in place "
                                                "on a terminal, appended blocks in a pipe, JSON Lines with --json.",
                                                show_default=False)] = None,
    redis: RedisOpt = DEFAULTS.redis_url, key_prefix: PrefixOpt = DEFAULTS.key_prefix, tls_ca: TlsCaOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    """Show a job's counts: produced, in the stream, committed, dead-lettered, workers, throughput."""
    from embedq.cli.watch import watch as watch_status
    from embedq.status import read_status, render, to_json

    if watch is not None and not watch > 0:  # `not >`: NaN too
        raise UsageError(f"--watch takes a number of seconds greater than 0, got {watch:g}.")
    client, keys = job_in_redis(ctx, job)
    if watch is None:
        current = read_status(client, keys)
        typer.echo(to_json(current) if as_json else render(current))
    else:
        current = watch_status(lambda: read_status(client, keys), watch, as_json=as_json)
    if not current.exists:
        raise typer.Exit(2)


def verify(
    ctx: typer.Context,
    job: JobOpt, out: OutOpt,
    source: Annotated[str | None, typer.Option("--source", help="Check against this source instead of the one "
                                               "recorded in the job.", show_default=False)] = None,
    allow_dead: Annotated[bool, typer.Option("--allow-dead-letters", help="Count dead-lettered ids as "
                                             "accounted for (each must then be in exactly one place).")] = False,
    redis: RedisOpt = DEFAULTS.redis_url, key_prefix: PrefixOpt = DEFAULTS.key_prefix, tls_ca: TlsCaOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    """Check the committed output: every source id exactly once, right dimension, finite values.

    Also rolls committed parts forward, removes orphan parts and writes _manifest.json. Exits 8 if
    anything is missing, duplicated or invalid.
    """
    from embedq.verify import verify_job

    with job_at_output(ctx, job, out) as (client, keys):
        result = verify_job(client, keys, out, source=source, allow_dead=allow_dead,
                            finished_ttl=settings_from(ctx).finished_ttl)
    typer.echo(result.render())
    result.raise_for_failure()


def dead_list(
    ctx: typer.Context,
    job: JobOpt,
    limit: Annotated[int, typer.Option("--limit", help="Show at most this many dead letters.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines for scripts.")] = False,
    out: Annotated[str | None, typer.Option("--out", "-o", help="The job's output directory, whose "
                                            "_dead_letters.jsonl is read once Redis has let a finished job's dead "
                                            "letters expire. Default: the one its workers recorded.",
                                            show_default=False)] = None,
    redis: RedisOpt = DEFAULTS.redis_url, key_prefix: PrefixOpt = DEFAULTS.key_prefix, tls_ca: TlsCaOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    """List dead letters: which documents, why, which worker, how many deliveries."""
    from embedq.deadletter import summary
    from embedq.worker.archive import dead_letters

    client, keys = job_in_redis(ctx, job)
    entries = dead_letters(client, keys, output=out, count=limit)
    for entry in entries:
        letter = entry.letter
        if as_json:
            typer.echo(json.dumps(summary(entry)))
        else:
            ids = ", ".join(map(repr, letter.doc_ids[:5])) + (" ..." if len(letter.doc_ids) > 5 else "")
            typer.echo(f"{entry.dead_id}  {letter.reason}: {len(letter.doc_ids)} doc(s) [{ids}] seq={letter.seq} "
                       f"worker={letter.worker} deliveries={letter.deliveries}"
                       + ("" if letter.replayable else " (not replayable)") + f"\n    {letter.error}")
    if not entries and not as_json:
        typer.echo(f"job {job}: no dead letters")


def dead_replay(
    ctx: typer.Context,
    job: JobOpt,
    ids: Annotated[list[str] | None, typer.Option("--id", help="Dead letter id (repeatable). Default: all.",
                                                   show_default=False)] = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="The job's output directory, whose "
                                            "_dead_letters.jsonl is brought up to date. Default: the one its "
                                            "workers recorded.", show_default=False)] = None,
    redis: RedisOpt = DEFAULTS.redis_url, key_prefix: PrefixOpt = DEFAULTS.key_prefix, tls_ca: TlsCaOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    """Put dead-lettered documents back into the job's stream (after a fix); then run workers again."""
    from embedq import job as job_record
    from embedq.deadletter import list_dead, replay

    client, keys = job_in_redis(ctx, job)
    _restore_archived(client, keys, out)
    entries = list_dead(client, keys, ids=ids)
    if ids and len(entries) != len(ids):
        missing = set(ids) - {e.dead_id for e in entries}
        raise UsageError(f"No dead letter with id {', '.join(sorted(missing))} in job {job!r}.")
    record = job_record.require(client, keys)
    documents, skipped = replay(client, keys, entries, allow_empty=record.allow_empty, limits=record.limits)
    typer.echo(f"job {job}: replayed {documents:,} documents; run `embedq work --job {job}` to embed them"
               if documents else f"job {job}: nothing replayed")
    for dead_id, reason in skipped[:_SKIPPED_SHOWN]:
        typer.echo(f"  skipped {dead_id}: {reason}")
    if len(skipped) > _SKIPPED_SHOWN:
        typer.echo(f"  ... and {len(skipped) - _SKIPPED_SHOWN} more skipped")
    if documents:
        _refresh_dead_letters_file(client, keys, out)


def _restore_archived(client: Redis, keys: JobKeys, out: str | None) -> None:
    """A finished job whose manifest and dead letters Redis lets expire gets them back, from its
    output, before a replay changes it (`worker/archive.py`); they stay until it is finished again."""
    from embedq.job import ARCHIVED_FIELD
    from embedq.worker.archive import unarchive
    from embedq.worker.finalize import recorded_output
    from embedq.worker.output import open_output

    if not client.hexists(keys.stats, ARCHIVED_FIELD):
        return
    location = out or recorded_output(client, keys)
    if location is None:
        raise UsageError(f"Job {keys.job!r} is finished and its dead letters are kept in its output, not in Redis, "
                         "whose copy expires: pass --out DIR, the job's output directory, to replay them from its "
                         "_dead_letters.jsonl.")
    if unarchive(client, keys, open_output(location, create=False)):
        typer.echo(f"job {keys.job}: its manifest and dead letters are back in Redis from {location}, until the job "
                   "is finished again")


def _refresh_dead_letters_file(client: Redis, keys: JobKeys, out: str | None) -> None:
    """After a replay, `_dead_letters.jsonl` must not list the replayed documents any more."""
    from embedq.errors import OutputError
    from embedq.worker.finalize import recorded_output, write_dead_letters_file
    from embedq.worker.output import DEAD_LETTERS_FILE, open_output

    location = out or recorded_output(client, keys)
    if location is None:
        typer.echo(f"  note: the output directory is not known; if it holds {DEAD_LETTERS_FILE}, run this again "
                   "with --out DIR, or `embedq gc --out DIR` once the job is complete, to bring it up to date")
        return
    try:
        left = write_dead_letters_file(client, keys, open_output(location, create=False), only_if_present=True)
    except OutputError as exc:
        typer.echo(f"  note: {DEAD_LETTERS_FILE} in {location} was not updated: {exc}", err=True)
        return
    typer.echo(f"  {DEAD_LETTERS_FILE} in {location}: " + (f"{left:,} documents left" if left else "removed"))


def gc(
    ctx: typer.Context,
    job: JobOpt, out: OutOpt,
    redis: RedisOpt = DEFAULTS.redis_url, key_prefix: PrefixOpt = DEFAULTS.key_prefix, tls_ca: TlsCaOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    """Set orphan parts aside (written but never committed), roll committed ones forward, and
    finalize a complete job's output (_manifest.json, deleting what was set aside)."""
    from embedq import job as job_record
    from embedq.progress import byte_size
    from embedq.worker.finalize import finalize_output
    from embedq.worker.output import open_output

    output = open_output(out, create=False)
    ttl = settings_from(ctx).finished_ttl
    with job_at_output(ctx, job, out) as (client, keys):
        result = finalize_output(client, keys, output, job_record.require(client, keys), finished_ttl=ttl)
        memory = job_record.job_memory(client, keys) if result.finalized else None
    typer.echo(f"job {job}: {len(result.parts)} committed parts; rolled forward {len(result.rolled_forward)}, "
               f"removed {len(result.orphans_set_aside)} visible and {len(result.staged_set_aside)} staged orphans; "
               f"kept {len(result.staged_kept)} staged parts of live workers")
    if result.orphans_set_aside or result.staged_set_aside:
        typer.echo("  orphans are set aside as .part-*.parquet.set-aside (no reader sees them) until the job is "
                   "finalized")
    if result.finalized:
        typer.echo(f"  the job is complete and its output final: _manifest.json written, "
                   f"{len(result.set_aside_deleted)} set-aside parts deleted")
        said = [] if memory is None else [f"Redis holds {byte_size(memory)} of it"]
        if ttl:
            said.append(f"its manifest and dead letters, which the output records, leave Redis in {ttl:,} s")
        typer.echo("  " + "; ".join([*said, f"`embedq delete --job {job}` removes the rest"]))
    if result.missing:
        typer.echo(f"warning: {len(result.missing)} committed parts are missing from {output.location}: "
                   + ", ".join(result.missing[:10]), err=True)
        raise typer.Exit(8)


def delete(
    ctx: typer.Context,
    job: JobOpt,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    redis: RedisOpt = DEFAULTS.redis_url, key_prefix: PrefixOpt = DEFAULTS.key_prefix, tls_ca: TlsCaOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    """Delete a job's keys from Redis (the output directory is left alone)."""
    client, keys = job_in_redis(ctx, job)
    found = [k for pattern in keys.all_patterns() for k in client.scan_iter(match=pattern, count=1000)]
    if not found:
        typer.echo(f"job {job}: no keys")
        return
    if not yes and not typer.confirm(f"Delete {len(found)} keys of job {job!r}?"):
        raise typer.Exit(1)
    client.delete(*found)
    typer.echo(f"job {job}: deleted {len(found)} keys")
