"""`embedq verify`: is every source id in the committed output exactly once, with a valid embedding?

Reads only parts the manifest lists (after rolling committed parts forward and setting orphans aside;
a complete job's output is finalized first, see `worker/finalize.py`),
checks each part's schema, dimension and values, and compares the multiset of output ids with
the source's ids and the dead letters. Ids are compared as 64-bit hashes, so memory stays at
about 8 bytes per document; examples of missing or repeated ids are then looked up by hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import redis

from embedq import job as job_record
from embedq.chunking import CHUNK_COLUMNS
from embedq.config import Settings
from embedq.deadletter import DUPLICATE_ID
from embedq.errors import VerificationFailed
from embedq.job import live_workers
from embedq.keys import JobKeys
from embedq.protocol import DocId
from embedq.worker.archive import dead_letters, write_manifest_file
from embedq.worker.commit import PartEntry, Reconciliation, reconcile
from embedq.worker.finalize import finalize_output
from embedq.worker.output import OutputDir, open_output, part_file
from embedq.worker.writer import read_metadata

if TYPE_CHECKING:
    from embedq.producer.sources import Source

MAX_EXAMPLES = 10


def hash_ids(ids: Sequence[DocId] | np.ndarray) -> np.ndarray:
    """64-bit hashes of ids: integers map to themselves, strings to 8 bytes of BLAKE2b."""
    if isinstance(ids, np.ndarray) and ids.dtype.kind in "iu":
        return ids.astype(np.uint64)
    out = np.empty(len(ids), dtype=np.uint64)
    for i, value in enumerate(ids):
        if isinstance(value, int | np.integer):
            out[i] = np.uint64(int(value) & 0xFFFFFFFFFFFFFFFF)
        else:
            out[i] = int.from_bytes(hashlib.blake2b(str(value).encode("utf-8", "surrogatepass"),
                                                    digest_size=8).digest(), "little")
    return out


@dataclass
class Verification:
    """What verify found; `ok` when nothing is missing, repeated or invalid."""

    job: str
    source_documents: int = 0
    output_rows: int = 0
    parts: int = 0
    dead_documents: int = 0
    duplicates_set_aside: int = 0  # repeated source ids the producer dead-lettered (--allow-duplicate-ids)
    missing: int = 0
    duplicated: int = 0
    chunked: bool = False  # a chunked job: rows are chunks, and documents count whole ones
    missing_chunks: int = 0  # chunks absent from documents that have others (those documents count as missing)
    unexpected: int = 0
    dead_and_output: int = 0
    invalid_values: int = 0
    problems: list[str] = field(default_factory=list)
    examples: dict[str, list[DocId]] = field(default_factory=dict)
    complete: bool = False
    allow_dead: bool = False
    rolled_forward: int = 0
    orphans_removed: int = 0  # set aside (out of every reader's sight), deleted once the job is finalized

    @property
    def ok(self) -> bool:
        counted_dead = 0 if self.allow_dead else self.dead_documents
        return not (self.missing or self.missing_chunks or self.duplicated or self.unexpected or self.dead_and_output
                    or self.invalid_values or self.problems or counted_dead) and self.complete

    def render(self) -> str:
        lines = [
            f"job {self.job}: {'OK' if self.ok else 'FAILED'}",
            f"  source documents   {self.source_documents:,}",
            f"  output rows        {self.output_rows:,} in {self.parts:,} parts",
            f"  dead-lettered      {self.dead_documents:,}" + ("" if self.allow_dead or not self.dead_documents
                                                                else " (not accepted; see --allow-dead-letters)"),
            f"  missing            {self.missing:,}",
            *([f"  missing chunks     {self.missing_chunks:,}"] if self.chunked else []),
            f"  duplicated         {self.duplicated:,}" + (" (chunks)" if self.chunked else ""),
            f"  not in the source  {self.unexpected:,}",
            f"  invalid values     {self.invalid_values:,}",
        ]
        if self.duplicates_set_aside:
            lines.append(f"  repeated source ids set aside (--allow-duplicate-ids): {self.duplicates_set_aside:,}")
        if self.dead_and_output:
            lines.append(f"  both dead-lettered and in the output: {self.dead_and_output:,}")
        if not self.complete:
            lines.append("  the job is not complete yet (producer unfinished or batches still in the stream)")
        if self.rolled_forward or self.orphans_removed:
            lines.append(f"  repaired: {self.rolled_forward} committed parts renamed, {self.orphans_removed} "
                         "orphan parts set aside")
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  {kind} e.g. {', '.join(map(repr, ids))}" for kind, ids in self.examples.items() if ids]
        return "\n".join(lines)

    def raise_for_failure(self) -> None:
        if not self.ok:
            raise VerificationFailed(f"verification of job {self.job!r} failed (see above)")


def verify_job(client: redis.Redis, keys: JobKeys, out: str, *, source: str | None = None,
               allow_dead: bool = False, finished_ttl: int = Settings.finished_ttl) -> Verification:
    """Check job `keys.job`'s output in `out` against its source; also writes `_manifest.json`.
    A job whose manifest and dead letters Redis has let expire is checked against the output's
    `_manifest.json` and `_dead_letters.jsonl` (`worker/archive.py`)."""
    from embedq.job import job_complete
    from embedq.producer.sources import SourceSpec, open_source

    record = job_record.require(client, keys)
    result = Verification(job=keys.job, allow_dead=allow_dead)
    result.complete = job_complete(client, keys)
    output = open_output(out, create=False)
    repaired: Reconciliation = (finalize_output(client, keys, output, record, finished_ttl=finished_ttl)
                                if result.complete else
                                reconcile(client, keys, output, live_workers=set(live_workers(client, keys))))
    result.rolled_forward = len(repaired.rolled_forward)
    result.orphans_removed = len(repaired.orphans_set_aside)
    result.problems += [f"committed part {name} is missing from {output.location}" for name in repaired.missing]

    output_hashes = _check_parts(output, repaired.parts, record, result)
    if record.chunk_tokens:
        output_hashes = _whole_documents(output_hashes, result)
    letters = dead_letters(client, keys, output=output)  # the finalization may have archived them again
    # A repeated id's letter names an id whose first occurrence is in the output: it accounts for the
    # repeat, not for a missing document.
    result.duplicates_set_aside = sum(len(e.letter.doc_ids) for e in letters if e.letter.reason == DUPLICATE_ID)
    dead_ids = [doc_id for e in letters if e.letter.reason != DUPLICATE_ID for doc_id in e.letter.doc_ids]
    result.dead_documents = len(dead_ids)
    dead_hashes = hash_ids(dead_ids)

    spec = dict(record.source_spec)
    if source is not None:
        spec["path"] = source
    if spec.get("path") in (None, "-"):
        result.problems.append("the job's source was stdin: pass --source FILE to compare ids with it")
        source_hashes = np.unique(np.concatenate([output_hashes, dead_hashes]))
        src = None
    else:
        src = open_source(SourceSpec(**spec))
        source_hashes = np.concatenate([hash_ids(chunk.ids) for chunk in src.chunks(chunk_size=65536)] or
                                       [np.zeros(0, np.uint64)])
    result.source_documents = int(source_hashes.shape[0])
    _compare(source_hashes, output_hashes, dead_hashes, result)
    if src is not None and (result.missing or result.duplicated or result.unexpected):
        _examples(src, source_hashes, output_hashes, dead_hashes, result)
        src.close()
    elif src is not None:
        src.close()
    # The same fields as the worker's finalization writes (`finalize_output`), and the verdict.
    dead_total = sum(len(e.letter.doc_ids) for e in letters)
    write_manifest_file(output, keys.job, repaired.parts, complete=result.complete and result.ok,
                        extra={**record.model_fields(), "dead_letters": dead_total, "verified": result.ok})
    return result


def _check_parts(output: OutputDir, parts: dict[str, PartEntry], record: job_record.JobRecord,
                 result: Verification) -> np.ndarray:
    """Check every committed part; the ids' hashes, with (in a chunked job) columns of chunk index and
    count: `(rows, 3)` uint64 then, else `(rows,)`."""
    hashes = []
    result.chunked = bool(record.chunk_tokens)
    for name, entry in sorted(parts.items()):
        file = part_file(name)
        if not output.has_part(name):
            continue
        try:
            table = output.read_part(name)
        except (OSError, pa.ArrowInvalid) as exc:
            result.problems.append(f"{file} cannot be read: {exc}")
            continue
        result.parts += 1
        meta = read_metadata(table.schema)
        embedding = table.schema.field("embedding").type if "embedding" in table.schema.names else None
        width = record.output_format().width(record.dimension)  # --truncate-dim and binary types store fewer
        if not isinstance(embedding, pa.FixedSizeListType) or embedding.list_size != width:
            result.problems.append(f"{file}: embedding column is {embedding}, expected {width} values")
            continue
        if meta.get("job") != record.job or meta.get("model_digest") != record.model_digest:
            result.problems.append(f"{file}: metadata names job {meta.get('job')!r} / model "
                                   f"{meta.get('model_digest')!r}, not this job's")
        if table.num_rows != entry.rows:
            result.problems.append(f"{file}: {table.num_rows} rows, the manifest says {entry.rows}")
        values = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        finite = np.isfinite(values.reshape(table.num_rows, width)).all(axis=1)
        result.invalid_values += int((~finite).sum())
        result.output_rows += table.num_rows
        ids = table.column("id")
        id_hashes = hash_ids(ids.to_numpy() if pa.types.is_integer(ids.type) else ids.to_pylist())
        if pc.any(pc.is_null(ids)).as_py():
            result.problems.append(f"{file}: null ids")
        if result.chunked:
            if not set(CHUNK_COLUMNS) <= set(table.schema.names):
                result.problems.append(f"{file}: a chunked job's part without its {', '.join(CHUNK_COLUMNS)} columns")
                continue
            id_hashes = np.stack([id_hashes, *(table.column(name).to_numpy().astype(np.int64).astype(np.uint64)
                                               for name in ("chunk_index", "n_chunks"))], axis=1)
        hashes.append(id_hashes)
    if not hashes:
        return np.zeros((0, 3) if result.chunked else 0, np.uint64)
    return np.concatenate(hashes)


def _whole_documents(rows: np.ndarray, result: Verification) -> np.ndarray:
    """A chunked job's rows `(id hash, chunk_index, n_chunks)` as the ids of its whole documents, once
    each, plus once more per repeated chunk (so `_compare` counts those as duplicated). A document
    is whole when its chunks 0..n_chunks-1 are there, with one n_chunks; one that is not counts as
    missing (its absent chunks in `missing_chunks`), with a problem line for a disagreeing n_chunks."""
    if not rows.shape[0]:
        return np.zeros(0, np.uint64)
    order = np.lexsort((rows[:, 1], rows[:, 0]))
    doc, chunk, count = (rows[order, i] for i in range(3))
    repeat = np.zeros(doc.shape[0], bool)
    repeat[1:] = (doc[1:] == doc[:-1]) & (chunk[1:] == chunk[:-1])
    doc, chunk, count, repeated = doc[~repeat], chunk[~repeat], count[~repeat], doc[repeat]
    docs, first, present = np.unique(doc, return_index=True, return_counts=True)
    # Per document: the fewest and most chunks it claims, and its highest chunk index.
    claimed_min = np.minimum.reduceat(count, first)
    claimed_max = np.maximum.reduceat(count, first)
    last = np.maximum.reduceat(chunk, first)
    disagree = claimed_min != claimed_max
    if disagree.any():
        result.problems.append(f"{int(disagree.sum())} document(s) whose chunks disagree on n_chunks")
    whole = ~disagree & (present == claimed_max) & (last == claimed_max - 1)
    result.missing_chunks = int(np.maximum(claimed_max.astype(np.int64), last.astype(np.int64) + 1)[~whole].sum()
                                - present[~whole].sum())
    return np.concatenate([docs[whole], repeated])


def _compare(source: np.ndarray, output: np.ndarray, dead: np.ndarray, result: Verification) -> None:
    out_unique, out_counts = np.unique(output, return_counts=True)
    result.duplicated = int((out_counts - 1).sum())
    src_unique = np.unique(source)
    accounted = np.unique(np.concatenate([out_unique, dead]))
    result.missing = int(np.setdiff1d(src_unique, accounted, assume_unique=True).shape[0])
    result.unexpected = int(np.setdiff1d(out_unique, src_unique, assume_unique=True).shape[0])
    result.dead_and_output = int(np.intersect1d(out_unique, np.unique(dead), assume_unique=True).shape[0])


def _examples(src: Source, source: np.ndarray, output: np.ndarray, dead: np.ndarray,
              result: Verification) -> None:
    out_unique, out_counts = np.unique(output, return_counts=True)
    wanted = {
        "missing": np.setdiff1d(np.unique(source), np.concatenate([out_unique, dead]))[:MAX_EXAMPLES],
        "duplicated": out_unique[out_counts > 1][:MAX_EXAMPLES],
    }
    found: dict[str, list[DocId]] = {k: [] for k in wanted}
    for chunk in src.chunks(chunk_size=65536):
        hashes = hash_ids(chunk.ids)
        for kind, targets in wanted.items():
            for i in np.flatnonzero(np.isin(hashes, targets)):
                if len(found[kind]) < MAX_EXAMPLES:
                    found[kind].append(chunk.ids[i])
    result.examples.update(found)

