"""The producer: scan the source, create (or resume) the job, publish every batch once, finish.

    scan      ids only: count, id type, duplicate ids, fingerprint (refuses duplicates by default)
    job       create the job record, or check that a resumed job is the same job
    publish   from the cursor in Redis to the end of the source, waiting on backpressure
    finish    mark the job produced, so workers know when it is complete
    stay      (`until_complete`) watch the job until it is complete; if Redis lost the `done` mark
              or the last batches (a restart without its last second, a failover), publish them again

The producer holds the job's lock (`keys.producer_lock`, a TTL renewed as it works) from `publish`
to the end: a job not fully produced without a lock holder has stalled, which `status` and idle
workers report with the command that finishes it.

With `ProducerOptions.part` (`--slice K/N`) it publishes one slice of the source, and N such
producers publish one job together (`slices.py`); the scan and the job record cover the whole source.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import redis

from embedq import deadletter
from embedq.config import Settings
from embedq.connection import retry_redis
from embedq.errors import SourceError, UsageError
from embedq.job import JobRecord, create_or_check, new_record
from embedq.keys import JobKeys
from embedq.model import ModelInfo
from embedq.producer.batching import BatchRules, PlannedBatch, plan_batches
from embedq.producer.publisher import Publisher
from embedq.producer.slices import Slice
from embedq.producer.sources import Source, SourceScan
from embedq.protocol import SCHEMA_VERSION, BatchMessage, Limits, encode_batch
from embedq.quantization import OutputFormat
from embedq.tokenization import TokenizedDocs, TokenizerPool

log = logging.getLogger("embedq.producer")


@dataclass(frozen=True)
class ProducerOptions:
    """How the producer batches and publishes; see `embedq produce --help` (the defaults are the CLI's)."""

    batch_size: int = Settings.batch_size
    limits: Limits = field(default_factory=Limits)
    backlog: int = Settings.backlog
    allow_empty: bool = Settings.allow_empty
    allow_duplicate_ids: bool = Settings.allow_duplicate_ids
    redis_retry_seconds: float = Settings.redis_retry_seconds
    until_complete: bool = False  # stay after publishing, publishing again what Redis loses, until complete
    watch_seconds: float = 1.0  # how often a producer that stays looks at the job
    part: Slice = field(default_factory=Slice)  # the slice of the source to publish (`--slice K/N`); all by default
    output: OutputFormat = field(default_factory=OutputFormat)  # how the job's vectors are stored (its record)
    chunk_tokens: int = Settings.chunk_tokens  # long documents cut into chunks (`embedq.chunking`); 0: truncated
    chunk_overlap: int = Settings.chunk_overlap
    compress: bool = Settings.compress  # zstd on each message (`embedq.protocol`)

    @classmethod
    def from_settings(cls, settings: Settings) -> ProducerOptions:
        return settings.options_for(cls, limits=settings.limits())


@dataclass
class ProducerReport:
    """What one producer run did."""

    job: str
    documents: int = 0  # documents in the source
    published_documents: int = 0  # documents published in this run
    batches: int = 0  # batches published in this run
    rejected: int = 0  # documents dead-lettered by the producer in this run
    resumed_from: int = 0  # source position this run started at
    already_done: bool = False
    complete: bool = False  # with `until_complete`: it stayed until the job was complete
    seconds: float = 0.0
    waited_seconds: float = 0.0  # time spent waiting on backpressure


Progress = Callable[[int, int], None]  # (documents published so far, total)


class Producer:
    """Publishes one source as one job."""

    def __init__(self, client: redis.Redis, keys: JobKeys, source: Source, model: ModelInfo,
                 options: ProducerOptions, *, encode: Callable[[list[str]], TokenizedDocs] | None = None,
                 tokenizer: TokenizerPool | None = None, stopping: Callable[[], bool] = lambda: False) -> None:
        self.client = client
        self.keys = keys
        self.source = source
        self.model = model
        self.options = options
        # Pretokenize when either is given; a pool tokenizes several batches ahead, in parallel.
        self.tokenizer = tokenizer
        self.encode = tokenizer.encode if tokenizer is not None else encode
        self.stopping = stopping
        self.publisher = Publisher(client, keys, options.backlog, part=options.part)
        self.scan: SourceScan | None = None
        self.record: JobRecord | None = None
        self.report: ProducerReport | None = None  # the report of the run under way (metrics read it)

    def prepare(self) -> JobRecord:
        """Scan the source (once) and create or check the job record."""
        scan = self.scan = self.scan or self.source.scan()
        if scan.n_duplicates and not self.options.allow_duplicate_ids:
            examples = ", ".join(f"{i!r} (positions {a} and {b})" for i, a, b in scan.duplicate_ids[:5])
            raise SourceError(
                f"{self.source.describe()} has {scan.n_duplicates} duplicate id(s), e.g. {examples}. Every id must "
                "be unique so the output holds it exactly once: fix the source, or pass --allow-duplicate-ids "
                "to embed the first occurrence and dead-letter the others."
            )
        if scan.count == 0:
            raise SourceError(f"{self.source.describe()} holds no documents.")
        record = new_record(
            self.keys.job, self.model, source=self.source.describe(), source_fingerprint=scan.fingerprint,
            source_spec=_spec_record(self.source), id_type=scan.id_type, documents=scan.count,
            batch_size=self.options.batch_size, pretokenized=self.encode is not None,
            max_doc_bytes=self.options.limits.max_doc_bytes,
            max_message_bytes=self.options.limits.max_message_bytes, allow_empty=self.options.allow_empty,
            allow_duplicate_ids=self.options.allow_duplicate_ids, chunk_tokens=self.options.chunk_tokens,
            chunk_overlap=self.options.chunk_overlap if self.options.chunk_tokens else 0,
            **self.options.output.record_fields())
        record.chunking(self.model)  # a chunk size the model cannot take is refused before anything is published
        self.record = self._redis(lambda: create_or_check(self.client, self.keys, record), "create the job")
        self.publisher.cover(self.record.documents)
        return self.record

    def run(self, progress: Progress = lambda done, total: None) -> ProducerReport:
        """Publish the whole source (from where an earlier run stopped), then, with `until_complete`,
        stay and publish again whatever Redis loses until the job is complete; returns the report."""
        started = time.monotonic()
        record = self.record or self.prepare()
        report = self.report = ProducerReport(job=self.keys.job,
                                              documents=self.publisher.stop - self.publisher.start)
        # Staying: wait for another producer of the job for as long as it runs, not a lock's lifetime.
        wait = math.inf if self.options.until_complete else None
        self._redis(self.publisher.check_numbering, "read the producer cursor")
        if not self._redis(lambda: self.publisher.acquire(wait, stopping=self.stopping), "take the producer lock"):
            return report
        try:
            report.resumed_from = self._redis(self.publisher.cursor, "read the producer cursor").next_pos
            report.already_done = self._publish_rest(record, report, progress)
            if self.options.until_complete:
                self._until_complete(record, report, progress)
        finally:
            report.seconds = time.monotonic() - started
            with contextlib.suppress(redis.RedisError):
                self.publisher.release()
        return report

    def _publish_rest(self, record: JobRecord, report: ProducerReport, progress: Progress) -> bool:
        """Publish from where Redis' cursor stands to the source's end and mark the job produced;
        True if it was already marked."""
        cursor = self._redis(self.publisher.cursor, "read the producer cursor")
        if cursor.done:
            progress(report.documents, report.documents)
            return True
        assert self.scan is not None
        skip = frozenset(self.scan.duplicate_positions) if self.options.allow_duplicate_ids else frozenset()
        # Whole documents' ids (a chunked job's) take up to 4 bytes per byte of text: batches close sooner.
        share = 8 if record.chunk_tokens and record.pretokenized else 2
        rules = BatchRules(self.options.batch_size, self.options.limits, self.options.allow_empty, skip, share)
        while True:
            if cursor.next_pos > self.publisher.start:
                log.info("resuming job %s at batch %d (document %d of %d)", self.keys.job, cursor.next_seq,
                         cursor.next_pos, self.publisher.stop)
            self._publish_all(rules, cursor.next_seq, cursor.next_pos, record, report, progress)
            if self.stopping() or self._redis(self.publisher.finish, "finish the job"):
                break
            cursor = self._redis(self.publisher.cursor, "read the producer cursor")
            if cursor.next_pos >= self.publisher.stop:  # cannot be: the record pins the source's size
                raise SourceError("the producer cursor is past the end of the source; run it again")
            # Redis lost the last batches between the last publish and the finish: publish them again.
        return False

    def _until_complete(self, record: JobRecord, report: ProducerReport, progress: Progress) -> None:
        """Stay until the job is complete (settled, output final), holding the lock, and publish
        again what Redis lost meanwhile: a restart from an AOF without its last second, or a
        failover, can take the `done` mark and the last batches with it, and workers would then
        wait for them forever."""
        announced = False
        while not self.stopping():
            state = self._redis(self.publisher.progress, "watch the job")
            if state.complete:
                report.complete = True
                return
            if state.lock_holder != self.publisher.owner:  # Redis came back without it: take it again
                self._hold_lock()
            if not state.cursor.done:
                log.warning("Redis lost the end of job %s's publishing (it is at document %d of %d): "
                            "publishing again from there", self.keys.job, state.cursor.next_pos, self.publisher.stop)
                self._redis(lambda: create_or_check(self.client, self.keys, record), "check the job record")
                self._publish_rest(record, report, progress)
                continue
            if not announced:
                log.info("job %s fully produced; staying until it is complete (--until-complete)", self.keys.job)
                announced = True
            self._redis(self.publisher.renew, "renew the producer lock")
            deadline = time.monotonic() + self.options.watch_seconds
            while time.monotonic() < deadline and not self.stopping():
                time.sleep(0.05)

    def _hold_lock(self) -> None:
        """Renew the lock now; if another producer took it meanwhile, wait for it to be done."""
        try:
            self._redis(lambda: self.publisher.renew(force=True), "renew the producer lock")
        except UsageError as exc:
            log.warning("%s Waiting for that producer to finish.", exc)
            self._redis(lambda: self.publisher.acquire(math.inf, stopping=self.stopping), "take the producer lock")

    def _publish_all(self, rules: BatchRules, seq: int, pos: int, record: JobRecord, report: ProducerReport,
                     progress: Progress) -> None:
        while True:  # a pass ends at the source's end, or restarts when Redis moved the cursor back
            rewind = None
            batches = plan_batches(self.source, rules, start_seq=seq, start_pos=pos, stop_pos=self.publisher.stop)
            for batch, payload in self._with_payloads(batches):
                if self.stopping():
                    return
                letters = [deadletter.encode(letter) for letter in self._dead_letters(batch)]
                waited = time.monotonic()
                self._redis(lambda: self.publisher.wait_for_room(self.stopping), "wait for room in the stream")
                report.waited_seconds += time.monotonic() - waited
                result = self._redis(
                    functools.partial(self.publisher.publish, batch.seq, batch.next_pos, payload, batch.documents,
                                      letters, len(batch.rejected)),
                    "publish a batch")
                self._redis(self.publisher.renew, "renew the producer lock")
                if not result.accepted:
                    assert result.cursor is not None
                    if result.cursor.next_seq > batch.seq:
                        continue  # published before (a retried call whose reply was lost)
                    rewind = result.cursor  # Redis lost recent batches (restart without fsync): redo them
                    log.warning("Redis is at batch %d, behind this producer (%d): republishing from there",
                                rewind.next_seq, batch.seq)
                    break
                report.batches += 1 if payload else 0
                report.published_documents += batch.documents
                report.rejected += len(batch.rejected)
                progress(batch.next_pos - self.publisher.start, report.documents)
            if rewind is None:
                return
            seq, pos = rewind.next_seq, rewind.next_pos

    def _with_payloads(self, batches: Iterator[PlannedBatch]) -> Iterator[tuple[PlannedBatch, bytes | None]]:
        """Each batch with its encoded message; token ids are computed `lookahead` batches ahead."""
        lookahead = 2 * self.tokenizer.processes if self.tokenizer is not None else 0
        pending: collections.deque[tuple[PlannedBatch, Future[TokenizedDocs] | None]] = collections.deque()
        for batch in batches:
            started = self.tokenizer.submit(batch.texts) if self.tokenizer is not None and batch.ids else None
            pending.append((batch, started))
            while len(pending) > lookahead:
                yield self._payload(*pending.popleft())
        while pending:
            yield self._payload(*pending.popleft())

    def _payload(self, batch: PlannedBatch, tokens: Future[TokenizedDocs] | None) -> tuple[PlannedBatch, bytes | None]:
        if not batch.ids:
            return batch, None
        if self.encode is None:
            message = BatchMessage(v=SCHEMA_VERSION, job=self.keys.job, seq=batch.seq, pos=batch.pos,
                                   ids=batch.ids, texts=batch.texts)
        else:
            docs = tokens.result() if tokens is not None else self.encode(batch.texts)
            message = BatchMessage(v=SCHEMA_VERSION, job=self.keys.job, seq=batch.seq, pos=batch.pos,
                                   ids=batch.ids, tokens=docs.tokens.astype("<i4").tobytes(),
                                   lengths=docs.lengths.astype("<i4").tobytes(),
                                   truncated=docs.truncated.astype("u1").tobytes())
        return batch, encode_batch(message, compress=self.options.compress)

    def _dead_letters(self, batch: PlannedBatch) -> list[deadletter.DeadLetter]:
        letters = []
        for rejected in batch.rejected:
            replayable = rejected.text is not None
            message = BatchMessage(v=SCHEMA_VERSION, job=self.keys.job, seq=batch.seq, pos=batch.pos + rejected.index,
                                   ids=[rejected.doc_id], texts=[rejected.text or ""])
            letters.append(deadletter.DeadLetter(
                job=self.keys.job, entry_id="", seq=batch.seq, pos=batch.pos + rejected.index,
                doc_ids=[rejected.doc_id], reason=rejected.reason, error=rejected.error, worker="producer",
                failed_at=time.time(), payload=encode_batch(message) if replayable else b"",
                replayable=replayable))
        return letters

    def _redis(self, call: Callable[[], Any], what: str) -> Any:
        return retry_redis(call, give_up_after=self.options.redis_retry_seconds, what=what, log=log.warning,
                           stopping=self.stopping)


def _spec_record(source: Source) -> dict[str, object]:
    """The source settings for the job record, with an absolute path so `verify` finds it from anywhere."""
    spec = dataclasses.asdict(source.spec)
    if spec["path"] != "-":
        spec["path"] = os.path.abspath(spec["path"])
    return spec
