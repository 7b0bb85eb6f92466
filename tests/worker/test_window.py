"""A window keeps its entries and its document table in step, whatever is cut out of it.

No Redis, no model: windows are built from messages whose every document's token ids equal a
number that names the document, so each check can see that nothing got mixed up.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedq.protocol import SCHEMA_VERSION, BatchMessage, Limits, decode_batch
from embedq.tokenization import TokenizedDocs
from embedq.worker.window import DocumentRules, Entry, Window

RULES = DocumentRules(limits=Limits(max_doc_bytes=100), id_type="string")


def message(seq: int, lengths: list[int]) -> BatchMessage:
    """A pretokenized message: document r has `lengths[r]` token ids, all equal to 1000 * seq + r."""
    tokens = np.concatenate([np.full(n, 1000 * seq + r, "<i4") for r, n in enumerate(lengths)] or [np.zeros(0, "<i4")])
    return BatchMessage(v=SCHEMA_VERSION, job="j", seq=seq, pos=seq * 100,
                        ids=[f"{seq}/{r}" for r in range(len(lengths))],
                        tokens=tokens.tobytes(), lengths=np.array(lengths, "<i4").tobytes(),
                        truncated=(np.array(lengths) % 3 == 0).astype(np.uint8).tobytes())


def window_of(messages: list[list[int]], deliveries: int = 1) -> Window:
    window = Window(entries=[Entry(f"{k}-0", message(k, lengths), deliveries) for k, lengths in enumerate(messages)])
    window.tokenize(lambda texts: TokenizedDocs.concat([]), RULES, "w")
    return window


def assert_consistent(window: Window) -> None:
    """Every document row agrees with its entry's message: id, tokens, truncation; embeddings follow."""
    docs = window.docs
    assert len(docs.ids) == len(docs.entry) == len(docs.row) == len(docs.tokens)
    for i, doc_id in enumerate(docs.ids):
        entry = window.entries[int(docs.entry[i])]
        r = int(docs.row[i])
        assert doc_id == entry.message.ids[r] == f"{entry.message.seq}/{r}"
        ids = docs.tokens.tokens[docs.tokens.offsets[i]:docs.tokens.offsets[i + 1]]
        assert (ids == 1000 * entry.message.seq + r).all() and ids.size == int(docs.tokens.lengths[i])
        assert bool(docs.tokens.truncated[i]) == (ids.size % 3 == 0)
        if docs.embeddings is not None:
            assert docs.embeddings[i, 0] == 1000 * entry.message.seq + r


def embed(window: Window) -> None:
    """Stand-in embeddings that name their document, so a mix-up is visible."""
    window.docs.embeddings = np.array([[1000 * window.entries[int(k)].message.seq + int(r), 0.0]
                                       for k, r in zip(window.docs.entry, window.docs.row, strict=True)],
                                      dtype=np.float32).reshape(-1, 2)


MESSAGES = st.lists(st.lists(st.integers(1, 40), min_size=0, max_size=30), min_size=1, max_size=5)


@settings(max_examples=60, deadline=None)
@given(MESSAGES)
def test_sorting_a_window_by_length_keeps_every_document_with_its_own_ids(messages: list[list[int]]) -> None:
    window = window_of(messages)
    before = [(int(k), int(r)) for k, r in zip(window.docs.entry, window.docs.row, strict=True)]
    window.sort_by_length()
    docs = window.docs
    assert (np.diff(docs.tokens.lengths) >= 0).all()
    assert sorted(docs.ids) == sorted(f"{k}/{r}" for k, lengths in enumerate(messages) for r in range(len(lengths)))
    assert_consistent(window)
    place = list(zip(docs.entry.tolist(), docs.row.tolist(), strict=True))
    assert sorted(place) == sorted(before)
    for i in range(len(docs) - 1):  # a stable sort: documents of equal length keep their order
        assert docs.tokens.lengths[i] < docs.tokens.lengths[i + 1] or place[i] < place[i + 1]


