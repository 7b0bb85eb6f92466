"""The batch message: versioned msgpack, validated against schema and limits before any use."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from embedq.errors import ProtocolError
from embedq.protocol import SCHEMA_VERSION, BatchMessage, Limits, decode_batch, encode_batch

LIMITS = Limits(max_message_bytes=1 << 20, max_doc_bytes=1000, max_docs=100)


def text_message(**overrides: object) -> dict[str, object]:
    fields: dict[str, object] = {"v": SCHEMA_VERSION, "job": "j", "seq": 3, "pos": 30, "ids": ["a", "b"],
                                 "texts": ["alpha", "beta"]}
    fields.update(overrides)
    return fields


def raw(fields: dict[str, object]) -> bytes:
    return msgspec.msgpack.encode(fields)


@given(ids=st.lists(st.one_of(st.text(max_size=20), st.integers(-2**63, 2**63 - 1)), min_size=1, max_size=50),
       seq=st.integers(0, 2**40))
def test_a_text_batch_round_trips(ids: list[object], seq: int) -> None:
    texts = [f"text {i}" for i in range(len(ids))]
    message = BatchMessage(v=SCHEMA_VERSION, job="j", seq=seq, pos=seq * 10, ids=ids, texts=texts)
    decoded = decode_batch(encode_batch(message), job="j", limits=LIMITS)
    assert decoded == message


def test_a_pretokenized_batch_carries_arrays_and_round_trips() -> None:
    lengths = np.array([3, 5], dtype="<i4")
    tokens = np.arange(8, dtype="<i4")
    message = BatchMessage(v=SCHEMA_VERSION, job="j", seq=0, pos=0, ids=[1, 2], tokens=tokens.tobytes(),
                           lengths=lengths.tobytes(), truncated=b"\x00\x01")
    decoded = decode_batch(encode_batch(message), job="j", limits=LIMITS)
    got_tokens, got_lengths, got_truncated = decoded.token_arrays()
    assert got_tokens.tolist() == tokens.tolist() and got_lengths.tolist() == [3, 5]
    assert got_truncated.tolist() == [False, True]


BAD_MESSAGES = {
    "not msgpack": (b"\xc1\xc1garbage", "not valid msgpack"),
    "not a map": (msgspec.msgpack.encode([1, 2, 3]), "does not match the batch schema"),
    "wrong schema version": (raw(text_message(v=SCHEMA_VERSION + 1)), "schema version"),
    "old schema version with other fields": (raw({"v": 0, "docs": []}), "schema version 0"),
    "wrong job": (raw(text_message(job="other")), "belongs to job 'other'"),
    "missing ids": (raw({k: v for k, v in text_message().items() if k != "ids"}), "missing required field"),
    "missing seq": (raw({k: v for k, v in text_message().items() if k != "seq"}), "missing required field"),
    "unknown field": (raw(text_message(extra=1)), "unknown field"),
    "ids of the wrong type": (raw(text_message(ids=[1.5, 2.5])), "got `float`"),
    "boolean ids": (raw(text_message(ids=[True, False])), "got `bool`"),
    "no documents": (raw(text_message(ids=[], texts=[])), "no documents"),
    "too many documents": (raw(text_message(ids=list(range(101)), texts=["x"] * 101)), "over the limit of 100"),
    "more ids than texts": (raw(text_message(ids=["a", "b", "c"])), "3 ids but 2 texts"),
    "negative sequence number": (raw(text_message(seq=-1)), "negative sequence"),
    "both texts and tokens": (raw(text_message(tokens=b"\0\0\0\0", lengths=b"\1\0\0\0\1\0\0\0",
                                               truncated=b"\0\0")), "both texts and token ids"),
    "neither texts nor tokens": (raw({k: v for k, v in text_message().items() if k != "texts"}),
                                 "neither texts nor token ids"),
    "token lengths that do not add up": (raw(text_message(texts=None, tokens=b"\0" * 8, lengths=b"\5\0\0\0\1\0\0\0",
                                                          truncated=b"\0\0")), "do not add up"),
    "zero-length token document": (raw(text_message(texts=None, tokens=b"\0" * 4, lengths=b"\0\0\0\0\1\0\0\0",
                                                    truncated=b"\0\0")), "no token ids"),
    "negative token id": (raw(text_message(texts=None, tokens=b"\xff\xff\xff\xff" * 2,
                                           lengths=b"\1\0\0\0\1\0\0\0", truncated=b"\0\0")), "negative token"),
    "text that is not a string": (raw(text_message(texts=[1, 2])), "Expected `str`"),
}


@pytest.mark.parametrize("case", sorted(BAD_MESSAGES))
def test_a_bad_message_is_refused_with_its_reason(case: str) -> None:
    payload, reason = BAD_MESSAGES[case]
    with pytest.raises(ProtocolError, match=reason):
        decode_batch(payload, job="j", limits=LIMITS)


def test_an_oversized_message_is_refused_before_it_is_parsed() -> None:
    payload = raw(text_message(texts=["x" * 600, "y" * 600]))
    with pytest.raises(ProtocolError, match="over the limit"):
        decode_batch(payload, job="j", limits=Limits(max_message_bytes=1000, max_doc_bytes=10**6))


def test_invalid_utf8_inside_a_text_is_refused() -> None:
    good = raw(text_message(texts=["AAAA", "BBBB"]))
    broken = good.replace(b"AAAA", b"\xff\xfe\xfd\xfc")
    with pytest.raises(ProtocolError, match="not valid UTF-8"):
        decode_batch(broken, job="j", limits=LIMITS)


def test_a_pickle_payload_is_never_unpickled() -> None:
    import pickle

    class Boom:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (exec, ("raise SystemExit('unpickled!')",))

    with pytest.raises(ProtocolError):
        decode_batch(pickle.dumps(Boom()), job="j", limits=LIMITS)
