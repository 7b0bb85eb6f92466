"""TensorRT engines from the ONNX export: one optimization profile per bucket, cached with a manifest.

A plan is built from the graph `onnx_export` writes (the one ONNX Runtime runs), with one profile
per bucket `Profile`: sequences of exactly its `max_seq_len`, batches of 1 to its `max_batch`
(what the worker submits). Networks are strongly typed, so the engine computes in the graph's
types: an fp16 plan is built from the fp16 export. TensorRT-RTX only builds that way, and
TensorRT 11 dropped the FP16/BF16 builder flags. The builder's timing cache is kept beside the
plan and reused by later builds.

The cache folder holds `engine.plan` and `manifest.json`: the model, ONNX and tokenizer digests,
the profiles, the precision, the TensorRT flavour and version, the GPU and its compute capability,
and the embedq version. A plan is loaded only if all of these match what is asked now; otherwise
it is built again, or refused (`on_mismatch="refuse"`) with the fields that differ. Building
holds a lock on the folder: when several workers of one node start at once, one builds and the
others wait for it, then load its plan.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from embedq import __version__
from embedq.durable import locked, write_atomically
from embedq.errors import EngineError
from embedq.model import ModelInfo

from .base import Profile
from .cache import model_cache_dir
from .onnx_export import INPUT_IDS, LENGTHS

log = logging.getLogger("embedq.engines")

FLAVOURS = ("tensorrt", "tensorrt_rtx")
PLAN_FILE = "engine.plan"
MANIFEST_FILE = "manifest.json"
TIMING_CACHE_FILE = "timing.cache"
WORKSPACE_BYTES = 4 << 30
# Fields of the manifest that describe the build, not what decides the plan.
_RECORD_ONLY = ("built_at", "build_seconds", "engine_bytes", "numerics")


def import_tensorrt() -> ModuleType:
    """`tensorrt`, else `tensorrt_rtx` (same API), else an `EngineError` saying how to get one."""
    for name in FLAVOURS:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise EngineError("TensorRT is not installed: `pip install 'embedq[tensorrt]'` (or use NVIDIA's TensorRT "
                      "container), or `pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings` on RTX GPUs.")


def flavour_of(trt: ModuleType) -> dict[str, str]:
    name = trt.__name__.split(".")[0]
    return {"flavour": "tensorrt_rtx" if "rtx" in name else "tensorrt", "version": str(trt.__version__)}


def make_logger(trt: ModuleType) -> Any:
    """A TensorRT logger that keeps the errors (for our messages) and passes warnings to `logging`."""

    class Logger(trt.ILogger):  # type: ignore[name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(str(msg))
                log.debug("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.debug("TensorRT warning: %s", msg)

    return Logger()


def gpu_identity(device: str) -> dict[str, str]:
    """The GPU a plan is built for: plans are specific to the GPU model and compute capability."""
    try:
        import torch

        if device.startswith("cuda") and torch.cuda.is_available():
            index = torch.device(device).index or 0
            major, minor = torch.cuda.get_device_capability(index)
            return {"name": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}"}
    except ImportError:
        pass
    return {"name": "none", "compute_capability": "none"}


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def expected_manifest(model: ModelInfo, onnx_file: Path, profiles: Sequence[Profile], precision: str,
                      trt: ModuleType, device: str) -> dict[str, Any]:
    """What a plan for this request must have been built from: the fields a cached one is checked on."""
    return {
        "format": 1, "model": model.name, "model_digest": model.digest, "pooling": model.pooling.value,
        "normalize": model.normalize, "max_seq_len": model.max_seq_len,
        # A plan fed by another tokenizer would embed wrong ids without any error: record it.
        "tokenizer_digest": file_digest(model.tokenizer_file), "onnx_digest": file_digest(onnx_file),
        "profiles": [[p.max_seq_len, p.max_batch] for p in sorted(profiles)], "precision": precision,
        "tensorrt": flavour_of(trt), "gpu": gpu_identity(device), "embedq_version": __version__,
    }


def differences(found: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """The fields of a cached manifest that do not match the request, as 'field: was -> now'."""
    return [f"{key}: {found.get(key)!r} -> {value!r}" for key, value in expected.items()
            if key not in _RECORD_ONLY and found.get(key) != value]


@dataclass
class BuiltPlan:
    plan: bytes
    manifest: dict[str, Any]
    folder: Path
    built_now: bool


def plan_folder(model: ModelInfo, manifest: dict[str, Any], cache_dir: str | os.PathLike[str] | None) -> Path:
    """The cache folder of a plan: keyed by everything the manifest checks, so plans for other GPUs,
    precisions or profiles live side by side."""
    key = json.dumps({k: v for k, v in manifest.items() if k not in _RECORD_ONLY}, sort_keys=True)
    return model_cache_dir(model, cache_dir, "tensorrt", hashlib.sha256(key.encode()).hexdigest()[:16])


def cached_plan(model: ModelInfo, onnx_file: Path, profiles: Sequence[Profile], precision: str, *,
                device: str, cache_dir: str | os.PathLike[str] | None = None, folder: Path | None = None,
                on_mismatch: str = "rebuild", force: bool = False, trt: ModuleType | None = None) -> BuiltPlan:
    """The plan for this request from the cache (or `folder`), built first if it is missing or was
    built from anything else (or `force`); `on_mismatch="refuse"` raises instead of rebuilding a
    mismatched one."""
    trt = trt or import_tensorrt()
    expected = expected_manifest(model, onnx_file, profiles, precision, trt, device)
    folder = folder or plan_folder(model, expected, cache_dir)
    def busy() -> None:
        log.info("another process is building the TensorRT plan in %s; waiting for it", folder)

    with locked(folder / ".lock", when_busy=busy):  # the others wait here while one builds, then find its plan
        found = _read_manifest(folder)
        plan_file = folder / PLAN_FILE
        if found is not None and plan_file.is_file() and not force:
            changed = differences(found, expected)
            if not changed:
                log.info("TensorRT plan from the cache: %s", folder)
                return BuiltPlan(plan_file.read_bytes(), found, folder, built_now=False)
            if on_mismatch == "refuse":
                raise EngineError(f"the TensorRT plan in {folder} was built from something else ("
                                  + "; ".join(changed) + "); build it again with `embedq engine build`, or let "
                                  "the worker rebuild it (--rebuild-engines).")
            log.warning("rebuilding the TensorRT plan in %s: %s", folder, "; ".join(changed))
        started = time.monotonic()
        plan = build_plan(trt, onnx_file.read_bytes(), profiles, precision, timing_cache=folder / TIMING_CACHE_FILE)
        manifest = {**expected, "built_at": time.time(), "build_seconds": round(time.monotonic() - started, 2),
                    "engine_bytes": len(plan)}
        write_atomically(plan_file, plan)
        write_atomically(folder / MANIFEST_FILE, json.dumps(manifest, indent=1, sort_keys=True).encode())
        return BuiltPlan(plan, manifest, folder, built_now=True)


def build_plan(trt: ModuleType, onnx_bytes: bytes, profiles: Sequence[Profile], precision: str, *,
               timing_cache: Path | None = None, progress: Callable[[str], None] = log.info) -> bytes:
    """Parse the ONNX graph and build a serialized plan with one optimization profile per bucket."""
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise EngineError(f"TensorRT cannot parse the ONNX graph: {'; '.join(errors) or logger.errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    # TensorRT-RTX has no timing cache (its operations are deprecated no-ops there).
    timing_cache = timing_cache if flavour_of(trt)["flavour"] == "tensorrt" else None
    if timing_cache is not None:
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        config.set_timing_cache(cache, False)
    ordered = sorted(profiles)
    for index, profile in enumerate(ordered):
        shapes = builder.create_optimization_profile()
        seq, batch = profile.max_seq_len, profile.max_batch
        shapes.set_shape(INPUT_IDS, (1, seq), (batch, seq), (batch, seq))
        shapes.set_shape(LENGTHS, (1,), (batch,), (batch,))
        if config.add_optimization_profile(shapes) < 0:
            raise EngineError(f"TensorRT refused the optimization profile {profile}: {logger.errors}")
        progress(f"profile {index + 1}/{len(ordered)}: {seq} tokens, batches of 1 to {batch}")
    progress(f"building the {precision} plan (TensorRT {trt.__version__}); this takes a while")
    started = time.monotonic()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT could not build the plan: {'; '.join(logger.errors) or 'no reason given'}")
    progress(f"built in {time.monotonic() - started:.1f} s")
    if timing_cache is not None:
        write_atomically(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        loaded = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None
