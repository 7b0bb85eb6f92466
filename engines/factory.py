"""The one place that turns settings into an engine: backend, device, precision and profiles.

The CLI, `embedq bench` and the tests all ask `engine_for`, so the policy (fp16 on GPUs, the token
budget per device, CUDA graphs where they help) is written once, and a new backend needs no edit
outside `engines/`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from embedq.config import Settings, parse_seq_lens
from embedq.model import ModelInfo

from . import create_engine, resolve_backend
from .base import Engine, EngineConfig, Pending, Profile
from .device import resolve_device
from .profiles import DEFAULT_SEQ_LENS, profile_table

log = logging.getLogger("embedq.engines")

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import numpy as np

# CPU: 1k-4k token batches ran as fast as larger ones (2 cores, MiniLM); GPU: 64k-token batches
# kept the H200 busiest in eager mode (engine measurements, 2026-11-28).
CPU_TOKEN_BUDGET = 4096
GPU_TOKEN_BUDGET = 65536
# --unpad auto: models this wide and wider run unpadded (see Settings.unpad for the measurements).
UNPAD_FROM_DIM = 768


@dataclass(frozen=True)
class EngineSpec:
    """What a user asks of the engine, backend-neutral; "auto" and None mean "what suits the device"."""

    backend: str = "auto"
    device: str = "auto"
    precision: str = "auto"
    token_budget: int | None = None
    seq_lens: tuple[int, ...] | None = None
    threads: int | None = None
    cuda_graphs: bool = True
    unpad: str = "auto"
    cache_dir: str | None = None
    rebuild: bool = True

    @classmethod
    def from_settings(cls, settings: Settings) -> EngineSpec:
        """The engine part of the settings (flags, environment, embedq.toml)."""
        return cls(backend=settings.backend, device=settings.device, precision=settings.precision,
                   token_budget=settings.token_budget,
                   seq_lens=parse_seq_lens(settings.seq_lens) if settings.seq_lens else None,
                   threads=settings.threads, cuda_graphs=settings.cuda_graphs, unpad=settings.unpad,
                   rebuild=settings.rebuild_engines)


def plan_engine(model: ModelInfo, spec: EngineSpec) -> tuple[str, EngineConfig]:
    """The backend and configuration `spec` stands for on this machine."""
    device = resolve_device(spec.device)
    on_gpu = device.startswith("cuda")
    precision = spec.precision if spec.precision != "auto" else auto_precision(model, on_gpu)
    budget = spec.token_budget or (GPU_TOKEN_BUDGET if on_gpu else CPU_TOKEN_BUDGET)
    seq_lens: Sequence[int] = spec.seq_lens or DEFAULT_SEQ_LENS
    backend = resolve_backend(spec.backend, device)
    unpadded = on_gpu and (spec.unpad == "on" or (spec.unpad == "auto" and model.dim >= UNPAD_FROM_DIM))
    # Decoders run eager, not yet in CUDA graphs: every captured profile keeps a memory pool of its
    # own, and a long-context model has some 30 profiles. The cost, measured on the H200 with a 0.6B
    # decoder: long documents run end to end at 85% of the GPU-only rate, but short passages, whose
    # batches are small, at 24-26%: the eager forward takes about 22 ms of host time a call.
    config = EngineConfig(model=model, profiles=profile_table(model.max_seq_len, budget, seq_lens), device=device,
                          precision=precision, threads=spec.threads, cache_dir=spec.cache_dir,
                          cuda_graphs=spec.cuda_graphs and on_gpu and not model.causal, unpadded=unpadded,
                          rebuild=spec.rebuild)
    return backend, config


def auto_precision(model: ModelInfo, on_gpu: bool) -> str:
    """fp32 on the CPU; on a GPU bf16 for a model saved in bf16 (Qwen3-Embedding and most decoders:
    their activations can pass fp16's 65,504), else fp16."""
    if not on_gpu:
        return "fp32"
    return "bf16" if model.dtype == "bfloat16" else "fp16"


def engine_for(model: ModelInfo, spec: EngineSpec) -> Engine:
    """A not yet started engine for `model` as `spec` asks (use it with `with`). Where "auto" picked
    TensorRT, an engine that falls back to torch (with CUDA graphs) if TensorRT cannot run here."""
    backend, config = plan_engine(model, spec)
    why = _why(spec.backend, backend, config.device)
    log.info("engine: %s (%s), %s on %s, %d profiles up to %d tokens", backend, why, config.precision,
             config.device, len(config.profiles), max(p.max_seq_len for p in config.profiles))
    engine = create_engine(backend, config)
    if spec.backend == "auto" and backend == "tensorrt":
        return FallbackEngine(engine, lambda: create_engine("torch", config))
    return engine


def _why(asked: str, backend: str, device: str) -> str:
    """Why this backend: what a user reads in the worker's first lines."""
    if asked != "auto":
        return "as asked"
    if backend == "tensorrt":
        return "auto: TensorRT is installed"
    if device.startswith("cuda"):
        return "auto: TensorRT is not installed (pip install 'embedq[tensorrt]'), so torch"
    return f"auto: {backend} is the fastest on CPU"


class FallbackEngine:
    """An engine that starts `primary`, or, if it cannot run on this machine (`EngineUnavailable`),
    says why and starts `fallback()` instead; then it is whichever started."""

    def __init__(self, primary: Engine, fallback: Callable[[], Engine]) -> None:
        self._active = primary
        self._fallback = fallback
        self.config = primary.config
        self.name = primary.name

    @property
    def dim(self) -> int:
        return self._active.dim

    @property
    def profiles(self) -> Sequence[Profile]:
        return self._active.profiles

    def __enter__(self) -> Engine:
        from .tensorrt_engine import EngineUnavailable

        try:
            return self._active.__enter__()
        except EngineUnavailable as exc:
            log.warning("%s; using the torch engine instead", exc)
            self._active = self._fallback()
            self.name = self._active.name
            return self._active.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._active.__exit__(*exc)

    def submit(self, input_ids: np.ndarray, lengths: np.ndarray) -> Pending:
        return self._active.submit(input_ids, lengths)
