"""The commands that look after a job in Redis and its output: status, verify, dead letters, gc, delete.

They only talk to Redis (and read the output directory), so they take the Redis options and little else.
"""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer

from embedq.cli.options import AsJsonOpt, JobOpt, OutOpt, PrefixOpt, RedisOpt, TlsCaOpt, TlsCertOpt, TlsKeyOpt
from embedq.cli.settings import job_in_redis
from embedq.errors import UsageError

# Skipped dead letters `dead-letter replay` lists one by one; the rest are counted.
_SKIPPED_SHOWN = 20


def status(
    ctx: typer.Context,
    job: JobOpt,
    as_json: AsJsonOpt = False,
    watch: Annotated[float | None, typer.Option("--watch", help="Refresh every N seconds until complete.",
                                                show_default=False)] = None,
    redis: RedisOpt = None, key_prefix: PrefixOpt = None, tls_ca: TlsCaOpt = None, tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    """Show a job's counts: produced, in the stream, committed, dead-lettered, workers, throughput."""
    from embedq.status import read_status, render, to_json

    client, keys = job_in_redis(ctx, job)
    while True:
        current = read_status(client, keys)
        typer.echo(to_json(current) if as_json else render(current))
        if watch is None or current.complete or not current.exists:
            break
        time.sleep(watch)
        typer.echo("")
    if not current.exists:
        raise typer.Exit(2)


def verify(
    ctx: typer.Context,
    job: JobOpt, out: OutOpt,
    source: Annotated[str | None, typer.Option("--source", help="Check against this source instead of the one "
                                               "recorded in the job.", show_default=False)] = None,
    allow_dead: Annotated[bool, typer.Option("--allow-dead-letters", help="Count dead-lettered ids as "
                                             "accounted for (each must then be in exactly one place).")] = False,
    redis: RedisOpt = None, key_prefix: PrefixOpt = None, tls_ca: TlsCaOpt = None, tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    """Check the committed output: every source id exactly once, right dimension, finite values.

    Also rolls committed parts forward, removes orphan parts and writes _manifest.json. Exits 8 if
    anything is missing, duplicated or invalid.
    """
    from embedq.verify import verify_job

    client, keys = job_in_redis(ctx, job)
    result = verify_job(client, keys, out, source=source, allow_dead=allow_dead)
    typer.echo(result.render())
    result.raise_for_failure()


def dead_list(
    ctx: typer.Context,
    job: JobOpt,
    limit: Annotated[int, typer.Option("--limit", help="Show at most this many dead letters.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines for scripts.")] = False,
    redis: RedisOpt = None, key_prefix: PrefixOpt = None, tls_ca: TlsCaOpt = None, tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    """List dead letters: which documents, why, which worker, how many deliveries."""
    from embedq.deadletter import list_dead, summary

    client, keys = job_in_redis(ctx, job)
    entries = list_dead(client, keys, count=limit)
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
    redis: RedisOpt = None, key_prefix: PrefixOpt = None, tls_ca: TlsCaOpt = None, tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    """Put dead-lettered documents back into the job's stream (after a fix); then run workers again."""
    from embedq import job as job_record
    from embedq.deadletter import list_dead, replay

    client, keys = job_in_redis(ctx, job)
    entries = list_dead(client, keys, ids=ids)
    if ids and len(entries) != len(ids):
        missing = set(ids) - {e.dead_id for e in entries}
        raise UsageError(f"No dead letter with id {', '.join(sorted(missing))} in job {job!r}.")
    record = job_record.require(client, keys)
    documents, skipped = replay(client, keys, entries, allow_empty=record.allow_empty)
    typer.echo(f"job {job}: replayed {documents:,} documents; run `embedq work --job {job}` to embed them"
               if documents else f"job {job}: nothing replayed")
    for dead_id, reason in skipped[:_SKIPPED_SHOWN]:
        typer.echo(f"  skipped {dead_id}: {reason}")
    if len(skipped) > _SKIPPED_SHOWN:
        typer.echo(f"  ... and {len(skipped) - _SKIPPED_SHOWN} more skipped")


def gc(
    ctx: typer.Context,
    job: JobOpt, out: OutOpt,
    redis: RedisOpt = None, key_prefix: PrefixOpt = None, tls_ca: TlsCaOpt = None, tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    """Remove orphan parts (written but never committed) and roll committed ones forward."""
    from embedq.job import job_complete, live_workers
    from embedq.worker.commit import reconcile
    from embedq.worker.output import open_output

    client, keys = job_in_redis(ctx, job)
    output = open_output(out, create=False)
    result = reconcile(client, keys, output, live_workers=set(live_workers(client, keys)),
                       finished=job_complete(client, keys))
    typer.echo(f"job {job}: {len(result.parts)} committed parts; rolled forward {len(result.rolled_forward)}, "
               f"removed {len(result.orphans_removed)} visible and {len(result.staged_removed)} staged orphans; "
               f"kept {len(result.staged_kept)} staged parts of live workers")
    if result.missing:
        typer.echo(f"warning: {len(result.missing)} committed parts are missing from {output.path}: "
                   + ", ".join(result.missing[:10]), err=True)
        raise typer.Exit(8)


def delete(
    ctx: typer.Context,
    job: JobOpt,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    redis: RedisOpt = None, key_prefix: PrefixOpt = None, tls_ca: TlsCaOpt = None, tls_cert: TlsCertOpt = None,
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
