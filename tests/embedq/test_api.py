"""The Python API: the vectors `embedq run` writes, in input order, from lists, generators and tables,
and a job submitted to Redis and waited for while a worker embeds it."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

import embedq
from embedq import job as job_record
from embedq.errors import UsageError
from embedq.keys import JobKeys
from tests.embedq.test_cli import SAMPLE
from tests.embedq.test_cli import embedq as embedq_cli
from tests.support import read_output, run_worker

PREFIX = "apitest"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], list[str], Path]:
    """120 documents: real glosses of 10-300 characters, and 10 passages of 2-24 glosses joined, the
    longest cut at the model's 256 tokens; written to a Parquet source with string ids."""
    glosses = [json.loads(line)["text"] for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    rng = np.random.default_rng(7)
    texts = glosses[:110] + [" ".join(glosses[i] for i in rng.integers(110, 1000, size=int(n)))
                             for n in rng.integers(2, 25, size=10)]
    ids = [f"doc-{i:03d}" for i in range(len(texts))]
    source = tmp_path_factory.mktemp("api") / "corpus.parquet"
    pq.write_table(pa.table({"id": ids, "text": texts}), source)
    return ids, texts, source


def _delete_job(url: str, job: str) -> None:
    client = redis.Redis.from_url(url)
    for key in client.scan_iter(match=f"{PREFIX}:{{{job}}}*", count=1000):
        client.delete(key)
    client.close()


@pytest.fixture(scope="module")
def run_vectors(corpus: tuple[list[str], list[str], Path], redis_url: str,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[Any, np.ndarray]]:
    """What `embedq run` writes for the corpus, by id (its parts hold rows in length order)."""
    job = f"t-{uuid.uuid4().hex[:12]}"
    out = tmp_path_factory.mktemp("run-out")
    result = embedq_cli("run", str(corpus[2]), "--out", str(out), "--job", job, "--redis", redis_url,
                        "--key-prefix", PREFIX)
    assert result.returncode == 0, result.stderr
    yield read_output(out)
    _delete_job(redis_url, job)


@pytest.fixture(scope="module")
def embedder() -> Iterator[embedq.Embedder]:
    """The default model on the CPU as `embedq run` above runs it (torch, 2 threads: tests/support.py)."""
    with embedq.Embedder(device="cpu", backend="torch", threads=2) as model:
        yield model


def _expected(run_vectors: dict[Any, np.ndarray], ids: list[Any]) -> np.ndarray:
    return np.stack([run_vectors[i] for i in ids])


def _assert_same_but_for_batching(got: np.ndarray, want: np.ndarray) -> None:
    """The same vectors from batches made up otherwise: the CPU's matrix kernels may sum in another
    order for another batch size (an Intel Xeon's do, by about 1e-7), so equal to 1e-6, not bit for bit."""
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_encode_gives_bit_identical_vectors_to_embedq_run(embedder: embedq.Embedder, corpus: tuple,
                                                          run_vectors: dict[Any, np.ndarray]) -> None:
    ids, texts, _ = corpus
    vectors = embedder.encode(texts)
    assert vectors.dtype == np.float32 and vectors.shape == (120, 384)
    # The same tokenizer, buckets and engine: not close, equal, bit for bit.
    assert np.array_equal(vectors, _expected(run_vectors, ids))


def test_encode_keeps_input_order_across_windows_with_lengths_far_apart(
        embedder: embedq.Embedder, corpus: tuple, run_vectors: dict[Any, np.ndarray]) -> None:
    ids, texts, _ = corpus
    # Shortest and longest interleaved (9 to 256 tokens), in windows of 7 that the engine sorts by length.
    by_length = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    picked = [i for pair in zip(by_length[:8], by_length[-8:][::-1], strict=True) for i in pair]
    vectors = embedder.encode([texts[i] for i in picked], batch_docs=7)
    _assert_same_but_for_batching(vectors, _expected(run_vectors, [ids[i] for i in picked]))


def test_encode_reads_a_generator_window_by_window(embedder: embedq.Embedder, corpus: tuple,
                                                   run_vectors: dict[Any, np.ndarray]) -> None:
    ids, texts, _ = corpus
    read: list[int] = []

    def lazily() -> Iterator[str]:
        for i in range(0, 20):
            read.append(i)
            yield texts[i]

    vectors = embedder.encode(lazily(), batch_docs=8)
    assert read == list(range(20))
    _assert_same_but_for_batching(vectors, _expected(run_vectors, ids[:20]))


def test_empty_input_gives_an_empty_matrix_of_the_model_width(embedder: embedq.Embedder) -> None:
    for empty in ([], iter(())):
        vectors = embedder.encode(empty)
        assert vectors.shape == (0, 384) and vectors.dtype == np.float32


def test_a_non_str_element_or_a_bare_string_is_a_usage_error_naming_it(embedder: embedq.Embedder) -> None:
    with pytest.raises(UsageError, match=r"texts\[2\] is of type int, not str"):
        embedder.encode(["one", "two", 3, "four"])
    with pytest.raises(UsageError, match=r"texts\[1\]: invalid Unicode"):
        embedder.encode(["fine", "lone \ud800 surrogate"])
    with pytest.raises(UsageError, match="not a single string"):
        embedder.encode("a sentence")


def test_embed_table_returns_the_worker_layout_in_input_order(embedder: embedq.Embedder, corpus: tuple,
                                                              run_vectors: dict[Any, np.ndarray],
                                                              tmp_path: Path) -> None:
    ids, texts, _ = corpus
    order = [int(i) for i in np.random.default_rng(3).permutation(110)[:16]] + [115, 112]
    table = pa.table({"key": [ids[i] for i in order], "body": [texts[i] for i in order]})
    out = embedder.embed_table(table, text_field="body", id_field="key", batch_docs=9)
    assert out.column("id").to_pylist() == [ids[i] for i in order]
    assert out.schema.field("embedding").type == pa.list_(pa.field("item", pa.float32(), nullable=False), 384)
    assert out.column_names == ["id", "embedding", "n_tokens", "truncated"]
    vectors = np.stack(out.column("embedding").to_numpy(zero_copy_only=False))
    _assert_same_but_for_batching(vectors, _expected(run_vectors, [ids[i] for i in order]))
    assert out.schema.metadata[b"embedq.model"] == b"sentence-transformers/all-MiniLM-L6-v2"
    # A Parquet path without an id column: ids are the row positions, as `embedq produce` numbers them.
    pq.write_table(pa.table({"text": [texts[i] for i in order[:5]]}), tmp_path / "plain.parquet")
    plain = embedder.embed_table(tmp_path / "plain.parquet")
    assert plain.schema.field("id").type == pa.int64() and plain.column("id").to_pylist() == [0, 1, 2, 3, 4]
    _assert_same_but_for_batching(np.stack(plain.column("embedding").to_numpy(zero_copy_only=False)), vectors[:5])


def test_importing_embedq_loads_no_inference_library() -> None:
    code = ("import sys, embedq; assert 'torch' not in sys.modules and 'pyarrow' not in sys.modules; "
            "embedq.Embedder; assert 'torch' not in sys.modules; print(embedq.__version__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_submit_and_wait_give_the_vectors_of_encode(embedder: embedq.Embedder, corpus: tuple, redis_url: str,
                                                    redis_client: redis.Redis, job_name: str, tmp_path: Path) -> None:
    ids, texts, _ = corpus
    source = tmp_path / "small.parquet"
    pq.write_table(pa.table({"id": ids[:30], "text": texts[:30]}), source)
    assert embedq.submit(source, job=job_name, redis=redis_url, key_prefix=PREFIX, batch_size=8) == job_name
    keys = JobKeys(job_name, PREFIX)
    assert redis_client.xlen(keys.stream) == 4  # published, nothing embedded yet
    # The worker `embedq work` runs, in a thread, on the engine the Embedder already started.
    worker = ThreadPoolExecutor(1).submit(run_worker, redis_client, keys, job_record.require(redis_client, keys),
                                          embedder.model, embedder.engine, tmp_path / "out")
    seen: list[str] = []
    status = embedq.wait(job_name, redis=redis_url, key_prefix=PREFIX, timeout=120, poll=0.2,
                         on_status=lambda s: seen.append(s.state))
    assert worker.result(timeout=60).job_complete
    assert status.complete and status.committed_documents == 30 and status.dead_documents == 0
    assert seen[-1] == "complete" and status.output.endswith("out")
    written = read_output(tmp_path / "out")
    _assert_same_but_for_batching(np.stack([written[i] for i in ids[:30]]), embedder.encode(texts[:30]))


def test_wait_gives_up_after_its_timeout_and_refuses_an_unknown_job(redis_url: str, job_name: str,
                                                                     tmp_path: Path) -> None:
    source = tmp_path / "two.parquet"
    pq.write_table(pa.table({"id": [1, 2], "text": ["one", "two"]}), source)
    embedq.submit(source, job=job_name, redis=redis_url, key_prefix=PREFIX)
    with pytest.raises(TimeoutError, match=r"not complete after 0\.3 s"):
        embedq.wait(job_name, redis=redis_url, key_prefix=PREFIX, timeout=0.3, poll=0.1)
    with pytest.raises(UsageError, match="does not exist"):
        embedq.wait("no-such-job", redis=redis_url, key_prefix=PREFIX, timeout=1)
