"""TensorRT for real (`pytest -m tensorrt`): wherever `tensorrt` or `tensorrt_rtx` imports and a CUDA
GPU is present; skipped elsewhere, with the reason.

- The build path: the bundled MiniLM and a BERT-base shape (random weights), fp16, one profile per
  default bucket; build time and plan size are written to `$EMBEDQ_TRT_REPORT` (JSON) if it is set.
- The cache: a second request loads the plan it built, and its manifest names this GPU and TensorRT.
- The runtime: the plan's embeddings against sentence-transformers (cosine >= 0.999 in fp16) and the
  per-document error against torch in fp32 (max L2, min cosine), where this GPU runs the plan.
  Where TensorRT cannot run it (TensorRT-RTX on a data-centre GPU such as the H200), the refusal
  must be a clear `EngineUnavailable`, and `--backend auto` must fall back to the torch engine.

On a node with TensorRT (NVIDIA's container, say): `pip install -e '.[dev,tensorrt]' && pytest -m tensorrt`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from embedq.engines.factory import EngineSpec, engine_for, plan_engine
from embedq.errors import EngineError
from embedq.model import ModelInfo, load_model_info

pytestmark = pytest.mark.tensorrt


def _unavailable() -> str | None:
    from embedq.engines.tensorrt_build import import_tensorrt

    try:
        import_tensorrt()
    except EngineError as exc:
        return str(exc)
    import torch

    return None if torch.cuda.is_available() else "no CUDA GPU here"


@pytest.fixture(scope="module", autouse=True)
def _needs_tensorrt_and_a_gpu() -> None:
    reason = _unavailable()
    if reason is not None:
        pytest.skip(f"TensorRT conformance needs TensorRT and a CUDA GPU: {reason}")


def _report(entry: dict[str, object]) -> None:
    path = os.environ.get("EMBEDQ_TRT_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")


def _models(tmp_path_factory: pytest.TempPathFactory, model_info: ModelInfo) -> dict[str, ModelInfo]:
    from embedq.bench import build_random_model

    base = build_random_model(tmp_path_factory.mktemp("bert-base"), "bert-base", model_info)
    return {"minilm": model_info, "bert-base": load_model_info(base)}


@pytest.mark.parametrize("name", ["minilm", "bert-base"])
def test_a_plan_builds_with_one_profile_per_bucket_and_is_cached(name: str, tmp_path_factory, model_info,
                                                                 tmp_path: Path) -> None:
    from embedq.engines.onnx_export import export_onnx
    from embedq.engines.tensorrt_build import cached_plan

    model = _models(tmp_path_factory, model_info)[name]
    _, config = plan_engine(model, EngineSpec(backend="torch", device="cuda", precision="fp16"))
    started = time.monotonic()
    onnx_file = export_onnx(model, tmp_path, precision="fp16", device="cuda")
    exported = time.monotonic() - started
    built = cached_plan(model, onnx_file, config.profiles, "fp16", device="cuda", cache_dir=tmp_path)
    assert built.built_now and len(built.plan) > 1_000_000
    again = cached_plan(model, onnx_file, config.profiles, "fp16", device="cuda", cache_dir=tmp_path)
    assert not again.built_now and again.plan == built.plan
    manifest = built.manifest
    assert manifest["gpu"]["name"] != "none" and manifest["profiles"] == [[p.max_seq_len, p.max_batch]
                                                                         for p in sorted(config.profiles)]
    _report({"test": "build", "model": name, "precision": "fp16", "profiles": len(config.profiles),
             "export_seconds": round(exported, 1), "build_seconds": manifest["build_seconds"],
             "plan_megabytes": round(len(built.plan) / 1e6, 1),
             "onnx_megabytes": round(onnx_file.stat().st_size / 1e6, 1),
             "tensorrt": manifest["tensorrt"], "gpu": manifest["gpu"]})


def test_the_plan_runs_here_or_auto_falls_back_to_torch(model_info, tmp_path: Path, gloss_texts: list[str]) -> None:
    from embedq.api import Embedder
    from embedq.engines.tensorrt_engine import EngineUnavailable, TensorRTEngine

    texts = gloss_texts[:2000]
    spec = EngineSpec(backend="tensorrt", device="cuda", precision="fp16", cache_dir=str(tmp_path))
    _, config = plan_engine(model_info, spec)
    try:
        with TensorRTEngine(config):
            runs = True
    except EngineUnavailable as exc:
        runs = False
        assert "cannot run it on" in str(exc) and "compute capability" in str(exc), str(exc)
        _report({"test": "runtime", "runs": False, "reason": str(exc)})
    auto = engine_for(model_info, EngineSpec(backend="auto", device="cuda", precision="fp16", cache_dir=str(tmp_path)))
    with auto as engine:
        assert engine.name == ("tensorrt" if runs else "torch")
    if not runs:
        return
    with Embedder(backend="tensorrt", device="cuda", precision="fp16") as trt, \
            Embedder(backend="torch", device="cuda", precision="fp32") as reference:
        got, exact = trt.encode(texts), reference.encode(texts)
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model_info.path), device="cuda").encode(texts, normalize_embeddings=True)
    cosine = (got * exact).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(exact, axis=1))
    st_cosine = (got * st).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(st, axis=1))
    _report({"test": "runtime", "runs": True, "documents": len(texts),
             "min_cosine_vs_torch_fp32": float(cosine.min()),
             "max_l2_vs_torch_fp32": float(np.linalg.norm(got - exact, axis=1).max()),
             "min_cosine_vs_sentence_transformers": float(st_cosine.min())})
    assert cosine.min() >= 0.999 and st_cosine.min() >= 0.999
