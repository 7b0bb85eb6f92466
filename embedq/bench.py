"""`embedq bench`: the end-to-end throughput of a real job, against the ceilings around it.

For each scenario (corpus x model x where tokenization happens) one run measures, on one device:

    tokenizer alone     the `tokenizers` library on all cores, and embedq's tokenizer pool
    sentence-transformers `encode` on the same texts and model (the baseline people use)
    GPU-only ceiling    the same engine on the same buckets, inputs already padded in host memory
    end to end          a real Redis stream (already filled by the producer), the worker with its
                        tokenizer pool or pretokenized messages, real Parquet parts, commits

and the padding waste, GPU busy fraction (NVML), peak host RSS (worker and tokenizer processes),
peak GPU memory, peak Redis memory, and throughput per stage over time (a PNG). Results go to
stdout as a table and to a JSON file. BERT-base is a random-weight model of that shape (speed
only); MiniLM is the real all-MiniLM-L6-v2.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedq.model import ModelInfo, load_model_info

if TYPE_CHECKING:
    from embedq.tokenization import Encode

log = logging.getLogger("embedq.bench")

SHAPES = {
    # name: (hidden, layers, heads, intermediate)
    "bert-base": (768, 12, 12, 3072),
    "minilm-l6": (384, 6, 12, 1536),
    "tiny": (32, 2, 4, 64),
}


def build_random_model(directory: Path, shape: str, tokenizer_from: ModelInfo, *, dtype: str = "float16") -> Path:
    """A random-weight BERT of a named shape in sentence-transformers layout (mean pooling,
    normalized), with the tokenizer of `tokenizer_from`. For speed tests only: its vectors mean nothing."""
    import torch
    from transformers import BertConfig, BertModel

    hidden, layers, heads, intermediate = SHAPES[shape]
    directory.mkdir(parents=True, exist_ok=True)
    config = BertConfig(vocab_size=tokenizer_from.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=intermediate, max_position_embeddings=512)
    torch.manual_seed(0)
    BertModel(config).to(getattr(torch, dtype)).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (tokenizer_from.path / name).exists():
            shutil.copy(tokenizer_from.path / name, directory / name)
    (directory / "1_Pooling").mkdir(exist_ok=True)
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": hidden, "pooling_mode_mean_tokens": True}))
    (directory / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": tokenizer_from.max_seq_len}))
    return directory


@dataclass
class Scenario:
    """One benchmark run's settings."""

    corpus: str
    model: str
    pretokenize: bool
    repeat: int = 1
    limit: int | None = None
    device: str = "cuda"
    precision: str = "fp16"
    cuda_graphs: bool = True

    @property
    def label(self) -> str:
        where = "pretokenized" if self.pretokenize else "worker-tokenized"
        graphs = " / CUDA graphs" if self.cuda_graphs and self.device.startswith("cuda") else ""
        return f"{self.model} / {self.corpus} x{self.repeat} / {where}{graphs}"


@dataclass
class Result:
    """One scenario's measurements (None where not measured)."""

    scenario: Scenario
    documents: int = 0
    real_tokens: int = 0
    e2e_seconds: float = 0.0
    e2e_tokens_per_s: float = 0.0
    e2e_docs_per_s: float = 0.0
    produce_seconds: float = 0.0
    gpu_only_tokens_per_s: float | None = None
    gpu_only_docs_per_s: float | None = None
    st_tokens_per_s: float | None = None
    st_docs_per_s: float | None = None
    tokenizer_all_cores_tokens_per_s: float | None = None
    tokenizer_all_cores_docs_per_s: float | None = None
    tokenizer_pool_tokens_per_s: float | None = None
    tokenizer_pool_docs_per_s: float | None = None
    padding_ratio: float = 0.0
    seq_lens: list[int] = field(default_factory=list)
    gpu_busy: float | None = None
    peak_rss_bytes: int = 0
    peak_gpu_bytes: int | None = None
    peak_redis_bytes: int = 0
    timeline: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("timeline")
        out["label"] = self.scenario.label
        if self.gpu_only_tokens_per_s:
            out["e2e_over_gpu_only"] = self.e2e_tokens_per_s / self.gpu_only_tokens_per_s
        if self.st_tokens_per_s:
            out["e2e_over_st"] = self.e2e_tokens_per_s / self.st_tokens_per_s
        return out


