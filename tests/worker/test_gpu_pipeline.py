"""The whole worker on a CUDA GPU: the same job as on CPU, in fp16 and bf16, against the CPU fp32 output.

Runs on the GPU machine (`pytest -m gpu`); skipped elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from embedq.engines import create_engine
from embedq.engines.base import EngineConfig
from embedq.engines.profiles import profile_table
from embedq.keys import JobKeys
from tests.support import produce, read_output, run_worker, write_jsonl

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible to torch)")]


@pytest.fixture(scope="module")
def job_source(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> Path:
    texts = []
    for name in ("glosses", "passages"):
        column = pq.read_table(corpus_dir / f"{name}.parquet", columns=["text"]).column("text").to_pylist()
        texts += column[:: max(1, len(column) // 1500)][:1500]
    return write_jsonl(tmp_path_factory.mktemp("gpu") / "docs.jsonl", list(range(len(texts))), texts)


def embed_job(redis_client, model_info, source: Path, out: Path, device: str, precision: str,  # type: ignore[no-untyped-def]
              cuda_graphs: bool = False) -> dict:
    keys = JobKeys(f"gpu-{precision}-{device.replace(':', '')}-{out.name}")
    for key in redis_client.scan_iter(match=f"*{{{keys.job}}}*"):
        redis_client.delete(key)
    record, _ = produce(redis_client, keys, model_info, source, batch_size=256)
    budget = 65536 if device.startswith("cuda") else 8192
    config = EngineConfig(model=model_info, profiles=profile_table(model_info.max_seq_len, budget), device=device,
                          precision=precision, cuda_graphs=cuda_graphs)
    with create_engine("torch", config) as engine:
        report = run_worker(redis_client, keys, record, model_info, engine, out, window_docs=1024)
    assert report.job_complete and report.dead_documents == 0
    return read_output(out)


@pytest.fixture(scope="module")
def cpu_fp32(redis_url, model_info, job_source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:  # type: ignore[no-untyped-def]
    import redis

    return embed_job(redis.Redis.from_url(redis_url), model_info, job_source, tmp_path_factory.mktemp("cpu"),
                     "cpu", "fp32")


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "cuda-graphs"])
def test_the_job_on_cuda_matches_the_cpu_fp32_output(redis_client, model_info, job_source: Path, tmp_path: Path,
                                                     cpu_fp32: dict, precision: str, cuda_graphs: bool) -> None:
    gpu = embed_job(redis_client, model_info, job_source, tmp_path / "out", "cuda:0", precision,
                    cuda_graphs=cuda_graphs)
    assert set(gpu) == set(cpu_fp32)
    ids = sorted(gpu)
    a = np.stack([gpu[i] for i in ids])
    b = np.stack([cpu_fp32[i] for i in ids])
    cosine = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    print(f"{precision} cuda_graphs={cuda_graphs}: min cosine {cosine.min():.6f} over {len(ids)} documents")
    assert cosine.min() >= 0.999
