"""Chaos: a whole job through the real CLI while its processes die, and still every id exactly once.

Three workers, one SIGKILLed every few seconds and started again; the producer SIGKILLed once
mid-way and started again; the private redis-server (AOF on) SIGKILLed once and started again on
the same port and directory. Then the output directory is read the way a user reads it (a DuckDB
glob, pyarrow.dataset) and `embedq verify` checks it: every source id once, none twice, none lost.

The full size runs with `pytest -m chaos`; the bounded size runs in the normal suite (CI). Set
EMBEDQ_CHAOS_REPORT=path.json to keep the figures (the README's reliability section quotes them).

Redis runs with `appendfsync everysec`, the setting production uses. A SIGKILLed redis-server
loses (almost) nothing it acknowledged under either setting: Redis write()s each command to the
AOF before it replies, and the page cache outlives the process; only when a background fsync
stalls on a slow disk may everysec hold writes back for up to 2 s. The two settings differ when
the machine itself dies (everysec can lose the last second or two, which contract 7 covers); what
this run restarts is the process, mid-job, with commits in flight.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import redis

from embedq.keys import GROUP, JobKeys
from embedq.model import default_model_path
from tests.chaos import Chaos, ChaosFigures, ChaosPlan

BOUNDED = ChaosPlan(documents=12_000, min_worker_kills=5, deadline=300)
FULL = ChaosPlan(documents=100_000, min_worker_kills=30, deadline=1800)
# The default model on this CPU with the default crash isolation, windows and token budget: a kill
# every 4-6 s must neither stop progress nor dead-letter innocent documents. CALM is the same job
# without a single kill, for the rate to compare with.
CPU_MODEL = ChaosPlan(documents=4000, min_worker_kills=10, deadline=3000, kill_every=(4.0, 6.0), batch_size=100,
                      window_docs=None, token_budget=None, lease_seconds=10.0, max_deliveries=5, model="default",
                      backend="torch", backlog=8)
CALM = dataclasses.replace(CPU_MODEL, violent=False, min_worker_kills=0)

JOB = "chaos"


@pytest.mark.parametrize("plan", [
    pytest.param(BOUNDED, id="bounded", marks=[pytest.mark.slow, pytest.mark.timeout(900)]),
    pytest.param(FULL, id="full", marks=[pytest.mark.chaos, pytest.mark.timeout(3600)]),
    pytest.param(CPU_MODEL, id="cpu-default-model", marks=[pytest.mark.chaos, pytest.mark.timeout(3600)]),
    pytest.param(CALM, id="cpu-default-model-no-kills", marks=[pytest.mark.chaos, pytest.mark.timeout(3600)]),
])
def test_every_document_comes_out_exactly_once_while_workers_producer_and_redis_are_killed(
        plan: ChaosPlan, tiny_model: Path, gloss_texts: list[str], tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    assert len(gloss_texts) >= plan.documents
    source = tmp_path / "glosses.parquet"
    pq.write_table(pa.table({"id": [f"gloss-{i:06d}" for i in range(plan.documents)],
                             "text": gloss_texts[:plan.documents]}), source)
    out = tmp_path / "out"
    started = time.monotonic()
    model = tiny_model if plan.model == "tiny" else default_model_path()
    with Chaos(plan, source=source, out=out, model=model, root=tmp_path, job=JOB) as chaos:
        figures = chaos.figures
        try:
            chaos.run()
            # As the workers left it: they finalize the directory when they see the job complete.
            as_left = UserView.read(out, source)
            figures.rows_read, figures.distinct_ids = as_left.rows, as_left.distinct
            figures.parts = len(as_left.parts)
            verify = embedq("verify", "--job", JOB, "--out", str(out), "--redis", chaos.url)
            figures.verify_exit_code, figures.verify_output = verify.returncode, verify.stdout.strip()

            assert verify.returncode == 0, verify.stdout + verify.stderr
            assert f"job {JOB}: OK" in verify.stdout and "repaired" not in verify.stdout, verify.stdout
            as_left.assert_every_id_once(plan.documents)
            UserView.read(out, source).assert_every_id_once(plan.documents)
            assert_redis_is_drained(chaos.client, chaos.keys, out, plan.documents)
            assert_status_says_complete(chaos.url, plan.documents)

            assert figures.unexpected_exits == [], "a process died without being killed"
            assert figures.worker_kills >= plan.min_worker_kills
            if plan.violent:
                assert figures.kills_holding_entries > 0, "no kill caught a worker holding batches"
                assert (figures.producer_kills, figures.producer_restarts, figures.redis_restarts) == (1, 1, 1)
        except BaseException:
            print(chaos.diagnostics())
            raise
        finally:
            figures.seconds_total = round(time.monotonic() - started, 1)
            report(request.node.callspec.id, figures)


def test_a_worker_starting_never_deletes_a_part_that_a_worker_whose_lease_lapsed_is_about_to_commit(
        redis_client: redis.Redis, job_name: str, tiny_model: Path, gloss_texts: list[str], tmp_path: Path) -> None:
    """The race the chaos run found. A worker's lease lapses while it lives (a heartbeat later than the
    lease: an idle spell, a loaded host, a Redis outage). A worker starting then runs recovery, which
    takes the first one for dead and deletes its staged part; the first one commits that part in Redis
    anyway (its batches are still pending) and cannot publish it: the batches are acknowledged, the
    documents gone. Recovery must fence such a part off in Redis before deleting it."""
    from embedq.engines import create_engine
    from embedq.engines.base import EngineConfig
    from embedq.engines.profiles import profile_table
    from embedq.job import live_workers
    from embedq.model import load_model_info
    from embedq.producer.producer import Producer, ProducerOptions
    from embedq.producer.sources import SourceSpec, open_source
    from embedq.verify import verify_job
    from embedq.worker.commit import Settlement, SettleResult, reconcile
    from embedq.worker.output import open_output
    from embedq.worker.worker import Worker, WorkerOptions

    tiny, keys = load_model_info(tiny_model), JobKeys(job_name)
    source = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(100)], "text": gloss_texts[:100]}), source)
    producer = Producer(redis_client, keys, open_source(SourceSpec(str(source))), tiny, ProducerOptions(batch_size=25))
    record = producer.prepare()
    out = open_output(tmp_path / "out")
    engine = create_engine("torch", EngineConfig(model=tiny, profiles=profile_table(tiny.max_seq_len, 4096)))
    with engine:
        first = Worker(redis_client, keys, record, tiny, engine, out, WorkerOptions(window_docs=100, lease_seconds=5))
        settle = first.committer.settle

        def a_worker_starts_then_settle(settlement: Settlement) -> SettleResult:
            first.committer.settle = settle  # one newcomer, once: between staging and settling
            redis_client.delete(keys.worker_lease(first.id))  # its heartbeat is late
            reconcile(redis_client, keys, out, live_workers=set(live_workers(redis_client, keys)))  # Worker.run
            return settle(settlement)

        first.committer.settle = a_worker_starts_then_settle
        producer.run()
        try:
            first.run(install_signals=False)
        except FileNotFoundError as exc:  # the rename of the part recovery deleted: reported below
            failure: Exception | None = exc
        else:
            failure = None
    result = verify_job(redis_client, keys, str(out.path))
    assert result.ok, result.render()
    assert failure is None


@dataclass(frozen=True)
class UserView:
    """The output directory as a user's reader sees it: a DuckDB glob, pyarrow.dataset, the listing."""

    files: list[str]
    rows: int  # DuckDB, `select count(*) from 'out/*.parquet'`
    distinct: int
    not_in_source: int
    missing: int
    dataset_ids: list[str]  # pyarrow.dataset over the directory
    source_ids: set[str]
    null_embeddings: int
    manifest: dict

    @property
    def parts(self) -> list[str]:
        return [name for name in self.files if name.endswith(".parquet")]

    @classmethod
    def read(cls, out: Path, source: Path) -> UserView:
        import duckdb

        glob, src = _sql_text(f"{out}/*.parquet"), _sql_text(str(source))
        with duckdb.connect() as db:
            def one(sql: str) -> tuple[int, ...]:
                row = db.execute(sql).fetchone()
                assert row is not None
                return tuple(row)

            rows, distinct = one(f"select count(*), count(distinct id) from '{glob}'")
            (extra,) = one(f"select count(*) from (select id from '{glob}' except select id from '{src}')")
            (missing,) = one(f"select count(*) from (select id from '{src}' except select id from '{glob}')")
        table = ds.dataset(str(out), format="parquet").to_table(columns=["id", "embedding"])
        return cls(files=sorted(os.listdir(out)), rows=rows, distinct=distinct, not_in_source=extra,
                   missing=missing, dataset_ids=table.column("id").to_pylist(),
                   source_ids=set(pq.read_table(source, columns=["id"]).column("id").to_pylist()),
                   null_embeddings=table.column("embedding").null_count,
                   manifest=json.loads((out / "_manifest.json").read_text()))

    def assert_every_id_once(self, n: int) -> None:
        assert [name for name in self.files if name.endswith(".tmp")] == [], "staged files left behind"
        strays = [name for name in self.files if not (name.startswith("part-") and name.endswith(".parquet"))
                  and name not in ("_manifest.json", "_embedq.json")]
        assert strays == [], "unexpected files in the output directory"
        assert (self.rows, self.distinct, self.not_in_source, self.missing) == (n, n, 0, 0)
        assert len(self.dataset_ids) == n and set(self.dataset_ids) == self.source_ids
        assert self.null_embeddings == 0
        assert self.manifest["complete"] and self.manifest["documents"] == n
        assert sorted(p["file"] for p in self.manifest["parts"]) == self.parts


