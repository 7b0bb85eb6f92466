"""How the engine's float32 vectors become the stored ones: Matryoshka truncation and compact types.

`OutputFormat` applies, in sentence-transformers' order, `truncate_dim` (keep the first N
dimensions), then L2 renormalization when the model normalizes (as `encode(truncate_dim=N,
normalize_embeddings=True)`: a Normalize module ran before the cut, so the cut vector is no longer
unit length), then the output type:

- `float32`, `float16`: a cast;
- `int8`, `uint8`: the scalar quantization of sentence-transformers' `quantize_embeddings`: per
  dimension, the range [min, max] of calibration embeddings cut into 255 steps, a value becomes
  `clip(floor((x - min) / step), 0, 255)` (minus 128 for int8); a dimension whose range is empty
  takes a step of 1;
- `binary`, `ubinary`: one bit per dimension (`x > 0`), packed 8 to a byte, most significant bit
  first (`numpy.packbits`); `binary` stores each byte minus 128 as int8, as sentence-transformers does.

The ranges must be the same for every part of a job (a reader compares vectors across parts), so a
job fixes them before its first part is written: `embedq produce` (or `run`) computes them once from
a sample of the source, or reads them from `--calibration FILE`, and stores them in the job record;
every worker reads them from there. They are recorded in each part's metadata too (`embedq.
quantization_ranges`, a JSON `[[min...], [max...]]`), so a reader can map int8/uint8 values back to
floats for rescoring: `min + (q + 128 or q + 0) * step`, with `step = (max - min) / 255`.

Pure numpy: the producer, the worker, the Python API and `verify` share it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedq.errors import UsageError

OUTPUT_DTYPES = ("float32", "float16", "int8", "uint8", "binary", "ubinary")
CALIBRATED = ("int8", "uint8")  # the types whose values depend on calibration ranges
NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's, as the engines use
# The numpy type of one stored value (binary types store 8 dimensions per value).
STORED_TYPES: dict[str, type[np.generic]] = {
    "float32": np.float32, "float16": np.float16, "int8": np.int8, "uint8": np.uint8,
    "binary": np.int8, "ubinary": np.uint8,
}


@dataclass(frozen=True, eq=False)
class OutputFormat:
    """What is stored per vector: `dtype`, the first `truncate_dim` dimensions (None: all),
    renormalized when `normalize`; `ranges` `(2, dim)` float32 for int8/uint8."""

    dtype: str = "float32"
    truncate_dim: int | None = None
    normalize: bool = False
    ranges: np.ndarray | None = None
    calibration: str = ""  # where the ranges came from, for the metadata and `status`

    def __post_init__(self) -> None:
        if self.dtype not in OUTPUT_DTYPES:
            raise UsageError(f"output-dtype must be one of {', '.join(OUTPUT_DTYPES)}; got {self.dtype!r}")
        if self.truncate_dim is not None and self.truncate_dim < 1:
            raise UsageError(f"truncate-dim must be positive; got {self.truncate_dim}")
        if self.ranges is not None:
            object.__setattr__(self, "ranges", np.asarray(self.ranges, dtype=np.float32))

    @property
    def needs_calibration(self) -> bool:
        return self.dtype in CALIBRATED

    def dim(self, model_dim: int) -> int:
        """Dimensions kept of a `model_dim` vector; a `truncate_dim` above it is a UsageError."""
        if self.truncate_dim is None:
            return model_dim
        if self.truncate_dim > model_dim:
            raise UsageError(f"--truncate-dim {self.truncate_dim} is more than the model's {model_dim} "
                             f"dimensions; choose at most {model_dim}.")
        return self.truncate_dim

    def width(self, model_dim: int) -> int:
        """Values stored per vector: the kept dimensions, or their bytes for the binary types."""
        dim = self.dim(model_dim)
        return math.ceil(dim / 8) if self.dtype.endswith("binary") else dim

    def bytes_per_vector(self, model_dim: int) -> int:
        """Bytes of one stored vector (before Parquet's own encoding)."""
        return self.width(model_dim) * np.dtype(STORED_TYPES[self.dtype]).itemsize

    def floats(self, embeddings: np.ndarray) -> np.ndarray:
        """The float32 vectors before the type conversion: truncated, and renormalized if asked."""
        vectors = np.asarray(embeddings, dtype=np.float32)
        if self.truncate_dim is None or self.truncate_dim >= vectors.shape[1]:
            return vectors
        vectors = vectors[:, :self.truncate_dim]
        if self.normalize:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, np.float32(NORMALIZE_EPS))
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def apply(self, embeddings: np.ndarray) -> np.ndarray:
        """`(n, model_dim)` float32 from the engine to `(n, width)` stored values."""
        return convert(self.floats(embeddings), self.dtype, self.ranges)

    def with_calibration(self, calibration_embeddings: np.ndarray, described: str) -> OutputFormat:
        """The same format with ranges computed from engine vectors (`(n, model_dim)` float32)."""
        return OutputFormat(self.dtype, self.truncate_dim, self.normalize,
                            quantization_ranges(self.floats(calibration_embeddings)), described)

    def record_fields(self) -> dict[str, Any]:
        """The job record's fields for this format (`JobRecord.output_dtype` and the rest)."""
        return {"output_dtype": self.dtype, "truncate_dim": self.truncate_dim,
                "quantization_ranges": None if self.ranges is None else self.ranges.tolist(),
                "calibration": self.calibration}

    def metadata(self) -> dict[str, Any]:
        """The Parquet metadata of this format (prefixed `embedq.` by the writer)."""
        meta: dict[str, Any] = {"output_dtype": self.dtype,
                                "truncate_dim": "" if self.truncate_dim is None else self.truncate_dim}
        if self.ranges is not None:
            meta["quantization_ranges"] = json.dumps(self.ranges.tolist())
            meta["calibration"] = self.calibration
        return meta

    def check(self, model_dim: int) -> OutputFormat:
        """Refuse a format that cannot be written for a model of `model_dim` dimensions."""
        dim = self.dim(model_dim)
        if self.needs_calibration:
            if self.ranges is None:
                raise UsageError(f"output-dtype {self.dtype} needs calibration ranges; the job has none.")
            if self.ranges.shape != (2, dim):
                raise UsageError(f"the calibration ranges are {self.ranges.shape}, not (2, {dim}): they were "
                                 f"made for vectors of another dimension.")
        return self


