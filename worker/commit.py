"""The commit protocol: how a staged part and its batches become committed exactly once.

    1. stage     write the part under `<name>.parquet.tmp`, fsync it        (writer.py)
    2. settle    one atomic Redis step: manifest entry + dead letters + XACK + XDEL + counters
    3. publish   rename to `<name>.parquet`, fsync the directory           (output.py)

Step 2 runs as a Lua script: Redis executes it atomically and replicates it as one unit, exactly
like MULTI/EXEC, but it can also *check* before writing, which MULTI/EXEC cannot without WATCH on
keys every worker writes. It settles only if every stream entry of the part is still pending in
the consumer group; an entry that is no longer pending was settled by another worker (it lost
its lease and the batch was reclaimed), so the part is rewritten without it or dropped. Retrying
after a lost reply is safe: a part already in the manifest answers "committed".

A crash after step 1 leaves a staged orphan (its batches are reclaimed and done again); a crash
after step 2 leaves a committed part still under its staging name, which `reconcile` renames
(roll forward). `reconcile` deletes a staged orphan only after condemning its name in Redis: a
writer that merely looked dead (its lease lapsed) is then refused when it settles, and stages the
part again under a new name, instead of committing a part whose file is gone. Visible parts the
manifest does not list can only come from a Redis that lost acknowledged writes (failover, AOF
`everysec`); `reconcile` removes them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import msgspec
import pyarrow as pa
import redis

from embedq import deadletter
from embedq.keys import GROUP, JobKeys
from embedq.protocol import PAYLOAD_FIELD
from embedq.worker.output import MANIFEST_FILE, OutputDir
from embedq.worker.window import Window
from embedq.worker.writer import PartWriter, StagedPart


class PartEntry(msgspec.Struct, frozen=True, kw_only=True):
    """The manifest's record of one committed part."""

    name: str
    rows: int
    tokens: int
    bytes: int
    entries: list[str]
    seqs: list[int]
    worker: str
    committed_at: float


@dataclass
class Settlement:
    """Everything one settle step commits for a set of stream entries."""

    entries: list[str]
    part: StagedPart | None = None
    seqs: list[int] = field(default_factory=list)
    tokens: int = 0
    dead: list[deadletter.DeadLetter] = field(default_factory=list)
    dead_entries: int = 0  # entries dead-lettered whole (unreadable), for the counters

    @property
    def dead_docs(self) -> int:
        return sum(len(letter.doc_ids) for letter in self.dead)


class Outcome(Enum):
    SETTLED = "settled"  # this call committed it
    ALREADY = "already"  # the part was committed by an earlier try of this same call
    GONE = "gone"  # some entries were settled elsewhere; `gone` lists them
    CONDEMNED = "condemned"  # recovery discarded the staged file (its writer looked dead): stage it again


@dataclass(frozen=True)
class SettleResult:
    outcome: Outcome
    gone: tuple[str, ...] = ()
    backlog: int = 0  # stream length after the step


_SETTLE = """
-- KEYS: 1 stream, 2 manifest, 3 stats, 4 dead, 5 failures, 6 condemned
-- ARGV: 1 group, 2 part ('' if none), 3 manifest entry, 4 rows, 5 tokens, 6 dead docs,
--       7 dead entries, 8 n entry ids, 9 n dead letters, then entry ids, then dead letters
local part = ARGV[2]
if part ~= '' and redis.call('HEXISTS', KEYS[2], part) == 1 then
  return {'already', redis.call('XLEN', KEYS[1])}
end
if part ~= '' and redis.call('SISMEMBER', KEYS[6], part) == 1 then
  return {'condemned', redis.call('XLEN', KEYS[1])}
end
local n, nd = tonumber(ARGV[8]), tonumber(ARGV[9])
local gone = {'gone', 0}
for i = 1, n do
  local id = ARGV[9 + i]
  if #redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1) == 0 then gone[#gone + 1] = id end
end
if #gone > 2 then return gone end
if part ~= '' then
  redis.call('HSET', KEYS[2], part, ARGV[3])
  redis.call('HINCRBY', KEYS[3], 'parts', 1)
end
for i = 1, nd do redis.call('XADD', KEYS[4], '*', 'd', ARGV[9 + n + i]) end
for i = 1, n do
  local id = ARGV[9 + i]
  redis.call('XACK', KEYS[1], ARGV[1], id)
  redis.call('XDEL', KEYS[1], id)
  redis.call('HDEL', KEYS[5], id)
end
redis.call('HINCRBY', KEYS[3], 'docs_committed', tonumber(ARGV[4]))
redis.call('HINCRBY', KEYS[3], 'tokens', tonumber(ARGV[5]))
redis.call('HINCRBY', KEYS[3], 'docs_dead', tonumber(ARGV[6]))
redis.call('HINCRBY', KEYS[3], 'entries_dead', tonumber(ARGV[7]))
redis.call('HINCRBY', KEYS[3], 'entries_settled', n)
return {'settled', redis.call('XLEN', KEYS[1])}
"""

