"""The TensorRT backend: a cached plan (see `tensorrt_build`) run in the shared CUDA pipeline.

TensorRT 10+ API only, named I/O tensors (`tensorrt`, or `tensorrt_rtx` with the same API). One
execution context per profile, each selecting its optimization profile once on the pipeline's
compute stream (`set_optimization_profile_async`); a batch sets its input shapes and the address of
every I/O tensor (the slot's device buffers), then `execute_async_v3` on that stream. The contexts
share one activation buffer where TensorRT lets the caller manage it, since only one runs at a time.

`TensorRTRunner` is the part that talks to TensorRT, in addresses and stream handles only, so its
contract is tested in CI against a fake runtime on host memory (tests/engines/fake_tensorrt.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from embedq.errors import EngineError

from .base import EngineBase, EngineConfig, Pending, Profile, check_batch
from .cuda_pipeline import CudaPipeline
from .onnx_export import EMBEDDINGS, INPUT_IDS, LENGTHS, export_onnx
from .tensorrt_build import cached_plan, import_tensorrt, make_logger

if TYPE_CHECKING:
    import torch


class EngineUnavailable(EngineError):
    """TensorRT is there but cannot run its plan on this GPU (TensorRT-RTX on a data-centre GPU)."""


class TensorRTRunner:
    """Execution contexts of one deserialized engine, one per profile, driven by device addresses."""

    def __init__(self, trt: ModuleType, engine: Any, profiles: Sequence[Profile], dim: int, logger: Any) -> None:
        self._trt = trt
        self._engine = engine
        self._logger = logger
        self.dim = dim
        self.indices = self._profile_indices(sorted(profiles))
        self._contexts: dict[Profile, Any] = {}
        self._shared_memory: Any = None

    def _profile_indices(self, profiles: Sequence[Profile]) -> dict[Profile, int]:
        """Check the plan's I/O tensors and profiles against what the engine will submit."""
        trt, engine = self._trt, self._engine
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        if names != {INPUT_IDS, LENGTHS, EMBEDDINGS}:
            raise EngineError(f"the TensorRT plan's tensors are {sorted(names)}, not those of embedq's ONNX export")
        for name, mode, dtype in ((INPUT_IDS, "INPUT", "INT32"), (LENGTHS, "INPUT", "INT32"),
                                  (EMBEDDINGS, "OUTPUT", "FLOAT")):
            if engine.get_tensor_mode(name) != getattr(trt.TensorIOMode, mode) or (
                    engine.get_tensor_dtype(name) != getattr(trt.DataType, dtype)):
                raise EngineError(f"the TensorRT plan's tensor {name} is not {mode.lower()} {dtype.lower()}")
        if engine.num_optimization_profiles != len(profiles):
            raise EngineError(f"the TensorRT plan has {engine.num_optimization_profiles} profiles, expected "
                              f"{len(profiles)}")
        indices = {}
        for index, profile in enumerate(profiles):
            seq, batch = profile.max_seq_len, profile.max_batch
            shapes = [tuple(s) for s in engine.get_tensor_profile_shape(INPUT_IDS, index)]
            if shapes != [(1, seq), (batch, seq), (batch, seq)]:
                raise EngineError(f"the TensorRT plan's profile {index} is {shapes}, expected {profile}")
            indices[profile] = index
        return indices

    def prepare(self, stream: int) -> None:
        """One context per profile, its profile selected on `stream`; where the API allows it, all of
        them on one activation buffer (batches run one at a time on the one compute stream)."""
        trt, engine = self._trt, self._engine
        strategy = getattr(getattr(trt, "ExecutionContextAllocationStrategy", None), "USER_MANAGED", None)
        for profile, index in self.indices.items():
            context = engine.create_execution_context(strategy) if strategy is not None else (
                engine.create_execution_context())
            if context is None:
                raise EngineError(f"TensorRT could not create an execution context: {self._errors()}")
            if not context.set_optimization_profile_async(index, stream):
                raise EngineError(f"TensorRT refused optimization profile {index}: {self._errors()}")
            self._contexts[profile] = context
        if strategy is not None:
            size = int(getattr(engine, "device_memory_size_v2", None) or engine.device_memory_size)
            self._shared_memory = _device_buffer(size)
            for context in self._contexts.values():
                context.set_device_memory(self._shared_memory.data_ptr(), size)

    def execute(self, profile: Profile, ids: int, lengths: int, out: int, rows: int, stream: int) -> None:
        """Queue one batch of `rows` sequences of `profile.max_seq_len` tokens on `stream`."""
        context = self._contexts[profile]
        seq = profile.max_seq_len
        if not (context.set_input_shape(INPUT_IDS, (rows, seq)) and context.set_input_shape(LENGTHS, (rows,))):
            raise EngineError(f"TensorRT refused a {rows}x{seq} batch under {profile}: {self._errors()}")
        for name, address in ((INPUT_IDS, ids), (LENGTHS, lengths), (EMBEDDINGS, out)):
            if not context.set_tensor_address(name, address):
                raise EngineError(f"TensorRT refused the address of {name}: {self._errors()}")
        shape = tuple(context.get_tensor_shape(EMBEDDINGS))
        if shape != (rows, self.dim):
            raise EngineError(f"the TensorRT plan gives {EMBEDDINGS} of shape {shape}, expected {(rows, self.dim)}")
        if not context.execute_async_v3(stream):
            raise EngineError(f"TensorRT could not run a {rows}x{seq} batch: {self._errors()}")

    def _errors(self) -> str:
        return "; ".join(self._logger.errors[-3:]) or "no reason given"

    def close(self) -> None:
        self._contexts.clear()
        self._shared_memory = None
        self._engine = None


