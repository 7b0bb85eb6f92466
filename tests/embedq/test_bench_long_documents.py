"""`embedq bench` on long documents: the corpus it joins from the passages (`--corpus long`), jobs
chunked as `embedq run --chunk` chunks them (`--chunk --overlap`), and the texts its
sentence-transformers baseline embeds for the chunks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from embedq.bench.corpus import LONG_WORDS, Corpus, load_corpus, long_documents
from embedq.bench.workload import Workload
from embedq.chunking import Chunking
from embedq.model import ModelInfo
from embedq.tokenization import Tokenizer

from .test_cli import embedq

DECODER_MAX = 8192  # the long-context random models' max_seq_len (qwen3-0.6b, qwen3-tiny)


@pytest.fixture(scope="module")
def passages(corpus_dir: Path) -> list[str]:
    return load_corpus(corpus_dir / "passages.parquet", 1)[1]


@pytest.fixture(scope="module")
def long_model(model_info: ModelInfo) -> ModelInfo:
    """MiniLM's tokenizer at the decoders' 8,192 tokens, as the random long-context models have it."""
    return dataclasses.replace(model_info, max_seq_len=DECODER_MAX)


def whole_lengths(model: ModelInfo, texts: list[str]) -> np.ndarray:
    return Tokenizer(model.tokenizer_file, DECODER_MAX, truncate=False).encode(texts).lengths


def test_long_documents_are_a_few_thousand_tokens_each_and_fit_the_decoders(passages: list[str],
                                                                            long_model: ModelInfo) -> None:
    ids, texts = long_documents(passages)
    assert 450 < len(texts) < 550
    assert ids[:2] == ["long-0", "long-1"] and len(set(ids)) == len(ids)
    longest_passage = max(len(p.split()) for p in passages)
    words = np.array([len(t.split()) for t in texts])
    assert words.min() >= LONG_WORDS[0] and words.max() < LONG_WORDS[1] + longest_passage
    lengths = whole_lengths(long_model, texts)
    assert lengths.min() > 1_400 and lengths.max() < DECODER_MAX  # embedded whole when unchunked
    assert 3_000 < np.median(lengths) < 4_500
    # Consecutive passages, joined with a blank line, every passage used once until the last document.
    assert texts[0].split("\n\n") == passages[:len(texts[0].split("\n\n"))]
    assert sum(len(t.split("\n\n")) for t in texts) <= len(passages)


def test_long_documents_are_the_same_each_time_and_differ_with_the_seed(passages: list[str]) -> None:
    assert long_documents(passages) == long_documents(passages)
    assert long_documents(passages)[1] != long_documents(passages, seed=22)[1]


def test_the_long_corpus_is_built_once_in_the_work_directory(corpus_dir: Path, tmp_path: Path) -> None:
    passages_file = corpus_dir / "passages.parquet"
    built = Corpus("long", passages_file, joined=True).file(tmp_path)
    assert built == tmp_path / "long.parquet"
    ids, texts = load_corpus(built, 1)
    assert (ids, texts) == long_documents(load_corpus(passages_file, 1)[1])
    stamp = built.stat().st_mtime_ns
    assert Corpus("long", passages_file, joined=True).file(tmp_path).stat().st_mtime_ns == stamp
    assert Corpus("passages", passages_file).file(tmp_path) == passages_file


def test_sentence_transformers_gets_chunk_texts_that_tokenize_back_to_about_each_chunk(
        passages: list[str], long_model: ModelInfo) -> None:
    texts = long_documents(passages)[1][:40]
    workload = Workload.of(long_model, texts, 512, 64)
    chunk_texts = workload.sentence_texts()
    assert len(chunk_texts) == len(workload.sequences) > 4 * len(texts)
    again = whole_lengths(long_model, chunk_texts).astype(np.int64)
    wanted = workload.sequences.lengths.astype(np.int64)
    assert abs(int(again.sum() - wanted.sum())) <= 0.001 * wanted.sum()
    assert (again == wanted).mean() > 0.9 and np.abs(again - wanted).max() <= 3
    assert not any(text.startswith("##") for text in chunk_texts)
    assert Workload.of(long_model, texts).sentence_texts() is texts  # unchunked: the documents themselves


def bench_long(tmp_path: Path, corpus_dir: Path, *args: str) -> tuple[list[dict], str]:
    out_json = tmp_path / "bench.json"
    result = embedq("bench", "--device", "cpu", "--precision", "fp32", "--model", "qwen3-tiny", "--corpus", "long",
                    "--corpus-dir", str(corpus_dir), "--tokenizer-processes", "0", "--token-budget", "16384",
                    "--json", str(out_json), "--plot", str(tmp_path / "bench.png"), *args, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out_json.read_text())["results"], result.stdout


def test_bench_embeds_long_documents_whole_when_not_chunked(tmp_path: Path, corpus_dir: Path,
                                                            long_model: ModelInfo) -> None:
    [run], table = bench_long(tmp_path, corpus_dir, "--limit", "6", "--tokenize", "worker")
    texts = long_documents(load_corpus(corpus_dir / "passages.parquet", 1)[1])[1][:6]
    assert run["documents"] == run["rows"] == 6 and run["verified"]
    assert run["real_tokens"] == int(whole_lengths(long_model, texts).sum())  # none truncated
    assert run["seq_lens"][-1] == DECODER_MAX and run["seq_lens"][0] > 1_000
    assert run["e2e_tokens_per_s"] > 0 and run["gpu_only_tokens_per_s"] > 0 and run["st_tokens_per_s"] > 0
    assert "| qwen3-tiny / long x1 / worker-tokenized | 6, verified |" in table


def test_bench_chunks_long_documents_as_embedq_run_chunk_does(tmp_path: Path, corpus_dir: Path,
                                                              long_model: ModelInfo) -> None:
    """The decoder (to 8,192 tokens) and the tiny BERT (to MiniLM's 256, so every document is over
    its maximum: a tokenizer that truncated would leave no whole document to cut)."""
    results, table = bench_long(tmp_path, corpus_dir, "--model", "tiny", "--limit", "10", "--chunk", "256",
                                "--overlap", "32", "--tokenize", "producer", "--tokenize", "worker")
    texts = long_documents(load_corpus(corpus_dir / "passages.parquet", 1)[1])[1][:10]
    tokenizer = Tokenizer(long_model.tokenizer_file, DECODER_MAX, truncate=False)
    chunks = Chunking.for_tokenizer(tokenizer, 256, 32).split(tokenizer.encode(texts))[0]
    assert [(r["scenario"]["model"], r["scenario"]["pretokenize"]) for r in results] == [
        ("qwen3-tiny", True), ("qwen3-tiny", False), ("tiny", True), ("tiny", False)]
    for run in results:  # pretokenized (whole documents in the messages) and worker-tokenized alike
        assert run["scenario"]["chunk_tokens"] == 256 and run["scenario"]["chunk_overlap"] == 32
        assert run["documents"] == 10 and run["rows"] == len(chunks) > 10 * 7 and run["verified"]
        assert run["real_tokens"] == int(chunks.lengths.sum())  # tokens/s counts the chunks' tokens
        assert all(s <= 256 for s in run["seq_lens"][:-1])  # buckets fitted to the chunks, then the maximum
        assert run["e2e_tokens_per_s"] > 0 and run["gpu_only_tokens_per_s"] > 0
    assert [r["seq_lens"][-1] for r in results] == [DECODER_MAX, DECODER_MAX, 256, 256]
    assert results[0]["st_tokens_per_s"] > 0 and results[2]["st_tokens_per_s"] > 0  # on the chunks' texts
    assert f"| qwen3-tiny / long x1 / pretokenized / chunk 256/32 | 10 in {len(chunks):,} chunks, verified |" in table


def test_bench_refuses_an_overlap_without_chunks(tmp_path: Path, corpus_dir: Path) -> None:
    result = embedq("bench", "--device", "cpu", "--corpus", "long", "--corpus-dir", str(corpus_dir),
                    "--overlap", "32", "--json", str(tmp_path / "b.json"))
    assert result.returncode == 2 and "--overlap only with --chunk" in result.stderr


def test_bench_help_names_the_long_corpus_and_chunking() -> None:
    result = embedq("bench", "--help", env={"COLUMNS": "200"})
    assert "long (documents of a few thousand tokens" in result.stdout
    assert "--chunk" in result.stdout and "--overlap" in result.stdout
