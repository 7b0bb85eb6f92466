"""Chunked jobs end to end (`--chunk --overlap`): each chunk's vector is the model's on exactly that
window's ids (prompt and special ids included), offsets and overlap as set, short documents as
unchunked, the same from pretokenized messages; a failing chunk dead-letters its whole document; a
worker killed mid-job still leaves every chunk exactly once; verify finds a missing or repeated chunk."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from embedq.errors import JobMismatch
from embedq.job import produce_command
from embedq.keys import JobKeys
from embedq.model import ModelInfo
from embedq.producer.producer import Producer, ProducerOptions
from embedq.producer.slices import Slice
from embedq.producer.sources import SourceSpec, open_source
from embedq.tokenization import Tokenizer
from embedq.verify import verify_job
from embedq.worker.writer import read_metadata
from tests.support import FaultyEngine, committed, embedq_process, produce, run_worker, wait_until, write_jsonl

CHUNK, OVERLAP = 64, 16


def _long_texts(glosses: list[str], n: int, per_doc: int) -> list[str]:
    """n documents of `per_doc` glosses each (about 12 tokens a gloss), every third one short."""
    return [glosses[i] if i % 3 == 2 else " ".join(glosses[i * per_doc:(i + 1) * per_doc]) for i in range(n)]


def _rows(out: Path) -> list[dict]:
    table = ds.dataset(str(out), format="parquet").to_table()
    return sorted(table.to_pylist(), key=lambda r: (r["id"], r["chunk_index"]))


def _expected_chunks(model: ModelInfo, prompt: str, text: str) -> list[tuple[int, int, list[int]]]:
    """(start, end, ids) of each chunk, from the `tokenizers` library directly: [CLS], the prompt's
    tokens, a window of the text's, [SEP]."""
    from tokenizers import Tokenizer as HFTokenizer

    reference = HFTokenizer.from_file(str(model.tokenizer_file))
    reference.no_truncation()
    reference.no_padding()
    full = reference.encode(prompt + text).ids
    n_prompt = len(reference.encode(prompt, add_special_tokens=False).ids)
    head, body, tail = full[:1 + n_prompt], full[1 + n_prompt:-1], full[-1:]
    window, chunks, start = CHUNK - 2 - n_prompt, [], 0
    while True:
        end = min(start + window, len(body))
        chunks.append((start, end, head + body[start:end] + tail))
        if end == len(body):
            return chunks
        start += window - OVERLAP


