"""Finalizing a job's output: once every batch is settled, make the directory final and say so.

`finalize_output` runs at the job's end (the worker that sees it complete), by `embedq gc` on a
complete job, and by `embedq verify`. It runs recovery with every writer taken for dead (commit.py:
committed parts renamed, orphans set aside), writes `_dead_letters.jsonl` and `_manifest.json`, and
only then records `finalized` in the job's stats hash, which `status` reads: "complete" means the
output is final, not merely that the stream is empty. A settle after that (a dead-letter replay
embedded) clears the flag again in the same atomic step. Once final, the job's bookkeeping per
stream entry is dropped from Redis, and what the files now record (manifest, dead letters) gets a TTL
(`job.compact_finished`, `archive.py`). `record_output` stores where the output is, for `status` and
`dead-letter replay`.

Set-aside parts (commit.py) are deleted here, and only here: once the job is complete, every part
the manifest lists is visible, and the part has been aside for `SET_ASIDE_GRACE` seconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import redis

from embedq import deadletter
from embedq.config import Settings
from embedq.job import FINALIZED_FIELD, OUTPUT_FIELD, JobRecord, compact_finished, job_complete, live_workers
from embedq.keys import JobKeys
from embedq.progress import byte_size
from embedq.worker.archive import write_dead_letters, write_manifest_file
from embedq.worker.commit import Reconciliation, Retry, reconcile
from embedq.worker.output import DEAD_LETTERS_FILE, OutputDir

log = logging.getLogger("embedq.worker")

# A set-aside part can be needed again only if Redis loses the condemnation that put it aside, and
# with it every write since. Deleting it no sooner than this after it was set aside (and after
# reading the job's state again) means that would take losing more than this many seconds of
# acknowledged writes: AOF `everysec` loses about 1 s, 2 s at worst when the disk stalls fsync.
SET_ASIDE_GRACE = 3.0

_FINALIZE = f"""
-- KEYS: 1 stream, 2 manifest, 3 stats, 4 dead.  ARGV: 1 parts the finalized directory holds, 2 the
--   dead-stream entries its _dead_letters.jsonl was written from, 3 the last one's id ('' if none)
-- Nothing may have been settled or replayed since the directory was made final: once archived, its
-- files are the job's whole record (entries are only ever added at the dead stream's end).
if redis.call('XLEN', KEYS[1]) ~= 0 or redis.call('HLEN', KEYS[2]) ~= tonumber(ARGV[1]) then return 0 end
if redis.call('XLEN', KEYS[4]) ~= tonumber(ARGV[2]) then return 0 end
if ARGV[3] ~= '' then
  local tail = redis.call('XRANGE', KEYS[4], ARGV[3], '+', 'COUNT', 2)
  if #tail ~= 1 or tail[1][1] ~= ARGV[3] then return 0 end
end
redis.call('HSET', KEYS[3], '{FINALIZED_FIELD}', 1)
return 1
"""


def _once(call: Callable[[], Any], what: str) -> Any:
    return call()


def record_output(client: redis.Redis, keys: JobKeys, output: OutputDir) -> None:
    """Record where the job's output is (`HSET <stats> output <absolute path or URI>`)."""
    client.hset(keys.stats, OUTPUT_FIELD, output.location)


def recorded_output(client: redis.Redis, keys: JobKeys) -> str | None:
    """The output location `record_output` recorded, if any."""
    raw = client.hget(keys.stats, OUTPUT_FIELD)
    return raw.decode() if isinstance(raw, bytes) else raw


def finalize_output(client: redis.Redis, keys: JobKeys, output: OutputDir, record: JobRecord, *,
                    retry: Retry | None = None, grace: float = SET_ASIDE_GRACE,
                    finished_ttl: int = Settings.finished_ttl) -> Reconciliation:
    """Make a complete job's output final: recovery, `_dead_letters.jsonl`, `_manifest.json`, then
    `finalized` in Redis, and compact the job there (what the files record expires after
    `finished_ttl` seconds). A job not complete (yet) only gets recovery, for live writers' sake."""
    run: Retry = retry or _once
    if not run(lambda: job_complete(client, keys), "check the job state"):
        return run(lambda: reconcile(client, keys, output, live_workers=set(live_workers(client, keys))),
                   "recover the output")
    done: Reconciliation = run(lambda: reconcile(client, keys, output, live_workers=set(), finished=True,
                                                 grace=grace), "finalize the output")
    if done.missing:
        log.error("committed parts are missing from %s: %s; `embedq verify` reports their documents",
                  output.location, ", ".join(done.missing[:10]))
    raw = run(lambda: client.xrange(keys.dead), "list dead letters")
    dead = write_dead_letters(output, deadletter.decode_entries(raw))
    write_manifest_file(output, keys.job, done.parts, complete=not done.missing,
                        extra={**record.model_fields(), "dead_letters": dead})
    if not done.missing:
        script = client.register_script(_FINALIZE)
        written = [len(done.parts), len(raw), _text(raw[-1][0]) if raw else ""]
        done.finalized = bool(run(lambda: script(keys=[keys.stream, keys.manifest, keys.stats, keys.dead],
                                                 args=written), "record the output as final"))
    if done.finalized:
        memory = run(lambda: compact_finished(client, keys, ttl=finished_ttl), "compact the job in Redis")
        if memory is not None and None not in memory:
            expiry = (f"; its manifest and dead letters, which the output records, leave Redis in {finished_ttl:,} s"
                      if finished_ttl else "")
            log.info("job %s: Redis holds %s of it now (%s before compaction%s); `embedq delete --job %s` "
                     "removes the rest once the output is all you need", keys.job, byte_size(memory[1]),
                     byte_size(memory[0]), expiry, keys.job)
    return done


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def write_dead_letters_file(client: redis.Redis, keys: JobKeys, output: OutputDir, *,
                            only_if_present: bool = False) -> int:
    """Write the job's dead letters as `_dead_letters.jsonl`, or remove the file when there are none
    (a replay emptied them); returns how many documents they hold. With `only_if_present`, a
    directory without the file is left alone (its job was never finalized)."""
    if only_if_present and not output.has_file(DEAD_LETTERS_FILE):
        return 0
    return write_dead_letters(output, deadletter.list_dead(client, keys))


def prune_set_aside(client: redis.Redis, keys: JobKeys, output: OutputDir, grace: float) -> list[str]:
    """Delete the set-aside parts a complete job does not need; returns their names.

    Only parts set aside at least `grace` seconds ago (waiting for the youngest if need be), and
    only if, read after the wait, the job is still complete and every part its manifest lists is
    visible: a write lost meanwhile shows as an incomplete job, and then nothing is deleted.
    """
    ages = {name: output.set_aside_age(name) for name in output.set_aside_names()}
    youngest = min((age for age in ages.values() if age is not None), default=grace)
    if youngest < grace:
        time.sleep(grace - youngest)
    committed = {name.decode() if isinstance(name, bytes) else str(name) for name in client.hkeys(keys.manifest)}
    if not job_complete(client, keys) or not committed <= output.part_names():
        return []
    doomed = []
    for name in sorted(ages.keys() - committed):
        age = output.set_aside_age(name)
        if age is not None and age >= grace:  # not set aside again during the wait
            output.delete_set_aside(name)
            doomed.append(name)
    if doomed:
        output.sync_dir()
    return doomed
