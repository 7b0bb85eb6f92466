"""The incremental record and the protocol that advances it, one generation at a time.

Layout under the state location (`--state DIR_OR_URI`), one record per model and settings:

    <key>/settings.json           model name and digest, pooling, normalization, max length, dtype
    <key>/CURRENT                 {"generation": N, "name": "g00000N-<digest>"}: the committed record
    <key>/g00000N-<digest>/       one generation, immutable once CURRENT names it:
        pending.json              the sealed delta: base generation, job, output location, counts
        delta.parquet             (id, text) of the documents to embed: the job's source
        delta-keys-<b>.parquet    (id, hash, key) of those documents, in bucket b
        tombstones.parquet        (id) of the documents gone from the source since the base
        aliases.parquet           (id, rep) with --dedupe: id's text is rep's, embedded once as rep
        record-<b>.parquet        (id, hash, key, generation) of every id embedded so far, bucket b,
                                  sorted by id: the "sorted hash table" the next diff reads in chunks
        generation.json           the committed description: the job's parts, counts, bucket count

The key is a digest of the settings (`RecordSettings.key`): a record only answers for vectors made
the same way, so changing the model or a setting finds no record for it, and `Record.open` says so.

A run moves through four steps; each leaves the state valid if the process dies there:

    diff     scan the source, compare it with CURRENT's record bucket by bucket, write the delta
             files into g<N+1>-<digest>/ (the digest covers the base and every changed id and hash,
             so the same source against the same base always names the same folder).
             Crash: CURRENT is untouched; the folder has no pending.json, so nothing reads it; the
             next run writes the same files again (or, if the source changed, another folder, and
             this one is removed as abandoned).
    seal     write pending.json (whole, atomically): the delta is fixed, and so is its job's name.
             Crash after: the next run over the same source finds the sealed folder and resumes the
             same job (Redis holds its progress; output is exactly-once by the job's own protocol).
    embed    the ordinary job over delta.parquet, into its own output location.
             Crash: as any job's; the state is untouched, and the rerun embeds at most what was in
             flight. A sealed generation whose job has finished is advanced by the next run before
             it diffs (`Record.pending`), even if the source has changed meanwhile, so finished work
             is never thrown away.
    advance  once the job's `_manifest.json` says complete: write record-<b>.parquet (base record,
             minus tombstones and changed ids, plus those embedded now), then generation.json, then
             replace CURRENT (a local rename after fsync, or one object PUT). Crash before CURRENT
             moves: the old record is still the record; the rerun advances again, writing the same
             files. After: the new record is the record, and the rerun's diff finds nothing to do.

Documents the job dead-lettered are left out of the record, so the next run tries them again.
One incremental run per record at a time: two runs over the same base and source would share one
job (safe), but two different sources racing to advance one record would make the second's view
win without the first's changes; run them in sequence (the nightly recipe does).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from embedq.errors import JobMismatch, OutputError, UsageError
from embedq.incremental.store import StateStore

if TYPE_CHECKING:
    import pyarrow as pa

    from embedq.model import ModelInfo

CURRENT = "CURRENT"
SETTINGS = "settings.json"
PENDING = "pending.json"
COMMITTED = "generation.json"
DELTA = "delta.parquet"
TOMBSTONES = "tombstones.parquet"
ALIASES = "aliases.parquet"


def delta_keys_file(bucket: int) -> str:
    return f"delta-keys-{bucket:05d}.parquet"


def record_file(bucket: int) -> str:
    return f"record-{bucket:05d}.parquet"


@dataclass(frozen=True)
class RecordSettings:
    """What makes two vectors of one text the same vector: the record answers for these only."""

    model: str
    digest: str
    pooling: str
    normalize: bool
    max_seq_len: int
    output_dtype: str

    @classmethod
    def of(cls, info: ModelInfo, output_dtype: str) -> RecordSettings:
        return cls(info.name, info.digest, str(getattr(info.pooling, "value", info.pooling)), info.normalize,
                   info.max_seq_len, output_dtype)

    @property
    def key(self) -> str:
        """The record's folder name: the settings' digest, prefixed by the model's name for people."""
        text = json.dumps({k: v for k, v in asdict(self).items() if k != "model"}, sort_keys=True)
        stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in self.model.split("/")[-1])[:32]
        return f"{stem}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"

    def differences(self, other: RecordSettings) -> list[str]:
        """'field: theirs -> ours' for each setting that differs."""
        return [f"{f.name} {getattr(other, f.name)!r} -> {getattr(self, f.name)!r}" for f in fields(self)
                if getattr(self, f.name) != getattr(other, f.name)]


@dataclass(frozen=True)
class Generation:
    """One generation of a record: a sealed delta, and once committed, what its job produced."""

    number: int
    name: str  # its folder, g<number>-<digest>
    base: str | None  # the folder of the generation it builds on; None for the first
    job: str
    output: str  # the job's output location
    source: str
    buckets: int  # how many buckets its delta keys and record files are split into
    documents: int  # documents in the delta, to embed (aliases excluded)
    tombstones: int
    aliases: int = 0
    created_at: float = field(default_factory=time.time)
    # Filled when the generation is committed:
    parts: tuple[str, ...] = ()  # the part files of the job's output that hold its vectors
    embedded: int = 0  # rows in those parts
    records: int = 0  # ids in the record after this generation

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Generation:
        raw: dict[str, Any] = json.loads(data)
        raw["parts"] = tuple(raw.get("parts", ()))
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})


def generation_name(number: int, digest: str) -> str:
    return f"g{number:06d}-{digest[:12]}"


