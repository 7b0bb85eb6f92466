"""`embedq snapshot` and `embedq load`: an incremental record's full view, and keeping an index current.

    embedq snapshot --state DIR --out VIEW.parquet          latest embedding per id, deletions applied
    embedq load --state DIR --into lancedb://PATH/TABLE     upsert what changed since the last load,
                                                            refresh the ANN index, report recall@10
"""

from __future__ import annotations

import time
from typing import Annotated

import typer

StateArg = Annotated[str, typer.Option("--state", metavar="DIR|URI", help="The incremental state "
                                       "(`embedq run --incremental --state`).", show_default=False)]
RecordOpt = Annotated[str | None, typer.Option(
    "--record", metavar="KEY", show_default=False,
    help="Which record of the state (a folder per model and settings); needed only when it holds several.")]


def snapshot(
    state: StateArg,
    out: Annotated[str, typer.Option("--out", "-o", metavar="FILE|URI", show_default=False,
                                     help="The Parquet file to write (replaced whole, atomically).")],
    record: RecordOpt = None,
) -> None:
    """Write the current full view of an incremental record as one Parquet file: the latest embedding
    of every id, ids deleted from the source left out. Columns as in a job's parts."""
    from embedq.cli.incremental import commit_finished
    from embedq.incremental.snapshot import write_snapshot
    from embedq.incremental.state import Record

    found = Record.find(state, record)
    commit_finished(found)  # a generation whose job finished after its run was stopped
    started = time.monotonic()
    report = write_snapshot(found, out)
    typer.echo(f"snapshot of generation {report.generation}: {report.rows:,} ids from {report.parts:,} parts in "
               f"{time.monotonic() - started:.1f} s -> {out}")


def load(
    state: StateArg,
    into: Annotated[str, typer.Option("--into", metavar="lancedb://PATH/TABLE", show_default=False,
                                      help="The LanceDB table to keep current (created if missing).")],
    record: RecordOpt = None,
    full: Annotated[bool, typer.Option("--full", help="Load the whole view again, not only what changed.")] = False,
    sample: Annotated[int, typer.Option("--sample", min=0, help="Held queries for the recall@10 check "
                                        "(0: skip it).")] = 200,
) -> None:
    """Upsert what changed since the table's last load (the whole view the first time), delete the ids
    gone, build or refresh the ANN index, and report recall@10 against exact search and the load rate."""
    from embedq.cli.incremental import commit_finished
    from embedq.incremental.lance import load as load_table
    from embedq.incremental.state import Record

    found = Record.find(state, record)
    commit_finished(found)
    report = load_table(found, into, sample=sample, full=full)
    rate = f", {report.upserted / report.seconds:,.0f} rows/s" if report.seconds > 0 and report.upserted else ""
    since = ("the whole view" if not report.since else "already loaded" if report.since == report.generation
             else f"generations {report.since + 1}-{report.generation}")
    typer.echo(f"{into}: generation {report.generation} ({since}): {report.upserted:,} upserted, "
               f"{report.deleted:,} deleted, {report.rows:,} rows in {report.seconds:.1f} s{rate}"
               + (f"; index {report.indexed}" if report.indexed else "" if report.since == report.generation
                  else "; no index (few rows: exact search)"))
    if report.recall_at_10 is not None:
        typer.echo(f"recall@10 {report.recall_at_10:.3f} against exact search on {report.queries} held queries")