_SPLIT = f"""
-- KEYS: 1 stream, 2 failures.  ARGV: 1 group, 2 entry id, then the payloads that replace it
local id = ARGV[2]
if #redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1) == 0 then return 0 end
for i = 3, #ARGV do redis.call('XADD', KEYS[1], '*', '{PAYLOAD_FIELD.decode()}', ARGV[i]) end
redis.call('XACK', KEYS[1], ARGV[1], id)
redis.call('XDEL', KEYS[1], id)
redis.call('HDEL', KEYS[2], id)
return 1
"""

_CONDEMN = """
-- KEYS: 1 manifest, 2 condemned.  ARGV: staged part names recovery wants to discard
-- A part committed meanwhile is kept; any other is condemned, so its writer can no longer commit it.
local verdicts = {}
for i = 1, #ARGV do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 then
    verdicts[i] = 'committed'
  else
    redis.call('SADD', KEYS[2], ARGV[i])
    verdicts[i] = 'condemned'
  end
end
return verdicts
"""


Retry = Callable[[Callable[[], Any], str], Any]  # runs a Redis call, retrying outages (`what` names it)


def _once(call: Callable[[], Any], what: str) -> Any:
    return call()


class Committer:
    """Runs the settle and split steps of one job against Redis."""

    def __init__(self, client: redis.Redis, keys: JobKeys, worker: str, *, retry: Retry | None = None) -> None:
        self.client = client
        self.keys = keys
        self.worker = worker
        self._retry: Retry = retry or _once
        self._settle = client.register_script(_SETTLE)
        self._split = client.register_script(_SPLIT)

    def settle(self, settlement: Settlement) -> SettleResult:
        """Commit a part (if any), its dead letters and the acknowledgement of its entries, atomically."""
        part = settlement.part
        entry = b""
        if part is not None:
            entry = msgspec.json.encode(PartEntry(
                name=part.name, rows=part.rows, tokens=settlement.tokens, bytes=part.bytes,
                entries=settlement.entries, seqs=settlement.seqs, worker=self.worker,
                committed_at=time.time()))
        args: list[Any] = [
            GROUP, part.name if part else "", entry, part.rows if part else 0, settlement.tokens,
            settlement.dead_docs, settlement.dead_entries, len(settlement.entries), len(settlement.dead),
            *settlement.entries, *(deadletter.encode(d) for d in settlement.dead),
        ]
        keys = [self.keys.stream, self.keys.manifest, self.keys.stats, self.keys.dead, self.keys.failures,
                self.keys.condemned]
        reply = self._retry(lambda: self._settle(keys=keys, args=args), "commit a part")
        kind = _text(reply[0])
        if kind == "gone":
            return SettleResult(Outcome.GONE, tuple(_text(x) for x in reply[2:]))
        return SettleResult(Outcome(kind), (), int(reply[1]))

    def split(self, entry_id: str, payloads: Sequence[bytes]) -> bool:
        """Replace a pending entry by new entries (halves of its batch), atomically; False if gone."""
        return bool(self._retry(lambda: self._split(keys=[self.keys.stream, self.keys.failures],
                                                    args=[GROUP, entry_id, *payloads]), "split a poison batch"))


class Step(Enum):
    """How far a part has got; `PartCommit.steps` yields each step as it completes."""

    STAGED = "staged"  # written and fsynced under its staging name
    DROPPED = "dropped"  # some of its entries were settled elsewhere: discarded, to be redone without them
    SETTLED = "settled"  # committed in Redis (manifest, dead letters, XACK)
    PUBLISHED = "published"  # renamed to its visible name


