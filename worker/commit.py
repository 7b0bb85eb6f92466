"""The commit protocol: how a staged part and its batches become committed exactly once.

    1. stage     write the part under `.<name>.parquet.tmp`, fsync it      (writer.py)
    2. settle    one atomic Redis step: manifest entry + dead letters + XACK + XDEL + counters
    3. publish   rename to `<name>.parquet`, fsync the directory           (output.py)
                 (in an object store: copy, then delete the staged object; object_store.py)

Step 2 runs as a Lua script: Redis executes it atomically and replicates it as one unit, exactly
like MULTI/EXEC, but it can also *check* before writing, which MULTI/EXEC cannot without WATCH on
keys every worker writes. It settles only if every stream entry of the part is still pending in
the consumer group and recovery has not condemned the part; otherwise the writer drops the part
and prepares it again without the entries settled elsewhere, under a new name. Retrying after a
lost reply is safe: a part already in the manifest answers "committed".

Redis may lose the writes it acknowledged in its last second or so (AOF `everysec`, a failover;
7.0 has no WAITAOF to wait for them). So recovery never deletes a part a lost write could bring
back into the manifest: it moves it aside (`.<name>.parquet.set-aside`, which no glob matches and
pyarrow.dataset skips), and any step that finds a committed part aside puts it back. Set-aside
parts are deleted only by `finalize.prune_set_aside`, once the job is complete and final.

Every state a crash or a lost Redis write can leave, and who repairs it ("recovery" is `reconcile`,
run at worker start, by `embedq gc`, `embedq verify` and at the job's end, `finalize.py`):

  died before/while staging, or staged and died   .tmp, not in the manifest   batches reclaimed after the lease
                                                                               and redone; recovery sets the .tmp aside
  staged, alive, but its lease lapsed             .tmp, not in the manifest   recovery condemns it (SADD), then sets it
                                                                               aside; the settle is refused: restaged
  ... and Redis lost that condemnation            .set-aside, settle passes   the writer's publish renames the set-aside
                                                                               file (if it dies first, recovery does)
  settled, died before the rename                 .tmp or .set-aside, listed  recovery renames it (roll forward)
  object store: copied, died before the delete    visible + copy, listed      recovery deletes the copy (same bytes)
  settle lost by Redis, writer died               .tmp, not in the manifest   as "staged and died"
  settle lost by Redis after the rename           visible, not listed         recovery sets it aside at once; redone
  settle found entries settled elsewhere          the writer deletes its .tmp no one else may ever commit that name
  job complete                                    -                           finalize.py: all writers taken for dead
  final, and its manifest expired from Redis      -                           recovery restores it from _manifest.json
                                                                               first (archive.py), or refuses to run
  committed, file deleted by hand                 listed, no file             an operator: `verify` lists its docs
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
from embedq.ledger import LEDGER_LUA
from embedq.worker.output import OutputDir
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
    documents: int | None = None  # source documents in the part: its rows unless chunks make more rows

    @property
    def dead_docs(self) -> int:
        return sum(len(letter.doc_ids) for letter in self.dead)


class Outcome(Enum):
    SETTLED = "settled"  # this call committed it
    ALREADY = "already"  # the part was committed by an earlier try of this same call
    GONE = "gone"  # some entries were settled elsewhere; `gone` lists them
    CONDEMNED = "condemned"  # recovery set the staged file aside (its writer looked dead): stage it again


@dataclass(frozen=True)
class SettleResult:
    outcome: Outcome
    gone: tuple[str, ...] = ()
    backlog: int = 0  # stream length after the step


_SETTLE = """
-- KEYS: 1 stream, 2 manifest, 3 stats, 4 dead, 5 failures, 6 condemned
-- ARGV: 1 group, 2 part ('' if none), 3 manifest entry, 4 documents, 5 tokens, 6 dead docs,
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
redis.call('HDEL', KEYS[3], 'finalized')  -- the output changes: no longer final (finalize.py)
return {'settled', redis.call('XLEN', KEYS[1])}
"""

_SPLIT = LEDGER_LUA + """
-- KEYS: 1 stream, 2 failures, 3 ledger.  ARGV: 1 group, 2 entry id, then the payloads that replace it
-- The halves inherit the entry's ledger record (its seq), and its record goes with it.
local id = ARGV[2]
if #redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1) == 0 then return 0 end
local seq = ledger_take(KEYS[3], id)
for i = 3, #ARGV do ledger_add(KEYS[1], KEYS[3], seq, ARGV[i]) end
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
        documents = settlement.documents if settlement.documents is not None else part.rows if part else 0
        args: list[Any] = [
            GROUP, part.name if part else "", entry, documents if part else 0, settlement.tokens,
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
        keys = [self.keys.stream, self.keys.failures, self.keys.ledger]
        return bool(self._retry(lambda: self._split(keys=keys, args=[GROUP, entry_id, *payloads]),
                                "split a poison batch"))


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
    for dead and its file set aside), the part is dropped and prepared again without those entries,
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
            self.table = self.writer.table(docs.ids, docs.embeddings, docs.tokens.lengths, docs.tokens.truncated,
                                           docs.chunks)
        self.settlement = Settlement(entries=window.all_entry_ids, seqs=window.seqs, tokens=window.token_count,
                                     dead=window.dead, dead_entries=len(window.dead_entries),
                                     documents=window.document_count)
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
    rolled_forward: list[str] = field(default_factory=list)  # committed, renamed from staged or set aside
    orphans_set_aside: list[str] = field(default_factory=list)  # visible, not committed
    staged_set_aside: list[str] = field(default_factory=list)  # staged by a writer taken for dead
    staged_kept: list[str] = field(default_factory=list)  # staged by a live writer
    missing: list[str] = field(default_factory=list)  # committed, and no file anywhere
    set_aside_deleted: list[str] = field(default_factory=list)  # proved unneeded by the finished job
    finalized: bool = False  # set by `finalize.finalize_output`