def test_each_chunk_is_the_models_vector_of_its_window_with_prompt_and_special_ids(
        redis_client, job_name, model_info: ModelInfo, cpu_engine, gloss_texts: list[str], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import torch
    from sentence_transformers import SentenceTransformer

    prompt = "query: "
    model = model_info.with_overrides(prompt=prompt)
    texts = _long_texts(gloss_texts, 6, 20)
    source = write_jsonl(tmp_path / "docs.jsonl", [f"d{i}" for i in range(len(texts))], texts)
    outputs = {}
    for pretokenize in (False, True):
        keys = JobKeys(f"{job_name}{'-p' if pretokenize else ''}")
        encode = Tokenizer(model.tokenizer_file, model.max_seq_len, prompt=prompt, truncate=False).encode
        producer = Producer(redis_client, keys, open_source(SourceSpec(str(source))), model,
                            ProducerOptions(batch_size=4, chunk_tokens=CHUNK, chunk_overlap=OVERLAP),
                            encode=encode if pretokenize else None)
        producer.run()
        record = producer.prepare()
        assert (record.chunk_tokens, record.chunk_overlap, record.pretokenized) == (CHUNK, OVERLAP, pretokenize)
        out = tmp_path / f"out-{pretokenize}"
        run_worker(redis_client, keys, record, model, cpu_engine, out, window_docs=4)
        outputs[pretokenize] = _rows(out)
        result = verify_job(redis_client, keys, str(out))
        assert result.ok and result.source_documents == len(texts), result.render()
        for key in redis_client.scan_iter(match=f"*{{{keys.job}}}*"):
            redis_client.delete(key)
    rows = outputs[False]
    meta = read_metadata(pq.read_schema(next((tmp_path / "out-False").glob("*.parquet"))))
    assert (meta["chunk_tokens"], meta["chunk_overlap"]) == (str(CHUNK), str(OVERLAP))

    st = SentenceTransformer(str(model_info.path), device="cpu")
    by_doc: dict[str, list[dict]] = {}
    for row in rows:
        by_doc.setdefault(row["id"], []).append(row)
    assert sorted(by_doc) == [f"d{i}" for i in range(len(texts))]
    for i, text in enumerate(texts):
        chunks, want = by_doc[f"d{i}"], _expected_chunks(model_info, prompt, text)
        assert [(c["chunk_index"], c["n_chunks"]) for c in chunks] == [(k, len(want)) for k in range(len(want))]
        assert [(c["token_start"], c["token_end"]) for c in chunks] == [(s, e) for s, e, _ in want]
        assert [c["n_tokens"] for c in chunks] == [len(ids) for _, _, ids in want]
        assert not any(c["truncated"] for c in chunks)
        if i % 3 == 2:  # a short document: one chunk, as sentence-transformers embeds it whole
            assert len(chunks) == 1
            whole = st.encode([text], prompt=prompt, normalize_embeddings=True)[0]
            np.testing.assert_allclose(chunks[0]["embedding"], whole, atol=2e-5)
            continue
        assert len(chunks) > 3 and all(len(ids) <= CHUNK for _, _, ids in want)
        # sentence-transformers' modules on exactly these ids, padded into one batch with a mask.
        mask = torch.tensor([[1] * len(ids) + [0] * (CHUNK - len(ids)) for _, _, ids in want])
        features = {"input_ids": torch.tensor([ids + [0] * (CHUNK - len(ids)) for _, _, ids in want]),
                    "attention_mask": mask, "token_type_ids": torch.zeros_like(mask)}
        with torch.no_grad():
            theirs = st(features)["sentence_embedding"].numpy()
        np.testing.assert_allclose(np.stack([c["embedding"] for c in chunks]), theirs, atol=2e-5)
    # Pretokenized messages carry whole documents; the worker cuts them alike.
    assert [(r["id"], r["chunk_index"], r["token_start"], r["token_end"]) for r in outputs[True]] == [
        (r["id"], r["chunk_index"], r["token_start"], r["token_end"]) for r in rows]
    np.testing.assert_allclose(np.stack([r["embedding"] for r in outputs[True]]),
                               np.stack([r["embedding"] for r in rows]), atol=2e-5)


def test_a_failing_chunk_takes_its_whole_document_to_the_dead_letters(
        redis_client, job_name, tiny: ModelInfo, tiny_engine, gloss_texts: list[str], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    texts = _long_texts(gloss_texts, 9, 20)
    texts[4] = texts[4] + " zebra " + texts[0]  # the poison word in a middle chunk of document 4
    source = write_jsonl(tmp_path / "docs.jsonl", list(range(len(texts))), texts)
    keys = JobKeys(job_name)
    record, _ = produce(redis_client, keys, tiny, source, batch_size=3, chunk_tokens=CHUNK, chunk_overlap=OVERLAP)
    zebra = Tokenizer(tiny.tokenizer_file, 8).encode(["zebra"]).tokens[1]
    out = tmp_path / "out"
    report = run_worker(redis_client, keys, record, tiny, FaultyEngine(tiny_engine, int(zebra)), out, window_docs=9)
    assert report.dead_documents == 1
    rows = _rows(out)
    assert 4 not in {r["id"] for r in rows}
    result = verify_job(redis_client, keys, str(out), allow_dead=True)
    assert result.ok and result.dead_documents == 1 and result.missing_chunks == 0, result.render()
    assert len(rows) > len(texts)  # the other documents are there whole, in several chunks each


def test_a_worker_killed_mid_job_leaves_every_chunk_exactly_once(
        redis_client, job_name, tiny: ModelInfo, tiny_model: Path, gloss_texts: list[str], tmp_path: Path,
        redis_url: str) -> None:  # type: ignore[no-untyped-def]
    texts = _long_texts(gloss_texts, 240, 12)
    source = write_jsonl(tmp_path / "docs.jsonl", list(range(len(texts))), texts)
    keys = JobKeys(job_name)
    # The first half now, the second after the kill: however fast the machine, the job is not done
    # when the worker is killed (on a slow one, the kill lands in the middle of the first half).
    record, _ = produce(redis_client, keys, tiny, source, batch_size=10, chunk_tokens=32, chunk_overlap=8,
                        part=Slice(0, 2))
    tokenizer = Tokenizer(tiny.tokenizer_file, tiny.max_seq_len, truncate=False)
    chunks = int(record.chunking(tiny).counts(tokenizer.encode(texts).lengths).sum())  # type: ignore[union-attr]
    out, log = tmp_path / "out", tmp_path / "worker.log"
    args = ["work", "--job", keys.job, "--out", str(out), "--redis", redis_url, "--model", str(tiny_model),
            "--window-docs", "20", "--lease-seconds", "2"]
    worker = embedq_process(*args, log=log)
    wait_until(lambda: committed(redis_client, keys) > 0, 120, "a first commit")
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=30)
    assert committed(redis_client, keys) < len(texts)  # killed mid-job
    produce(redis_client, keys, tiny, source, batch_size=10, chunk_tokens=32, chunk_overlap=8, part=Slice(1, 2))
    assert embedq_process(*args, log=log).wait(timeout=300) == 0, log.read_text()[-3000:]
    result = verify_job(redis_client, keys, str(out))
    assert result.ok and result.output_rows == chunks, result.render()
    assert int(redis_client.hget(keys.stats, "docs_committed") or 0) == len(texts)  # documents, not chunks


def test_verify_reports_a_missing_and_a_repeated_chunk(
        redis_client, job_name, tiny: ModelInfo, tiny_engine, gloss_texts: list[str], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    texts = _long_texts(gloss_texts, 6, 20)
    source = write_jsonl(tmp_path / "docs.jsonl", [f"d{i}" for i in range(len(texts))], texts)
    keys = JobKeys(job_name)
    record, _ = produce(redis_client, keys, tiny, source, batch_size=6, chunk_tokens=CHUNK, chunk_overlap=OVERLAP)
    out = tmp_path / "out"
    run_worker(redis_client, keys, record, tiny, tiny_engine, out, window_docs=6)
    assert verify_job(redis_client, keys, str(out)).ok
    # The chunk settings are the job's: a producer resuming it with others is refused.
    assert f"--chunk {CHUNK} --overlap {OVERLAP}" in produce_command(record, keys)
    with pytest.raises(JobMismatch, match="chunk_overlap"):
        produce(redis_client, keys, tiny, source, batch_size=6, chunk_tokens=CHUNK, chunk_overlap=OVERLAP + 1)
    (part,) = out.glob("*.parquet")
    table = pq.read_table(part)
    middle = next(i for i, r in enumerate(table.to_pylist()) if r["chunk_index"] == 1)

    pq.write_table(table.filter(np.arange(table.num_rows) != middle), part)
    missing = verify_job(redis_client, keys, str(out))
    assert not missing.ok and (missing.missing_chunks, missing.missing, missing.duplicated) == (1, 1, 0)
    assert "missing chunks     1" in missing.render()

    pq.write_table(table.take(np.r_[np.arange(table.num_rows), middle]), part)
    repeated = verify_job(redis_client, keys, str(out))
    assert not repeated.ok and (repeated.missing_chunks, repeated.missing, repeated.duplicated) == (0, 0, 1)
    assert repeated.examples["duplicated"] == [table.column("id")[middle].as_py()]


@pytest.fixture
def gloss_texts(gloss_texts: list[str]) -> list[str]:
    """Glosses long enough to make chunks of (the corpus' shortest are a word or two)."""
    return [t for t in gloss_texts if len(t) > 40]
