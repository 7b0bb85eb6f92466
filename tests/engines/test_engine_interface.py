"""What every engine refuses and the registry's answers: shapes outside the profiles, bad settings, names."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from embedq import engines
from embedq.engines import BACKENDS, available_backends, create_engine, resolve_backend
from embedq.engines.base import Engine, EngineConfig, Profile
from embedq.engines.device import cuda_device_count, resolve_device
from embedq.errors import EngineError
from embedq.model import ModelInfo


def _batch(rows: int, width: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((rows, width), 101, dtype=np.int32)
    return ids, np.full(rows, width if length is None else length, dtype=np.int32)


def test_a_started_engine_is_an_engine_of_the_model(backend_engine: Engine, model_info: ModelInfo) -> None:
    assert isinstance(backend_engine, Engine)
    assert backend_engine.name in BACKENDS
    assert backend_engine.dim == model_info.dim
    assert list(backend_engine.profiles) == sorted(backend_engine.profiles)


def test_a_batch_of_a_profile_comes_back_as_batch_by_dim_float32(backend_engine: Engine) -> None:
    profile = backend_engine.profiles[0]
    result = backend_engine.submit(*_batch(3, profile.max_seq_len, length=2)).result()

    assert result.shape == (3, backend_engine.dim) and result.dtype == np.float32


@pytest.mark.parametrize(("input_ids", "lengths"), [
    pytest.param(np.zeros(16, np.int32), np.ones(1, np.int32), id="ids-not-2d"),
    pytest.param(np.zeros((2, 16), np.int32), np.ones(3, np.int32), id="lengths-not-one-per-row"),
    pytest.param(np.zeros((2, 17), np.int32), np.ones(2, np.int32), id="width-not-a-profile"),
    pytest.param(np.zeros((2, 16), np.int32), np.zeros(2, np.int32), id="empty-document"),
    pytest.param(np.zeros((2, 16), np.int32), np.full(2, 17, np.int32), id="length-beyond-width"),
    pytest.param(np.zeros((0, 16), np.int32), np.ones(0, np.int32), id="no-rows"),
])
def test_batches_that_fit_no_profile_are_refused(
    backend_engine: Engine, input_ids: np.ndarray, lengths: np.ndarray
) -> None:
    with pytest.raises(ValueError):
        backend_engine.submit(input_ids, lengths)


def test_a_batch_larger_than_its_profile_is_refused(backend_engine: Engine) -> None:
    profile = backend_engine.profiles[-1]
    with pytest.raises(ValueError, match="does not fit"):
        backend_engine.submit(*_batch(profile.max_batch + 1, profile.max_seq_len))


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_on_cpu_is_an_engine_error(backend: str, precision: str, model_info: ModelInfo) -> None:
    config = EngineConfig(model_info, (Profile(16, 4),), device="cpu", precision=precision)
    with pytest.raises(EngineError, match="fp32"):
        create_engine(backend, config)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_submitting_before_start_is_an_engine_error(backend: str, model_info: ModelInfo) -> None:
    engine = create_engine(backend, EngineConfig(model_info, (Profile(16, 4),)))
    with pytest.raises(EngineError, match="not started"):
        engine.submit(*_batch(1, 16))


def test_cuda_without_a_gpu_is_an_engine_error(model_info: ModelInfo) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    engine = create_engine("torch", EngineConfig(model_info, (Profile(16, 4),), device="cuda"))
    with pytest.raises(EngineError, match="no CUDA GPU"), engine:
        pass


def test_an_unknown_backend_is_an_engine_error_naming_the_choices(model_info: ModelInfo) -> None:
    config = EngineConfig(model_info, (Profile(16, 4),))
    with pytest.raises(EngineError, match="torch, onnxruntime, tensorrt"):
        create_engine("tensorflow", config)
    with pytest.raises(EngineError, match="unknown backend"):
        resolve_backend("tensorflow", "cpu")


def test_tensorrt_without_its_library_says_how_to_get_it(model_info: ModelInfo,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # neither imports (as on these machines)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    with pytest.raises(EngineError, match=r"needs tensorrt or tensorrt_rtx.*pip install 'embedq\[tensorrt\]'"):
        create_engine("tensorrt", EngineConfig(model_info, (Profile(16, 4),), device="cuda"))
    assert "tensorrt" not in available_backends()
    assert engines.resolve_backend("auto", "cuda") == "torch"


def test_a_backend_whose_library_is_missing_says_what_to_install(
    model_info: ModelInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = engines._REGISTRY["onnxruntime"]
    monkeypatch.setitem(engines._REGISTRY, "onnxruntime", replace(spec, requires=(("no_such_library",),)))

    with pytest.raises(EngineError, match=r"needs no_such_library.*pip install"):
        create_engine("onnxruntime", EngineConfig(model_info, (Profile(16, 4),)))
    assert "onnxruntime" not in available_backends()


def test_auto_picks_the_measured_cpu_backend_and_torch_on_cuda_without_tensorrt() -> None:
    assert resolve_backend("auto", "cpu") == engines.CPU_AUTO_BACKEND
    assert resolve_backend("auto", "cuda:0") == "torch"
    assert resolve_backend("onnxruntime", "cpu") == "onnxruntime"
    assert set(available_backends()) == {"torch", "onnxruntime"}


def test_the_engines_import_without_torch_or_onnxruntime_and_say_what_to_install() -> None:
    # A None entry in sys.modules makes any import of that name fail, as if it were not installed.
    code = (
        "import sys\n"
        "for name in ('torch', 'onnxruntime', 'onnx', 'transformers', 'tensorrt'):\n"
        "    sys.modules[name] = None\n"
        "import embedq.engines.torch_engine, embedq.engines.onnxruntime_engine\n"
        "import embedq.engines.onnx_export, embedq.engines.pooling, embedq.engines.cache\n"
        "from embedq.engines import available_backends, create_engine\n"
        "from embedq.engines.device import resolve_device\n"
        "from embedq.engines.base import EngineConfig, Profile\n"
        "from embedq.errors import EngineError\n"
        "from embedq.model import load_model_info\n"
        "assert available_backends() == () and resolve_device('auto') == 'cpu'\n"
        "try:\n"
        "    create_engine('torch', EngineConfig(load_model_info(), (Profile(16, 1),)))\n"
        "except EngineError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)

    assert done.returncode == 0, done.stderr
    assert "needs torch, transformers" in done.stdout and "pip install torch transformers" in done.stdout


def test_a_cuda_device_this_machine_lacks_is_an_engine_error() -> None:
    missing = f"cuda:{cuda_device_count()}"
    with pytest.raises(EngineError, match="not available"):
        resolve_device(missing)


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cuda:", "CPU", "mps"])
def test_a_device_that_is_not_cpu_or_cuda_is_an_engine_error(name: str) -> None:
    with pytest.raises(EngineError, match="not auto, cpu, cuda or cuda:N"):
        resolve_device(name)


def test_auto_device_is_cuda_only_where_torch_sees_a_gpu() -> None:
    assert resolve_device("auto") == ("cuda:0" if cuda_device_count() else "cpu")
    assert resolve_device("cpu") == "cpu"


def test_the_bench_warms_an_engine_with_one_full_batch_of_every_profile(profiles: tuple[Profile, ...]) -> None:
    """`embedq bench --gpus` warms each worker's engine before its timing starts: a CUDA graph engine
    captures a profile's graph the first time a batch of it comes, so every profile must come, each
    in a batch every engine takes (`check_batch`, what the engines validate a submit with)."""
    from embedq.bench.ceilings import warm_up
    from embedq.engines.base import Done, check_batch

    seen: list[Profile] = []

    class Recording:
        def __init__(self) -> None:
            self.profiles = profiles

        def submit(self, input_ids: np.ndarray, lengths: np.ndarray) -> Done:
            profile = check_batch(profiles, input_ids, lengths)
            assert input_ids.shape == (profile.max_batch, profile.max_seq_len)
            seen.append(profile)
            return Done(np.zeros((len(lengths), 8), np.float32))

    warm_up(Recording(), pad_id=0)  # type: ignore[arg-type]
    assert seen == list(profiles)
