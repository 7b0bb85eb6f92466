"""The batch message on the wire: versioned msgpack, typed and size-checked before use, never pickle.

A producer encodes one `BatchMessage` per stream entry; a worker decodes it with `decode_batch`,
which checks the raw size before parsing, the schema version and job after, and every document's
size. Anything that fails raises `ProtocolError` with a reason that goes into the dead letter.

A producer may compress the message (`--compress`): the entry then holds `COMPRESSED` (0xc1, a byte
that never begins msgpack, and "z"), the msgpack's size as a little-endian uint32, and the msgpack
compressed with zstd (pyarrow's codec, level 1). The worker reads both forms, whatever the job says,
so producers of one job may differ. Compression is for Redis: its publish script spends about half
its time on the bytes entering Lua, so fewer bytes mean more GPUs fed by one Redis core (README,
Scaling out). The size is checked against the limit before anything is decompressed, and
decompression writes into a buffer of exactly that size, so a small entry cannot expand past it.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
import numpy as np

from embedq.errors import ProtocolError
from embedq.tokenization import TokenizedDocs

SCHEMA_VERSION = 1
PAYLOAD_FIELD = b"m"  # the one field of a stream entry; short, since every entry carries it

DocId = str | int

# Why a message was refused: stable codes for scripts and tests (`ProtocolError.code`, a dead
# letter's `code`); the human wording beside them may change.
MESSAGE_TOO_LARGE = "message-too-large"  # over max_message_bytes or max_docs
NOT_MSGPACK = "not-msgpack"  # not msgpack at all, or cut short
INVALID_UTF8 = "invalid-utf8"  # a msgpack string that is not UTF-8
NOT_A_BATCH = "not-a-batch"  # msgpack, but not the batch schema (types, fields, both/neither payloads)
SCHEMA_VERSION_UNSUPPORTED = "schema-version"
WRONG_JOB = "wrong-job"
NO_DOCUMENTS = "no-documents"
SHAPE_MISMATCH = "shape-mismatch"  # ids, texts and token arrays of different lengths
BAD_TOKENS = "bad-tokens"  # a document without token ids, a negative id
NO_PAYLOAD = "no-payload"  # a stream entry without the payload field
BAD_COMPRESSION = "bad-compression"  # a compressed payload that does not decompress to its stated size
REASON_CODES = (MESSAGE_TOO_LARGE, NOT_MSGPACK, INVALID_UTF8, NOT_A_BATCH, SCHEMA_VERSION_UNSUPPORTED, WRONG_JOB,
                NO_DOCUMENTS, SHAPE_MISMATCH, BAD_TOKENS, NO_PAYLOAD, BAD_COMPRESSION)
COMPRESSED = b"\xc1z"  # a compressed payload's first bytes (module docstring)
_SIZE_BYTES = 4


@dataclass(frozen=True)
class Limits:
    """Hard limits on what a message may hold; a message over them is dead-lettered unread."""

    max_message_bytes: int = 32 << 20
    max_doc_bytes: int = 1 << 20
    max_docs: int = 1 << 16

    def __post_init__(self) -> None:
        if min(self.max_message_bytes, self.max_doc_bytes, self.max_docs) <= 0:
            raise ValueError("message limits must be positive")


class BatchMessage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One batch of documents: either texts, or token ids when the producer pretokenized.

    `tokens` is the int32 little-endian concatenation of every document's ids, `lengths` their
    int32 counts and `truncated` one byte per document; arrays travel as bytes, never as lists.
    """

    v: int
    job: str
    seq: int
    pos: int
    ids: list[DocId]
    texts: list[str] | None = None
    tokens: bytes | None = None
    lengths: bytes | None = None
    truncated: bytes | None = None

    @property
    def pretokenized(self) -> bool:
        return self.tokens is not None

    def __len__(self) -> int:
        return len(self.ids)

    def token_docs(self) -> TokenizedDocs:
        """The message's token ids as a document table (views over the message bytes)."""
        tokens, lengths, truncated = self.token_arrays()
        return TokenizedDocs(tokens, lengths, truncated)

    def token_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, lengths, truncated) as numpy views over the message bytes (no copy)."""
        if self.tokens is None or self.lengths is None or self.truncated is None:
            raise ProtocolError("message carries texts, not token ids", code=NOT_A_BATCH)
        return (
            np.frombuffer(self.tokens, dtype="<i4"),
            np.frombuffer(self.lengths, dtype="<i4"),
            np.frombuffer(self.truncated, dtype=np.uint8).astype(bool),
        )


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(BatchMessage)


def encode_batch(message: BatchMessage, *, compress: bool = False) -> bytes:
    """The payload of one stream entry: msgpack, or with `compress` msgpack compressed (module docstring)."""
    raw = _encoder.encode(message)
    if not compress:
        return raw
    import pyarrow as pa

    return COMPRESSED + len(raw).to_bytes(_SIZE_BYTES, "little") + pa.compress(raw, codec="zstd", asbytes=True)


def uncompressed(payload: bytes, limits: Limits) -> bytes:
    """The msgpack of a payload, compressed or not; raises ProtocolError for one over the limits or corrupt."""
    if len(payload) > limits.max_message_bytes:
        raise ProtocolError(f"message is {len(payload)} bytes, over the limit of {limits.max_message_bytes}",
                            code=MESSAGE_TOO_LARGE)
    if not payload.startswith(COMPRESSED):
        return payload
    head = len(COMPRESSED) + _SIZE_BYTES
    if len(payload) < head:
        raise ProtocolError("compressed message is cut short before its size", code=BAD_COMPRESSION)
    size = int.from_bytes(payload[len(COMPRESSED):head], "little")
    if size > limits.max_message_bytes:
        raise ProtocolError(f"message is {size} bytes uncompressed, over the limit of {limits.max_message_bytes}",
                            code=MESSAGE_TOO_LARGE)
    import pyarrow as pa

    try:
        raw = pa.decompress(payload[head:], decompressed_size=size, codec="zstd", asbytes=True)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ProtocolError(f"compressed message does not decompress ({exc})", code=BAD_COMPRESSION) from exc
    if len(raw) != size:
        raise ProtocolError(f"compressed message decompresses to {len(raw)} bytes, not the {size} it states",
                            code=BAD_COMPRESSION)
    return bytes(raw)


def decode_batch(raw: bytes, *, job: str, limits: Limits) -> BatchMessage:
    """Parse and validate one entry's payload; raises ProtocolError naming what is wrong."""
    raw = uncompressed(raw, limits)
    try:
        message = _decoder.decode(raw)
    except msgspec.ValidationError as exc:
        version = _peek_version(raw)
        if version is not None and version != SCHEMA_VERSION:
            raise ProtocolError(f"schema version {version} is not supported (this worker reads {SCHEMA_VERSION})",
                                code=SCHEMA_VERSION_UNSUPPORTED) from exc
        raise ProtocolError(f"message does not match the batch schema: {exc}", code=NOT_A_BATCH) from exc
    except msgspec.DecodeError as exc:
        # msgspec < 0.23 raised UnicodeDecodeError for a str that is not UTF-8; 0.23 raises DecodeError
        # and says so in its message (the one place that reads a library's wording, pinned by a test).
        if "utf-8" in str(exc).lower():
            raise ProtocolError(f"message holds a string that is not valid UTF-8 ({exc})", code=INVALID_UTF8) from exc
        raise ProtocolError(f"message is not valid msgpack ({exc})", code=NOT_MSGPACK) from exc
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"message holds a string that is not valid UTF-8 ({exc})", code=INVALID_UTF8) from exc
    validate_batch(message, job=job, limits=limits)
    return message