def assert_redis_is_drained(client: redis.Redis, keys: JobKeys, out: Path, n: int) -> None:
    """Nothing left in the stream or pending, no dead letter, and the manifest is exactly the parts."""
    assert client.xlen(keys.stream) == 0
    assert client.xpending(keys.stream, GROUP)["pending"] == 0
    assert client.xlen(keys.dead) == 0, "documents were dead-lettered"
    assert int(client.hget(keys.stats, "docs_committed") or 0) == n
    manifest = {f"{name.decode() if isinstance(name, bytes) else name}.parquet" for name in client.hkeys(keys.manifest)}
    assert manifest == {p.name for p in out.glob("*.parquet")}


def assert_status_says_complete(url: str, n: int) -> None:
    status = embedq("status", "--job", JOB, "--json", "--redis", url)
    assert status.returncode == 0, status.stderr
    state = json.loads(status.stdout)
    assert (state["state"], state["committed_documents"], state["dead_documents"]) == ("complete", n, 0)
    assert (state["stream_entries"], state["pending_entries"]) == (0, 0)


def embedq(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "embedq", *args], capture_output=True, text=True, timeout=300)


def report(size: str, figures: ChaosFigures) -> None:
    """Print the figures; also merge them into the JSON file EMBEDQ_CHAOS_REPORT names, by size."""
    summary = figures.summary()
    print(f"chaos ({size}):", json.dumps(summary, indent=1))
    target = os.environ.get("EMBEDQ_CHAOS_REPORT")
    if target:
        path = Path(target)
        existing = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**existing, size: summary}, indent=1) + "\n")


def _sql_text(value: str) -> str:
    return value.replace("'", "''")