def load_corpus(path: Path, repeat: int, limit: int | None = None) -> tuple[list[str], list[str]]:
    """Ids and texts of a Parquet corpus (columns id, text; the first `limit`), repeated with distinct ids."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["id", "text"])
    if limit is not None:
        table = table.slice(0, limit)
    ids = [str(i) for i in table.column("id").to_pylist()]
    texts = table.column("text").to_pylist()
    if repeat == 1:
        return ids, texts
    return [f"{i}#{k}" for k in range(repeat) for i in ids], texts * repeat


class Sampler:
    """Samples counters and resource use every `every` seconds in a thread."""

    def __init__(self, read: Any, every: float = 0.25) -> None:
        self.read = read
        self.every = every
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="embedq-bench-sampler")

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.samples.append({"t": time.monotonic() - started, **self.read()})
            self._stop.wait(self.every)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def process_tree_rss() -> int:
    import psutil

    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += child.memory_info().rss
    return int(total)


class Gpu:
    """NVML readings of one GPU (utilization, memory), or nothing where NVML is missing."""

    def __init__(self, device: str) -> None:
        self.handle = None
        if not device.startswith("cuda"):
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            index = int(device.split(":")[1]) if ":" in device else 0
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._nvml = pynvml
        except Exception as exc:  # NVML absent or not permitted: report no GPU figures
            log.warning("NVML unavailable (%s): no GPU busy fraction", exc)

    def read(self) -> dict[str, float]:
        if self.handle is None:
            return {}
        util = self._nvml.nvmlDeviceGetUtilizationRates(self.handle)
        memory = self._nvml.nvmlDeviceGetMemoryInfo(self.handle)
        return {"gpu_util": float(util.gpu), "gpu_mem": float(memory.used)}


def measure_tokenizers(model: ModelInfo, texts: list[str], processes: int) -> dict[str, float]:
    """The tokenizer alone: `tokenizers` with all cores (rayon), and embedq's process pool."""
    from embedq.tokenization import Tokenizer, TokenizerPool

    out = _time_encode("all_cores", Tokenizer(model.tokenizer_file, model.max_seq_len).encode, texts)
    if processes > 0:
        with TokenizerPool(model.tokenizer_file, model.max_seq_len, processes) as pool:
            out.update(_time_encode("pool", pool.encode, texts))
    return out


def _time_encode(name: str, encode: Encode, texts: list[str]) -> dict[str, float]:
    """`{name}_tokens_per_s` and `{name}_docs_per_s` of `encode` over `texts`, after a warm-up call."""
    encode(texts[:1000])
    started = time.perf_counter()
    docs = encode(texts)
    seconds = time.perf_counter() - started
    return {f"{name}_tokens_per_s": float(docs.lengths.sum()) / seconds, f"{name}_docs_per_s": len(texts) / seconds}


def measure_gpu_only(engine: Any, docs: Any, pad_id: int) -> tuple[float, float, float]:
    """The engine alone on the same buckets, every batch padded in host memory beforehand:
    (tokens/s, docs/s, padding ratio)."""
    from embedq.worker.buckets import pad_batch, padding_ratio, plan_buckets

    buckets = plan_buckets(docs.lengths, engine.profiles)
    offsets = docs.offsets
    batches = [pad_batch(docs.tokens, offsets, docs.lengths, b.rows, b.profile.max_seq_len, pad_id)
               for b in buckets]
    def one_pass() -> float:
        started = time.perf_counter()
        pending = []
        for ids, lengths in batches:
            pending.append(engine.submit(ids, lengths))
            if len(pending) >= 2:
                pending.pop(0).result()
        for item in pending:
            item.result()
        return time.perf_counter() - started

    one_pass()  # warm-up: every shape once (kernel choice, allocator, autotuning)
    seconds = one_pass()
    return float(docs.lengths.sum()) / seconds, len(docs) / seconds, padding_ratio(docs.lengths, buckets)