@settings(max_examples=60, deadline=None)
@given(MESSAGES, st.data())
def test_dropping_entries_settled_elsewhere_removes_exactly_their_documents_and_letters(
        messages: list[list[int]], data: st.DataObject) -> None:
    window = window_of(messages)
    window.sort_by_length()
    embed(window)
    if len(window):  # a dead letter for the first document of each entry, to be dropped with it
        firsts = np.array([int(np.flatnonzero(window.docs.entry == k)[0]) for k in np.unique(window.docs.entry)])
        window.dead_letter_documents(firsts, reason="test", error="", worker="w")
    gone = set(data.draw(st.sets(st.sampled_from([e.entry_id for e in window.entries]))))
    kept_ids = [d for d, k in zip(window.docs.ids, window.docs.entry, strict=True)
                if window.entries[int(k)].entry_id not in gone]
    gone_docs = sum(window.entries[int(k)].entry_id in gone for k in window.docs.entry)
    assert window.drop_entries(gone) == gone_docs
    assert all(letter.entry_id not in gone for letter in window.dead)
    assert window.docs.ids == kept_ids
    assert not gone & set(window.entry_ids) and not gone & set(window.all_entry_ids)
    assert_consistent(window)


def test_dead_lettering_documents_takes_them_out_with_one_letter_per_entry() -> None:
    window = window_of([[3, 5, 7], [2, 4]])
    embed(window)
    rows = np.array([i for i, doc_id in enumerate(window.docs.ids) if doc_id in ("0/1", "1/0", "1/1")])
    window.dead_letter_documents(rows, reason="embedding failed", error="boom", worker="w", failures=3)
    assert window.docs.ids == ["0/0", "0/2"]
    assert_consistent(window)
    letters = {letter.entry_id: letter for letter in window.dead}
    assert letters["0-0"].doc_ids == ["0/1"] and letters["1-0"].doc_ids == ["1/0", "1/1"]
    assert all(letter.failures == 3 and letter.reason == "embedding failed" for letter in window.dead)
    # The letter's payload is the documents alone, replayable as a message of its own.
    replay = decode_batch(letters["1-0"].payload, job="j", limits=Limits())
    assert replay.ids == ["1/0", "1/1"] and replay.token_docs().lengths.tolist() == [2, 4]
    assert window.dead_documents == 3 and window.all_entry_ids == ["0-0", "1-0"]


def test_crash_suspects_are_split_off_before_tokenizing_and_the_rest_stays() -> None:
    window = Window(entries=[Entry("a", message(0, [2, 2]), 5), Entry("b", message(1, [3]), 1),
                             Entry("c", message(2, [4]), 7)])
    taken = window.split_off(lambda e: e.deliveries >= 5)
    assert [e.entry_id for e in taken] == ["a", "c"] and window.entry_ids == ["b"]
    window.tokenize(lambda texts: TokenizedDocs.concat([]), RULES, "w")
    assert window.docs.ids == ["1/0"]
    with pytest.raises(ValueError, match="before the window is tokenized"):
        window.split_off(lambda e: True)


def test_unusable_documents_become_dead_letters_and_their_batch_mates_stay() -> None:
    texts = BatchMessage(v=SCHEMA_VERSION, job="j", seq=0, pos=0, ids=["ok", "empty", "huge", 7],
                         texts=["fine", " \t", "x" * 101, "wrong id type"])
    window = Window(entries=[Entry("e", texts, 1)])
    window.tokenize(lambda batch: TokenizedDocs(np.arange(sum(len(t) for t in batch), dtype=np.int32),
                                                np.array([len(t) for t in batch], np.int32),
                                                np.zeros(len(batch), bool)), RULES, "w")
    assert window.docs.ids == ["ok"] and window.docs.tokens.lengths.tolist() == [4]
    reasons = {letter.reason: letter.doc_ids for letter in window.dead}
    assert reasons == {"empty text": ["empty"], "document over the size limit": ["huge"],
                       "id of the wrong type (the job's ids are string)": [7]}


def test_an_entry_delivered_twice_in_one_read_round_is_taken_once() -> None:
    """Redis lost a delivery it had acknowledged, and the worker's retried read got the same entry
    again as new (seen in tests/worker/test_lost_writes.py): the window must not embed it twice."""
    from embedq.protocol import encode_batch
    from embedq.worker.consumer import Delivery

    raw = [encode_batch(message(k, [3, 4])) for k in range(2)]
    deliveries = [Delivery("1-0", raw[0], 1), Delivery("2-0", raw[1], 1), Delivery("1-0", raw[0], 1)]
    window = Window.assemble(deliveries, job="j", rules=RULES, worker="w")
    assert [e.entry_id for e in window.entries] == ["1-0", "2-0"]
    assert window.all_entry_ids == ["1-0", "2-0"]
