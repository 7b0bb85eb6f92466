"""The worker: read batches, embed them, commit parts, exactly once, until the job is done.

Three stages run concurrently, joined by small bounded queues:

    fetch thread     XAUTOCLAIM / XREADGROUP -> decode, validate, tokenize -> Window
    engine (caller)  bucket by length -> engine, double-buffered -> embeddings
    commit thread    Parquet part -> fsync -> settle (manifest + dead letters + XACK) -> rename

A first SIGTERM or SIGINT stops reading and commits what was read, then exits 0; a second exits at
once, and what was not committed stays pending, reclaimed after the lease: nothing is lost.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import redis

from embedq.connection import retry_redis
from embedq.engines.base import Engine
from embedq.job import JobRecord, check_model, job_complete, live_workers, producer_stalled
from embedq.keys import JobKeys
from embedq.ledger import EntryLedger, read_ledger
from embedq.model import ModelInfo
from embedq.tokenization import Encode, Tokenizer
from embedq.worker.commit import Committer, PartCommit, Reconciliation, Step, part_name, reconcile
from embedq.worker.consumer import Delivery, StreamConsumer, ensure_group
from embedq.worker.faults import FaultIsolation
from embedq.worker.finalize import finalize_output, record_output
from embedq.worker.lease import InFlight, Lease, WorkingSet
from embedq.worker.options import WorkerOptions, WorkerReport
from embedq.worker.output import OutputDir
from embedq.worker.pipeline import END, Work, embed_stream
from embedq.worker.signals import drain_on_signal
from embedq.worker.window import DocumentRules, Window, WindowSizer
from embedq.worker.writer import PartWriter, part_metadata, stored_schema

log = logging.getLogger("embedq.worker")
# The worker's periodic progress lines: a command that shows its own progress display quiets them.
progress_log = logging.getLogger("embedq.worker.progress")

_END = None  # queue sentinel: no more windows


def new_worker_id() -> str:
    """host_pid_random: unique per process, readable in status and part names (no '-' inside)."""
    host = socket.gethostname().split(".")[0].replace("-", "") or "host"
    return f"{host[:20]}_{os.getpid()}_{uuid.uuid4().hex[:6]}"


class Worker:
    """One worker process's loop over one job."""

    def __init__(self, client: redis.Redis, keys: JobKeys, record: JobRecord, model: ModelInfo,
                 engine: Engine, output: OutputDir, options: WorkerOptions,
                 worker_id: str | None = None, encode: Encode | None = None) -> None:
        check_model(record, model)
        self.client = client
        self.keys = keys
        self.record = record
        self.model = model
        self.engine = engine
        self.output = output
        self.options = options
        self.id = worker_id or new_worker_id()
        self.report = WorkerReport(worker=self.id)
        self.consumer = StreamConsumer(client, keys, self.id, int(options.lease_seconds * 1000))
        self.committer = Committer(client, keys, self.id, retry=self._redis)
        self.in_flight = InFlight()
        self.lease = Lease(client, keys, self.id, self.consumer, self.in_flight, options.lease_seconds,
                           self._status, progress=self._progress)
        self.working = WorkingSet(client, keys, self.id, self._redis)
        self._sizer = WindowSizer(window_docs=options.window_docs, window_seconds=options.window_seconds,
                                  lease_seconds=options.lease_seconds, batch_size=record.batch_size)
        self._stop_deadline: float | None = None  # set by a stop: in-flight work must end by then
        self._stall_checked = time.monotonic() - 50  # the first check 10 s after the start
        self.rules = DocumentRules(limits=record.limits, allow_empty=record.allow_empty, vocab_size=model.vocab_size,
                                   max_tokens=model.max_seq_len, id_type=record.id_type,
                                   chunking=record.chunking(model))
        self._encode: Encode = encode or Tokenizer.for_model(model, chunked=self.rules.chunking is not None).encode
        self._ready: queue.Queue[Window | None] = queue.Queue(maxsize=max(1, options.prefetch))
        self._to_commit: queue.Queue[Window | None] = queue.Queue(maxsize=max(2, options.commit_threads))
        self._stop_reading, self._abort = threading.Event(), threading.Event()
        self._errors: list[BaseException] = []
        self._parts, self._parts_lock = itertools.count(1), threading.Lock()
        self._started = self._last_log = time.monotonic()
        self._state = "starting"
        self.faults = FaultIsolation(
            engine=engine, pad_id=model.pad_token_id,
            canary=Tokenizer(model.tokenizer_file, model.max_seq_len).encode(["embedq canary"]),
            committer=self.committer, in_flight=self.in_flight, count_failure=self._count_failure,
            max_failures=options.max_failures, max_deliveries=options.max_deliveries, worker=self.id)
        schema = stored_schema(record.id_type, model.dim, stored := record.output_format().check(model.dim),
                               part_metadata(keys.job, model.describe(), engine.name, engine.config.precision),
                               self.rules.chunking)
        self._writer = PartWriter(output, schema, disk_retry_seconds=options.disk_retry_seconds,
                                  stopping=self._abort.is_set, output_format=stored)

    # -- public ---------------------------------------------------------------------------------

    def run(self, *, install_signals: bool = True) -> WorkerReport:
        """Work until the job is complete (or a signal, or a fatal error); returns the report."""
        signals = drain_on_signal(self.stop) if install_signals else contextlib.nullcontext(bool)
        # From the first step on, a signal drains: one during recovery lets it finish, then nothing is read.
        with signals as signalled:
            self._redis(lambda: ensure_group(self.client, self.keys), "create the consumer group")
            self.output.claim(self.keys.job)
            self._redis(lambda: record_output(self.client, self.keys, self.output), "record the output location")
            recovered = self._recover("recover parts left by earlier workers")
            if recovered.rolled_forward:
                log.info("rolled %d committed part(s) forward", len(recovered.rolled_forward))
            fetcher = threading.Thread(target=self._guard, args=(self._fetch_loop,), name="embedq-fetch", daemon=True)
            committers = [threading.Thread(target=self._guard, args=(self._commit_loop,), name=f"embedq-commit-{i}",
                                           daemon=True) for i in range(max(1, self.options.commit_threads))]
            self._state = "running"
            self.lease.start()  # the worker shows in the job's workers once a signal would drain it
            fetcher.start()
            for thread in committers:
                thread.start()
            try:
                self._engine_loop()
            except BaseException as exc:
                self._errors.append(exc)
                self._abort.set()
            finally:
                self._drain([fetcher, *committers])
                self.lease.stop()
                self.report.stopped_by_signal = signalled()
        self.report.seconds = time.monotonic() - self._started
        if self._errors:
            raise self._errors[0]
        if self.report.job_complete:
            self.finalize()
        self._log_progress(force=True)
        return self.report

    def finalize(self) -> None:
        """Make the complete job's output final (parts visible, orphans aside, `_manifest.json`,
        `_dead_letters.jsonl`, then `finalized` in Redis; its copies in Redis expire later)."""
        finalize_output(self.client, self.keys, self.output, self.record, retry=self._redis,
                        finished_ttl=self.options.finished_ttl)

    def stop(self) -> None:
        """Stop reading; finish and commit what is on the engine, hand back what is not, within
        `shutdown_timeout` (what a first SIGTERM or SIGINT does)."""
        if self._stop_deadline is None:
            self._stop_deadline = time.monotonic() + self.options.shutdown_timeout
        self._stop_reading.set()

    def _past_deadline(self) -> bool:
        return self._stop_deadline is not None and time.monotonic() > self._stop_deadline

    def _progress(self) -> int:
        """Grows with every step: what the lease watches to tell a working worker from a stuck one."""
        report, stages = self.report, self.report.stages
        return (stages.fetched + stages.tokenized + report.engine.batches + stages.committed + report.parts
                + report.dead_documents)

    # -- stages ---------------------------------------------------------------------------------

    def _fetch_loop(self) -> None:
        reclaim_every = max(1.0, self.options.lease_seconds / 2)
        next_reclaim = 0.0
        idle_since: float | None = None
        batch_size = max(1, self.record.batch_size)
        while not self._stop_reading.is_set() and not self._abort.is_set():
            target = self._sizer.next_window(self.report.stages.embedded, self.report.engine.busy_seconds())
            per_read = max(1, -(-target // batch_size))
            deliveries: list[Delivery] = []
            if time.monotonic() >= next_reclaim:
                held = set(self.in_flight.snapshot())
                deliveries += self._redis(functools.partial(self.consumer.reclaim, per_read, held), "reclaim batches")
                self.report.reclaimed += len(deliveries)
                next_reclaim = 0.0 if len(deliveries) >= per_read else time.monotonic() + reclaim_every
                if deliveries:  # a batch redone may have a part from a lost settle: set it aside now
                    self._recover("set orphan parts aside")
            block = 200
            while len(deliveries) < per_read and not self._stop_reading.is_set():
                with self.report.latency["fetch"].time():
                    got = self._redis(functools.partial(self.consumer.read_new, per_read - len(deliveries), block),
                                      "read batches")
                if not got:
                    break
                deliveries += got
                block = 20  # a window fills from what is already there; do not wait long for more
            if not deliveries:
                idle_since = idle_since or time.monotonic()
                if self._finished_or_idle(idle_since):
                    break
                continue
            idle_since = None
            self.report.delivered += len(deliveries)
            self.in_flight.add([d.entry_id for d in deliveries])
            # An entry that workers died on is embedded in a window of its own: if it kills this
            # worker too, no batch-mate is blamed with it (the first step of crash isolation).
            suspects = [d for d in deliveries if d.crashes > 0]
            groups = [[d] for d in suspects] + [[d for d in deliveries if d.crashes == 0]]
            for suspect in suspects:
                log.warning("batch %s: %d worker(s) died while working on it; embedding it alone",
                            suspect.entry_id, suspect.crashes)
            entry_ids = [d.entry_id for d in deliveries]
            ledger = self._redis(functools.partial(read_ledger, self.client, self.keys, entry_ids), "read the ledger")
            for group in groups:
                if group and not self._stop_reading.is_set():
                    self._put(self._ready, self._prepare(group, ledger), until_stop=True)
        self._put(self._ready, _END, until_stop=True)

    def _finished_or_idle(self, idle_since: float) -> bool:
        if len(self.in_flight):
            return False
        if self.options.exit_when_done and self._redis(lambda: job_complete(self.client, self.keys),
                                                       "check the job state"):
            self.report.job_complete = True
            return True
        if time.monotonic() - self._stall_checked > 60:
            self._stall_checked = time.monotonic()
            advice = self._redis(lambda: producer_stalled(self.client, self.keys), "check the producer")
            if advice:
                log.warning("job %s is waiting for batches no producer will publish: %s", self.keys.job, advice)
        idle_limit = self.options.idle_exit_seconds
        return idle_limit is not None and time.monotonic() - idle_since > idle_limit

    def _prepare(self, deliveries: list[Delivery], ledger: EntryLedger | None = None) -> Window:
        """Decode, split crash suspects, tokenize and sort (a window may end up with nothing to
        embed, but still with entries to settle)."""
        ids = [d.entry_id for d in deliveries]
        self.working.add(ids)
        try:
            window = Window.assemble(deliveries, job=self.keys.job, rules=self.rules, worker=self.id, ledger=ledger)
            self.faults.split_crash_suspects(window)
            self.report.stages.fetched += sum(len(e.message) for e in window.entries)
            with self.report.latency["tokenize"].time():
                window.tokenize(self._encode, self.rules, self.id)
            window.sort_by_length()
        finally:
            self.working.discard(ids)
        self.report.stages.tokenized += len(window)
        log.debug("window of %d documents (%d tokens) from %d batches ready for the engine", len(window),
                  window.token_count, len(window.entries))
        return window

    def _engine_loop(self) -> None:
        """Embed windows as they come, the engine's pipeline running across window boundaries."""
        ended = False

        def take(wait: bool) -> Work[Window] | object | None:
            nonlocal ended
            if self._abort.is_set() or self._stop_reading.is_set():
                ended = True  # on a stop, windows not yet started are handed back, not embedded
                return END
            try:
                window = self._ready.get(timeout=0.2) if wait else self._ready.get_nowait()
            except queue.Empty:
                return None
            if window is _END:
                ended = True
                return END
            if len(window):
                self._state = "embedding"
                self.working.add(window.entry_ids)
            return Work(window, window.tokens)

        windows: Iterator[tuple[Window, np.ndarray | Exception]] = embed_stream(
            self.engine, take, self.model.pad_token_id, stats=self.report.engine, stop=self._past_deadline)
        for window, result in windows:
            if self._abort.is_set() or self._past_deadline():
                return
            if len(window):
                self.faults.take_embeddings(window, result)
                self.working.discard(window.entry_ids)
                self.report.stages.embedded += window.document_count  # the sizer's unit: documents, not chunks
                self.report.stages.tokens_embedded += window.token_count
            self._put(self._to_commit, window)
        if ended:
            for _ in range(max(1, self.options.commit_threads)):
                self._put(self._to_commit, _END)

    def _commit_loop(self) -> None:
        while not self._abort.is_set():
            try:
                window = self._to_commit.get(timeout=0.2)
            except queue.Empty:
                continue
            if window is _END:
                return
            self._state = "committing"
            with self.report.latency["commit"].time():
                self._commit(window)
            self._log_progress()

    def _commit(self, window: Window) -> None:
        self.faults.set_aside_non_finite(window)
        entries = window.all_entry_ids
        commit = PartCommit(window, self._writer, self.committer, self._next_part_name)
        for step in commit.steps():
            with self._parts_lock:  # several commit threads add to the same counters
                if step is Step.PUBLISHED:
                    self.report.parts += 1
                    log.debug("part of %d documents written and visible", len(window))
                elif step is Step.SETTLED:
                    self.report.documents += window.document_count
                    self.report.stages.committed += window.document_count
                    self.report.tokens += window.token_count
                    self.report.dead_documents += window.dead_documents
                elif step is Step.DROPPED and commit.excluded:
                    log.info("%d batch(es) were committed by another worker; dropping their documents here",
                             len(commit.excluded))
        with self._parts_lock:
            self.report.duplicates_dropped += commit.dropped_documents
        self.in_flight.discard(entries)

    def _next_part_name(self) -> str:
        with self._parts_lock:
            return part_name(next(self._parts), self.id)

    def _recover(self, what: str) -> Reconciliation:
        """Roll committed parts forward, set orphans aside (recovery as every worker start runs it)."""
        return self._redis(lambda: reconcile(self.client, self.keys, self.output,
                                             live_workers=set(live_workers(self.client, self.keys))), what)

    def _count_failure(self, entry: str) -> None:
        self.report.count_error("batch")
        self._redis(lambda: self.client.hincrby(self.keys.failures, entry, 1), "count a failure")

    # -- plumbing -------------------------------------------------------------------------------

    def _redis(self, call: Callable[[], Any], what: str) -> Any:
        return retry_redis(call, give_up_after=self.options.redis_retry_seconds, what=what,
                           log=self.report.counting("redis", log.warning), stopping=self._abort.is_set)

    def _put(self, target: queue.Queue[Window | None], item: Window | None, *, until_stop: bool = False) -> None:
        """Put `item` on a stage queue, unless the worker aborts (or, `until_stop`, stops reading:
        a window not yet queued for the engine is then handed back instead)."""
        while not self._abort.is_set() and not (until_stop and self._stop_reading.is_set()):
            try:
                target.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _guard(self, stage: Callable[[], None]) -> None:
        try:
            stage()
        except BaseException as exc:
            log.error("worker stage %s failed: %s", threading.current_thread().name, exc)
            self._errors.append(exc)
            self._abort.set()

    def _drain(self, threads: list[threading.Thread]) -> None:
        """Let the stages finish (by the stop's deadline, with a short grace for commits under way),
        then hand back whatever is still held, so another worker takes it at once."""
        self._stop_reading.set()
        deadline = max(self._stop_deadline or time.monotonic() + self.options.shutdown_timeout, time.monotonic())
        deadline += min(10.0, self.options.shutdown_timeout)
        for thread in threads:
            thread.join(timeout=max(0.1, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in threads):
            log.warning("shutdown timeout (%.0f s) reached; uncommitted batches will be reclaimed by "
                        "another worker", self.options.shutdown_timeout)
            self._abort.set()
        leftover = self.in_flight.snapshot()
        with contextlib.suppress(redis.RedisError):
            if leftover:
                self.consumer.release(leftover)  # let another worker take them now, not after the lease
            self.working.clear()
        if leftover and self._stop_deadline is not None:
            log.warning("interrupted: %d batch(es) not committed were handed back; run the same command again "
                        "to resume", len(leftover))

    def _status(self) -> dict[str, Any]:
        elapsed = max(1e-9, time.monotonic() - self._started)
        return {"host": socket.gethostname(), "pid": os.getpid(), "state": self._state,
                "backend": self.engine.name, "device": self.engine.config.device,
                "precision": self.engine.config.precision, "documents": self.report.documents,
                "tokens": self.report.tokens, "docs_per_s": self.report.documents / elapsed,
                "tokens_per_s": self.report.tokens / elapsed, "in_flight": len(self.in_flight)}

    def _log_progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_log < 10:
            return
        self._last_log = now
        status = self._status()
        # The last line at the end of a run only at debug level: the command prints its own summary.
        progress_log.log(logging.DEBUG if force else logging.INFO,
                         "worker %s: %d documents, %d parts, %.0f docs/s, %.0f tokens/s, %d dead-lettered",
                         self.id, self.report.documents, self.report.parts, status["docs_per_s"],
                         status["tokens_per_s"], self.report.dead_documents)