def measure_sentence_transformers(model: ModelInfo, texts: list[str], tokens: int, device: str,
                                  precision: str) -> tuple[float, float]:
    """sentence-transformers `encode` on the same texts, batch 256 for short texts, 128 for long."""
    import torch
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model.path), device=device)
    st = st.to({"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision])
    st.max_seq_length = model.max_seq_len
    batch = 256 if tokens / max(1, len(texts)) < 64 else 128
    st.encode(texts[:512], batch_size=batch)
    started = time.perf_counter()
    st.encode(texts, batch_size=batch)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    del st
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return tokens / seconds, len(texts) / seconds


def run_scenario(scenario: Scenario, model: ModelInfo, corpus_path: Path, redis_url: str, work_dir: Path,
                 *, out_dir: Path, tokenizer_processes: int, baselines: bool, token_budget: int, window_docs: int,
                 cuda_graphs: bool) -> Result:
    """One scenario, end to end."""
    import redis as redis_lib

    from embedq.engines import create_engine
    from embedq.engines.base import EngineConfig
    from embedq.keys import JobKeys
    from embedq.producer.producer import Producer, ProducerOptions
    from embedq.producer.sources import SourceSpec, open_source
    from embedq.tokenization import Tokenizer, TokenizerPool
    from embedq.engines.profiles import fit_seq_lens, profile_table
    from embedq.worker.output import open_output
    from embedq.worker.worker import Worker, WorkerOptions

    result = Result(scenario=scenario)
    ids, texts = load_corpus(corpus_path, scenario.repeat, scenario.limit)
    source_file = work_dir / f"corpus-{uuid.uuid4().hex[:6]}.parquet"
    write_corpus(source_file, ids, texts)
    one_copy = texts[: len(texts) // scenario.repeat]
    tokenized_once = Tokenizer(model.tokenizer_file, model.max_seq_len).encode(one_copy)
    seq_lens = fit_seq_lens(tokenized_once.lengths, model.max_seq_len)
    result.seq_lens = list(seq_lens)
    profiles = profile_table(model.max_seq_len, token_budget, seq_lens)
    engine = create_engine("torch", EngineConfig(model=model, profiles=profiles, device=scenario.device,
                                                 precision=scenario.precision),
                           **({"cuda_graphs": True} if cuda_graphs and scenario.device.startswith("cuda") else {}))
    if baselines:
        tok = measure_tokenizers(model, one_copy, tokenizer_processes)
        result.tokenizer_all_cores_tokens_per_s = tok.get("all_cores_tokens_per_s")
        result.tokenizer_all_cores_docs_per_s = tok.get("all_cores_docs_per_s")
        result.tokenizer_pool_tokens_per_s = tok.get("pool_tokens_per_s")
        result.tokenizer_pool_docs_per_s = tok.get("pool_docs_per_s")
        result.st_tokens_per_s, result.st_docs_per_s = measure_sentence_transformers(
            model, one_copy, int(tokenized_once.lengths.sum()), scenario.device, scenario.precision)
    client = redis_lib.Redis.from_url(redis_url)
    keys = JobKeys(f"bench-{uuid.uuid4().hex[:8]}")
    gpu = Gpu(scenario.device)
    with engine:
        result.gpu_only_tokens_per_s, result.gpu_only_docs_per_s, _ = measure_gpu_only(
            engine, tokenized_once, model.pad_token_id)
        with contextlib.ExitStack() as stack:
            pool = stack.enter_context(TokenizerPool(model.tokenizer_file, model.max_seq_len, tokenizer_processes))
            src = stack.enter_context(open_source(SourceSpec(str(source_file))))
            options = ProducerOptions(batch_size=512, backlog=10**9)
            producer = Producer(client, keys, src, model, options,
                                tokenizer=pool if scenario.pretokenize else None)
            started = time.perf_counter()
            record = producer.prepare()
            producer.run()
            result.produce_seconds = time.perf_counter() - started
            client.config_resetstat()
            output = open_output(out_dir / f"out-{keys.job}")
            worker = Worker(client, keys, record, model, engine, output,
                            WorkerOptions(window_docs=window_docs, prefetch=3, lease_seconds=60, commit_threads=4),
                            encode=None if scenario.pretokenize else pool.encode)
            stages = worker.report.stages

            def read() -> dict[str, float]:
                info = client.info("memory")
                return {"fetched": stages.fetched, "tokenized": stages.tokenized, "embedded": stages.embedded,
                        "committed": stages.committed, "tokens": stages.tokens_embedded,
                        "rss": process_tree_rss(), "redis": float(info["used_memory"]), **gpu.read()}

            if scenario.device.startswith("cuda"):
                import torch

                torch.cuda.reset_peak_memory_stats()
            log.info("bench: end-to-end run starts (%d documents in the stream)", record.documents)
            with Sampler(read) as sampler:
                started = time.perf_counter()
                report = worker.run(install_signals=False)
                result.e2e_seconds = time.perf_counter() - started
            if scenario.device.startswith("cuda"):
                import torch

                result.peak_gpu_bytes = int(torch.cuda.max_memory_allocated())
        result.documents = report.documents
        result.real_tokens = report.tokens
        result.e2e_tokens_per_s = report.tokens / result.e2e_seconds
        result.e2e_docs_per_s = report.documents / result.e2e_seconds
        result.padding_ratio = report.engine.padding_ratio
        result.timeline = sampler.samples
        result.peak_rss_bytes = int(max((s["rss"] for s in sampler.samples), default=process_tree_rss()))
        result.peak_redis_bytes = int(client.info("memory")["used_memory_peak"])
        busy = [s["gpu_util"] for s in _steady(sampler.samples) if "gpu_util" in s]
        result.gpu_busy = float(np.mean(busy)) / 100.0 if busy else None
    for key in client.scan_iter(match=f"*{{{keys.job}}}*"):
        client.delete(key)
    shutil.rmtree(out_dir / f"out-{keys.job}", ignore_errors=True)
    source_file.unlink()
    return result


def _steady(samples: list[dict[str, float]]) -> list[dict[str, float]]:
    """The samples between the first and last tenth of the documents committed."""
    if not samples:
        return []
    total = samples[-1]["committed"]
    return [s for s in samples if 0.1 * total <= s["committed"] <= 0.9 * total]


def write_corpus(path: Path, ids: list[str], texts: list[str]) -> None:
    """Write ids and texts as the Parquet source a producer reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ids, "text": texts}), path, row_group_size=65536)


def precision_check(model: ModelInfo, texts: list[str], device: str, token_budget: int) -> dict[str, float]:
    """Lowest cosine of fp16 and bf16 embeddings against fp32, over every document given."""
    from embedq.engines import create_engine
    from embedq.engines.base import EngineConfig
    from embedq.tokenization import Tokenizer
    from embedq.engines.profiles import profile_table
    from embedq.worker.pipeline import embed_documents

    docs = Tokenizer(model.tokenizer_file, model.max_seq_len).encode(texts)
    profiles = profile_table(model.max_seq_len, token_budget)
    vectors = {}
    for precision in ("fp32", "fp16", "bf16"):
        with create_engine("torch", EngineConfig(model=model, profiles=profiles, device=device,
                                                 precision=precision)) as engine:
            vectors[precision] = embed_documents(engine, docs, model.pad_token_id)
    reference = vectors["fp32"] / np.linalg.norm(vectors["fp32"], axis=1, keepdims=True)
    out = {}
    for precision in ("fp16", "bf16"):
        other = vectors[precision] / np.linalg.norm(vectors[precision], axis=1, keepdims=True)
        out[f"min_cosine_{precision}_vs_fp32"] = float((reference * other).sum(axis=1).min())
    out["documents"] = len(texts)
    return out


def plot(timelines: dict[str, list[dict[str, float]]], path: Path, smooth: float = 1.0) -> None:
    """Documents per second through each stage over time (averaged over `smooth` seconds, since
    the counters move a window at a time), one panel per scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 2
    rows = max(1, (len(timelines) + columns - 1) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(12, 3.2 * rows), squeeze=False)
    for ax, (label, samples) in zip(axes.flat, timelines.items(), strict=False):
        if len(samples) < 2:
            continue
        t = np.array([s["t"] for s in samples])
        for stage in ("fetched", "tokenized", "embedded", "committed"):
            values = np.array([s[stage] for s in samples])
            earlier = np.interp(t - smooth, t, values, left=values[0])
            span = np.minimum(smooth, t - t[0])
            rate = np.divide(values - earlier, span, out=np.zeros_like(values, dtype=float), where=span > 0)
            ax.plot(t, rate / 1000.0, label=stage)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("seconds")
        ax.set_ylabel(f"k documents/s ({smooth:g} s average)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(timelines):]:
        ax.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def replot(json_paths: list[Path], path: Path) -> None:
    """Draw the plot again from saved results (several files are drawn side by side)."""
    timelines: dict[str, list[dict[str, float]]] = {}
    for json_path in json_paths:
        timelines.update(json.loads(json_path.read_text())["timelines"])
    plot(timelines, path)


def render(results: list[Result], precision: dict[str, float] | None) -> str:
    def rate(value: float | None, unit: str = "") -> str:
        if value is None:
            return "-"
        return f"{value / 1e6:.2f}M{unit}" if value >= 1e6 else f"{value / 1e3:.1f}k{unit}"

    lines = ["| scenario | docs | e2e tokens/s | e2e docs/s | GPU-only tokens/s | e2e/GPU-only | ST tokens/s | "
             "e2e/ST | tokenizer all cores | tokenizer pool | padding | GPU busy | peak RSS | peak GPU mem | "
             "peak Redis |",
             "|" + " --- |" * 15]
    for r in results:
        lines.append(
            f"| {r.scenario.label} | {r.documents:,} | {rate(r.e2e_tokens_per_s)} | {rate(r.e2e_docs_per_s)} | "
            f"{rate(r.gpu_only_tokens_per_s)} | "
            f"{(r.e2e_tokens_per_s / r.gpu_only_tokens_per_s) if r.gpu_only_tokens_per_s else 0:.0%} | "
            f"{rate(r.st_tokens_per_s)} | "
            f"{(r.e2e_tokens_per_s / r.st_tokens_per_s) if r.st_tokens_per_s else 0:.1f}x | "
            f"{rate(r.tokenizer_all_cores_tokens_per_s)} ({rate(r.tokenizer_all_cores_docs_per_s, ' docs')}) | "
            f"{rate(r.tokenizer_pool_tokens_per_s)} ({rate(r.tokenizer_pool_docs_per_s, ' docs')}) | "
            f"{r.padding_ratio:.3f} | {'-' if r.gpu_busy is None else f'{r.gpu_busy:.0%}'} | "
            f"{r.peak_rss_bytes / 2**30:.2f} GiB | "
            f"{'-' if r.peak_gpu_bytes is None else f'{r.peak_gpu_bytes / 2**30:.2f} GiB'} | "
            f"{r.peak_redis_bytes / 2**20:.0f} MiB |")
    if precision:
        lines.append("")
        lines.append("precision: " + ", ".join(f"{k} {v:.6f}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in precision.items()))
    return "\n".join(lines)


@contextlib.contextmanager
def bench_redis(url: str | None) -> Iterator[str]:
    """The named Redis, or a private one (with nothing else in it, so its memory figures are ours)."""
    from embedq.connection import RedisServer

    if url:
        yield url
        return
    with RedisServer() as server:
        yield server.url


def _save(path: Path, results: list[Result], precision: dict[str, float] | None) -> None:
    path.write_text(json.dumps({"environment": environment(), "precision": precision,
                                "results": [r.summary() for r in results],
                                "timelines": {r.scenario.label: r.timeline for r in results}}, indent=1))


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "host": platform.node(), "cpus": os.cpu_count(),
                            "python": platform.python_version()}
    with contextlib.suppress(Exception):
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    return info


def run_bench(corpora: list[tuple[str, Path]], models: list[str], tokenize: list[str], *, repeat: int,
              limit: int | None, device: str, precision: str, redis_url: str | None, json_path: Path, plot_path: Path,
              tokenizer_processes: int, baselines: bool, token_budget: int, window_docs: int,
              check_precision: bool, cuda_graphs: bool, model_path: str | None,
              out_dir: Path | None = None) -> list[Result]:
    """The cross product of corpora x models x tokenize modes; writes JSON and the plot."""
    base = load_model_info(model_path)
    results: list[Result] = []
    precision_report: dict[str, float] | None = None
    with tempfile.TemporaryDirectory(prefix="embedq-bench-") as tmp, bench_redis(redis_url) as url:
        work = Path(tmp)
        for model_name in models:
            model = base if model_name == "minilm" else load_model_info(
                build_random_model(work / model_name, model_name, base))
            for corpus_name, corpus_path in corpora:
                for mode in tokenize:
                    scenario = Scenario(corpus=corpus_name, model=model_name, pretokenize=(mode == "producer"),
                                        repeat=repeat, limit=limit, device=device, precision=precision,
                                        cuda_graphs=cuda_graphs)
                    log.info("bench: %s", scenario.label)
                    result = run_scenario(scenario, model, corpus_path, url, work, out_dir=out_dir or work,
                                          tokenizer_processes=tokenizer_processes,
                                          baselines=baselines and mode == tokenize[0],
                                          token_budget=token_budget, window_docs=window_docs,
                                          cuda_graphs=cuda_graphs)
                    results.append(result)
                    log.info("bench: %s", json.dumps(result.summary()))
                    _save(json_path, results, None)  # a run cut short still leaves what it measured
        if check_precision and device.startswith("cuda"):
            texts = [t for _, path in corpora for t in load_corpus(path, 1, limit)[1]]
            precision_report = precision_check(base, texts, device, token_budget)
    _save(json_path, results, precision_report)
    plot({r.scenario.label: r.timeline for r in results}, plot_path)
    print(render(results, precision_report))
    return results
