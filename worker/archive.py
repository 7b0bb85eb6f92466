"""What a finished job's output location records of it, and bringing that back into Redis.

Finalization (finalize.py) writes `_manifest.json` (every committed part) and `_dead_letters.jsonl`
(every dead letter, its payload included) into the output location. From then on the Redis copies,
the manifest hash and the dead-letter stream, are redundant: the compaction gives them a TTL
(`finished_ttl`) and marks the job archived (`embedq.job.ARCHIVED_FIELD`, where the invariant is
stated). What stays in Redis for good is small: the job's record, counters and producer cursor, and
its empty stream with the consumer group, so `status` still knows the job and says it is complete.

Whatever reads or changes an archived job's manifest or dead letters calls `unarchive` first:
`reconcile` (so every starting worker, `gc`, `verify` and finalization) and `dead-letter replay`. It
restores what expired from the files, removes the TTL and clears the mark, in one script; the next
finalization archives the job again. Where a file it needs is gone it refuses, because recovery
without the manifest would take every committed part for an orphan and set it aside. `dead_letters`
reads them without restoring anything (`dead-letter list`, `verify`).
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
import redis

from embedq.deadletter import DEAD_FIELD, DeadEntry, decode_entries, encode, file_row, from_file_row
from embedq.errors import OutputError, UsageError
from embedq.job import ARCHIVED_FIELD, OUTPUT_FIELD
from embedq.keys import JobKeys
from embedq.worker.commit import PartEntry, part_writer
from embedq.worker.output import DEAD_LETTERS_FILE, MANIFEST_FILE, PART_SUFFIX, OutputDir, open_output, part_file

_UNARCHIVE = f"""
-- KEYS: 1 stats, 2 manifest, 3 dead.  ARGV: 1 '1' if the parts follow, 2 their number n, 3 '1' if the
--   dead letters follow, 4 their number m, then n (part name, manifest entry), then m (dead id, letter)
-- A key that expired after the caller looked, with nothing supplied for it: -1, look again.
if redis.call('HEXISTS', KEYS[1], '{ARCHIVED_FIELD}') == 0 then return 0 end
local n, m = tonumber(ARGV[2]), tonumber(ARGV[4])
if redis.call('EXISTS', KEYS[2]) == 0 then
  if ARGV[1] ~= '1' then return -1 end
  if tonumber(redis.call('HGET', KEYS[1], 'parts') or '0') ~= n then return -2 end
  for i = 1, n do redis.call('HSET', KEYS[2], ARGV[3 + 2 * i], ARGV[4 + 2 * i]) end
end
if redis.call('EXISTS', KEYS[3]) == 0 then
  if ARGV[3] ~= '1' then return -1 end
  local at = 3 + 2 * n
  for j = 1, m do redis.call('XADD', KEYS[3], ARGV[at + 2 * j], '{DEAD_FIELD.decode()}', ARGV[at + 1 + 2 * j]) end
end
redis.call('PERSIST', KEYS[2])
redis.call('PERSIST', KEYS[3])
redis.call('HDEL', KEYS[1], '{ARCHIVED_FIELD}')
return 1
"""


def unarchive(client: redis.Redis, keys: JobKeys, output: OutputDir) -> bool:
    """Make an archived job whole in Redis again: what expired restored from the output's files, the
    TTLs removed, the mark cleared. False if the job was not archived; OutputError where a file it
    needs is missing or is not this job's."""
    script = client.register_script(_UNARCHIVE)
    look_again = False
    while True:
        pipe = client.pipeline(transaction=False)
        pipe.hmget(keys.stats, [ARCHIVED_FIELD, "parts", "docs_dead"])
        pipe.exists(keys.manifest)  # EXISTS, not TTL: the narrowest ACL the README lists has no TTL
        pipe.exists(keys.dead)
        (archived, parts, docs_dead), has_manifest, has_dead = pipe.execute()
        if archived is None:
            return False
        entries = None if has_manifest and not look_again else _archived_parts(output, keys, int(parts or 0))
        letters = None if has_dead and not look_again else archived_letters(output, keys, int(docs_dead or 0))
        args: list[Any] = ["" if entries is None else "1", len(entries or {}), "" if letters is None else "1",
                           len(letters or []), *(x for pair in (entries or {}).items() for x in pair),
                           *(x for e in letters or [] for x in (e.dead_id, encode(e.letter)))]
        done = int(script(keys=[keys.stats, keys.manifest, keys.dead], args=args))
        if done == -2:
            raise OutputError(f"{output.where(MANIFEST_FILE)} lists {len(entries or {})} parts, but job "
                              f"{keys.job!r} committed {int(parts or 0)}: it is not this job's final manifest. "
                              f"Put the job's own back, or, if the output is all you need, `embedq delete --job "
                              f"{keys.job}`.")
        if done >= 0:
            return done == 1
        look_again = True


