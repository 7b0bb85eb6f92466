"""The ONNX Runtime backend: runs the exported graph (pooling and normalization inside) synchronously.

CPUExecutionProvider on `cpu`; CUDAExecutionProvider on `cuda[:N]` where the installed onnxruntime
has it. The graph is fp32, so precision must be fp32. onnxruntime is imported when the engine starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from embedq.errors import EngineError

from .base import Done, EngineBase, EngineConfig, Pending, check_batch
from .onnx_export import EMBEDDINGS, INPUT_IDS, LENGTHS, export_onnx


class OnnxRuntimeEngine(EngineBase):
    """Runs the cached ONNX export with ONNX Runtime; `submit` returns a finished `Done`."""

    name = "onnxruntime"

    def __init__(self, config: EngineConfig) -> None:
        if config.precision != "fp32":
            raise EngineError(
                f"the onnxruntime backend runs the fp32 graph only, not {config.precision}; "
                "use --precision fp32, or the torch backend on CUDA for fp16/bf16."
            )
        super().__init__(config)
        self._session: Any = None

    def __enter__(self) -> OnnxRuntimeEngine:
        import onnxruntime as ort

        providers = _providers(self.config.device, ort.get_available_providers())
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.config.threads:
            options.intra_op_num_threads = self.config.threads
        # One graph runs at a time: inter-op threads would only compete with the intra-op pool.
        options.inter_op_num_threads = 1
        path = export_onnx(self.config.model, self.config.cache_dir)
        try:
            self._session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped exceptions
            raise EngineError(
                f"onnxruntime cannot load {path}: {exc}. Delete the file to have it exported again."
            ) from exc
        return self

    def __exit__(self, *exc: object) -> None:
        self._session = None

    def submit(self, input_ids: np.ndarray, lengths: np.ndarray) -> Pending:
        """Run one padded batch now."""
        if self._session is None:
            raise EngineError("the onnxruntime engine is not started; use it inside `with engine:`")
        check_batch(self._profiles, input_ids, lengths)
        feeds = {
            INPUT_IDS: np.ascontiguousarray(input_ids, dtype=np.int32),
            LENGTHS: np.ascontiguousarray(lengths, dtype=np.int32),
        }
        (embeddings,) = self._session.run([EMBEDDINGS], feeds)
        return Done(embeddings)


def _providers(device: str, available: Sequence[str]) -> list[Any]:
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if not device.startswith("cuda"):
        raise EngineError(f"the onnxruntime backend runs on cpu or cuda[:N], not {device!r}.")
    if "CUDAExecutionProvider" not in available:
        raise EngineError(
            f"device {device!r} asked for, but this onnxruntime has no CUDAExecutionProvider "
            f"(it has {', '.join(available)}); install onnxruntime-gpu or use the torch backend."
        )
    _, _, index = device.partition(":")
    try:
        device_id = int(index or 0)
    except ValueError as exc:
        raise EngineError(f"device {device!r} is not cuda or cuda:N.") from exc
    return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
