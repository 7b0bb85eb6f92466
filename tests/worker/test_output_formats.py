"""A job's output format end to end: the producer fixes prompt, truncation, type and calibration in
the job record; every worker writes them alike and records them in each part's metadata, from which
a reader rescores; a worker asking for something else is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from embedq import job as job_record
from embedq.cli.calibration import job_output_format, sample_texts
from embedq.config import Settings
from embedq.errors import JobMismatch, UsageError
from embedq.keys import JobKeys
from embedq.model import ModelInfo
from embedq.producer.sources import SourceSpec, open_source
from embedq.quantization import OutputFormat
from embedq.worker.writer import read_metadata
from tests.support import produce, run_worker, write_jsonl

TEXTS = [f"document {i} about {topic}" for i, topic in enumerate(
    ["cats", "the sea", "tax law", "jazz", "volcanoes", "bread", "chess", "rain"] * 30)]


def _source(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "docs.jsonl", list(range(len(TEXTS))), TEXTS)


def _stored(settings: Settings, model: ModelInfo, source: Path, engine: object, client: object = None,
            keys: JobKeys | None = None) -> OutputFormat:
    existing = job_record.load(client, keys) if keys is not None else None  # type: ignore[arg-type]
    with open_source(SourceSpec(str(source))) as src:
        return job_output_format(settings, model, src, existing, engine=lambda: engine)  # type: ignore[arg-type,return-value]


def test_an_int8_job_stores_the_records_ranges_in_every_part_and_matches_sentence_transformers(
        redis_client, job_name, model_info: ModelInfo, cpu_engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util.quantization import quantize_embeddings

    source = _source(tmp_path)
    settings = Settings(output_dtype="int8", truncate_dim=96, calibration_docs=100)
    stored = _stored(settings, model_info, source, cpu_engine)
    keys = JobKeys(job_name)
    record, _ = produce(redis_client, keys, model_info, source, batch_size=40, output=stored)
    assert (record.output_dtype, record.truncate_dim) == ("int8", 96)
    assert record.quantization_ranges is not None and np.asarray(record.quantization_ranges).shape == (2, 96)
    assert record.calibration.startswith("100 documents of the source")
    run_worker(redis_client, keys, record, model_info, cpu_engine, tmp_path / "out", window_docs=60)

    files = sorted((tmp_path / "out").glob("*.parquet"))
    assert len(files) > 1  # several parts, each with the job's ranges
    for file in files:
        meta = read_metadata(pq.read_schema(file))
        assert (meta["output_dtype"], meta["truncate_dim"]) == ("int8", "96")
        assert json.loads(meta["quantization_ranges"]) == record.quantization_ranges
    table = ds.dataset(str(tmp_path / "out"), format="parquet").to_table().sort_by("id")
    embedding = table.schema.field("embedding").type
    assert (str(embedding.value_type), embedding.list_size) == ("int8", 96)
    mine = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    floats = SentenceTransformer(str(model_info.path), device="cpu").encode(
        TEXTS, truncate_dim=96, normalize_embeddings=True)
    theirs = quantize_embeddings(floats, "int8", ranges=np.asarray(record.quantization_ranges, np.float32))
    # Other float rounding (batches of other widths) may move a value across a step boundary, rarely.
    differs = mine.astype(np.int16) != theirs
    assert differs.mean() < 0.005 and np.abs(mine.astype(np.int16) - theirs).max() <= 1
    # A reader maps the values back to floats with the recorded ranges, within one step.
    low, high = np.asarray(record.quantization_ranges, np.float32)
    restored = low + (mine.astype(np.float32) + 128) * (high - low) / 255
    inside = (floats >= low) & (floats <= high)
    assert (np.abs(restored - floats)[inside] <= ((high - low) / 255 + 1e-6)[np.nonzero(inside)[1]]).all()


def test_a_resumed_producer_keeps_the_jobs_calibration_and_a_different_format_is_refused(
        redis_client, job_name, model_info: ModelInfo, cpu_engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source = _source(tmp_path)
    keys = JobKeys(job_name)
    settings = Settings(output_dtype="uint8", calibration_docs=50)
    first = _stored(settings, model_info, source, cpu_engine)
    produce(redis_client, keys, model_info, source, output=first)

    def fail() -> None:
        raise AssertionError("a resumed job must not calibrate again")

    again = _stored(settings, model_info, source, fail, redis_client, keys)
    assert again.ranges is not None and first.ranges is not None
    np.testing.assert_array_equal(again.ranges, first.ranges)
    with pytest.raises(JobMismatch, match="output_dtype: job has 'uint8', this run has 'float16'"):
        produce(redis_client, keys, model_info, source, output=OutputFormat("float16"))
    with pytest.raises(JobMismatch, match="prompt"):
        record = job_record.require(redis_client, keys)
        job_record.check_model(record, model_info.with_overrides(prompt="query: "))


def test_the_calibration_sample_spreads_over_the_source_and_files_work(
        model_info: ModelInfo, cpu_engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source = _source(tmp_path)
    with open_source(SourceSpec(str(source))) as src:
        picked = sample_texts(src, 16)
        assert len(picked) == 16 and picked[0] == TEXTS[0] and picked[-1] == TEXTS[210 + 1]
        assert sample_texts(src, 1000) == TEXTS  # a small source: all of it
    ranges = np.stack([np.full(384, -0.5), np.full(384, 0.5)]).astype(np.float32)
    np.save(tmp_path / "ranges.npy", ranges)
    from_file = _stored(Settings(output_dtype="int8", calibration=str(tmp_path / "ranges.npy")), model_info, source,
                        None)
    assert from_file.ranges is not None and from_file.calibration == f"ranges in {tmp_path / 'ranges.npy'}"
    np.testing.assert_array_equal(from_file.ranges, ranges)
    with pytest.raises(UsageError, match="ranges of 384 dimensions; this job stores 64"):
        _stored(Settings(output_dtype="int8", truncate_dim=64, calibration=str(tmp_path / "ranges.npy")), model_info,
                source, None)


def test_the_cli_fixes_prompt_and_format_when_producing_and_refuses_a_worker_asking_otherwise(
        redis_client, redis_url: str, job_name: str, model_info: ModelInfo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    from tests.embedq.test_prompts import prompted_copy

    model = prompted_copy(model_info.path, tmp_path / "model", include_prompt=False)
    env = {"EMBEDQ_BACKEND": "torch", "EMBEDQ_THREADS": "1", "EMBEDQ_REDIS_URL": redis_url, "PATH": "/usr/bin:/bin"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "embedq", *args], capture_output=True, text=True, env=env,
                              timeout=300)

    produced = cli("produce", str(_source(tmp_path)), "--job", job_name, "--model", str(model), "--prompt-name",
                   "query", "--output-dtype", "float16", "--truncate-dim", "64")
    assert produced.returncode == 0, produced.stderr
    record = job_record.require(redis_client, JobKeys(job_name))
    assert (record.prompt, record.prompt_name, record.include_prompt) == ("query: ", "query", False)
    assert (record.output_dtype, record.truncate_dim, record.quantization_ranges) == ("float16", 64, None)
    assert "--prompt 'query: ' --output-dtype float16 --truncate-dim 64" in job_record.produce_command(
        record, JobKeys(job_name))
    refused = cli("work", "--job", job_name, "--out", str(tmp_path / "out"), "--output-dtype", "int8", "--no-wait")
    assert refused.returncode != 0 and "stores float16 vectors, not int8" in refused.stderr


@pytest.mark.parametrize(("dtype", "most"), [("int8", 1.25), ("uint8", 1.25), ("binary", 1.4), ("float16", 1.05)])
def test_compact_parts_take_about_their_bytes_per_vector_on_disk_and_read_back_exactly(
        dtype: str, most: float, tmp_path: Path) -> None:
    import duckdb

    from embedq.quantization import quantization_ranges
    from embedq.worker.output import open_output
    from embedq.worker.writer import PartWriter, output_schema

    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((4000, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    stored = OutputFormat(dtype, ranges=quantization_ranges(vectors[:500]) if dtype.endswith("int8") else None)
    writer = PartWriter(open_output(str(tmp_path)), output_schema("int64", stored.width(384), dtype),
                        output_format=stored)
    part = writer.stage("p", writer.table(list(range(4000)), vectors, np.full(4000, 9, np.int32), np.zeros(4000, bool)))
    # Parquet stores 8-bit values in 32-bit slots unless encoded: a part must not be 4x its data.
    assert part.bytes < most * 4000 * stored.bytes_per_vector(384) + 40_000
    file = next(tmp_path.glob(".p*"))
    back = np.stack(pq.read_table(file).column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(back, stored.apply(vectors))
    first = duckdb.sql(f"select embedding from read_parquet('{file}') where id = 0").fetchall()[0][0]
    assert list(first) == back[0].tolist()
