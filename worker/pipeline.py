"""The engine stage: run windows of documents through the engine bucket by bucket, keeping it busy.

Batches are submitted ahead of collection (`depth` in flight, 2 by default): while the device
runs batch k, the host pads batch k+1 and hands it over, and only then waits for batch k. The
pipeline runs across window boundaries: the first batches of the next window are submitted
before the last batch of the current one is collected, so the device does not idle while the
worker hands a finished window to the commit stage and plans the next. With a synchronous engine
(CPU) this degenerates to one batch at a time, with the same results.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

from embedq.engines.base import Engine, Pending, Profile
from embedq.metrics import Histogram
from embedq.tokenization import TokenizedDocs
from embedq.worker.buckets import Bucket, pad_batch, plan_buckets

T = TypeVar("T")

END = object()
"""What a `take` callback returns when no more work will come."""


@dataclass
class EngineStats:
    """Counters of the engine stage, for progress, status and the benchmark."""

    batches: int = 0
    documents: int = 0  # handed to the engine (a window at a time)
    real_tokens: int = 0
    done_documents: int = 0  # embedded: counted batch by batch as their results come back, for progress
    done_tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0  # wall time with at least one window in the engine, up to the last idle moment
    busy_since: float | None = None  # when the current busy stretch began (perf_counter), if one runs
    first_result_at: float | None = None  # when the first batch's embeddings came back (time.time())
    batch_latency: Histogram = field(default_factory=Histogram)  # submitted to its result on the host
    window_latency: Histogram = field(default_factory=Histogram)  # a window's first batch to its last result

    def busy_seconds(self) -> float:
        """Wall time with work in the engine so far, the stretch still running included: an engine
        fed without a pause (a fast GPU with windows prefetched) is never idle, so `seconds` alone
        would stay 0 while it runs."""
        since = self.busy_since
        return self.seconds + (time.perf_counter() - since if since is not None else 0.0)

    @property
    def padding_ratio(self) -> float:
        return self.padded_tokens / self.real_tokens if self.real_tokens else 1.0


@dataclass(frozen=True)
class Work(Generic[T]):
    """Documents to embed (`indices` of `docs`, all when None), and the caller's tag for them."""

    tag: T
    docs: TokenizedDocs
    indices: np.ndarray | None = None


@dataclass
class _Job(Generic[T]):
    """One `Work` inside the pipeline: its buckets, how far they went, and its output."""

    tag: T
    docs: TokenizedDocs
    rows: np.ndarray
    buckets: list[Bucket]
    by_length: np.ndarray  # results in bucket order: each batch's rows land as one contiguous slice
    submitted: int = 0
    filled: int = 0  # rows of by_length handed to the engine so far
    in_flight: int = 0
    error: Exception | None = None
    started: float = field(default_factory=time.perf_counter)

    @property
    def to_submit(self) -> bool:
        return self.error is None and self.submitted < len(self.buckets)

    @property
    def finished(self) -> bool:
        return not self.to_submit and self.in_flight == 0

    def embeddings(self) -> np.ndarray:
        """The results in the order of the work's documents: one scatter per window, not one per
        batch (each numpy copy lets go of the GIL, and getting it back can wait on other threads)."""
        order = np.concatenate([bucket.rows for bucket in self.buckets]) if self.buckets else np.zeros(0, np.int64)
        if bool((order == np.arange(order.shape[0])).all()):
            return self.by_length
        out = np.empty_like(self.by_length)
        out[order] = self.by_length
        return out