def from_record(dtype: str, truncate_dim: int | None, normalize: bool, ranges: list[list[float]] | None,
                calibration: str = "") -> OutputFormat:
    """The format a job record describes."""
    return OutputFormat(dtype, truncate_dim, normalize, None if ranges is None else np.asarray(ranges, np.float32),
                        calibration)


def quantization_ranges(embeddings: np.ndarray) -> np.ndarray:
    """Per-dimension `[min, max]` `(2, dim)` float32 of calibration vectors (`quantize_embeddings`'
    calibration); at least two vectors."""
    vectors = np.asarray(embeddings, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] < 2:
        raise UsageError(f"calibration needs at least two embeddings; got {vectors.shape[0] if vectors.ndim else 0}")
    return np.stack([vectors.min(axis=0), vectors.max(axis=0)]).astype(np.float32)


def convert(vectors: np.ndarray, dtype: str, ranges: np.ndarray | None = None) -> np.ndarray:
    """Float32 `(n, dim)` vectors as `dtype` (see the module docstring for each type's rule)."""
    if dtype in ("float32", "float16"):
        return vectors.astype(STORED_TYPES[dtype], copy=False)
    if dtype in CALIBRATED:
        if ranges is None:
            raise UsageError(f"output-dtype {dtype} needs calibration ranges")
        low = ranges[0].astype(np.float32, copy=False)
        step = (ranges[1].astype(np.float32, copy=False) - low) / np.float32(255)
        step = np.where(step == 0, np.float32(1), step).astype(np.float32)
        # float32 throughout, as sentence-transformers computes it: the floor must fall alike.
        levels = np.clip(np.floor((vectors - low) / step), 0, 255)
        return levels.astype(np.uint8) if dtype == "uint8" else (levels - 128).astype(np.int8)
    if dtype in ("binary", "ubinary"):
        bits = np.packbits(vectors > 0, axis=-1)
        return bits if dtype == "ubinary" else (bits.astype(np.int16) - 128).astype(np.int8)
    raise UsageError(f"output-dtype must be one of {', '.join(OUTPUT_DTYPES)}; got {dtype!r}")


def read_ranges(path: str) -> np.ndarray:
    """Calibration ranges from `--calibration FILE`: a `.npy` of shape (2, dim) (`quantize_embeddings`'
    `ranges`), or a `.json` `[[min...], [max...]]`."""
    try:
        if path.endswith(".npy"):
            ranges = np.load(path, allow_pickle=False)
        elif path.endswith(".json"):
            with open(path, encoding="utf-8") as handle:
                ranges = np.asarray(json.load(handle), dtype=np.float32)
        else:
            raise UsageError(f"--calibration {path}: give a .npy or .json file of ranges [[min...], [max...]], "
                             "or a Parquet file of float embeddings (.parquet).")
    except (OSError, ValueError) as exc:
        raise UsageError(f"Cannot read the calibration ranges {path}: {exc}") from exc
    ranges = np.asarray(ranges, dtype=np.float32)
    if ranges.ndim != 2 or ranges.shape[0] != 2:
        raise UsageError(f"--calibration {path} holds an array of shape {ranges.shape}; ranges are (2, dim): "
                         "a row of minima and a row of maxima.")
    return ranges
