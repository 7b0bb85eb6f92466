"""Advance the record: fold a finished job's output into the next generation (state.py, `advance`).

The job's parts say which ids were embedded: their id columns are read (nothing else) and spilled
per bucket, as the diff spills the source. Then, bucket by bucket:

    embedded  the delta's ids found in the parts, and the aliases whose representative is one of them
    record    base record - tombstones - embedded, + embedded at this generation, sorted by id

A delta id missing from the parts was dead-lettered: it keeps its old entry (old hash, old
generation), so the view keeps its old vector and the next run tries it again. A part id that is not
in the delta means the output location holds another job's parts: refused, nothing is written.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedq.errors import OutputError
from embedq.incremental.hashing import bucket_keys
from embedq.incremental.state import (
    ALIASES,
    TOMBSTONES,
    Generation,
    Record,
    delta_keys_file,
    empty_record,
    record_file,
)
from embedq.incremental.store import StateStore

if TYPE_CHECKING:
    import pyarrow as pa


def finished_parts(generation: Generation) -> list[str] | None:
    """The part files of the generation's job once its output is final (`_manifest.json` complete),
    else None; a generation with nothing to embed has no parts."""
    if generation.documents == 0:
        return []
    from embedq.worker.output import open_output

    try:
        manifest = open_output(generation.output, create=False).read_manifest()
    except OutputError:
        return None
    if not manifest or not manifest.get("complete") or manifest.get("job") != generation.job:
        return None
    return [str(part["file"]) for part in manifest["parts"]]


def advance(record: Record, generation: Generation, parts: list[str]) -> Generation:
    """Write the record files of `generation` from its job's `parts`, then commit it (CURRENT moves)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    base = record.committed(generation.base) if generation.base else None
    folder = record.store.child(generation.name)
    output = StateStore.open(generation.output) if parts else None
    aliases = folder.read_table(ALIASES) if generation.aliases else None
    tombstones = folder.read_table(TOMBSTONES)
    n = generation.buckets
    with tempfile.TemporaryDirectory(prefix="embedq-advance-") as tmp:
        spill = Path(tmp)
        embedded_rows = _spill_part_ids(output, parts, spill, n)
        id_type = folder.read_table(delta_keys_file(0)).schema.field("id").type
        # Two passes over the buckets, one in memory at a time: the dead-lettered ids first (few).
        missing = _missing(folder, spill, n, id_type, aliases)
        records = 0
        for b in range(n):
            delta = folder.read_table(delta_keys_file(b))
            keep = delta.filter(pc.invert(pc.is_in(delta.column("id"), value_set=missing)))
            if aliases is not None and aliases.num_rows:
                orphaned = aliases.filter(pc.is_in(aliases.column("rep"), value_set=missing)).column("id")
                keep = keep.filter(pc.invert(pc.is_in(keep.column("id"), value_set=orphaned.combine_chunks())))
            old = record.read_record(base, b, n)
            if old.num_rows == 0:
                old = empty_record(id_type)
            gone = pa.concat_arrays([*tombstones.filter(_in_bucket(tombstones, b, n)).column("id").chunks,
                                     *keep.column("id").chunks]) if keep.num_rows or tombstones.num_rows else None
            if gone is not None and len(gone):
                old = old.filter(pc.invert(pc.is_in(old.column("id"), value_set=gone)))
            fresh = keep.append_column("generation", pa.array(np.full(keep.num_rows, generation.number, np.uint32)))
            table = pa.concat_tables([old.cast(old.schema), fresh.cast(old.schema)]).sort_by("id")
            folder.write_table(record_file(b), table)
            records += table.num_rows
    committed = dataclasses.replace(generation, parts=tuple(parts), embedded=embedded_rows, records=records)
    record.commit(committed)
    return committed


def _spill_part_ids(output: StateStore | None, parts: list[str], spill: Path, buckets: int) -> int:
    """The id column of every part, into one local Arrow file per bucket; the number of rows."""
    import pyarrow as pa

    writers: dict[int, Any] = {}
    rows = 0
    try:
        for part in parts:
            assert output is not None
            ids = output.read_table(part, columns=["id"]).column("id").combine_chunks()
            rows += len(ids)
            which = bucket_keys(ids.to_pylist()) & np.uint32(buckets - 1)
            table = pa.table({"id": ids})
            for b in np.unique(which).tolist():
                if b not in writers:
                    writers[b] = pa.ipc.new_stream(str(spill / f"{b}.arrow"), table.schema)
                writers[b].write_table(table.filter(pa.array(which == b)))
    finally:
        for writer in writers.values():
            writer.close()
    return rows


def _read(spill: Path, bucket: int, id_type: pa.DataType) -> pa.Array:
    import pyarrow as pa

    path = spill / f"{bucket}.arrow"
    if not path.exists():
        return pa.array([], id_type)
    with pa.memory_map(str(path)) as stream:
        return pa.ipc.open_stream(stream).read_all().column("id").combine_chunks().cast(id_type)


def _missing(folder: StateStore, spill: Path, buckets: int, id_type: pa.DataType, aliases: pa.Table | None
             ) -> pa.Array:
    """The delta ids that no part holds (dead-lettered), aliases excluded; refuses part ids that are
    not in the delta."""
    import pyarrow as pa
    import pyarrow.compute as pc

    alias_ids = aliases.column("id").combine_chunks() if aliases is not None else pa.array([], id_type)
    missing: list[pa.Array] = []
    for b in range(buckets):
        ids = folder.read_table(delta_keys_file(b)).column("id").combine_chunks()
        embedded = _read(spill, b, id_type)
        stray = pc.invert(pc.is_in(embedded, value_set=ids))
        if pc.any(stray).as_py():
            example = embedded.filter(stray)[0].as_py()
            raise OutputError(f"the job's output holds id {example!r}, which is not in its delta: the output "
                              "location holds another job's parts; give this state its own --out.")
        absent = ids.filter(pc.invert(pc.is_in(ids, value_set=embedded)))
        if len(alias_ids):
            absent = absent.filter(pc.invert(pc.is_in(absent, value_set=alias_ids)))
        missing.append(absent)
    return pa.concat_arrays(missing)


def _in_bucket(table: pa.Table, bucket: int, buckets: int) -> pa.Array:
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.equal(pc.bit_wise_and(table.column("key"), pa.scalar(buckets - 1, pa.uint32())),
                    pa.scalar(bucket, pa.uint32()))