class PartCommit:
    """One window's way through the protocol: prepare, stage, settle, publish (module docstring).

    If the settle step finds entries that another worker settled first (GONE: this one lost its
    lease on them), or finds the staged part condemned by recovery (CONDEMNED: this worker was taken
    for dead and its file deleted), the part is dropped and prepared again without those entries,
    under a new name. `steps()` yields after each step, so tests can stop a commit anywhere, as a
    crash would.
    """

    def __init__(self, window: Window, writer: PartWriter, committer: Committer, names: Callable[[], str]) -> None:
        self.window = window
        self.writer = writer
        self.committer = committer
        self._names = names
        self.excluded: frozenset[str] = frozenset()  # entries settled elsewhere
        self.dropped_documents = 0  # documents dropped because another worker committed them
        self.name = ""
        self.table: pa.Table | None = None
        self.settlement = Settlement(entries=[])

    def run(self) -> None:
        """All steps, to the end."""
        for _ in self.steps():
            pass

    def steps(self) -> Iterator[Step]:
        while self.prepare():
            if self.table is not None:
                self.stage()
                yield Step.STAGED
            result = self.settle()
            if result.outcome in (Outcome.GONE, Outcome.CONDEMNED):
                self.drop(result)
                yield Step.DROPPED
                continue
            yield Step.SETTLED
            if self.settlement.part is not None:
                self.publish()
                yield Step.PUBLISHED
            return

    def prepare(self) -> bool:
        """Build the part's table and settlement from the window, without the excluded entries;
        False when nothing is left to settle."""
        if self.excluded:
            self.dropped_documents += self.window.drop_entries(self.excluded)
        window = self.window
        self.table = None
        if len(window):
            docs = window.docs
            assert docs.embeddings is not None, "a window is committed after it was embedded"
            self.table = self.writer.table(docs.ids, docs.embeddings, docs.tokens.lengths, docs.tokens.truncated)
        self.settlement = Settlement(entries=window.all_entry_ids, seqs=window.seqs, tokens=window.token_count,
                                     dead=window.dead, dead_entries=len(window.dead_entries))
        self.name = self._names()
        return bool(self.settlement.entries)

    def stage(self) -> None:
        """Step 1: write and fsync the part under its staging name."""
        assert self.table is not None
        self.settlement.part = self.writer.stage(self.name, self.table)

    def settle(self) -> SettleResult:
        """Step 2: commit it in Redis, atomically, if every entry is still this worker's."""
        return self.committer.settle(self.settlement)

    def drop(self, result: SettleResult) -> None:
        """Discard the staged part; the next `prepare` leaves out the entries settled elsewhere."""
        if self.settlement.part is not None:
            self.writer.output.discard(self.name)
        self.excluded = self.excluded | frozenset(result.gone)

    def publish(self) -> None:
        """Step 3: rename the committed part to its visible name."""
        self.writer.output.publish(self.name)


def manifest_entries(client: redis.Redis, keys: JobKeys) -> dict[str, PartEntry]:
    """Every committed part of the job, by name."""
    raw = client.hgetall(keys.manifest)
    return {_text(k): msgspec.json.decode(v, type=PartEntry) for k, v in raw.items()}


@dataclass
class Reconciliation:
    """What `reconcile` found and did."""

    parts: dict[str, PartEntry]
    rolled_forward: list[str] = field(default_factory=list)
    orphans_removed: list[str] = field(default_factory=list)
    staged_removed: list[str] = field(default_factory=list)
    staged_kept: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def reconcile(client: redis.Redis, keys: JobKeys, output: OutputDir, *, live_workers: set[str],
              finished: bool = False) -> Reconciliation:
    """Bring the directory in line with the manifest: roll committed parts forward, remove orphans.

    The directory is listed BEFORE the manifest is read: a part visible at listing time was renamed
    after its commit, so the later manifest read includes it. Staged orphans of live workers are
    kept (they may be about to commit) unless the job is `finished`; any other is condemned in
    Redis before its file is deleted, so its writer, if alive after all, cannot commit it.
    """
    visible, staged = output.part_names(), output.staged_names()
    parts = manifest_entries(client, keys)
    report = Reconciliation(parts=parts)
    for name in sorted(parts):
        if name in visible:
            continue
        if name in staged:
            output.publish(name)
            report.rolled_forward.append(name)
        elif not output.final(name).exists():
            report.missing.append(name)
    for name in sorted(visible - parts.keys()):
        output.remove_orphan(name)
        report.orphans_removed.append(name)
    doomed = [name for name in sorted(staged - parts.keys()) if finished or part_writer(name) not in live_workers]
    report.staged_kept = sorted(staged - parts.keys() - set(doomed))
    # A writer whose lease lapsed may be alive (idle, slow, cut off from Redis) and about to commit
    # its staged part: condemn the name in Redis first, so that commit is refused, then delete it.
    verdicts = client.register_script(_CONDEMN)(keys=[keys.manifest, keys.condemned], args=doomed) if doomed else []
    for name, verdict in zip(doomed, verdicts, strict=True):
        if _text(verdict) == "committed":  # committed after the manifest was read: roll it forward
            raw = client.hget(keys.manifest, name)
            assert raw is not None
            parts[name] = msgspec.json.decode(raw, type=PartEntry)
            output.publish(name)
            report.rolled_forward.append(name)
        else:
            output.discard(name)
            report.staged_removed.append(name)
    if report.orphans_removed or report.staged_removed:
        output.sync_dir()
    return report


def write_manifest_file(output: OutputDir, job: str, parts: dict[str, PartEntry], *, complete: bool,
                        extra: dict[str, Any]) -> None:
    """Write `_manifest.json`, so the output directory describes itself without Redis."""
    output.write_json(MANIFEST_FILE, {
        "job": job,
        "complete": complete,
        "documents": sum(p.rows for p in parts.values()),
        "parts": [{"file": output.final(name).name, "rows": p.rows, "bytes": p.bytes, "tokens": p.tokens}
                  for name, p in sorted(parts.items())],
        "updated_at": time.time(),
        **extra,
    })


def part_name(counter: int, worker: str) -> str:
    """A part's name: unique per worker process and window (`part-<n>-<worker>`)."""
    return f"part-{counter:06d}-{worker}"


def part_writer(name: str) -> str:
    """The worker id inside a part name."""
    return name.split("-", 2)[2] if name.count("-") >= 2 else ""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