def deserialize(trt: ModuleType, plan: bytes, manifest: dict[str, Any], logger: Any) -> Any:
    """The runtime engine of `plan`; `EngineUnavailable` with TensorRT's reason if it cannot run here."""
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    if engine is None:
        gpu = manifest.get("gpu", {})
        raise EngineUnavailable(
            f"{trt.__name__} {trt.__version__} built a plan but cannot run it on {gpu.get('name', 'this GPU')} "
            f"(compute capability {gpu.get('compute_capability', '?')}): "
            + ("; ".join(logger.errors) or "no reason given"))
    return engine


def _device_buffer(size: int) -> torch.Tensor:
    import torch

    return torch.empty(max(size, 1), dtype=torch.uint8, device="cuda")


class _PipelineRunner:
    """The runner in the shared CUDA pipeline: torch tensors in, device addresses to TensorRT."""

    def __init__(self, runner: TensorRTRunner) -> None:
        self.runner = runner

    def prepare(self, profiles: Sequence[Profile], stream: torch.cuda.Stream) -> None:
        self.runner.prepare(stream.cuda_stream)

    def run(self, profile: Profile, ids: torch.Tensor, lengths: torch.Tensor, rows: int, tokens: int,
            out: torch.Tensor, stream: torch.cuda.Stream) -> torch.Tensor:
        self.runner.execute(profile, ids.data_ptr(), lengths.data_ptr(), out.data_ptr(), rows, stream.cuda_stream)
        return out


class TensorRTEngine(EngineBase):
    """TensorRT on `cuda[:N]`: fp16 (default on GPUs), bf16 or fp32, from a plan built on first use."""

    name = "tensorrt"

    def __init__(self, config: EngineConfig) -> None:
        if not config.device.startswith("cuda"):
            raise EngineError(f"TensorRT runs on CUDA GPUs, not {config.device!r}; use --device cuda.")
        super().__init__(config)
        self.on_mismatch = "rebuild" if config.rebuild else "refuse"
        self.manifest: dict[str, Any] = {}
        self._runner: TensorRTRunner | None = None
        self._pipeline: CudaPipeline | None = None

    def __enter__(self) -> TensorRTEngine:
        import torch

        trt = import_tensorrt()
        model = self.config.model
        onnx_file = export_onnx(model, self.config.cache_dir, precision=self.config.precision,
                                device=self.config.device)
        built = cached_plan(model, onnx_file, self._profiles, self.config.precision, device=self.config.device,
                            cache_dir=self.config.cache_dir, on_mismatch=self.on_mismatch, trt=trt)
        self.manifest = built.manifest
        logger = make_logger(trt)
        device = torch.device(self.config.device)
        with torch.cuda.device(device):
            engine = deserialize(trt, built.plan, built.manifest, logger)
            self._runner = TensorRTRunner(trt, engine, self._profiles, self.dim, logger)
            self._pipeline = CudaPipeline(_PipelineRunner(self._runner), device, self._profiles, self.dim,
                                          model.pad_token_id, output_buffers=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pipeline is not None:
            self._pipeline.close()
            self._pipeline = None
        if self._runner is not None:
            self._runner.close()
            self._runner = None

    def submit(self, input_ids: np.ndarray, lengths: np.ndarray) -> Pending:
        if self._pipeline is None:
            raise EngineError("the TensorRT engine is not started; use it inside `with engine:`")
        profile = check_batch(self._profiles, input_ids, lengths)
        return self._pipeline.submit(profile, np.ascontiguousarray(input_ids, np.int32),
                                     np.ascontiguousarray(lengths, np.int32))
