"""Output to an object store (s3://): the commit protocol without a rename, against a real
S3-compatible server (`moto_server`, a separate process on a free port, spoken to over HTTP by
pyarrow and boto3 as they would speak to S3 or MinIO), real worker processes and a real Redis."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from embedq.connection import free_port
from embedq.engines.base import Engine
from embedq.keys import GROUP, JobKeys
from embedq.model import ModelInfo
from embedq.verify import verify_job
from embedq.worker.commit import manifest_entries
from embedq.worker.object_store import ObjectStoreDir
from embedq.worker.output import open_output
from tests.support import committed, embedq_process, produce, run_worker, wait_until, write_jsonl

N_DOCS = 400


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """`moto_server` (moto[server], the dev extra) on a free loopback port, until the module ends."""
    server = Path(sys.executable).with_name("moto_server")
    if not server.exists() and shutil.which("moto_server") is None:
        pytest.fail("the object-storage tests need moto_server: pip install -e '.[dev]' (moto[server])")
    port = free_port()
    process = subprocess.Popen([str(server) if server.exists() else "moto_server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return True
        except OSError:
            return process.poll() is not None  # exited: stop waiting, fail below

    wait_until(answers, 30, "moto_server to answer")
    assert process.poll() is None, "moto_server exited at start"
    yield url
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket; the AWS variables (for this process and the workers it starts) point at it."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "EMBEDQ_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "embedq-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "embedq-test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    name = f"embedq-{uuid.uuid4().hex[:12]}"
    s3().create_bucket(Bucket=name)
    return name


def s3() -> Any:
    """A boto3 client: a second, independent view of the bucket."""
    import boto3

    return boto3.client("s3")


def objects(bucket: str, prefix: str) -> set[str]:
    """The object names under `prefix/`, as S3 lists them (without the `prefix/` marker pyarrow puts
    where a delete would leave a "directory" empty)."""
    pages = s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    return {item["Key"][len(prefix) + 1:] for page in pages for item in page.get("Contents", [])} - {""}


@pytest.fixture
def keys(job_name: str) -> JobKeys:
    return JobKeys(job_name)


@pytest.fixture
def source(tmp_path: Path, gloss_texts: list[str]) -> Path:
    return write_jsonl(tmp_path / "docs.jsonl", list(range(N_DOCS)), gloss_texts[:N_DOCS])


def work_args(keys: JobKeys, out: str, url: str, tiny_model: Path) -> list[str]:
    return ["work", "--job", keys.job, "--out", out, "--redis", url, "--model", str(tiny_model),
            "--window-docs", "25", "--lease-seconds", "2"]


def assert_every_id_once(client: redis.Redis, keys: JobKeys, bucket: str, prefix: str, n_docs: int = N_DOCS) -> None:
    """What a reader of the bucket sees (pyarrow.dataset over the prefix), what verify says, and
    nothing left staged or aside."""
    import pyarrow.dataset as ds

    ids = ds.dataset(f"s3://{bucket}/{prefix}", format="parquet").to_table(columns=["id"]).column("id").to_pylist()
    assert sorted(ids) == list(range(n_docs)), "every id exactly once, as a dataset reader sees the bucket"
    result = verify_job(client, keys, f"s3://{bucket}/{prefix}")
    assert result.ok and result.output_rows == n_docs, result.render()
    names = objects(bucket, prefix)
    assert {"_manifest.json", "_embedq.json"} <= names
    assert {n for n in names if n.endswith(".parquet")} == {n + ".parquet" for n in manifest_entries(client, keys)}
    assert not [n for n in names if n.startswith(".")], "nothing staged, set aside or probing is left"


def test_run_embeds_a_job_into_a_bucket_and_verify_reads_it_there(bucket: str, source: Path, tiny_model: Path,
                                                                 redis_url: str, redis_client, keys) -> None:
    out, log = f"s3://{bucket}/embeddings", source.with_name("run.log")
    run = embedq_process("run", str(source), "--out", out, "--job", keys.job, "--redis", redis_url,
                         "--model", str(tiny_model), "--window-docs", "100", "--batch-size", "50", log=log)
    assert run.wait(timeout=120) == 0, log.read_text()[-3000:]
    assert f"in {out} (" in log.read_text()
    verify = embedq_process("verify", "--job", keys.job, "--out", out, "--redis", redis_url, log=log)
    assert verify.wait(timeout=60) == 0, log.read_text()[-3000:]
    assert f"job {keys.job}: OK" in log.read_text()
    manifest = s3().get_object(Bucket=bucket, Key="embeddings/_manifest.json")["Body"].read()
    assert b'"complete": true' in manifest and b'"verified": true' in manifest
    assert_every_id_once(redis_client, keys, bucket, "embeddings")


def test_run_refuses_a_bucket_without_a_redis_to_keep_the_jobs_state(bucket: str, source: Path, tmp_path: Path,
                                                                     tiny_model: Path) -> None:
    log = tmp_path / "run.log"
    run = embedq_process("run", str(source), "--out", f"s3://{bucket}/embeddings", "--model", str(tiny_model),
                         log=log)
    assert run.wait(timeout=60) == 2, log.read_text()[-3000:]
    assert "is in an object store" in log.read_text() and "--redis" in log.read_text()
    assert objects(bucket, "embeddings") == set()


def test_a_worker_killed_mid_job_leaves_the_bucket_for_another_to_finish(
        bucket: str, source: Path, tiny: ModelInfo, tiny_model: Path, redis_url: str, redis_client, keys,
        tmp_path: Path) -> None:
    produce(redis_client, keys, tiny, source, batch_size=25)
    out, log = f"s3://{bucket}/embeddings", tmp_path / "worker.log"
    victim = embedq_process(*work_args(keys, out, redis_url, tiny_model), log=log)
    wait_until(lambda: committed(redis_client, keys) > 0, 120, "a first commit", every=0.02)
    victim.kill()  # SIGKILL: mid-job, holding batches, perhaps mid-upload or between a copy and its delete
    victim.wait()
    assert 0 < committed(redis_client, keys) < N_DOCS
    assert redis_client.xpending(keys.stream, GROUP)["pending"] > 0, "the victim held no batches when it died"
    finisher = embedq_process(*work_args(keys, out, redis_url, tiny_model), log=log)
    assert finisher.wait(timeout=120) == 0, log.read_text()[-3000:]
    assert_every_id_once(redis_client, keys, bucket, "embeddings")


def test_gc_on_a_bucket_finishes_or_undoes_each_half_done_step_and_removes_orphans(
        bucket: str, tiny: ModelInfo, tiny_engine: Engine, redis_url: str, redis_client, keys,
        tmp_path: Path, gloss_texts: list[str]) -> None:
    """Every state a crash between a copy and its delete can leave (ObjectStoreDir's table), built
    with a plain S3 client, then one `embedq gc`."""
    n_docs = 100
    source = write_jsonl(tmp_path / "docs.jsonl", list(range(n_docs)), gloss_texts[:n_docs])
    record, _ = produce(redis_client, keys, tiny, source, batch_size=25)
    out = f"s3://{bucket}/embeddings"
    report = run_worker(redis_client, keys, record, tiny, tiny_engine, out, window_docs=25)
    assert report.job_complete
    parts = manifest_entries(redis_client, keys)
    first, second, third, *_ = sorted(parts)
    client = s3()

    def copy(source: str, target: str) -> None:
        client.copy_object(Bucket=bucket, Key=f"embeddings/{target}",
                           CopySource={"Bucket": bucket, "Key": f"embeddings/{source}"})

    # Died between the settle and the publish's copy: committed, only staged.
    copy(f"{first}.parquet", f".{first}.parquet.tmp")
    client.delete_object(Bucket=bucket, Key=f"embeddings/{first}.parquet")
    # Died between the publish's copy and its delete: committed, visible, and a staged copy beside it.
    copy(f"{second}.parquet", f".{second}.parquet.tmp")
    # Died after staging, before the settle: an orphan no one will commit.
    client.put_object(Bucket=bucket, Key="embeddings/.part-000001-ghost_1_aaaaaa.parquet.tmp", Body=b"PAR1 orphan")
    # Redis lost a settle after the publish (the third part's documents were embedded again since):
    # a visible orphan; and recovery died between the copy and the delete that set it aside.
    copy(f"{third}.parquet", "part-000002-ghost_1_aaaaaa.parquet")
    copy(f"{third}.parquet", ".part-000002-ghost_1_aaaaaa.parquet.set-aside")
    import pyarrow.dataset as ds

    seen = ds.dataset(out, format="parquet").count_rows()
    assert seen == n_docs - parts[first].rows + parts[third].rows  # a reader misses some and sees some twice
    started = time.monotonic()
    gc = subprocess.run([sys.executable, "-m", "embedq", "gc", "--job", keys.job, "--out", out, "--redis", redis_url],
                        capture_output=True, text=True, timeout=60)
    assert gc.returncode == 0, gc.stdout + gc.stderr
    assert "rolled forward 1, removed 1 visible and 1 staged orphans" in gc.stdout, gc.stdout
    assert "2 set-aside parts deleted" in gc.stdout, gc.stdout  # the orphans, after their grace
    assert time.monotonic() - started < 30
    assert_every_id_once(redis_client, keys, bucket, "embeddings", n_docs)


def test_a_uri_pyarrow_cannot_open_goes_through_fsspec(tmp_path: Path) -> None:
    pytest.importorskip("fsspec")
    output = open_output(f"memory://embedq-{uuid.uuid4().hex[:8]}/out")
    assert isinstance(output, ObjectStoreDir)
    output.claim("job")
    import pyarrow as pa
    import pyarrow.parquet as pq

    with output.staging_stream("part-000001-w_1_abcdef") as handle:
        pq.write_table(pa.table({"id": [1, 2]}), handle)
    assert output.staged_names() == {"part-000001-w_1_abcdef"} and output.part_names() == set()
    output.publish("part-000001-w_1_abcdef")
    assert output.part_names() == {"part-000001-w_1_abcdef"} and output.staged_names() == set()
    assert output.read_part("part-000001-w_1_abcdef").num_rows == 2
    assert output.move_aside("part-000001-w_1_abcdef", visible=True)
    assert output.part_names() == set() and output.set_aside_names() == {"part-000001-w_1_abcdef"}
    age = output.set_aside_age("part-000001-w_1_abcdef")
    assert age is not None and age < 5
