"""Incremental jobs: embed only what changed since the last run, and keep a full view for an index.

    state.py     the record of (id, content hash) -> generation, and the protocol that advances it
    store.py     where the record lives: a local directory or an object-store prefix
    hashing.py   content hashes and the id buckets the record is partitioned into
    diff.py      a source against the record: the delta to embed, the tombstones
    advance.py   a finished job's output folded into the record as its next generation
    snapshot.py  the current full view (latest embedding per id, deletions applied) as Parquet
    lance.py     that view, or what changed since the last load, upserted into a LanceDB table

The application layer (the CLI's `run --incremental`, `snapshot` and `load`) drives these; they sit
above the wings and read job output through `embedq.worker.output`.
"""