def validate_batch(message: BatchMessage, *, job: str, limits: Limits) -> None:
    """Check the invariants a schema cannot express: version, job, shapes, per-document sizes."""
    if message.v != SCHEMA_VERSION:
        raise ProtocolError(f"schema version {message.v} is not supported (this worker reads {SCHEMA_VERSION})",
                            code=SCHEMA_VERSION_UNSUPPORTED)
    if message.job != job:
        raise ProtocolError(f"message belongs to job {message.job!r}, not {job!r}", code=WRONG_JOB)
    if message.seq < 0 or message.pos < 0:
        raise ProtocolError(f"negative sequence number or position ({message.seq}, {message.pos})", code=NOT_A_BATCH)
    n = len(message.ids)
    if n == 0:
        raise ProtocolError("message holds no documents", code=NO_DOCUMENTS)
    if n > limits.max_docs:
        raise ProtocolError(f"message holds {n} documents, over the limit of {limits.max_docs}", code=MESSAGE_TOO_LARGE)
    if message.texts is not None:
        if message.tokens is not None:
            raise ProtocolError("message carries both texts and token ids", code=NOT_A_BATCH)
        if len(message.texts) != n:
            raise ProtocolError(f"{n} ids but {len(message.texts)} texts", code=SHAPE_MISMATCH)
    else:
        _check_token_shapes(message, n, limits)


def _check_token_shapes(message: BatchMessage, n: int, limits: Limits) -> None:
    if message.tokens is None or message.lengths is None or message.truncated is None:
        raise ProtocolError("message carries neither texts nor token ids", code=NOT_A_BATCH)
    if len(message.tokens) % 4 or len(message.lengths) != 4 * n or len(message.truncated) != n:
        raise ProtocolError("token arrays do not match the number of documents", code=SHAPE_MISMATCH)
    lengths = np.frombuffer(message.lengths, dtype="<i4")
    if lengths.min() <= 0:
        raise ProtocolError("a document has no token ids (every document needs at least one)", code=BAD_TOKENS)
    if int(lengths.sum()) * 4 != len(message.tokens):
        raise ProtocolError("token lengths do not add up to the token array", code=SHAPE_MISMATCH)
    tokens = np.frombuffer(message.tokens, dtype="<i4")
    if tokens.size and int(tokens.min()) < 0:
        raise ProtocolError("negative token id", code=BAD_TOKENS)


def _peek_version(raw: bytes) -> int | None:
    try:
        loose = msgspec.msgpack.decode(raw)
    except msgspec.DecodeError:
        return None
    version = loose.get("v") if isinstance(loose, dict) else None
    return version if isinstance(version, int) else None