class Record:
    """The record of one settings key under a state location."""

    def __init__(self, store: StateStore, settings: RecordSettings) -> None:
        self.root = store
        self.settings = settings
        self.store = store.child(settings.key)

    @classmethod
    def open(cls, location: str, settings: RecordSettings, *, new_record: bool = False) -> Record:
        """The record for `settings` under `location`. Refuses, naming what changed, when the
        location holds records for other settings only, unless `new_record` (a full embed follows)."""
        root = StateStore.open(location)
        record = cls(root, settings)
        if record.store.exists(SETTINGS):
            return record
        others = [RecordSettings(**json.loads(root.child(key).read_bytes(SETTINGS))) for key in root.folders()
                  if root.child(key).exists(SETTINGS)]
        if others and not new_record:
            changes = "; ".join(", ".join(settings.differences(o)) for o in others)
            raise JobMismatch(
                f"the incremental state at {location} was built with other model settings ({changes}), so none "
                "of its vectors can be reused: pass --new-record to start a record for these settings (every "
                "document is embedded again), or use the settings the record was built with.")
        record.store.write_bytes(SETTINGS, json.dumps(asdict(settings), indent=1, sort_keys=True).encode())
        return record

    @classmethod
    def find(cls, location: str, key: str | None = None) -> Record:
        """The existing record under `location`: the one named `key`, or the only one there."""
        root = StateStore.open(location)
        keys = [k for k in root.folders() if root.child(k).exists(SETTINGS)]
        if key is None and len(keys) == 1:
            key = keys[0]
        if key not in keys:
            listed = ", ".join(keys) or "none"
            raise UsageError(f"the incremental state at {location} holds the records {listed}; name one with "
                             "--record KEY." if keys else f"{location} holds no incremental record: run "
                             f"`embedq run SOURCE --incremental --state {location}` first.")
        assert key is not None
        settings = RecordSettings(**json.loads(root.child(key).read_bytes(SETTINGS)))
        return cls(root, settings)

    # -- reading -----------------------------------------------------------------------------------

    def current(self) -> Generation | None:
        """The committed generation CURRENT names; None before the first."""
        if not self.store.exists(CURRENT):
            return None
        name = json.loads(self.store.read_bytes(CURRENT))["name"]
        return self.committed(name)

    def committed(self, name: str) -> Generation:
        folder = self.store.child(name)
        if not folder.exists(COMMITTED):
            raise OutputError(f"the incremental state {self.store} names generation {name}, but "
                              f"{folder.path(COMMITTED)} is missing: the state was damaged; start a new --state.")
        return Generation.from_json(folder.read_bytes(COMMITTED))

    def sealed(self, name: str) -> Generation | None:
        """The sealed (pending) generation in folder `name`, or None if it was never sealed."""
        folder = self.store.child(name)
        return Generation.from_json(folder.read_bytes(PENDING)) if folder.exists(PENDING) else None

    def pending(self) -> list[Generation]:
        """Sealed generations built on CURRENT that are not committed: jobs in flight or finished."""
        current = self.current()
        base = current.name if current else None
        number = current.number + 1 if current else 1
        found = []
        for name in self.store.folders():
            # generation.json may be there already: a crash between it and CURRENT (state.py, advance).
            if name.startswith(f"g{number:06d}-"):
                sealed = self.sealed(name)
                if sealed is not None and sealed.base == base:
                    found.append(sealed)
        return found

    def chain(self) -> list[Generation]:
        """Every committed generation, newest first."""
        out: list[Generation] = []
        generation = self.current()
        while generation is not None:
            out.append(generation)
            generation = self.committed(generation.base) if generation.base else None
        return out

    def read_record(self, generation: Generation | None, bucket: int, buckets: int) -> pa.Table:
        """The ids of the record after `generation` that fall in `bucket` of `buckets`: (id, hash,
        key, generation). Reads only the files of `generation` that can hold them (module hashing)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if generation is None:
            return empty_record(None)
        folder = self.store.child(generation.name)
        low = min(buckets, generation.buckets)
        tables = [folder.read_table(record_file(i)) for i in range(generation.buckets) if i % low == bucket % low]
        table = pa.concat_tables(tables) if tables else empty_record(None)
        if generation.buckets < buckets:
            mask = pc.equal(pc.bit_wise_and(table.column("key"), pa.scalar(buckets - 1, pa.uint32())),
                            pa.scalar(bucket, pa.uint32()))
            table = table.filter(mask)
        return table

    # -- writing -----------------------------------------------------------------------------------

    def seal(self, generation: Generation) -> None:
        """Fix the delta in its folder: from now on its job is the generation's job."""
        self.store.child(generation.name).write_bytes(PENDING, generation.to_json())

    def commit(self, generation: Generation) -> None:
        """Write generation.json, then point CURRENT at it (the step that makes it the record)."""
        self.store.child(generation.name).write_bytes(COMMITTED, generation.to_json())
        self.store.write_bytes(CURRENT, json.dumps({"generation": generation.number, "name": generation.name}).encode())

    def abandon(self, name: str) -> None:
        """Remove a generation folder nothing will commit (its delta no longer matches the source)."""
        self.store.child(name).remove()


def empty_record(id_type: pa.DataType | None) -> pa.Table:
    """A record table with no rows."""
    import pyarrow as pa

    from embedq.incremental.hashing import HASH_BYTES

    return pa.table({"id": pa.array([], id_type or pa.string()), "hash": pa.array([], pa.binary(HASH_BYTES)),
                     "key": pa.array([], pa.uint32()), "generation": pa.array([], pa.uint32())})
