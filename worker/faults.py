"""Fault isolation: when a batch fails, find the documents at fault, set them aside, keep going.

Two kinds of fault reach a worker:

- **A batch that kills or stalls its workers** (a segfault in a tokenizer, an out-of-memory kill):
  no error is ever seen; what counts is how many workers died while *working* on it (tokenizing or
  embedding it, recorded in Redis as they go; consumer.py counts a crash when it reclaims such an
  entry), never how often it was delivered, so a worker killed by someone else blames nothing it
  merely held. A batch with one crash is embedded in a window of its own (worker.py); one with
  `max_deliveries` crashes is split in halves, as new stream entries with fresh counts, so the
  culprit is found in a few rounds; only a single document that workers still die on is
  dead-lettered.
- **A batch whose embedding raises**: the window is embedded again message by message, then
  document by document, each tried up to `max_failures` times; what still fails is dead-lettered
  with its error. If the engine fails even on a canary document, the engine is at fault, not the
  data: the worker stops instead of dead-lettering a whole corpus.

Non-finite embeddings (NaN, infinity) are dead-lettered document by document as well.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import numpy as np

from embedq import deadletter
from embedq.engines.base import Engine
from embedq.errors import EmbedqError, EngineError
from embedq.protocol import encode_batch
from embedq.tokenization import TokenizedDocs
from embedq.worker.commit import Committer
from embedq.worker.lease import InFlight
from embedq.worker.pipeline import embed_documents, non_finite_rows
from embedq.worker.window import Entry, Window

log = logging.getLogger("embedq.worker")


class FaultIsolation:
    """The worker's policy for failing batches and documents (module docstring)."""

    def __init__(self, *, engine: Engine, pad_id: int, canary: TokenizedDocs, committer: Committer,
                 in_flight: InFlight, count_failure: Callable[[str], None], max_failures: int,
                 max_deliveries: int, worker: str) -> None:
        self.engine = engine
        self.pad_id = pad_id
        self.canary = canary
        self.committer = committer
        self.in_flight = in_flight
        self.count_failure = count_failure  # counts a failed attempt on a stream entry in Redis
        self.max_failures = max_failures
        self.max_deliveries = max_deliveries
        self.worker = worker

    # -- batches that kill their workers ---------------------------------------------------------

    def split_crash_suspects(self, window: Window) -> None:
        """Take the entries that `max_deliveries` workers died on out of a (not yet tokenized) window:
        split each in two, or dead-letter it if it holds one document."""
        for entry in window.split_off(lambda e: e.crashes >= self.max_deliveries):
            self._isolate(entry, window)

    def _isolate(self, entry: Entry, window: Window) -> None:
        message, n = entry.message, len(entry.message.ids)
        if n > 1:
            half = n // 2
            payloads = [encode_batch(deadletter.subset(message, range(0, half))),
                        encode_batch(deadletter.subset(message, range(half, n)))]
            self.committer.split(entry.entry_id, payloads)
            self.in_flight.discard([entry.entry_id])
            log.warning("batch %s (seq %d): %d workers died while working on it; split it in two (%d and %d "
                        "documents) to find the culprit", entry.entry_id, message.seq, entry.crashes, half, n - half)
            return
        log.warning("document %r (batch %s): %d workers died while working on it alone; dead-lettered",
                    message.ids[0], entry.entry_id, entry.crashes)
        window.dead_letter_entry(entry.entry_id, deadletter.for_documents(
            message, [0], entry_id=entry.entry_id, reason="worker died processing it",
            error=f"{entry.crashes} workers died or stalled while working on this document alone",
            worker=self.worker, deliveries=entry.deliveries))

    # -- batches whose embedding fails -----------------------------------------------------------

    def take_embeddings(self, window: Window, result: np.ndarray | Exception) -> None:
        """Give the window its embeddings; on a batch-level failure, find the documents at fault."""
        if not isinstance(result, Exception):
            window.docs.embeddings = result
            return
        log.warning("embedding a window of %d documents failed (%s); isolating the cause", len(window), result)
        window.docs.embeddings, failed = self._embed_isolated(window, result)
        if failed:
            rows = np.array(sorted(failed), dtype=np.int64)
            window.dead_letter_documents(rows, reason="embedding failed",
                                         error="; ".join(sorted(set(failed.values())))[:2000],
                                         worker=self.worker, failures=self.max_failures)

    def set_aside_non_finite(self, window: Window) -> None:
        """Dead-letter documents whose embedding is NaN or infinite (checked in a commit thread,
        off the engine's path)."""
        if window.docs.embeddings is None:
            return
        bad = non_finite_rows(window.docs.embeddings)
        if bad.size:
            window.dead_letter_documents(bad, reason="non-finite embedding",
                                         error="the model produced NaN or infinity for this document",
                                         worker=self.worker)

    def _embed_isolated(self, window: Window, first_error: Exception) -> tuple[np.ndarray, dict[int, str]]:
        """Embed entry by entry, then document by document; returns the embeddings and the
        documents that still fail, with their errors."""
        out = np.full((len(window), self.engine.dim), np.nan, dtype=np.float32)
        failed: dict[int, str] = {}
        tokens = window.docs.tokens
        for k, entry in enumerate(window.entries):
            rows = window.rows_of(k)
            if not rows.size:
                continue
            whole = self._attempt(functools.partial(embed_documents, self.engine, tokens, self.pad_id, indices=rows),
                                  entry=entry.entry_id)
            if isinstance(whole, np.ndarray):
                out[rows] = whole
                continue
            for row in rows.tolist():
                single = self._attempt(functools.partial(embed_documents, self.engine, tokens, self.pad_id,
                                                         indices=np.array([row])))
                if isinstance(single, np.ndarray):
                    out[row] = single[0]
                else:
                    failed[row] = single
        if failed:
            canary = self._attempt(functools.partial(embed_documents, self.engine, self.canary, self.pad_id), tries=1)
            if not isinstance(canary, np.ndarray):
                raise EngineError(f"the engine fails even on a canary document ({canary}); first error: "
                                  f"{first_error}. Stopping instead of dead-lettering the job.")
        return out, failed

    def _attempt(self, run: Callable[[], np.ndarray], *, entry: str | None = None,
                 tries: int | None = None) -> np.ndarray | str:
        """The result of `run`, or its last error after `tries` (default max_failures) failures."""
        error = ""
        for _ in range(tries or self.max_failures):
            try:
                return run()
            except EmbedqError:
                raise
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                if entry is not None:
                    self.count_failure(entry)
        return error
