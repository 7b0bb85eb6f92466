"""Inference backends behind one Engine protocol (see engines/base.py), picked by name.

Each backend is one module, imported only when it is asked for, and each imports its own library
(torch, onnxruntime, tensorrt) only when an engine starts, so `import embedq.engines` needs none.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

from embedq.errors import EngineError

from .base import Engine, EngineConfig

__all__ = ["BACKENDS", "Engine", "EngineConfig", "available_backends", "create_engine", "resolve_backend"]

BACKENDS = ("torch", "onnxruntime", "tensorrt")

# "auto" on CPU. Measured 2026-11-28 on this project's 2-core CPU machine (AMD EPYC, 2 threads),
# all-MiniLM-L6-v2, 2,000 passages drawn from the passage corpus (244k tokens), length-sorted batches
# of at most 4,096 padded tokens in widths of 16 (tests/engines/corpus_batches.py), two rounds each:
#   torch 2.13        6,479-6,715 tokens/s, 53-55 documents/s
#   onnxruntime 1.32  6,428-6,579 tokens/s, 53-54 documents/s
# and at 1,000 passages, 1,024-token batches: 6,484 vs 6,174; 16,384-token batches: 5,923 vs 5,365.
# A tie at best for ONNX Runtime (its transformer optimizer fused nothing useful and ran slower),
# so torch, which also skips the export step and its cache.
CPU_AUTO_BACKEND = "torch"


@dataclass(frozen=True)
class _Backend:
    """Where a backend's engine class lives and what it needs installed."""

    module: str
    engine_class: str
    # Libraries the backend cannot run without; each entry is satisfied by any one of its names.
    requires: tuple[tuple[str, ...], ...]
    install_hint: str

    def missing(self) -> list[str]:
        return [" or ".join(names) for names in self.requires if not any(map(_installed, names))]

    def built(self) -> bool:
        return _installed(f"{__name__}.{self.module}")


_REGISTRY = {
    "torch": _Backend("torch_engine", "TorchEngine", (("torch",), ("transformers",)),
                      "pip install torch transformers"),
    # The ONNX file is exported with torch on first use, hence torch and transformers too.
    "onnxruntime": _Backend("onnxruntime_engine", "OnnxRuntimeEngine",
                            (("onnxruntime",), ("onnx",), ("torch",), ("transformers",)),
                            "pip install onnxruntime onnx torch transformers"),
    "tensorrt": _Backend("tensorrt_engine", "TensorRTEngine", (("tensorrt", "tensorrt_rtx"),),
                         "pip install 'embedq[tensorrt]', or tensorrt_rtx on RTX GPUs"),
}


def create_engine(backend: str, config: EngineConfig) -> Engine:
    """A not yet started engine of `backend` for `config` (`engine_for` picks both from settings)."""
    spec = _backend(backend)
    if not spec.built():
        raise EngineError(f"the {backend} backend is not built yet; use --backend torch.")
    missing = spec.missing()
    if missing:
        raise EngineError(
            f"the {backend} backend needs {', '.join(missing)}, which is not installed; run "
            f"`{spec.install_hint}` or pick one of the available backends ({', '.join(available_backends())})."
        )
    module = importlib.import_module(f"{__name__}.{spec.module}")
    engine: Engine = getattr(module, spec.engine_class)(config)
    return engine


def resolve_backend(name: str, device: str) -> str:
    """The backend `name` stands for on a resolved `device` (see `device.resolve_device`): itself, or for
    "auto" the one expected fastest there."""
    if name != "auto":
        _backend(name)
        return name
    if device.startswith("cuda"):
        if _REGISTRY["tensorrt"].built() and _tensorrt_importable():
            return "tensorrt"
        return "torch"
    return CPU_AUTO_BACKEND


def available_backends() -> tuple[str, ...]:
    """The backends built in this version whose libraries are installed here."""
    return tuple(name for name, spec in _REGISTRY.items() if spec.built() and not spec.missing())


def _backend(name: str) -> _Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise EngineError(
            f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} or auto."
        ) from None


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package, or a module set to None
        return False


def _tensorrt_importable() -> bool:
    for library in ("tensorrt", "tensorrt_rtx"):
        try:
            importlib.import_module(library)
        except ImportError:
            continue
        return True
    return False
