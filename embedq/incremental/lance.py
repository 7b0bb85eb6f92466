"""Keep a LanceDB table current with an incremental record: upsert, delete, refresh the ANN index.

LanceDB is embedded (a directory of Lance files, no server) and optional: `pip install embedq[index]`.
The table remembers which generation of which record it holds in a file beside it
(`<TABLE>.embedq.json`, written after the table's changes), so a load applies only the generations
since: their current rows are upserted on `id` (merge_insert) and the ids they deleted are deleted.
A load that dies before that file is written is simply applied again (upserts and deletes of the
same rows are idempotent). A table without that file, or from another record, is loaded whole.

The index is IVF-PQ on cosine distance, built once the table holds `INDEX_MIN_ROWS` rows and
refreshed (new rows folded in) by `optimize` on later loads; LanceDB searches rows not yet indexed
by a flat scan, so a load never loses recall while the index catches up. Recall@10 is measured with a
uniform sample of the loaded vectors as queries, against exact search (`bypass_vector_index`).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedq.errors import OutputError, UsageError
from embedq.incremental.snapshot import ViewReport, current_rows
from embedq.incremental.state import Record

SCHEME = "lancedb://"
INDEX_MIN_ROWS = 5_000  # below this a flat scan is exact and fast; PQ training wants thousands of rows
# Queries: `nprobes` partitions of about sqrt(rows), each PQ distance re-ranked exactly among
# `refine_factor` x 10 candidates; chosen for recall@10 >= 0.95 (see the README's measurement).
NPROBES = 20
REFINE_FACTOR = 10
DELETE_CHUNK = 1_000


@dataclass
class LoadReport:
    """What one load did."""

    table: str
    generation: int
    since: int
    upserted: int = 0
    deleted: int = 0
    rows: int = 0  # rows in the table after the load
    seconds: float = 0.0
    indexed: str = ""  # "built", "refreshed" or "" (too few rows for an index)
    recall_at_10: float | None = None
    queries: int = 0


def parse_uri(uri: str) -> tuple[str, str]:
    """(database directory, table name) of lancedb://PATH/TABLE."""
    if not uri.startswith(SCHEME) or "/" not in uri[len(SCHEME):].strip("/"):
        raise UsageError(f"--into {uri!r} should be {SCHEME}PATH/TABLE (a local directory and a table name).")
    path, _, table = uri[len(SCHEME):].rstrip("/").rpartition("/")
    return path, table


def load(record: Record, uri: str, *, sample: int = 200, full: bool = False,
         index_min_rows: int = INDEX_MIN_ROWS) -> LoadReport:
    """Bring the table at `uri` to the record's current generation; measure recall@10 on `sample` queries
    (drawn from the rows this load writes)."""
    try:
        import lancedb
    except ImportError as exc:
        raise UsageError("`embedq load` needs LanceDB: pip install 'embedq[index]'") from exc
    current = record.current()
    if current is None:
        raise OutputError(f"the incremental state {record.store} has no committed generation yet.")
    path, name = parse_uri(uri)
    marker = Path(path) / f"{name}.embedq.json"
    db = lancedb.connect(path)
    exists = name in db.table_names()
    since = 0 if full or not exists else _loaded_generation(marker, record)
    report = LoadReport(table=uri, generation=current.number, since=since)
    started = time.monotonic()
    view = ViewReport()
    table = db.open_table(name) if exists and since else None
    held = _Reservoir(sample)
    for rows in current_rows(record, view, since=since):
        rows = rows.replace_schema_metadata(None)
        held.offer(rows)
        if table is None:
            table = db.create_table(name, data=rows, mode="overwrite")
        elif since:
            table.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(rows)
        else:
            table.add(rows)
        report.upserted += rows.num_rows
    if table is None:  # nothing current since `since`, or an empty view
        if not exists:
            raise OutputError(f"generation {current.number} of {record.store} holds no embeddings to load.")
        table = db.open_table(name)
    if since:
        report.deleted = _delete(table, view.deleted)
    report.rows = table.count_rows()
    if report.upserted or report.deleted or not since:
        report.indexed = _refresh_index(table, report.rows, index_min_rows, rebuilt=not since)
    report.seconds = time.monotonic() - started
    marker.write_text(json.dumps({"record": record.settings.key, "generation": current.number}))
    report.recall_at_10, report.queries = recall_at_10(table, held.vectors)
    return report


class _Reservoir:
    """A uniform sample of the loaded vectors (reservoir sampling): the held queries for recall."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.seen = 0
        self.vectors: list[list[float]] = []
        self._random = random.Random(0)

    def offer(self, rows: Any) -> None:
        for vector in rows.column("embedding").to_pylist() if self.size else []:
            self.seen += 1
            if len(self.vectors) < self.size:
                self.vectors.append(vector)
            elif (slot := self._random.randrange(self.seen)) < self.size:
                self.vectors[slot] = vector


def _loaded_generation(marker: Path, record: Record) -> int:
    if not marker.exists():
        return 0
    data: dict[str, Any] = json.loads(marker.read_text())
    return int(data["generation"]) if data.get("record") == record.settings.key else 0


def _delete(table: Any, ids: list[Any]) -> int:
    for start in range(0, len(ids), DELETE_CHUNK):
        chunk = ids[start:start + DELETE_CHUNK]
        table.delete(f"id IN ({', '.join(_literal(i) for i in chunk)})")
    return len(ids)


def _literal(value: Any) -> str:
    """An id as a SQL literal for LanceDB's filter (strings quoted, quotes doubled)."""
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def _refresh_index(table: Any, rows: int, min_rows: int, *, rebuilt: bool) -> str:
    if rows < min_rows:
        return ""
    has_index = any(getattr(i, "columns", None) == ["embedding"] for i in table.list_indices())
    if rebuilt or not has_index:
        from lancedb.index import IvfPq

        table.create_index("embedding", config=IvfPq(distance_type="cosine"), replace=True)
        return "built"
    table.optimize()  # folds the new rows into the existing index
    return "refreshed"


def recall_at_10(table: Any, queries: list[list[float]]) -> tuple[float | None, int]:
    """Mean recall@10 of the table's vector search (embedq's query settings) against exact search,
    with `queries` (vectors this load wrote); None without queries."""
    import numpy as np

    if not queries:
        return None, 0
    hits = []
    for query in queries:
        vector = np.asarray(query, dtype=np.float32)
        ann = _ids(table.search(vector).distance_type("cosine").nprobes(NPROBES).refine_factor(REFINE_FACTOR).limit(10))
        exact = _ids(table.search(vector).distance_type("cosine").bypass_vector_index().limit(10))
        hits.append(len(ann & exact) / max(1, len(exact)))
    return float(np.mean(hits)), len(queries)


def _ids(query: Any) -> set[Any]:
    return set(query.select(["id", "_distance"]).to_arrow().column("id").to_pylist())
