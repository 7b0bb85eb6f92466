"""`embedq bench` as a whole: every scenario of corpora x models x tokenize modes on one Redis, then
the precision check, the JSON results, the plot and the table."""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from embedq.bench.corpus import Corpus, load_corpus
from embedq.bench.end_to_end import run_scenario
from embedq.bench.plot import plot
from embedq.bench.precision import precision_check
from embedq.bench.random_model import build_random_model
from embedq.bench.report import render, save_results
from embedq.bench.scenarios import Result, Scenario
from embedq.model import ModelInfo, load_model_info

log = logging.getLogger("embedq.bench")


@contextlib.contextmanager
def bench_redis(url: str | None) -> Iterator[str]:
    """The named Redis, or a private one (with nothing else in it, so its memory figures are ours)."""
    from embedq.connection import RedisServer

    if url:
        yield url
        return
    with RedisServer() as server:
        yield server.url


def run_bench(corpora: list[Corpus], models: list[str], tokenize: list[str], *, repeat: int,
              limit: int | None, device: str, precision: str, redis_url: str | None, json_path: Path, plot_path: Path,
              tokenizer_processes: int, baselines: bool, token_budget: int, window_docs: int,
              check_precision: bool, cuda_graphs: bool, model_path: str | None, unpad: str = "auto",
              out_dir: Path | None = None, gpu_counts: list[int] | None = None,
              fleet_tokenizer_processes: int | None = None, chunk_tokens: int = 0,
              chunk_overlap: int = 0) -> list[Result]:
    """The cross product of corpora x models x tokenize modes, each job chunked as `chunk_tokens`
    and `chunk_overlap` say (0: not); writes JSON and the plot. With `gpu_counts`, each scenario runs
    on that many GPUs instead (`fleet`), with no baselines."""
    base = load_model_info(model_path)
    chunks = {"chunk_tokens": chunk_tokens, "chunk_overlap": chunk_overlap}
    if gpu_counts:
        _run_fleet_bench(corpora, models, tokenize, base, repeat=repeat, limit=limit, device=device,
                         precision=precision, redis_url=redis_url, json_path=json_path, token_budget=token_budget,
                         window_docs=window_docs, cuda_graphs=cuda_graphs, unpad=unpad, out_dir=out_dir,
                         gpu_counts=gpu_counts, tokenizer_processes=fleet_tokenizer_processes, **chunks)
        return []
    results: list[Result] = []
    precision_report: dict[str, float] | None = None
    with tempfile.TemporaryDirectory(prefix="embedq-bench-") as tmp, bench_redis(redis_url) as url:
        work = Path(tmp)
        for scenario, model, corpus_path in _scenarios(work, base, models, corpora, tokenize, repeat=repeat,
                                                       limit=limit, device=device, precision=precision,
                                                       cuda_graphs=cuda_graphs, unpad=unpad, **chunks):
            log.info("bench: %s", scenario.label)
            result = run_scenario(scenario, model, corpus_path, url, work, out_dir=out_dir or work,
                                  tokenizer_processes=tokenizer_processes,
                                  baselines=baselines and scenario.pretokenize == (tokenize[0] == "producer"),
                                  token_budget=token_budget, window_docs=window_docs)
            results.append(result)
            log.info("bench: %s", json.dumps(result.summary()))
            save_results(json_path, results, None)  # a run cut short still leaves what it measured
        if check_precision and device.startswith("cuda"):
            texts = [t for corpus in corpora for t in load_corpus(corpus.file(work), 1, limit)[1]]
            precision_report = precision_check(base, texts, device, token_budget)
    save_results(json_path, results, precision_report)
    plot({r.scenario.label: r.timeline for r in results}, plot_path)
    print(render(results, precision_report))
    return results


def _run_fleet_bench(corpora: list[Corpus], models: list[str], tokenize: list[str], base: ModelInfo, *,
                     repeat: int, limit: int | None, device: str, precision: str, redis_url: str | None,
                     json_path: Path, token_budget: int, window_docs: int, cuda_graphs: bool, unpad: str,
                     out_dir: Path | None, gpu_counts: list[int], tokenizer_processes: int | None,
                     chunk_tokens: int, chunk_overlap: int) -> None:
    from embedq.bench.fleet import FleetResult, render_fleet, run_fleet

    results: list[FleetResult] = []
    with tempfile.TemporaryDirectory(prefix="embedq-bench-") as tmp, bench_redis(redis_url) as url:
        work = Path(tmp)
        for scenario, model, corpus_path in _scenarios(work, base, models, corpora, tokenize, repeat=repeat,
                                                       limit=limit, device=device, precision=precision,
                                                       cuda_graphs=cuda_graphs, unpad=unpad,
                                                       chunk_tokens=chunk_tokens, chunk_overlap=chunk_overlap):
            log.info("bench: %s on %s GPU(s)", scenario.label, ", ".join(map(str, gpu_counts)))
            results += run_fleet(scenario, model, corpus_path, url, work, gpu_counts=gpu_counts,
                                 out_dir=out_dir or work, tokenizer_processes=tokenizer_processes,
                                 token_budget=token_budget, window_docs=window_docs)
            json_path.write_text(json.dumps({"fleet": [r.summary() for r in results]}, indent=1))
    print(render_fleet(results))


def _scenarios(work: Path, base: ModelInfo, models: list[str], corpora: list[Corpus], tokenize: list[str],
               **settings: Any) -> Iterator[tuple[Scenario, ModelInfo, Path]]:
    """Every scenario of models x corpora x tokenize modes, with its model (random weights built in
    `work` for the shapes other than MiniLM) and its corpus file (the long documents built in `work`)."""
    for model_name in models:
        model = base if model_name == "minilm" else load_model_info(
            build_random_model(work / model_name, model_name, base))
        # Decoders run eager whatever --cuda-graphs says (engines.factory): the label says what ran.
        graphs = settings.get("cuda_graphs", True) and not model.causal
        for corpus in corpora:
            for mode in tokenize:
                yield Scenario(corpus=corpus.name, model=model_name, pretokenize=(mode == "producer"),
                               **{**settings, "cuda_graphs": graphs}), model, corpus.file(work)
