"""The batch message: versioned msgpack, validated against schema and limits before any use."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from embedq.errors import ProtocolError
from embedq.protocol import (
    BAD_COMPRESSION,
    BAD_TOKENS,
    COMPRESSED,
    INVALID_UTF8,
    MESSAGE_TOO_LARGE,
    NO_DOCUMENTS,
    NOT_A_BATCH,
    NOT_MSGPACK,
    SCHEMA_VERSION,
    SCHEMA_VERSION_UNSUPPORTED,
    SHAPE_MISMATCH,
    WRONG_JOB,
    BatchMessage,
    Limits,
    decode_batch,
    encode_batch,
    uncompressed,
)

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


BAD_MESSAGES = {  # case: (payload, the reason code it is refused with)
    "not msgpack": (b"\xc1\xc1garbage", NOT_MSGPACK),
    "not a map": (msgspec.msgpack.encode([1, 2, 3]), NOT_A_BATCH),
    "wrong schema version": (raw(text_message(v=SCHEMA_VERSION + 1)), SCHEMA_VERSION_UNSUPPORTED),
    "old schema version with other fields": (raw({"v": 0, "docs": []}), SCHEMA_VERSION_UNSUPPORTED),
    "wrong job": (raw(text_message(job="other")), WRONG_JOB),
    "missing ids": (raw({k: v for k, v in text_message().items() if k != "ids"}), NOT_A_BATCH),
    "missing seq": (raw({k: v for k, v in text_message().items() if k != "seq"}), NOT_A_BATCH),
    "unknown field": (raw(text_message(extra=1)), NOT_A_BATCH),
    "ids of the wrong type": (raw(text_message(ids=[1.5, 2.5])), NOT_A_BATCH),
    "boolean ids": (raw(text_message(ids=[True, False])), NOT_A_BATCH),
    "no documents": (raw(text_message(ids=[], texts=[])), NO_DOCUMENTS),
    "too many documents": (raw(text_message(ids=list(range(101)), texts=["x"] * 101)), MESSAGE_TOO_LARGE),
    "more ids than texts": (raw(text_message(ids=["a", "b", "c"])), SHAPE_MISMATCH),
    "negative sequence number": (raw(text_message(seq=-1)), NOT_A_BATCH),
    "both texts and tokens": (raw(text_message(tokens=b"\0\0\0\0", lengths=b"\1\0\0\0\1\0\0\0",
                                               truncated=b"\0\0")), NOT_A_BATCH),
    "neither texts nor tokens": (raw({k: v for k, v in text_message().items() if k != "texts"}),
                                 NOT_A_BATCH),
    "token lengths that do not add up": (raw(text_message(texts=None, tokens=b"\0" * 8, lengths=b"\5\0\0\0\1\0\0\0",
                                                          truncated=b"\0\0")), SHAPE_MISMATCH),
    "zero-length token document": (raw(text_message(texts=None, tokens=b"\0" * 4, lengths=b"\0\0\0\0\1\0\0\0",
                                                    truncated=b"\0\0")), BAD_TOKENS),
    "negative token id": (raw(text_message(texts=None, tokens=b"\xff\xff\xff\xff" * 2,
                                           lengths=b"\1\0\0\0\1\0\0\0", truncated=b"\0\0")), BAD_TOKENS),
    "text that is not a string": (raw(text_message(texts=[1, 2])), NOT_A_BATCH),
}


@pytest.mark.parametrize("case", sorted(BAD_MESSAGES))
def test_a_bad_message_is_refused_with_its_reason(case: str) -> None:
    payload, code = BAD_MESSAGES[case]
    with pytest.raises(ProtocolError) as refused:
        decode_batch(payload, job="j", limits=LIMITS)
    assert refused.value.code == code, str(refused.value)


def test_an_oversized_message_is_refused_before_it_is_parsed() -> None:
    payload = raw(text_message(texts=["x" * 600, "y" * 600]))
    with pytest.raises(ProtocolError, match="over the limit") as refused:
        decode_batch(payload, job="j", limits=Limits(max_message_bytes=1000, max_doc_bytes=10**6))
    assert refused.value.code == MESSAGE_TOO_LARGE


def test_invalid_utf8_inside_a_text_is_refused() -> None:
    good = raw(text_message(texts=["AAAA", "BBBB"]))
    broken = good.replace(b"AAAA", b"\xff\xfe\xfd\xfc")
    with pytest.raises(ProtocolError, match="not valid UTF-8") as refused:
        decode_batch(broken, job="j", limits=LIMITS)
    assert refused.value.code == INVALID_UTF8


def test_a_pickle_payload_is_never_unpickled() -> None:
    import pickle

    class Boom:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (exec, ("raise SystemExit('unpickled!')",))

    with pytest.raises(ProtocolError):
        decode_batch(pickle.dumps(Boom()), job="j", limits=LIMITS)


# -- Compressed payloads (`--compress`)

def _long_text_message() -> BatchMessage:
    texts = [f"document {i}: the quick brown fox jumps over the lazy dog " * 8 for i in range(64)]
    return BatchMessage(v=SCHEMA_VERSION, job="j", seq=1, pos=64, ids=list(range(64)), texts=texts)


def test_a_compressed_batch_is_smaller_starts_with_a_byte_msgpack_never_starts_with_and_round_trips() -> None:
    message = _long_text_message()
    plain, packed = encode_batch(message), encode_batch(message, compress=True)
    assert packed.startswith(COMPRESSED) and not plain.startswith(COMPRESSED[:1])
    assert len(packed) < len(plain) / 4
    assert decode_batch(packed, job="j", limits=LIMITS) == message
    assert uncompressed(packed, LIMITS) == plain and uncompressed(plain, LIMITS) == plain
    tokens = BatchMessage(v=SCHEMA_VERSION, job="j", seq=0, pos=0, ids=[1, 2],
                          tokens=np.arange(8, dtype="<i4").tobytes(), lengths=np.array([3, 5], dtype="<i4").tobytes(),
                          truncated=b"\x00\x01")
    assert decode_batch(encode_batch(tokens, compress=True), job="j", limits=LIMITS) == tokens


def test_a_compressed_batch_states_its_size_which_is_held_to_the_limit_before_anything_is_decompressed() -> None:
    packed = encode_batch(_long_text_message(), compress=True)
    size = int.from_bytes(packed[2:6], "little")
    with pytest.raises(ProtocolError) as too_large:
        decode_batch(packed, job="j", limits=Limits(max_message_bytes=size - 1))
    assert too_large.value.code == MESSAGE_TOO_LARGE and "uncompressed" in str(too_large.value)
    # A stated size under the real one: decompression has no room for more and refuses, whatever
    # the frame says (no entry expands past what it states).
    understated = COMPRESSED + (size // 2).to_bytes(4, "little") + packed[6:]
    overstated = COMPRESSED + (size + 100).to_bytes(4, "little") + packed[6:]
    for broken in (understated, overstated, packed[:-5], packed[:4], packed[:6] + b"junk" * 10):
        with pytest.raises(ProtocolError) as refused:
            decode_batch(broken, job="j", limits=LIMITS)
        assert refused.value.code == BAD_COMPRESSION, broken[:12]
