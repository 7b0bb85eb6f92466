"""Incremental jobs (embedq.incremental, `embedq run --incremental`, `embedq snapshot`): the second
night embeds only what changed, the snapshot equals a full re-run, and a crash at any step of the
record's protocol leaves a state that the next run completes, exactly once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from embedq.cli import app
from embedq.errors import JobMismatch
from embedq.incremental.state import Record
from embedq.incremental.store import StateStore
from tests.support import embedq_process, read_output, wait_until

N = 2000  # 1% of it is 20 documents changed, 20 added, 20 deleted


@pytest.fixture
def corpus(tmp_path: Path, gloss_texts: list[str]) -> dict[str, str]:
    """N real glosses under string ids."""
    return {f"g{i}": gloss_texts[i] for i in range(N)}


def write(path: Path, docs: dict[str, str]) -> Path:
    pq.write_table(pa.table({"id": list(docs), "text": list(docs.values())}), path)
    return path


def night(source: Path, root: Path, stem: str, redis_url: str, model: Path, *extra: str) -> Any:
    """One incremental run, in this process."""
    args = ["run", str(source), "--out", str(root / "out"), "--state", str(root / "state"), "--incremental",
            "--job", stem, "--redis", redis_url, "--model", str(model), "--batch-size", "50", "--window-docs", "200",
            "--backend", "torch", "--threads", "1", *extra]
    return CliRunner().invoke(app, args)


def snapshot(root: Path) -> dict[Any, np.ndarray]:
    result = CliRunner().invoke(app, ["snapshot", "--state", str(root / "state"), "--out", str(root / "view.parquet")])
    assert result.exit_code == 0, result.output
    table = pq.read_table(root / "view.parquet")
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids))
    return dict(zip(ids, np.asarray(table.column("embedding").to_pylist(), np.float32), strict=True))


def delta_ids(root: Path) -> list[set[Any]]:
    """The ids each committed generation embedded, oldest first (read from its job's parts)."""
    record = Record.find(str(root / "state"))
    return [set(read_output(Path(g.output))) if g.parts else set() for g in reversed(record.chain())]


def assert_same_view(view: dict[Any, np.ndarray], full: dict[Any, np.ndarray]) -> None:
    assert set(view) == set(full)
    for doc_id, vector in full.items():
        cosine = float(vector @ view[doc_id] / (np.linalg.norm(vector) * np.linalg.norm(view[doc_id])))
        assert cosine >= 0.9999, (doc_id, cosine)


def change_one_percent(docs: dict[str, str]) -> tuple[dict[str, str], set[str], set[str], set[str]]:
    ids = list(docs)
    changed, deleted = set(ids[100:120]), set(ids[500:520])
    new = {f"new{i}": f"a document added on the second night, number {i}" for i in range(20)}
    after = {i: (t + " (revised)" if i in changed else t) for i, t in docs.items() if i not in deleted}
    return {**after, **new}, changed, set(new), deleted


def test_unchanged_source_embeds_nothing_the_second_time(tmp_path: Path, corpus: dict[str, str], stem: str,
                                                         redis_url: str, tiny_model: Path) -> None:
    source = write(tmp_path / "docs.parquet", corpus)
    first = night(source, tmp_path, stem, redis_url, tiny_model)
    assert first.exit_code == 0, first.output
    source.touch()  # a new mtime, same content: still nothing to do
    second = night(source, tmp_path, stem, redis_url, tiny_model)
    assert second.exit_code == 0, second.output
    assert "nothing to embed" in second.output
    assert [len(ids) for ids in delta_ids(tmp_path)] == [N]
    assert len(list((tmp_path / "out").iterdir())) == 1


def test_one_percent_changed_added_deleted_embeds_exactly_those_and_the_view_equals_a_full_run(
        tmp_path: Path, corpus: dict[str, str], stem: str, redis_url: str, tiny_model: Path) -> None:
    source = write(tmp_path / "docs.parquet", corpus)
    assert night(source, tmp_path, stem, redis_url, tiny_model).exit_code == 0
    after, changed, added, deleted = change_one_percent(corpus)
    write(source, after)
    result = night(source, tmp_path, stem, redis_url, tiny_model)
    assert result.exit_code == 0, result.output
    assert "20 added, 20 changed, 20 deleted" in result.output
    assert delta_ids(tmp_path)[1] == changed | added
    tombstones = Record.find(str(tmp_path / "state"))
    folder = tombstones.store.child(tombstones.chain()[0].name)
    assert set(folder.read_table("tombstones.parquet").column("id").to_pylist()) == deleted
    full = tmp_path / "full"
    rerun = CliRunner().invoke(app, ["run", str(source), "--out", str(full), "--job", f"{stem}-full", "--redis",
                                     redis_url, "--model", str(tiny_model), "--backend", "torch", "--threads", "1"])
    assert rerun.exit_code == 0, rerun.output
    assert_same_view(snapshot(tmp_path), read_output(full))


def test_deleting_and_adding_back_and_dedupe_share_vectors(tmp_path: Path, corpus: dict[str, str], stem: str,
                                                           redis_url: str, tiny_model: Path) -> None:
    docs = dict(list(corpus.items())[:300])
    source = write(tmp_path / "docs.parquet", {**docs, "copy-a": docs["g1"], "copy-b": docs["g1"]})
    first = night(source, tmp_path, stem, redis_url, tiny_model, "--dedupe")
    assert first.exit_code == 0, first.output
    assert "2 duplicate texts share a vector" in first.output
    assert len(delta_ids(tmp_path)[0]) == 300  # the copies were not embedded
    view = snapshot(tmp_path)
    assert np.array_equal(view["copy-a"], view["g1"]) and len(view) == 302
    write(source, {k: v for k, v in docs.items() if k != "g2"})  # copies and g2 deleted
    assert night(source, tmp_path, stem, redis_url, tiny_model).exit_code == 0
    assert set(snapshot(tmp_path)) == set(docs) - {"g2"}
    write(source, docs)  # g2 back, same text: embedded again (its old vector was deleted)
    assert night(source, tmp_path, stem, redis_url, tiny_model).exit_code == 0
    assert set(snapshot(tmp_path)) == set(docs) and delta_ids(tmp_path)[2] == {"g2"}


def test_a_model_change_invalidates_the_record_with_a_clear_message(tmp_path: Path, corpus: dict[str, str],
                                                                    stem: str, redis_url: str,
                                                                    tiny_model: Path) -> None:
    source = write(tmp_path / "docs.parquet", dict(list(corpus.items())[:100]))
    assert night(source, tmp_path, stem, redis_url, tiny_model).exit_code == 0
    refused = night(source, tmp_path, stem, redis_url, tiny_model, "--max-seq-len", "64")
    assert isinstance(refused.exception, JobMismatch) and JobMismatch.exit_code == 7, refused.output
    assert "max_seq_len 128 -> 64" in str(refused.exception) and "--new-record" in str(refused.exception)
    again = night(source, tmp_path, stem, redis_url, tiny_model, "--max-seq-len", "64", "--new-record")
    assert again.exit_code == 0, again.output
    assert "100 added" in again.output  # a record of its own: everything embedded again


@pytest.mark.parametrize("crash_at", ["delta.parquet", "pending.json", "record-00000.parquet", "generation.json",
                                      "CURRENT"])
def test_a_crash_at_any_step_of_the_record_protocol_is_completed_by_the_next_run(
        tmp_path: Path, corpus: dict[str, str], stem: str, redis_url: str, tiny_model: Path,
        monkeypatch: pytest.MonkeyPatch, crash_at: str) -> None:
    docs = dict(list(corpus.items())[:400])
    source = write(tmp_path / "docs.parquet", docs)
    assert night(source, tmp_path, stem, redis_url, tiny_model).exit_code == 0
    after, changed, added, _ = change_one_percent(docs)
    write(source, after)
    write_bytes, writer = StateStore.write_bytes, StateStore.writer

    def dies(self: StateStore, name: str, *args: Any) -> Any:
        if name == crash_at:
            raise SystemExit(f"killed while writing {name}")
        return (write_bytes if args else writer)(self, name, *args)

    with monkeypatch.context() as patch:
        patch.setattr(StateStore, "write_bytes", dies)
        patch.setattr(StateStore, "writer", lambda self, name: dies(self, name))
        crashed = night(source, tmp_path, stem, redis_url, tiny_model)
    assert crashed.exit_code != 0 and "killed while writing" in str(crashed.exception)
    record = Record.find(str(tmp_path / "state"))
    assert record.current() is not None and record.current().number == 1  # the old record still stands
    resumed = night(source, tmp_path, stem, redis_url, tiny_model)
    assert resumed.exit_code == 0, resumed.output
    assert Record.find(str(tmp_path / "state")).current().number == 2
    assert delta_ids(tmp_path)[1] == changed | added  # embedded exactly once, whatever was done before
    view = snapshot(tmp_path)
    assert set(view) == set(after)
    assert night(source, tmp_path, stem, redis_url, tiny_model).output.count("nothing to embed") == 1


def test_kill_9_in_the_middle_of_the_incremental_job_loses_nothing_and_embeds_nothing_twice(
        tmp_path: Path, corpus: dict[str, str], stem: str, redis_url: str, tiny_model: Path) -> None:
    docs = dict(list(corpus.items())[:300])
    source = write(tmp_path / "docs.parquet", docs)
    assert night(source, tmp_path, stem, redis_url, tiny_model).exit_code == 0
    after = {**docs, **{f"more{i}": f"{corpus[f'g{i}']} and more" for i in range(1500)}}
    write(source, after)
    args = ["run", str(source), "--out", str(tmp_path / "out"), "--state", str(tmp_path / "state"),
            "--incremental", "--job", stem, "--redis", redis_url, "--model", str(tiny_model),
            "--batch-size", "20", "--window-docs", "40", "--lease-seconds", "3"]  # the resume reclaims after 3 s
    process = embedq_process(*args, log=tmp_path / "run.log")
    wait_until(lambda: len(list((tmp_path / "out").glob("g000002-*/part-*.parquet"))) >= 2, 120, "two parts")
    process.kill()
    process.wait(timeout=30)
    record = Record.find(str(tmp_path / "state"))
    assert record.current().number == 1 and len(record.pending()) == 1
    resumed = CliRunner().invoke(app, [*args, "--backend", "torch", "--threads", "1"])  # the same command
    assert resumed.exit_code == 0, resumed.output
    assert "resuming its job" in resumed.output
    second = record.current()
    assert second.number == 2 and second.embedded == 1500
    assert set(read_output(Path(second.output))) == set(after) - set(docs)  # asserts no id twice
    assert set(snapshot(tmp_path)) == set(after)
    manifest = json.loads((Path(second.output) / "_manifest.json").read_text())
    assert manifest["documents"] == 1500


def test_produce_incremental_publishes_only_the_delta_for_workers_anywhere(
        tmp_path: Path, corpus: dict[str, str], stem: str, redis_url: str, tiny_model: Path) -> None:
    """`produce --incremental` publishes the delta as a job of its own and prints the workers' command;
    the next incremental command (here `snapshot`) commits the finished generation."""
    import re

    docs = dict(list(corpus.items())[:600])
    source = write(tmp_path / "docs.parquet", docs)
    common = ["--state", str(tmp_path / "state"), "--redis", redis_url, "--model", str(tiny_model)]

    def produce_and_work() -> str:
        produced = CliRunner().invoke(app, ["produce", str(source), "--job", stem, "--incremental", "--out",
                                            str(tmp_path / "out"), "--batch-size", "50", *common])
        assert produced.exit_code == 0, produced.output
        found = re.search(r"embedq work --job (\S+) --out (\S+)`", produced.output)
        assert found, produced.output
        worked = CliRunner().invoke(app, ["work", "--job", found[1], "--out", found[2], "--redis", redis_url,
                                          "--backend", "torch", "--threads", "1", "--window-docs", "200"])
        assert worked.exit_code == 0, worked.output
        return produced.output

    produce_and_work()
    assert set(snapshot(tmp_path)) == set(docs)  # the snapshot committed generation 1 first
    after, changed, added, _ = change_one_percent(docs)
    write(source, after)
    assert "20 added, 20 changed, 20 deleted, 560 unchanged" in produce_and_work()
    assert set(snapshot(tmp_path)) == set(after)
    assert delta_ids(tmp_path)[1] == changed | added
    missing_out = CliRunner().invoke(app, ["produce", str(source), "--job", stem, "--incremental", *common])
    assert missing_out.exit_code != 0 and "needs --out" in str(missing_out.exception)
