"""What makes a document embeddable: the rules the producer and the worker both apply.

The producer checks documents as it reads them (so it can dead-letter them before they travel);
the worker checks them again when a message arrives, because a message may come from an older
producer, a replay or another client. Both ask these functions, so the two can never disagree on
what is empty, what is too large, or which ids a job's Parquet can hold.
"""

from __future__ import annotations

from typing import Any

from embedq.protocol import DocId

EMPTY_TEXT = "empty text"
MISSING_TEXT = "missing text"
TOO_LARGE = "document over the size limit"
INVALID_UTF8 = "invalid UTF-8"

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
ID_TYPES = ("string", "int64")


def is_empty(text: str) -> bool:
    """No text, or whitespace only: nothing to embed."""
    return not text or text.isspace()


def too_large(text: str, max_bytes: int) -> bool:
    """Whether a text is over `max_bytes` UTF-8 bytes (checked per document, so one oversized
    document is set aside alone, not with its batch)."""
    # A character is at most 4 UTF-8 bytes: only texts longer than a quarter of the limit need
    # encoding to be measured, which keeps the check off the hot path for normal documents.
    return len(text) > max_bytes // 4 and len(text.encode("utf-8", "surrogatepass")) > max_bytes


def unicode_problem(text: str, *, surrogate_escaped: bool = False) -> str | None:
    """Why `text` cannot be encoded as UTF-8 (a lone surrogate), else None.

    A lone surrogate can arrive in valid msgpack or JSON (an escaped `\\ud800` re-encoded); the
    tokenizer would reject the whole batch on it. With `surrogate_escaped`, surrogates U+DC80..U+DCFF
    are bytes that Python's `surrogateescape` carried over from an undecodable file: reported as
    invalid UTF-8 at their byte offset.
    """
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as exc:
        char = text[exc.start]
        if surrogate_escaped and "\udc80" <= char <= "\udcff":
            return f"{INVALID_UTF8} at byte {len(text[:exc.start].encode('utf-8', 'surrogateescape'))}"
        return f"invalid Unicode: lone surrogate U+{ord(char):04X} at character {exc.start}"


def text_problem(text: str, *, allow_empty: bool, max_bytes: int) -> str | None:
    """The reason a decoded text cannot be embedded (a dead letter's reason), or None if it can."""
    if not allow_empty and is_empty(text):
        return EMPTY_TEXT
    if too_large(text, max_bytes):
        return TOO_LARGE
    if unicode_problem(text) is not None:
        return INVALID_UTF8
    return None


def fits_int64(value: int) -> bool:
    """Whether an integer id fits a Parquet int64 column."""
    return INT64_MIN <= value <= INT64_MAX


def id_fits(doc_id: Any, id_type: str) -> bool:
    """Whether `doc_id` can go into a job whose ids are `id_type` ("string" or "int64")."""
    if id_type == "int64":
        return type(doc_id) is int and fits_int64(doc_id)
    return type(doc_id) is str


def id_type_of(doc_id: DocId) -> str:
    """The job id type a single id belongs to."""
    return "int64" if isinstance(doc_id, int) else "string"
