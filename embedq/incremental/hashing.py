"""Content hashes and id buckets: the two keys the incremental record is built on.

A document's content hash is BLAKE2b-128 of its text in UTF-8: 16 bytes, so two different texts
sharing a hash is out of reach at any corpus size (the dedupe flag compares hashes across ids, where
the birthday bound of a 64-bit hash would bite at about 4 billion documents).

An id's bucket key is a stable 32-bit hash of the id (CRC-32 of its UTF-8; for integer ids the high
half of id x 2^64/phi, Fibonacci hashing, in numpy): unlike Python's `hash`, it is the same in every
process, so a record written by one run partitions the same way in the next. Bucket `b` of `n` (a
power of two) holds the ids whose key has `key & (n - 1) == b`, so doubling `n` splits every bucket
in two without reading the others.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

HASH_BYTES = 16
ROWS_PER_BUCKET = 2_000_000  # about 60 MB of Arrow per bucket in memory (id, hash, generation)


def content_hash(text: str) -> bytes:
    """The 16-byte content hash of one document's text."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=HASH_BYTES).digest()


def content_hashes(texts: Sequence[str]) -> list[bytes]:
    """The content hash of every text."""
    return [content_hash(t) for t in texts]


def bucket_keys(ids: Sequence[Any]) -> np.ndarray:
    """A stable uint32 per id (see the module docstring)."""
    if len(ids) and isinstance(ids[0], int | np.integer):
        # Fibonacci hashing: the high half of id * 2^64/phi, in numpy (wrapping uint64 arithmetic).
        data = np.asarray(ids, dtype=np.int64).view(np.uint64)
        with np.errstate(over="ignore"):
            return ((data * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)).astype(np.uint32)
    return np.fromiter((zlib.crc32(str(i).encode("utf-8", "surrogatepass")) for i in ids), np.uint32, len(ids))


def bucket_count(rows: int) -> int:
    """How many buckets a record of `rows` ids is split into: a power of two, each about
    ROWS_PER_BUCKET ids or fewer, so the diff holds one bucket in memory at a time."""
    n = 1
    while rows > n * ROWS_PER_BUCKET:
        n *= 2
    return n
