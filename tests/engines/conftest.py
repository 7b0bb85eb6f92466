"""Fixtures for the engine tests: a mixed real-text sample, its sentence-transformers reference, engines."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from embedq.engines import create_engine
from embedq.engines.base import Engine, EngineConfig, Profile
from embedq.model import ModelInfo
from embedq.tokenization import TokenizedDocs, Tokenizer

from .corpus_batches import bucket_profiles, read_texts

# 2,000 documents: short glosses and long passages (about 7% of passages are cut at 256 tokens).
# Passages dominate the CPU time (~115 tokens each against ~18), hence fewer of them.
GLOSSES_IN_SAMPLE = 1_600
PASSAGES_IN_SAMPLE = 400
# The default run holds the backends to sentence-transformers on a quarter of the sample (a quarter of
# its tokens, ~4 s a backend instead of ~15 s on 2 cores), picked evenly across token lengths so short
# glosses, passages and documents cut at 256 tokens all stay in; `pytest -m full` checks all 2,000.
BOUNDED_SAMPLE = 500
# Batches of at most 4,096 padded tokens in widths of 16: on 2 cores as fast as 1,024 and faster than
# 16,384 (the measurements are in engines/__init__.py).
TOKEN_BUDGET = 4_096
THREADS = 2


@dataclass(frozen=True)
class Sample:
    """Texts of both corpora and their token ids."""

    texts: list[str]
    docs: TokenizedDocs


@pytest.fixture(scope="session")
def sample(model_info: ModelInfo, corpus_dir: Path) -> Sample:
    texts = (read_texts(corpus_dir / "glosses.parquet", GLOSSES_IN_SAMPLE, seed=7)
             + read_texts(corpus_dir / "passages.parquet", PASSAGES_IN_SAMPLE, seed=7))
    docs = Tokenizer(model_info.tokenizer_file, model_info.max_seq_len).encode(texts)
    return Sample(texts, docs)


@pytest.fixture(scope="session")
def bounded_sample(model_info: ModelInfo, sample: Sample) -> Sample:
    """BOUNDED_SAMPLE documents of the sample at evenly spaced ranks of token length, in sample order."""
    by_length = np.argsort(sample.docs.lengths, kind="stable")
    ranks = np.linspace(0, len(by_length) - 1, BOUNDED_SAMPLE).round().astype(np.int64)
    texts = [sample.texts[i] for i in np.sort(by_length[ranks])]
    return Sample(texts, Tokenizer(model_info.tokenizer_file, model_info.max_seq_len).encode(texts))


@pytest.fixture(scope="session")
def profiles(model_info: ModelInfo) -> tuple[Profile, ...]:
    return bucket_profiles(model_info.max_seq_len, TOKEN_BUDGET)


@pytest.fixture(scope="session")
def st_reference(model_info: ModelInfo, sample: Sample, corpus_dir: Path) -> np.ndarray:
    """sentence-transformers' embeddings of the sample, computed once per machine and kept by the corpus."""
    return sentence_transformers_reference(model_info, sample, corpus_dir)


@pytest.fixture(scope="session")
def bounded_st_reference(model_info: ModelInfo, bounded_sample: Sample, corpus_dir: Path) -> np.ndarray:
    """sentence-transformers' embeddings of the bounded sample (its own, so a fresh machine computes only these)."""
    return sentence_transformers_reference(model_info, bounded_sample, corpus_dir)


def sentence_transformers_reference(model_info: ModelInfo, sample: Sample, corpus_dir: Path) -> np.ndarray:
    """sentence-transformers' embeddings of `sample`, computed once per machine and kept by the corpus."""
    import sentence_transformers
    import torch

    # Keyed by everything that decides the numbers; beside the corpus rather than in .pytest_cache,
    # which `-p no:cacheprovider` turns off. It costs ~30 s of CPU to recompute on 2 cores (the whole sample).
    key = hashlib.sha256("\0".join(
        [model_info.digest, sentence_transformers.__version__, torch.__version__, *sample.texts]
    ).encode()).hexdigest()[:16]
    cached = corpus_dir / f"st-reference-{key}.npy"
    if cached.is_file():
        return np.load(cached)
    torch.set_num_threads(THREADS)
    model = sentence_transformers.SentenceTransformer(str(model_info.path), device="cpu")
    reference = model.encode(sample.texts, batch_size=64, normalize_embeddings=False,
                             convert_to_numpy=True).astype(np.float32)
    staged = cached.with_suffix(f".{os.getpid()}.tmp.npy")  # np.save insists on the .npy suffix
    with contextlib.suppress(OSError):  # a read-only corpus folder only costs the recomputation
        np.save(staged, reference)
        os.replace(staged, cached)
    return reference


@pytest.fixture(scope="session")
def onnx_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One engine cache for the session, so each model setting is exported once."""
    return tmp_path_factory.mktemp("engine-cache")


@pytest.fixture(scope="session", params=["torch", "onnxruntime"])
def backend_engine(request: pytest.FixtureRequest, model_info: ModelInfo, profiles: tuple[Profile, ...],
               onnx_cache_dir: Path) -> Iterator[Engine]:
    """A started CPU engine of each backend over the test profiles."""
    config = EngineConfig(model_info, profiles, cache_dir=str(onnx_cache_dir), threads=THREADS)
    with create_engine(request.param, config) as engine:
        yield engine