@dataclass
class _Stream:
    engine: Engine
    pad_id: int
    profiles: Sequence[Profile]
    stats: EngineStats
    jobs: collections.deque[_Job] = field(default_factory=collections.deque)  # started, not yet handed back
    # (job, its rows, the batch, its real tokens, when it was submitted)
    in_flight: collections.deque[tuple[_Job, slice, Pending, int, float]] = field(default_factory=collections.deque)

    def start(self, work: Work) -> None:
        rows = (np.arange(len(work.docs), dtype=np.int64) if work.indices is None
                else np.asarray(work.indices, np.int64))
        lengths = work.docs.lengths[rows]
        buckets = plan_buckets(lengths, self.profiles) if rows.size else []
        self.jobs.append(_Job(work.tag, work.docs, rows, buckets,
                              np.empty((rows.shape[0], self.engine.dim), dtype=np.float32)))
        if self.stats.busy_since is None:
            self.stats.busy_since = time.perf_counter()
        self.stats.documents += rows.shape[0]
        self.stats.real_tokens += int(lengths.sum())

    def next_to_submit(self) -> _Job | None:
        # Jobs are submitted in order, so only the newest can have batches left.
        return self.jobs[-1] if self.jobs and self.jobs[-1].to_submit else None

    def submit(self, job: _Job) -> None:
        bucket = job.buckets[job.submitted]
        job.submitted += 1
        docs = job.docs
        try:
            ids, lengths = pad_batch(docs.tokens, docs.offsets, docs.lengths, job.rows[bucket.rows],
                                     bucket.profile.max_seq_len, self.pad_id)
            pending = self.engine.submit(ids, lengths)
        except Exception as exc:  # the caller isolates the documents at fault
            job.error = exc
            return
        job.in_flight += 1
        self.in_flight.append((job, slice(job.filled, job.filled + len(bucket)), pending, int(lengths.sum()),
                               time.perf_counter()))
        job.filled += len(bucket)
        self.stats.batches += 1
        self.stats.padded_tokens += bucket.profile.max_seq_len * len(bucket)

    def collect(self) -> None:
        job, place, pending, tokens, submitted = self.in_flight.popleft()
        job.in_flight -= 1
        try:
            result = pending.result()
        except Exception as exc:
            job.error = job.error or exc
            return
        self.stats.batch_latency.observe(time.perf_counter() - submitted)
        if job.error is None:
            job.by_length[place] = result
        if self.stats.first_result_at is None:
            self.stats.first_result_at = time.time()
        self.stats.done_documents += place.stop - place.start
        self.stats.done_tokens += tokens

    def finished(self) -> Iterator[_Job]:
        """Hand back finished jobs in order. Before a failed one, collect everything in flight, so
        the caller may use the engine on its own to find the documents at fault."""
        while self.jobs and self.jobs[0].finished:
            if self.jobs[0].error is not None:
                while self.in_flight:
                    self.collect()
            job = self.jobs.popleft()
            self.stats.window_latency.observe(time.perf_counter() - job.started)
            if not self.jobs and self.stats.busy_since is not None:
                self.stats.seconds += time.perf_counter() - self.stats.busy_since
                self.stats.busy_since = None
            yield job


def embed_stream(engine: Engine, take: Callable[[bool], Work[T] | object | None], pad_id: int, *,
                 profiles: Sequence[Profile] | None = None, depth: int = 2,
                 stats: EngineStats | None = None,
                 stop: Callable[[], bool] = lambda: False) -> Iterator[tuple[T, np.ndarray | Exception]]:
    """Embed a stream of `Work`, `depth` batches in flight across work boundaries.

    `take(wait)` gives the next `Work`, or None when none is ready (it may block a little when
    `wait` is true: the pipeline is then empty), or `END`. Yields `(tag, embeddings)` in the order
    taken, embeddings `(n, dim)` float32 in the order of the work's documents, or `(tag, error)` when
    a batch of that work failed (nothing is then in flight). Returns early, between two batches,
    once `stop()` is true: what was not yielded is left to the caller to hand back.
    """
    stream = _Stream(engine, pad_id, profiles or engine.profiles, stats if stats is not None else EngineStats())
    ended = False
    while not stop():
        while not ended and stream.next_to_submit() is None:  # (work with no documents has no batches)
            work = take(not stream.jobs)
            if work is END:
                ended = True
            elif isinstance(work, Work):
                stream.start(work)
            else:
                break
        job = stream.next_to_submit()
        if job is not None:
            stream.submit(job)
        if stream.in_flight and (len(stream.in_flight) >= depth or stream.next_to_submit() is None):
            stream.collect()
        for done in stream.finished():
            yield done.tag, done.error if done.error is not None else done.embeddings()
        if ended and not stream.jobs:
            return


def embed_documents(engine: Engine, docs: TokenizedDocs, pad_id: int, *,
                    indices: np.ndarray | None = None, profiles: Sequence[Profile] | None = None,
                    depth: int = 2, stats: EngineStats | None = None) -> np.ndarray:
    """Embeddings `(len(indices), dim)` float32 of the documents `indices` (all when None)."""
    queue: list[Work[None] | object] = [END, Work(None, docs, indices)]
    for _, result in embed_stream(engine, lambda wait: queue.pop(), pad_id, profiles=profiles, depth=depth,
                                  stats=stats):
        if isinstance(result, Exception):
            raise result
        return result
    raise AssertionError("embed_stream returned no result")  # pragma: no cover


def non_finite_rows(embeddings: np.ndarray) -> np.ndarray:
    """Indices of rows holding NaN or infinity (a model overflow in fp16, for instance)."""
    return np.flatnonzero(~np.isfinite(embeddings).all(axis=1))

