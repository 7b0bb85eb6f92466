"""The job's output format, and for int8/uint8 its calibration: ranges fixed before the first part.

Every part of a job must quantize with the same ranges, or a reader comparing vectors across parts
compares different scales; and a worker may start (and commit) before another one runs. So the
ranges are decided once, by whoever creates the job (`embedq produce`, `embedq run`), and stored in
the job record, which every worker reads (`JobRecord.output_format`); a resumed producer takes the
stored ranges and computes nothing. From what:

- `--calibration FILE`: ranges (`.npy` of shape (2, dim) as sentence-transformers' `ranges`, or a
  `.json` `[[min...], [max...]]`), or float embeddings in Parquet (an `embedding` column: the float32
  output of an earlier job of the same model, say), whose per-dimension min and max become the ranges;
- else `--calibration-docs` documents of the source (1000 by default), taken in eight runs spread
  evenly over it (a source sorted by topic or date still gives a sample of all of it), embedded
  here with the job's model, prompt, truncation and normalization. Deterministic for a given source;
  on a CPU-only producer node with a large model, pass a file instead (or fewer documents).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from embedq.config import Settings
from embedq.errors import UsageError
from embedq.quantization import OutputFormat, quantization_ranges, read_ranges

if TYPE_CHECKING:
    from embedq.engines.base import Engine
    from embedq.job import JobRecord
    from embedq.model import ModelInfo
    from embedq.producer.sources import Source

log = logging.getLogger("embedq")
SAMPLE_RUNS = 8  # runs of consecutive documents the calibration sample is taken in


def job_output_format(settings: Settings, info: ModelInfo, source: Source, existing: JobRecord | None,
                      engine: Callable[[], Engine] | None = None) -> OutputFormat:
    """The output format a new job gets (with its calibration), or the one `existing` has when the
    settings ask for nothing else. `engine` gives a started engine of `info` for the sample, else one
    is started here (either only when a sample must be embedded)."""
    stored = OutputFormat(settings.output_dtype, settings.truncate_dim, info.normalize)
    stored.dim(info.dim)  # a truncate_dim above the model's dimension is refused here, before any work
    if not stored.needs_calibration:
        return stored
    if (settings.calibration is None and existing is not None and existing.quantization_ranges is not None
            and existing.output_dtype == stored.dtype and existing.truncate_dim == stored.truncate_dim):
        return existing.output_format()
    if settings.calibration is not None:
        return _from_file(stored, settings.calibration, info.dim)
    texts = sample_texts(source, settings.calibration_docs)
    if len(texts) < 2:
        raise UsageError(f"{stored.dtype} output needs at least two usable documents to calibrate on; the source "
                         "has fewer. Pass --calibration FILE, or use --output-dtype float16.")
    vectors = _embed(texts, info, settings, engine)
    described = f"{len(texts)} documents of the source, in {SAMPLE_RUNS} runs spread over it"
    log.info("calibrated %s output on %s", stored.dtype, described)
    return stored.with_calibration(vectors, described)


def sample_texts(source: Source, wanted: int) -> list[str]:
    """Up to `wanted` usable texts: `SAMPLE_RUNS` runs of consecutive documents spread evenly over
    the source (all of it when it is smaller)."""
    count = source.scan().count
    runs = max(1, min(SAMPLE_RUNS, wanted))
    per_run = -(-wanted // runs)
    starts = sorted({(count * k) // runs for k in range(runs)}) if count > wanted else [0]
    texts: list[str] = []
    for start in starts:
        size = per_run if count > wanted else max(1, wanted)
        chunk = next(iter(source.chunks(start, size)), None)
        if chunk is not None:
            texts += [text for i, text in enumerate(chunk.texts) if text and i not in chunk.problems]
    return texts[:wanted]


def _from_file(stored: OutputFormat, path: str, model_dim: int) -> OutputFormat:
    """The format with ranges from `--calibration FILE` (see the module docstring)."""
    dim = stored.dim(model_dim)
    if path.endswith(".parquet") or not path.endswith((".npy", ".json")):
        vectors = _parquet_embeddings(path)
        if vectors.shape[1] == model_dim:  # engine vectors: truncated and renormalized as the job's will be
            vectors = stored.floats(vectors)
        if vectors.shape[1] != dim:
            raise UsageError(f"--calibration {path} holds {vectors.shape[1]}-dimensional embeddings; this job "
                             f"stores {dim} dimensions (the model has {model_dim}).")
        ranges = quantization_ranges(vectors)
        described = f"{vectors.shape[0]} embeddings in {path}"
    else:
        ranges = read_ranges(path)
        if ranges.shape[1] != dim:
            raise UsageError(f"--calibration {path} holds ranges of {ranges.shape[1]} dimensions; this job stores "
                             f"{dim} (the model has {model_dim}, --truncate-dim cuts them).")
        described = f"ranges in {path}"
    return dataclasses.replace(stored, ranges=ranges, calibration=described)


def _parquet_embeddings(path: str) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        column = pq.read_table(path, columns=["embedding"]).column("embedding").combine_chunks()
    except (OSError, KeyError, pa.ArrowException) as exc:
        raise UsageError(f"Cannot read float embeddings from --calibration {path}: {exc}") from exc
    if not pa.types.is_floating(column.type.value_type):
        raise UsageError(f"--calibration {path}: its embeddings are {column.type.value_type}, not floats.")
    width = column.type.list_size if pa.types.is_fixed_size_list(column.type) else len(column[0])
    return np.asarray(column.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(-1, width)


def _embed(texts: list[str], info: ModelInfo, settings: Settings, engine: Callable[[], Engine] | None) -> np.ndarray:
    """The engine's float32 vectors of `texts` (the job's prompt included)."""
    from embedq.engines.factory import EngineSpec, engine_for
    from embedq.tokenization import Tokenizer
    from embedq.worker.pipeline import embed_documents

    docs = Tokenizer(info.tokenizer_file, info.max_seq_len, prompt=info.prompt).encode(texts)
    if engine is not None:
        return embed_documents(engine(), docs, info.pad_token_id)
    with engine_for(info, EngineSpec.from_settings(settings)) as started:
        return embed_documents(started, docs, info.pad_token_id)
