"""The current full view of a record: the latest embedding of every id, deletions applied.

The generations are read newest first. Every row of the newest generation's parts is current; a
row of an older generation is current unless a later generation embedded its id again or deleted
it. So the reader carries one set, the ids *superseded* so far (embedded or deleted by a later
generation), and each part is filtered against it as it streams by: memory is the set of ids that
changed after the oldest generation read, not the corpus, and each part is read once.

`since` reads only the generations after one (what a LanceDB table that holds generation `since`
needs): the current rows of those, and the ids they deleted that are not current again.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from embedq.errors import OutputError
from embedq.incremental.state import ALIASES, TOMBSTONES, Generation, Record
from embedq.incremental.store import StateStore

if TYPE_CHECKING:
    import pyarrow as pa

SNAPSHOT_KEY = b"embedq.snapshot"


@dataclass
class ViewReport:
    """What a pass over the view read and produced."""

    generation: int = 0
    rows: int = 0  # current rows produced
    deleted: list[Any] = field(default_factory=list)  # ids deleted since `since` (not current again)
    parts: int = 0
    metadata: dict[bytes, bytes] = field(default_factory=dict)  # the schema metadata of the first part


def current_rows(record: Record, report: ViewReport, *, since: int = 0) -> Iterator[pa.Table]:
    """The current rows (the parts' columns) of the generations after `since`, newest first; fills
    `report` (its `deleted` once the iterator is exhausted)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    chain = [g for g in record.chain() if g.number > since]
    report.generation = chain[0].number if chain else since
    superseded: pa.Array | None = None
    deleted: list[pa.Array] = []
    for generation in chain:
        later = superseded
        fresh: list[pa.Array] = []
        aliases = _aliases(record, generation)
        for table in _parts(generation, report):
            ids = table.column("id")
            fresh.append(ids.combine_chunks())
            rows = table if later is None else table.filter(pc.invert(pc.is_in(ids, value_set=later)))
            if rows.num_rows:
                report.rows += rows.num_rows
                yield rows
            if aliases is not None:
                shared, alias_ids = _alias_rows(table, aliases, later)
                if shared.num_rows:
                    report.rows += shared.num_rows
                    yield shared
                fresh.append(alias_ids)
        tombstones = record.store.child(generation.name).read_table(TOMBSTONES, columns=["id"]).column("id")
        gone = tombstones.combine_chunks()
        if later is not None and len(gone):
            gone = gone.filter(pc.invert(pc.is_in(gone, value_set=later)))
        deleted.append(gone)
        arrays = [a for a in [*([] if later is None else [later]), *fresh, tombstones.combine_chunks()] if len(a)]
        if arrays:
            superseded = pa.concat_arrays([a.cast(arrays[0].type) for a in arrays])
    report.deleted = [x for a in deleted for x in a.to_pylist()]


def write_snapshot(record: Record, target: str) -> ViewReport:
    """Write the full view as one Parquet file at `target` (a path or a URI), atomically; checks that
    it holds exactly one row per id of the record."""
    import pyarrow.parquet as pq

    current = record.current()
    if current is None:
        raise OutputError(f"the incremental state {record.store} has no committed generation yet: run "
                          "`embedq run --incremental` first.")
    report = ViewReport()
    folder, name = _split(target)
    rows = current_rows(record, report)
    first = next(rows, None)
    if first is None:
        raise OutputError(f"generation {current.number} of {record.store} holds no embeddings (every document was "
                          "deleted or dead-lettered); nothing to snapshot.")
    meta = dict(first.schema.metadata or {})
    meta[SNAPSHOT_KEY] = json.dumps({"record": record.settings.key, "generation": current.number,
                                     "state": str(record.root)}).encode()
    schema = first.schema.with_metadata(meta)
    with folder.writer(name) as sink, pq.ParquetWriter(sink, schema, compression="zstd") as writer:
        writer.write_table(first.cast(schema))
        for table in rows:
            writer.write_table(table.cast(schema))
    if report.rows != current.records:
        raise OutputError(f"the snapshot holds {report.rows:,} rows but generation {current.number} records "
                          f"{current.records:,} ids: a part of the state's outputs is missing or was changed. "
                          "Check them with `embedq verify`.")
    return report


def _parts(generation: Generation, report: ViewReport) -> Iterator[pa.Table]:
    if not generation.parts:
        return
    output = StateStore.open(generation.output)
    for part in generation.parts:
        try:
            table = output.read_table(part)
        except OSError as exc:
            raise OutputError(f"generation {generation.number}'s part {output.path(part)} cannot be read ({exc}): "
                              "the job's output was moved or removed, and the state needs it.") from exc
        report.parts += 1
        if not report.metadata:
            report.metadata = dict(table.schema.metadata or {})
        yield table


def _aliases(record: Record, generation: Generation) -> pa.Table | None:
    return record.store.child(generation.name).read_table(ALIASES) if generation.aliases else None


def _alias_rows(part: pa.Table, aliases: pa.Table, later: pa.Array | None) -> tuple[pa.Table, pa.Array]:
    """The rows of the aliases whose representative is in `part` (the representative's vector under
    the alias's id), those superseded later left out; and every such alias id."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = part.column("id").combine_chunks()
    here = aliases.filter(pc.is_in(aliases.column("rep"), value_set=ids))
    alias_ids = here.column("id").combine_chunks()
    if later is not None:
        here = here.filter(pc.invert(pc.is_in(here.column("id"), value_set=later)))
    rows = part.take(pc.index_in(here.column("rep"), value_set=ids))
    column = part.schema.get_field_index("id")
    rows = rows.set_column(column, "id", here.column("id").cast(part.schema.field(column).type))
    return rows, alias_ids if len(alias_ids) else pa.array([], ids.type)


def _split(target: str) -> tuple[StateStore, str]:
    """The folder store and file name of a path or URI."""
    head, _, name = target.rstrip("/").rpartition("/")
    if not name.endswith(".parquet"):
        raise OutputError(f"--out {target} should name a .parquet file (the snapshot is one file).")
    return StateStore.open(head or "."), name
