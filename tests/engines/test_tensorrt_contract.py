"""The TensorRT backend against a fake of TensorRT's runtime (tests/engines/fake_tensorrt.py, written
from NVIDIA's documentation, not from this backend): what TensorRT requires of a caller, and the
engine cache. The real thing runs in tests/engines/test_tensorrt.py (`pytest -m tensorrt`).

The fake runs on host memory: "device" addresses are host pointers, and `execute_async_v3` runs the
plan's ONNX graph with ONNX Runtime, so the vectors that come back are the model's. Mutants of the
backend's source (an address left out, a shape outside its profile, no profile selected) must fail.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest

from embedq.engines import tensorrt_engine
from embedq.engines.base import Profile
from embedq.engines.onnx_export import export_onnx
from embedq.engines.profiles import profile_table
from embedq.engines.tensorrt_build import MANIFEST_FILE, build_plan, cached_plan, make_logger
from embedq.errors import EngineError
from embedq.model import load_model_info
from tests.engines import fake_tensorrt as trt

SEQ_LENS = (8, 16, 32)
BUDGET = 256


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    trt.reset()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    monkeypatch.setattr("embedq.engines.tensorrt_build.gpu_identity", lambda device: {
        "name": trt.DEVICE, "compute_capability": "9.0"})
    return trt


@pytest.fixture(scope="module")
def tiny(tiny_model: Path):
    return load_model_info(tiny_model)


@pytest.fixture(scope="module")
def onnx_file(tiny, onnx_cache_dir: Path) -> Path:
    return export_onnx(tiny, onnx_cache_dir)


def profiles(tiny) -> tuple[Profile, ...]:
    return profile_table(tiny.max_seq_len, BUDGET, SEQ_LENS)


def aligned(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """A buffer starting on a 256-byte boundary, as cudaMalloc's allocations do."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.zeros(size + 256, np.uint8)
    start = -raw.ctypes.data % 256
    return raw[start:start + size].view(dtype).reshape(shape)


def run_contract(module: types.ModuleType, tiny, onnx_file: Path) -> dict[Profile, np.ndarray]:
    """Build a plan, start the backend's runner on it and run a full and a one-row batch per
    profile through host buffers; returns each profile's full-batch embeddings."""
    plan = build_plan(trt, onnx_file.read_bytes(), profiles(tiny), "fp32")
    logger = make_logger(trt)
    engine = module.deserialize(trt, plan, {}, logger)
    runner = module.TensorRTRunner(trt, engine, profiles(tiny), tiny.dim, logger)
    runner.prepare(0)
    results = {}
    rng = np.random.default_rng(7)
    for profile in profiles(tiny):
        for rows in (profile.max_batch, 1):
            seq = profile.max_seq_len
            ids, lengths = aligned((profile.max_batch, seq), np.int32), aligned((profile.max_batch,), np.int32)
            out = aligned((profile.max_batch, tiny.dim), np.float32)
            ids[:rows] = rng.integers(1000, 2000, (rows, seq))
            lengths[:rows] = rng.integers(1, seq + 1, rows)
            runner.execute(profile, ids.ctypes.data, lengths.ctypes.data, out.ctypes.data, rows, 0)
            expected = _reference(tiny, ids[:rows], lengths[:rows])
            assert np.allclose(out[:rows], expected, atol=1e-5), profile
            if rows == profile.max_batch:
                results[profile] = out[:rows].copy()
    runner.close()
    return results