def dead_letters(client: redis.Redis, keys: JobKeys, *, output: OutputDir | str | None = None,
                 count: int | None = None) -> list[DeadEntry]:
    """The job's dead letters, oldest first (the first `count`): from Redis, or once Redis has let
    an archived job's copy expire, from `_dead_letters.jsonl` in `output` (default: the recorded one)."""
    pipe = client.pipeline(transaction=False)
    pipe.xrange(keys.dead, count=count)  # first: had the stream entries, they are what it held
    pipe.exists(keys.dead)
    pipe.hmget(keys.stats, [ARCHIVED_FIELD, OUTPUT_FIELD, "docs_dead"])
    raw, exists, (archived, recorded, docs_dead) = pipe.execute()
    if raw or exists or archived is None:
        return decode_entries(raw)
    location = output if output is not None else None if recorded is None else recorded.decode()
    if location is None:
        raise UsageError(f"Job {keys.job!r}'s dead letters have expired from Redis and its output location is not "
                         "recorded: pass --out DIR, the directory whose _dead_letters.jsonl lists them.")
    found = archived_letters(location if isinstance(location, OutputDir) else open_output(location, create=False),
                             keys, int(docs_dead or 0))
    return found if count is None else found[:count]


def archived_letters(output: OutputDir, keys: JobKeys, dead_documents: int) -> list[DeadEntry]:
    """The dead letters `_dead_letters.jsonl` holds, in their stream's order; OutputError where the
    file is gone though the job has dead documents."""
    rows = output.read_lines(DEAD_LETTERS_FILE)
    if rows is None:
        if dead_documents:
            raise OutputError(f"Job {keys.job!r}'s {dead_documents:,} dead-lettered documents have expired from Redis "
                              f"and {output.where(DEAD_LETTERS_FILE)} is missing: put the file back (`embedq "
                              "verify` needs it to account for them).")
        return []
    return sorted((from_file_row(row, keys.job) for row in rows), key=lambda e: _stream_order(e.dead_id))


def _archived_parts(output: OutputDir, keys: JobKeys, parts: int) -> dict[str, bytes]:
    """The manifest entries `_manifest.json` records (without the stream entries and sequence
    numbers of each part, which only matter while the job runs)."""
    if parts == 0:
        return {}
    manifest = output.read_manifest()
    if manifest is None or manifest.get("job") != keys.job:
        raise OutputError(f"Job {keys.job!r}'s manifest has expired from Redis and {output.where(MANIFEST_FILE)} "
                          f"{'is missing' if manifest is None else 'names another job'}: without it, committed parts "
                          "cannot be told from orphans. Put the file back, or, if the output is all you need, "
                          f"`embedq delete --job {keys.job}`.")
    committed_at = float(manifest.get("updated_at", 0.0))
    entries = {}
    for part in manifest.get("parts", []):
        name = str(part["file"]).removesuffix(PART_SUFFIX)
        entries[name] = msgspec.json.encode(PartEntry(
            name=name, rows=int(part["rows"]), tokens=int(part.get("tokens", 0)), bytes=int(part.get("bytes", 0)),
            entries=[], seqs=[], worker=part_writer(name), committed_at=committed_at))
    return entries


def _stream_order(entry_id: str) -> tuple[int, int]:
    milliseconds, _, sequence = entry_id.partition("-")
    return int(milliseconds), int(sequence or 0)


def write_manifest_file(output: OutputDir, job: str, parts: dict[str, PartEntry], *, complete: bool,
                        extra: dict[str, Any]) -> None:
    """Write `_manifest.json`, so the output location describes itself without Redis."""
    output.write_json(MANIFEST_FILE, {
        "job": job,
        "complete": complete,
        "documents": sum(p.rows for p in parts.values()),
        "parts": [{"file": part_file(name), "rows": p.rows, "bytes": p.bytes, "tokens": p.tokens}
                  for name, p in sorted(parts.items())],
        "updated_at": time.time(),
        **extra,
    })


def write_dead_letters(output: OutputDir, letters: list[DeadEntry]) -> int:
    """Write `_dead_letters.jsonl` (each letter whole, payload included), or remove it when there
    are none; returns how many documents they hold."""
    if letters:
        output.write_lines(DEAD_LETTERS_FILE, [file_row(entry) for entry in letters])
    else:
        output.remove_file(DEAD_LETTERS_FILE)
    return sum(len(entry.letter.doc_ids) for entry in letters)
