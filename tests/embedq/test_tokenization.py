"""The tokenizer: nanotoken (the fast path) gives the ids of the `tokenizers` library (the reference)
on every document of both corpora and on the edge cases; truncation; where the fast path is not used."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from embedq.bench.tokenizer_candidates import edge_cases, random_unicode
from embedq.model import ModelInfo
from embedq.tokenization import SELF_CHECK, TokenizedDocs, Tokenizer, TokenizerPool

pytest.importorskip("nanotoken")


@pytest.fixture(scope="module")
def fast(model_info: ModelInfo) -> Tokenizer:
    tokenizer = Tokenizer(model_info.tokenizer_file, model_info.max_seq_len)
    assert tokenizer.library == "nanotoken"
    return tokenizer


@pytest.fixture(scope="module")
def reference(model_info: ModelInfo) -> Tokenizer:
    return Tokenizer(model_info.tokenizer_file, model_info.max_seq_len, library="tokenizers")


def assert_same(got: TokenizedDocs, want: TokenizedDocs, texts: list[str]) -> None:
    np.testing.assert_array_equal(got.lengths, want.lengths)
    np.testing.assert_array_equal(got.truncated, want.truncated)
    for i in np.flatnonzero(got.lengths == want.lengths):
        a, b = got.slice(int(i), int(i) + 1).tokens, want.slice(int(i), int(i) + 1).tokens
        assert np.array_equal(a, b), f"document {i} {texts[i][:60]!r}: {a[:12]} against {b[:12]}"


@pytest.mark.parametrize("corpus", ["glosses", "passages"])
def test_every_document_of_the_corpora_gets_the_ids_of_tokenizers(
    corpus: str, corpus_dir: Path, fast: Tokenizer, reference: Tokenizer
) -> None:
    texts = pq.read_table(corpus_dir / f"{corpus}.parquet", columns=["text"]).column("text").to_pylist()

    assert_same(fast.encode(texts), reference.encode(texts), texts)


def test_edge_cases_and_random_unicode_get_the_ids_of_tokenizers(
    model_info: ModelInfo, fast: Tokenizer, reference: Tokenizer
) -> None:
    texts = [*edge_cases(model_info.max_seq_len).values(), *SELF_CHECK, *random_unicode(2000)]

    assert_same(fast.encode(texts), reference.encode(texts), texts)


@pytest.mark.parametrize("library", ["auto", "tokenizers"])
def test_a_document_over_the_maximum_is_cut_to_it_and_ends_with_sep(model_info: ModelInfo, library: str) -> None:
    limit = model_info.max_seq_len
    tokenizer = Tokenizer(model_info.tokenizer_file, limit, library=library)
    # "a " * n is n word pieces: with [CLS] and [SEP], limit - 2 of them fit exactly.
    docs = tokenizer.encode(["a " * (limit - 2), "a " * (limit - 1), "a " * 1000, "a"])

    assert docs.lengths.tolist() == [limit, limit, limit, 3]
    assert docs.truncated.tolist() == [False, True, True, False]
    sep = docs.tokens[docs.offsets[1] - 1]
    for i in range(3):
        row = docs.tokens[docs.offsets[i]:docs.offsets[i + 1]]
        assert row[-1] == sep and row[0] == docs.tokens[0]  # [CLS] ... [SEP]


def test_a_fast_tokenizer_that_disagrees_on_the_self_check_is_not_used(
    model_info: ModelInfo, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import nanotoken

    from embedq import tokenization

    real = nanotoken.WordPieceTokenizer.from_json(model_info.tokenizer_file.read_text(encoding="utf-8"))

    class OffByOne:
        """nanotoken's own results with one id changed in the first document."""

        def encode_batch(self, texts: list[str], **options: object) -> tuple[np.ndarray, np.ndarray]:
            ids, offsets = real.encode_batch(texts, **options)
            ids = ids.copy()
            ids[1] += 1
            return ids, offsets

    monkeypatch.setattr(tokenization, "_nanotoken", lambda path: OffByOne())
    with caplog.at_level(logging.WARNING, logger="embedq.tokenization"):
        tokenizer = Tokenizer(model_info.tokenizer_file, model_info.max_seq_len)

    assert tokenizer.library == "tokenizers"
    assert "nanotoken gives other ids than tokenizers" in caplog.text
    reference = Tokenizer(model_info.tokenizer_file, model_info.max_seq_len, library="tokenizers")
    assert_same(tokenizer.encode(["Café naïve"]), reference.encode(["Café naïve"]), ["Café naïve"])


def test_a_tokenizer_that_is_not_wordpiece_runs_on_tokenizers(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE
    from tokenizers.pre_tokenizers import Whitespace

    bpe = HFTokenizer(BPE(vocab={"[UNK]": 0, "a": 1, "b": 2, "ab": 3}, merges=[("a", "b")], unk_token="[UNK]"))
    bpe.pre_tokenizer = Whitespace()
    bpe.save(str(tmp_path / "tokenizer.json"))

    tokenizer = Tokenizer(tmp_path / "tokenizer.json", 8)

    assert tokenizer.library == "tokenizers"
    assert tokenizer.encode(["ab a b"]).tokens.tolist() == [3, 1, 2]


def test_the_pool_gives_what_one_process_gives(model_info: ModelInfo, corpus_dir: Path, fast: Tokenizer) -> None:
    texts = pq.read_table(corpus_dir / "glosses.parquet", columns=["text"]).column("text").to_pylist()[:5000]
    with TokenizerPool(model_info.tokenizer_file, model_info.max_seq_len, processes=2, chunk_size=700) as pool:
        pool.wait_ready()  # what the bench's workers do before their timing starts
        assert len(pool._warming) == 2 and all(f.done() and f.exception() is None for f in pool._warming)
        pooled = pool.encode(texts)

    assert_same(pooled, fast.encode(texts), texts)