def _reference(tiny, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    import torch

    from embedq.engines.torch_engine import load_encoder

    encoder = load_encoder(tiny)
    with torch.inference_mode():
        return encoder(torch.from_numpy(ids.copy()), torch.from_numpy(lengths.copy())).numpy()


def test_the_runner_meets_the_runtime_contract_and_gives_the_models_vectors(fake, tiny, onnx_file: Path) -> None:
    results = run_contract(tensorrt_engine, tiny, onnx_file)
    assert set(results) == set(profiles(tiny))
    contexts = [args for name, args in trt.CALLS if name == "ICudaEngine.create_execution_context"]
    selected = [args[0] for name, args in trt.CALLS if name == "IExecutionContext.set_optimization_profile_async"]
    assert len(contexts) == len(profiles(tiny)) and sorted(selected) == list(range(len(profiles(tiny))))


@pytest.mark.parametrize(("mutation", "original", "mutant"), [
    ("an output address left out", "(LENGTHS, lengths), (EMBEDDINGS, out)):", "(LENGTHS, lengths)):"),
    ("a shape outside the profile", "context.set_input_shape(INPUT_IDS, (rows, seq))",
     "context.set_input_shape(INPUT_IDS, (rows, seq + 1))"),
    ("a batch over the profile's max", "context.set_input_shape(INPUT_IDS, (rows, seq))",
     "context.set_input_shape(INPUT_IDS, (rows + 1, seq))"),
    ("no profile selected", "if not context.set_optimization_profile_async(index, stream):", "if False:"),
    ("one context for every profile", "self._contexts[profile] = context",
     "self._contexts[profile] = next(iter(self._contexts.values()), context)"),
])
def test_a_mutant_of_the_backend_breaks_the_contract(fake, tiny, onnx_file: Path, mutation: str, original: str,
                                                     mutant: str) -> None:
    source = Path(tensorrt_engine.__file__).read_text(encoding="utf-8")
    assert original in source, f"the test's anchor for {mutation!r} is gone from the backend"
    mutated = types.ModuleType("mutated_tensorrt_engine")
    mutated.__dict__["__package__"] = "embedq.engines"
    exec(compile(source.replace(original, mutant, 1), "mutated", "exec"), mutated.__dict__)
    with pytest.raises((EngineError, RuntimeError, AssertionError)):
        run_contract(mutated, tiny, onnx_file)


def test_a_refused_plan_is_a_clear_error_that_auto_falls_back_from(fake, tiny, onnx_file: Path) -> None:
    plan = build_plan(trt, onnx_file.read_bytes(), profiles(tiny), "fp32")
    trt.REFUSE_DESERIALIZE = "The engine cannot run on this GPU, which has compute capability 9.0"
    manifest = {"gpu": {"name": "NVIDIA H200", "compute_capability": "9.0"}}
    with pytest.raises(tensorrt_engine.EngineUnavailable,
                       match=r"cannot run it on NVIDIA H200 \(compute capability 9\.0\): .*cannot run on this GPU"):
        tensorrt_engine.deserialize(trt, plan, manifest, make_logger(trt))

    from embedq.engines import create_engine
    from embedq.engines.base import EngineConfig
    from embedq.engines.factory import FallbackEngine

    config = EngineConfig(model=tiny, profiles=profiles(tiny))

    class Refused:
        name = "tensorrt"

        def __init__(self) -> None:
            self.config = config

        def __enter__(self):
            raise tensorrt_engine.EngineUnavailable("TensorRT-RTX cannot run on compute capability 9.0")

    with FallbackEngine(Refused(), lambda: create_engine("torch", config)) as engine:  # type: ignore[arg-type]
        assert engine.name == "torch"
        assert engine.submit(np.full((1, 8), 1000, np.int32), np.array([8], np.int32)).result().shape == (1, tiny.dim)


def test_the_cache_builds_once_loads_after_and_rebuilds_or_refuses_what_changed(fake, tiny, onnx_file: Path,
                                                                                 tmp_path: Path) -> None:
    first = cached_plan(tiny, onnx_file, profiles(tiny), "fp32", device="cuda", cache_dir=tmp_path)
    assert first.built_now and (first.folder / MANIFEST_FILE).is_file()
    manifest = first.manifest
    assert manifest["tokenizer_digest"].startswith("sha256:") and manifest["onnx_digest"].startswith("sha256:")
    assert manifest["tensorrt"] == {"flavour": "tensorrt", "version": trt.__version__}
    assert manifest["gpu"]["compute_capability"] == "9.0" and manifest["engine_bytes"] == len(first.plan)
    assert manifest["profiles"] == [[p.max_seq_len, p.max_batch] for p in profiles(tiny)]
    again = cached_plan(tiny, onnx_file, profiles(tiny), "fp32", device="cuda", cache_dir=tmp_path)
    assert not again.built_now and again.plan == first.plan
    # Another GPU: the manifest no longer matches the plan in that folder.
    other = {**manifest, "gpu": {"name": "NVIDIA L4", "compute_capability": "8.9"}}
    (first.folder / MANIFEST_FILE).write_text(__import__("json").dumps(other))
    with pytest.raises(EngineError, match=r"gpu: .*8\.9.*9\.0"):
        cached_plan(tiny, onnx_file, profiles(tiny), "fp32", device="cuda", cache_dir=tmp_path, on_mismatch="refuse")
    rebuilt = cached_plan(tiny, onnx_file, profiles(tiny), "fp32", device="cuda", cache_dir=tmp_path)
    assert rebuilt.built_now
    assert (first.folder / "timing.cache").read_bytes()  # kept beside the plan for the next build


def test_workers_starting_together_build_one_plan(fake, tiny, onnx_file: Path, tmp_path: Path) -> None:
    results = []

    def start() -> None:
        results.append(cached_plan(tiny, onnx_file, profiles(tiny), "fp32", device="cuda", cache_dir=tmp_path))

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(r.built_now for r in results) == 1
    assert len({r.plan for r in results}) == 1
    assert sum(name == "Builder.build_serialized_network" for name, _ in trt.CALLS) == 1


def test_addresses_are_host_pointers_in_the_fake(fake) -> None:
    """The premise of these tests: the fake reads what the runner points at."""
    buffer = aligned((4,), np.int32)
    buffer[:] = [1, 2, 3, 4]
    assert list((ctypes.c_int32 * 4).from_address(buffer.ctypes.data)) == [1, 2, 3, 4]
