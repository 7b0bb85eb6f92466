"""A source against the record: which documents are new or changed, which ids are gone.

Memory stays bounded by one bucket whatever the corpus size (state.py's layout): the first pass
reads the source once, hashes every text and spills (id, hash, key, position) into one local Arrow
file per bucket; then each bucket of the source is joined with the same bucket of the record, read
from its Parquet files, and only the differences are kept. What is kept per document is one byte (the
bitmap of positions to embed), and the changed ids themselves go to disk, bucket by bucket. A second
pass over the source writes the texts at those positions as the delta, the job's source.

With `dedupe`, texts that repeat under other ids within the delta are embedded once: the first
position keeps its place in the delta, the others become aliases of it (a dict of the delta's hashes,
so this flag costs about 100 bytes per changed document).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedq.errors import SourceError
from embedq.incremental.hashing import HASH_BYTES, bucket_count, bucket_keys, content_hashes
from embedq.incremental.state import (
    ALIASES,
    DELTA,
    TOMBSTONES,
    Generation,
    Record,
    delta_keys_file,
    empty_record,
    generation_name,
)

if TYPE_CHECKING:
    import pyarrow as pa

    from embedq.producer.sources import Source

CHUNK = 65_536  # documents per source read; the spill writes one Arrow batch per bucket per chunk


@dataclass(frozen=True)
class Delta:
    """What one diff found, and the sealed generation that embeds it."""

    generation: Generation
    resumed: bool  # the same delta was sealed by an earlier run (its job resumes)
    added: int
    changed: int
    unchanged: int
    deleted: int
    aliases: int  # documents not embedded because their text is embedded under another id (--dedupe)


def plan(record: Record, source: Source, *, job_stem: str, output_root: str, dedupe: bool = False) -> Delta | None:
    """Diff `source` against the record's current generation; seal and return the next generation,
    or None when nothing was added, changed or deleted."""
    import pyarrow as pa
    import pyarrow.compute as pc

    base = record.current()
    scan = source.scan()
    if scan.n_duplicates:
        example = scan.duplicate_ids[0][0]
        raise SourceError(f"{source.describe()} has {scan.n_duplicates} duplicate id(s), e.g. {example!r}: an "
                          "incremental job tracks documents by id, so every id must be unique.")
    buckets = bucket_count(max(scan.count, base.records if base else 0))
    with tempfile.TemporaryDirectory(prefix="embedq-diff-") as tmp:
        spill = Path(tmp)
        id_type = _spill(source, spill, buckets)
        selected = np.zeros(scan.count, dtype=bool)
        digest = hashlib.sha256(f"embedq-delta-v1\n{base.name if base else ''}\n{dedupe}\n".encode())
        counts = {"added": 0, "changed": 0, "unchanged": 0}
        changed_tables: list[pa.Table] = []
        tombstones: list[pa.Table] = []
        for b in range(buckets):
            new = _read_spill(spill, b, id_type)
            old = record.read_record(base, b, buckets)
            if old.num_rows == 0:
                old = empty_record(id_type)
            changed, gone, unchanged = _diff_bucket(new, old)
            counts["unchanged"] += unchanged
            counts["added"] += int(pc.sum(changed.column("is_new")).as_py() or 0)
            selected[changed.column("pos").to_numpy()] = True
            changed = changed.select(["id", "hash", "key", "pos"])
            changed_tables.append(changed)
            tombstones.append(gone)
            digest.update(b"b")
            for column in (changed.column("id"), changed.column("hash"), gone.column("id")):
                digest.update(str(column.to_pylist()).encode())
        counts["changed"] = sum(t.num_rows for t in changed_tables) - counts["added"]
        deleted = sum(t.num_rows for t in tombstones)
        if not selected.any() and not deleted:
            return None
        alias_pos = _dedupe(changed_tables, selected) if dedupe else {}
        number = base.number + 1 if base else 1
        name = generation_name(number, digest.hexdigest())
        sealed = record.sealed(name)
        if sealed is not None:
            return Delta(sealed, True, counts["added"], counts["changed"], counts["unchanged"], deleted, sealed.aliases)
        folder = record.store.child(name)
        for b, table in enumerate(changed_tables):
            folder.write_table(delta_keys_file(b), table.select(["id", "hash", "key"]))
        folder.write_table(TOMBSTONES, pa.concat_tables(tombstones))
        aliases = _write_delta(source, folder, selected, alias_pos)
        if dedupe:
            folder.write_table(ALIASES, aliases)
        job = f"{job_stem[:40]}-{name}"
        generation = Generation(number=number, name=name, base=base.name if base else None, job=job,
                                output=_join(output_root, name), source=source.describe(), buckets=buckets,
                                documents=int(selected.sum()), tombstones=deleted, aliases=aliases.num_rows)
        record.seal(generation)  # the step after which this delta, and its job's name, are fixed
        return Delta(generation, False, counts["added"], counts["changed"], counts["unchanged"], deleted,
                     aliases.num_rows)


def _spill(source: Source, spill: Path, buckets: int) -> pa.DataType:
    """Pass one: (id, hash, key, pos) of every document into the local file of its bucket."""
    import pyarrow as pa

    writers: dict[int, Any] = {}
    id_type = pa.int64() if source.scan().id_type == "int64" else pa.string()
    schema = pa.schema([("id", id_type), ("hash", pa.binary(HASH_BYTES)), ("key", pa.uint32()), ("pos", pa.int64())])
    try:
        for chunk in source.chunks(0, CHUNK):
            keys = bucket_keys(chunk.ids)
            table = pa.table({"id": pa.array(chunk.ids, id_type),
                              "hash": pa.array(content_hashes(chunk.texts), pa.binary(HASH_BYTES)),
                              "key": pa.array(keys, pa.uint32()),
                              "pos": pa.array(np.arange(chunk.pos, chunk.pos + len(chunk.ids)), pa.int64())},
                             schema=schema)
            which = keys & np.uint32(buckets - 1)
            for b in np.unique(which).tolist():
                if b not in writers:
                    writers[b] = pa.ipc.new_stream(str(spill / f"{b}.arrow"), schema)
                writers[b].write_table(table.filter(pa.array(which == b)))
    finally:
        for writer in writers.values():
            writer.close()
    return id_type


def _read_spill(spill: Path, bucket: int, id_type: pa.DataType) -> pa.Table:
    import pyarrow as pa

    path = spill / f"{bucket}.arrow"
    if not path.exists():
        return empty_record(id_type).select(["id", "hash", "key"]).append_column("pos", pa.array([], pa.int64()))
    with pa.memory_map(str(path)) as stream:
        return pa.ipc.open_stream(stream).read_all()


def _diff_bucket(new: pa.Table, old: pa.Table) -> tuple[pa.Table, pa.Table, int]:
    """(new or changed rows with an `is_new` column, sorted by id; the (id, key) of ids gone; how many
    are unchanged) for one bucket."""
    import pyarrow.compute as pc

    old = old.select(["id", "hash", "key"]).rename_columns(["id", "old_hash", "old_key"])
    joined = new.join(old.select(["id", "old_hash"]), keys="id", join_type="left outer")
    is_new = pc.is_null(joined.column("old_hash"))
    differs = pc.fill_null(pc.not_equal(joined.column("hash"), joined.column("old_hash")), True)
    changed = joined.append_column("is_new", is_new).filter(differs).drop_columns(["old_hash"]).sort_by("id")
    gone = old.join(new.select(["id"]), keys="id", join_type="left anti").select(["id", "old_key"])
    gone = gone.rename_columns(["id", "key"]).sort_by("id")
    return changed, gone, new.num_rows - changed.num_rows


def _dedupe(changed: list[pa.Table], selected: np.ndarray) -> dict[int, int]:
    """Alias position -> representative position for texts repeated within the delta; clears the
    aliases from `selected` (the first position of each text stays, and is embedded once for all)."""
    first: dict[bytes, int] = {}
    aliases: dict[int, int] = {}
    hashes = [h for t in changed for h in t.column("hash").to_pylist()]
    positions = [p for t in changed for p in t.column("pos").to_pylist()]
    for pos, digest in sorted(zip(positions, hashes, strict=True)):
        rep = first.setdefault(digest, pos)
        if rep != pos:
            aliases[pos] = rep
            selected[pos] = False
    return aliases


def _write_delta(source: Source, folder: Any, selected: np.ndarray, alias_pos: dict[int, int]) -> pa.Table:
    """Pass two: the (id, text) of the selected positions as delta.parquet; returns the aliases as
    (id, rep) ids."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    id_type = pa.int64() if source.scan().id_type == "int64" else pa.string()
    schema = pa.schema([("id", id_type), ("text", pa.string())])
    reps = set(alias_pos.values())
    rep_ids: dict[int, Any] = {}
    alias_ids: list[Any] = []
    alias_reps: list[Any] = []
    with folder.writer(DELTA) as sink, pq.ParquetWriter(sink, schema, compression="zstd") as writer:
        for chunk in source.chunks(0, CHUNK):
            take = np.flatnonzero(selected[chunk.pos:chunk.pos + len(chunk.ids)])
            if take.size:
                writer.write_table(pa.table({"id": pa.array([chunk.ids[i] for i in take], id_type),
                                             "text": [chunk.texts[i] for i in take]}, schema=schema))
            if alias_pos:
                for i, doc_id in enumerate(chunk.ids):
                    pos = chunk.pos + i
                    if pos in reps:
                        rep_ids[pos] = doc_id
                    if pos in alias_pos:
                        alias_ids.append(doc_id)
                        alias_reps.append(rep_ids[alias_pos[pos]])
    return pa.table({"id": pa.array(alias_ids, id_type), "rep": pa.array(alias_reps, id_type)})


def _join(root: str, name: str) -> str:
    """`name` under the output root, a path or a URI."""
    return f"{root.rstrip('/')}/{name}" if "://" in root else os.path.join(root, name)
