"""Export a model, pooling and normalization included, to one ONNX file in the engine cache.

The graph (the contract ONNX Runtime runs and the TensorRT backend builds from; keep it stable):

| name        | role   | dtype   | shape                   |
| ----------- | ------ | ------- | ----------------------- |
| `input_ids` | input  | int32   | (batch, sequence)       |
| `lengths`   | input  | int32   | (batch,)                |
| `embeddings`| output | float32 | (batch, dim)            |

Right padding with the model's pad id; the attention mask `arange(sequence) < lengths[:, None]`
is computed inside the graph, so callers hand over exactly what the `Engine` protocol gets. int32,
not int64: it is what the tokenizer produces, half the bytes to copy, and TensorRT's native index
type. Weights and computation are fp32 (opset 17), or fp16/bf16 for TensorRT's strongly typed
networks; `embeddings` stays float32 either way. A half-precision graph is traced with eager
attention: traced through SDPA, the attention blocks come out in float32 while the LayerNorm
weights stay half, a graph ONNX Runtime and TensorRT both refuse. `batch` and `sequence` are dynamic; `dim` is fixed.
The file's metadata (`embedq.*` keys) records the model digest, pooling, normalization, dimension
and precision. The cache folder is keyed by model digest, pooling, normalization, `EXPORT_FORMAT`
and precision.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from embedq.durable import atomic_path
from embedq.errors import EngineError
from embedq.model import ModelInfo
from embedq.tokenization import TokenizedDocs

from .cache import model_cache_dir

INPUT_IDS = "input_ids"
LENGTHS = "lengths"
EMBEDDINGS = "embeddings"
BATCH_AXIS = "batch"
SEQUENCE_AXIS = "sequence"
OPSET = 17
# Bump when the graph's interface or the wrapper around the transformer changes: files exported
# under an older format then stop matching the cache key instead of being reused.
EXPORT_FORMAT = 1
ONNX_FILE = "model.onnx"


def onnx_path(model: ModelInfo, cache_dir: str | os.PathLike[str] | None = None, precision: str = "fp32") -> Path:
    """Where the exported graph of `model` (with its pooling and normalization) lives in the cache."""
    parts = (f"onnx-v{EXPORT_FORMAT}", f"opset{OPSET}") + (() if precision == "fp32" else (precision,))
    return model_cache_dir(model, cache_dir, *parts) / ONNX_FILE


def export_onnx(model: ModelInfo, cache_dir: str | os.PathLike[str] | None = None, *, precision: str = "fp32",
                device: str = "cpu") -> Path:
    """The cached ONNX file for `model`, exported (and checked) first if it is not there yet; the
    model is traced on `device`."""
    path = onnx_path(model, cache_dir, precision)
    if path.is_file():
        return path
    with atomic_path(path) as staged:
        _export(model, staged, precision, device)
        _annotate_and_check(model, staged, precision)
    return path


def _export(model: ModelInfo, destination: Path, precision: str = "fp32", device: str = "cpu") -> None:
    import torch

    from .torch_engine import load_encoder

    encoder = load_encoder(model, device=device, precision=precision,
                           attention="sdpa" if precision == "fp32" else "eager")
    # Two rows of different lengths, one padded: the trace must see a real mask, not a skipped one.
    example_ids = torch.full((2, 8), model.pad_token_id, dtype=torch.int32, device=device)
    example_ids[:, :3] = 101
    example_ids[0, 3:8] = 102
    example_lengths = torch.tensor([8, 3], dtype=torch.int32, device=device)
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            # transformers warns that `is_causal` is traced as a constant; it is False for every
            # input, since the attention mask is always given.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", "You are using the legacy TorchScript", DeprecationWarning)
            # dynamo=False: the dynamo exporter fails on this wrapper ("output name used twice").
            torch.onnx.export(
                encoder,
                (example_ids, example_lengths),
                str(destination),
                input_names=[INPUT_IDS, LENGTHS],
                output_names=[EMBEDDINGS],
                dynamic_axes={
                    INPUT_IDS: {0: BATCH_AXIS, 1: SEQUENCE_AXIS},
                    LENGTHS: {0: BATCH_AXIS},
                    EMBEDDINGS: {0: BATCH_AXIS},
                },
                opset_version=OPSET,
                dynamo=False,
            )
    except Exception as exc:  # the exporter raises many unrelated types
        raise EngineError(
            f"exporting {model.name} ({model.architecture}) to ONNX failed: {exc}. "
            "Use the torch backend for this model."
        ) from exc


def _annotate_and_check(model: ModelInfo, path: Path, precision: str = "fp32") -> None:
    import onnx

    graph = onnx.load(str(path))
    # The tracer leaves the width of `embeddings` symbolic; a fixed one lets consumers (TensorRT's
    # output buffers, the worker's checks) size themselves from the file alone.
    graph.graph.output[0].type.tensor_type.shape.dim[1].dim_value = model.dim
    metadata = {f"embedq.{key}": str(value) for key, value in model.describe().items()}
    metadata["embedq.export_format"] = str(EXPORT_FORMAT)
    metadata["embedq.precision"] = precision
    onnx.helper.set_model_props(graph, metadata)
    onnx.save(graph, str(path))
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise EngineError(f"the ONNX export of {model.name} does not pass onnx.checker: {exc}") from exc


def run_onnxruntime(path: Path, docs: TokenizedDocs, pad_id: int, batch: int = 32) -> np.ndarray:
    """Embed `docs` with ONNX Runtime (CPU) on the graph at `path`, in their order: a check of an
    exported file, batches padded to their longest document."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rows = []
    for start in range(0, len(docs), batch):
        lengths = docs.lengths[start:start + batch].astype(np.int32)
        ids = np.full((len(lengths), int(lengths.max())), pad_id, np.int32)
        for row, (offset, length) in enumerate(zip(docs.offsets[start:start + batch], lengths, strict=False)):
            ids[row, :length] = docs.tokens[offset:offset + length]
        rows.append(session.run([EMBEDDINGS], {INPUT_IDS: ids, LENGTHS: lengths})[0])
    return np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)
