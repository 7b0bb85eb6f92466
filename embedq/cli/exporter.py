"""Prometheus metrics of `work`, `produce` and `run` (`--metrics-port`).

Nothing is counted twice: at each scrape the collector reads the live reports the worker and the
producer keep anyway (documents, tokens, parts, dead letters, errors by kind, deliveries, reclaims,
padding, latency histograms), asks Redis for the consumer group's lag and pending entries, and NVML
for the worker's GPU's utilization and memory where it is present. Served from a thread of its own on a
registry of its own, so two exporters in one process (tests) do not collide.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import redis

    from embedq.keys import JobKeys
    from embedq.metrics import Histogram
    from embedq.producer.producer import Producer
    from embedq.worker.worker import Worker

log = logging.getLogger("embedq")


@contextlib.contextmanager
def serve_metrics(port: int | None, client: redis.Redis, keys: JobKeys, *,
                  worker: Callable[[], Worker | None] = lambda: None,
                  producer: Callable[[], Producer | None] = lambda: None) -> Iterator[int | None]:
    """Serve /metrics on `port` (0: any free port) for the block; yields the port, None if `port` is None."""
    if port is None:
        yield None
        return
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(client, keys, worker, producer))
    try:
        server, thread = start_http_server(port, registry=registry)
    except OSError as exc:
        from embedq.errors import UsageError

        raise UsageError(f"--metrics-port {port}: cannot listen there ({exc.strerror}).") from exc
    log.info("metrics: http://0.0.0.0:%d/metrics", server.server_port)
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class _Collector:
    """Reads the reports at scrape time (the prometheus_client custom-collector protocol)."""

    def __init__(self, client: redis.Redis, keys: JobKeys, worker: Callable[[], Worker | None],
                 producer: Callable[[], Producer | None]) -> None:
        self.client = client
        self.keys = keys
        self.worker = worker
        self.producer = producer
        self._gpu: Any = None

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        job = self.keys.job
        up = GaugeMetricFamily("embedq_up", "1 while this embedq process serves metrics.", labels=["job"])
        up.add_metric([job], 1)
        yield up
        documents = CounterMetricFamily("embedq_documents", "Documents embedded and committed (worker) or "
                                        "published (producer).", labels=["job", "role"])
        dead = CounterMetricFamily("embedq_dead_letters", "Documents dead-lettered, with the reason kept in "
                                   "Redis and in the output's _dead_letters.jsonl.", labels=["job", "role"])
        worker, producer = self.worker(), self.producer()
        if worker is not None:
            report = worker.report
            documents.add_metric([job, "worker"], report.documents)
            dead.add_metric([job, "worker"], report.dead_documents)
            yield from self._worker(job, worker)
            yield from self._gpu_figures(worker.engine.config.device)
        if producer is not None and producer.report is not None:
            published = producer.report
            # The report's published documents include those it dead-lettered; the stream got the rest.
            documents.add_metric([job, "producer"], published.published_documents - published.rejected)
            dead.add_metric([job, "producer"], published.rejected)
            yield _counter("embedq_stream_batches_published", "Stream entries (batches) published.", job,
                           published.batches)
            yield _counter("embedq_producer_backpressure_seconds", "Seconds the producer waited for the "
                           "backlog to drain.", job, published.waited_seconds)
        yield documents
        yield dead
        yield from self._stream(job)

    def _worker(self, job: str, worker: Worker) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        report, engine = worker.report, worker.report.engine
        yield _counter("embedq_tokens", "Real (unpadded) tokens embedded and committed.", job, report.tokens)
        yield _counter("embedq_parts", "Parquet parts published.", job, report.parts)
        yield _counter("embedq_engine_batches", "Padded batches run on the engine.", job, engine.batches)
        yield _counter("embedq_engine_busy_seconds", "Seconds with work on the engine.", job, engine.busy_seconds())
        yield _counter("embedq_deliveries", "Stream entries delivered to this worker.", job, report.delivered)
        yield _counter("embedq_reclaims", "Stream entries taken over from workers whose lease ran out.", job,
                       report.reclaimed)
        errors = CounterMetricFamily("embedq_errors", "Errors by kind: redis (an operation retried), batch (a "
                                     "failed attempt at a batch).", labels=["job", "kind"])
        for kind in ("redis", "batch", *sorted(set(report.errors) - {"redis", "batch"})):
            errors.add_metric([job, kind], report.errors.get(kind, 0))
        yield errors
        padding = GaugeMetricFamily("embedq_padding_ratio", "Padded over real tokens of the batches run so far "
                                    "(1 is no padding).", labels=["job"])
        padding.add_metric([job], engine.padding_ratio)
        yield padding
        stages: dict[str, Histogram] = {**report.latency, "engine_batch": engine.batch_latency,
                                        "engine_window": engine.window_latency}
        latency = HistogramMetricFamily("embedq_stage_seconds", "Seconds per step: fetch (one read from Redis), "
                                        "tokenize, engine_window and commit (per window), engine_batch (per "
                                        "batch, submitted to result).", labels=["job", "stage"])
        for stage, histogram in stages.items():
            latency.add_metric([job, stage], [(_bound(b), n) for b, n in histogram.cumulative()], histogram.total)
        yield latency

    def _stream(self, job: str) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        from embedq.keys import GROUP

        try:
            groups = self.client.xinfo_groups(self.keys.stream)
        except Exception:
            return
        for group in groups:
            if _text(group.get("name")) != GROUP:
                continue
            lag = GaugeMetricFamily("embedq_stream_lag", "Stream entries not yet delivered to the workers.",
                                    labels=["job"])
            if group.get("lag") is not None:  # None where Redis cannot tell (entries deleted mid-stream)
                lag.add_metric([job], float(group["lag"]))
            yield lag
            pending = GaugeMetricFamily("embedq_stream_pending", "Stream entries delivered but not yet "
                                        "acknowledged.", labels=["job"])
            pending.add_metric([job], float(group.get("pending", 0)))
            yield pending

    def _gpu_figures(self, device: str) -> Iterator[Any]:
        if not device.startswith("cuda"):
            return
        from prometheus_client.core import GaugeMetricFamily

        if self._gpu is None:
            from embedq.bench.sampling import Gpu

            self._gpu = Gpu(device)
        reading = self._gpu.read()
        if not reading:
            return
        util = GaugeMetricFamily("embedq_gpu_utilization_ratio", "GPU busy fraction (NVML).", labels=["device"])
        util.add_metric([device], reading["gpu_util"] / 100.0)
        memory = GaugeMetricFamily("embedq_gpu_memory_used_bytes", "GPU memory in use (NVML).", labels=["device"])
        memory.add_metric([device], reading["gpu_mem"])
        yield util
        yield memory


def _counter(name: str, documentation: str, job: str, value: float) -> Any:
    from prometheus_client.core import CounterMetricFamily

    metric = CounterMetricFamily(name, documentation, labels=["job"])
    metric.add_metric([job], value)
    return metric


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
