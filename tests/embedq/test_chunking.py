"""Cutting long documents into chunks (`embedq.chunking`): windows, offsets and overlap, the special
ids and prompt on every chunk, whole sequences from both tokenizer libraries, and the settings'
limits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embedq.chunking import Chunking
from embedq.errors import UsageError
from embedq.model import ModelInfo
from embedq.tokenization import TokenizedDocs, Tokenizer

CLS, SEP = 101, 102


def _docs(rows: list[list[int]]) -> TokenizedDocs:
    return TokenizedDocs(np.array([t for r in rows for t in r], np.int32), np.array([len(r) for r in rows], np.int32),
                         np.zeros(len(rows), bool))


def test_chunks_carry_head_prompt_and_tail_and_step_by_window_less_overlap() -> None:
    prompt = [7, 8]
    text = list(range(1000, 1025))  # 25 text tokens
    chunking = Chunking(size=12, overlap=3, head=1, tail=1, prompt=2)  # 8 text tokens a chunk, step 5
    tokens, doc, columns = chunking.split(_docs([[CLS, *prompt, *text, SEP]]))
    assert (chunking.window, chunking.step) == (8, 5)
    assert columns.start.tolist() == [0, 5, 10, 15, 20]
    assert columns.end.tolist() == [8, 13, 18, 23, 25]  # the last ends at the text's end
    assert columns.index.tolist() == [0, 1, 2, 3, 4] and columns.count.tolist() == [5] * 5
    assert doc.tolist() == [0] * 5
    for k, (start, end) in enumerate(zip(columns.start, columns.end, strict=True)):
        chunk = tokens.tokens[tokens.offsets[k]:tokens.offsets[k + 1]].tolist()
        assert chunk == [CLS, *prompt, *text[start:end], SEP]
        assert len(chunk) <= chunking.size
    # Neighbours share exactly `overlap` text tokens.
    assert all(columns.end[k] - columns.start[k + 1] == 3 for k in range(3))
    assert not tokens.truncated.any()


def test_a_document_that_fits_one_chunk_is_its_own_sequence_unchanged() -> None:
    rows = [[CLS, 5, 6, 7, SEP], [CLS, SEP], [CLS, *range(200, 210), SEP]]  # 3, 0 and 10 text tokens
    tokens, doc, columns = Chunking(size=12, overlap=2).split(_docs(rows))
    assert doc.tolist() == [0, 1, 2] and columns.index.tolist() == [0, 0, 0] and columns.count.tolist() == [1, 1, 1]
    assert columns.end.tolist() == [3, 0, 10]
    assert tokens.tokens.tolist() == [t for r in rows for t in r]


def test_a_window_of_documents_is_cut_in_order_each_document_to_its_own_chunks() -> None:
    rows = [[CLS, *range(300, 320), SEP], [CLS, 1, SEP], [CLS, *range(400, 417), SEP]]
    chunking = Chunking(size=10, overlap=0)  # 8 text tokens a chunk
    tokens, doc, columns = chunking.split(_docs(rows))
    assert doc.tolist() == [0, 0, 0, 1, 2, 2, 2]
    assert columns.count.tolist() == [3, 3, 3, 1, 3, 3, 3]
    assert chunking.counts(np.array([22, 3, 19])).tolist() == [3, 1, 3]
    last = tokens.tokens[tokens.offsets[-2]:].tolist()
    assert last == [CLS, 416, SEP]


def test_whole_sequences_from_both_libraries_and_their_special_ids(model_info: ModelInfo) -> None:
    from tokenizers import Tokenizer as HFTokenizer

    texts = ["long " * 900 + "end", "a short one", ""]
    reference = HFTokenizer.from_file(str(model_info.tokenizer_file))
    reference.no_truncation()
    reference.no_padding()
    want = [e.ids for e in reference.encode_batch(["query: " + t for t in texts])]
    for library in ("auto", "tokenizers"):
        tokenizer = Tokenizer(model_info.tokenizer_file, model_info.max_seq_len, prompt="query: ", truncate=False,
                              library=library)
        docs = tokenizer.encode(texts)
        assert docs.lengths.tolist() == [len(w) for w in want] and docs.lengths[0] > 512
        assert docs.tokens.tolist() == [t for w in want for t in w]
        assert not docs.truncated.any()
        assert (tokenizer.head, tokenizer.tail, tokenizer.prompt_tokens) == (1, 1, 2)
    assert Tokenizer(model_info.tokenizer_file, 128).encode(texts).truncated.tolist() == [True, False, False]


def test_a_decoder_tokenizer_has_no_head_and_its_eos_closes_every_chunk(tmp_path: Path) -> None:
    from tests.engines.decoder_model import EOS, write_bpe_tokenizer

    write_bpe_tokenizer(tmp_path, ["the quick brown fox jumps over the lazy dog"] * 50)
    tokenizer = Tokenizer(tmp_path / "tokenizer.json", 64, truncate=False)
    assert (tokenizer.head, tokenizer.tail) == (0, 1)
    docs = tokenizer.encode(["the lazy dog " * 40])
    chunking = Chunking.for_tokenizer(tokenizer, 16, 4)
    tokens, _, columns = chunking.split(docs)
    eos = tokenizer._tok.token_to_id(EOS)
    assert columns.count[0] > 1 and (tokens.lengths <= 16).all()
    assert (tokens.tokens[tokens.offsets[1:] - 1] == eos).all()
    assert int((tokens.tokens == eos).sum()) == len(tokens)  # once per chunk, at its end


def test_settings_a_model_cannot_take_are_refused(model_info: ModelInfo) -> None:
    tokenizer = Tokenizer(model_info.tokenizer_file, model_info.max_seq_len, prompt="query: ", truncate=False)
    with pytest.raises(UsageError, match="over the model's max_seq_len"):
        Chunking.for_tokenizer(tokenizer, 1024, 0)
    with pytest.raises(UsageError, match="no room for text"):
        Chunking.for_tokenizer(tokenizer, 4, 0)  # [CLS] query : [SEP]
    with pytest.raises(UsageError, match="--overlap 60"):
        Chunking.for_tokenizer(tokenizer, 64, 60)
    with pytest.raises(ValueError, match="whole documents"):
        Chunking(size=64).split(Tokenizer(model_info.tokenizer_file, 16).encode(["many words " * 20]))
