"""`embedq bench` on the models it builds with random weights: the Qwen3-Embedding-0.6B shape, and a
tiny decoder of the same architecture timed end to end on CPU (the H200 figures need a GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embedq.bench.random_model import SHAPES, qwen3_config

from .test_cli import embedq


def test_the_qwen3_shape_has_the_parameters_of_qwen3_embedding_0_6b() -> None:
    torch = pytest.importorskip("torch")
    from transformers import Qwen3Model

    spec = SHAPES["qwen3-0.6b"]
    with torch.device("meta"):  # sizes only: no memory, no initialisation
        model = Qwen3Model(qwen3_config(spec, spec.vocab_size or 0))
    parameters = sum(p.numel() for p in model.parameters())
    assert 590e6 < parameters < 600e6  # "0.6B": 596M, of which 155M the tied embedding table
    assert (model.config.hidden_size, model.config.num_hidden_layers, spec.max_seq_len) == (1024, 28, 8192)


def test_bench_times_a_random_decoder_end_to_end_with_the_sentence_transformers_baseline(
    tmp_path: Path, corpus_dir: Path, redis_url: str
) -> None:
    out_json = tmp_path / "bench.json"
    result = embedq("bench", "--device", "cpu", "--precision", "fp32", "--model", "qwen3-tiny", "--corpus",
                    f"glosses={corpus_dir / 'glosses.parquet'}", "--limit", "400", "--tokenize", "worker",
                    "--tokenizer-processes", "0", "--token-budget", "4096", "--window-docs", "400",
                    "--json", str(out_json), "--plot", str(tmp_path / "bench.png"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = json.loads(out_json.read_text())["results"]
    assert run["documents"] == 400 and run["e2e_tokens_per_s"] > 0 and run["st_tokens_per_s"] > 0
    assert run["seq_lens"][-1] == 8192  # profiles reach the decoder's long maximum
    assert "| qwen3-tiny / glosses x1 / worker-tokenized" in result.stdout