def reconcile(client: redis.Redis, keys: JobKeys, output: OutputDir, *, live_workers: set[str],
              finished: bool = False, grace: float | None = None) -> Reconciliation:
    """Bring the directory in line with the manifest: roll committed parts forward, set orphans aside.

    The directory is listed BEFORE the manifest is read: a part visible at listing time was renamed
    after its commit, so the later manifest read includes it. Staged orphans of live workers are
    kept (they may be about to commit) unless the job is `finished`; any other is condemned in
    Redis before it is set aside, so its writer, if alive after all, cannot commit it. With
    `finished`, set-aside parts the finished job does not need are then deleted (`prune_set_aside`).
    """
    from embedq.worker.archive import unarchive  # the archive builds on this module

    output.remove_stale_probes()
    unarchive(client, keys, output)  # an archived job's manifest back from `_manifest.json`, before it is read
    visible, staged, aside = output.part_names(), output.staged_names(), output.set_aside_names()
    parts = manifest_entries(client, keys)
    report = Reconciliation(parts=parts)
    for name in sorted(parts.keys() - visible):
        if name in staged or name in aside:
            output.publish(name)
            report.rolled_forward.append(name)
        elif not output.has_part(name):
            report.missing.append(name)
    # Committed and visible, with a copy beside it: an object store's publish died between copy and delete.
    for name in sorted(parts.keys() & visible & (staged | aside)):
        output.forget_copy(name)
    # Visible but not committed: Redis lost the commit (its batches are pending again and will be
    # committed anew). Out of sight at once, so a glob reader does not see those documents twice.
    for name in sorted(visible - parts.keys()):
        if output.move_aside(name, visible=True):
            report.orphans_set_aside.append(name)
    doomed = [name for name in sorted(staged - parts.keys()) if finished or part_writer(name) not in live_workers]
    report.staged_kept = sorted(staged - parts.keys() - set(doomed))
    # A writer whose lease lapsed may be alive (idle, slow, cut off from Redis) and about to commit
    # its staged part: condemn the name in Redis first, so that commit is refused, then set it
    # aside. Redis may lose the condemnation; the writer's publish then finds the file aside.
    verdicts = client.register_script(_CONDEMN)(keys=[keys.manifest, keys.condemned], args=doomed) if doomed else []
    for name, verdict in zip(doomed, verdicts, strict=True):
        if _text(verdict) == "committed":  # committed after the manifest was read: roll it forward
            raw = client.hget(keys.manifest, name)
            assert raw is not None
            parts[name] = msgspec.json.decode(raw, type=PartEntry)
            output.publish(name)
            report.rolled_forward.append(name)
        elif output.move_aside(name, visible=False):
            report.staged_set_aside.append(name)
    if report.orphans_set_aside or report.staged_set_aside:
        output.sync_dir()
    if finished and not report.missing:
        from embedq.worker.finalize import SET_ASIDE_GRACE, prune_set_aside  # finalize builds on this module

        report.set_aside_deleted = prune_set_aside(client, keys, output, SET_ASIDE_GRACE if grace is None else grace)
    return report


def part_name(counter: int, worker: str) -> str:
    """A part's name: unique per worker process and window (`part-<n>-<worker>`)."""
    return f"part-{counter:06d}-{worker}"


def part_writer(name: str) -> str:
    """The worker id inside a part name."""
    return name.split("-", 2)[2] if name.count("-") >= 2 else ""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
