"""Duplicate ids: which documents of a source repeat an id first seen at an earlier position.

Found in two passes over the ids so that memory stays at about 8 bytes per document whatever the
ids are: the scan hashes every id into a uint64 (integer ids as themselves, exactly), and only the
ids whose hash occurs more than once are compared for real in a second pass, so a hash collision
never reports a duplicate. Generated ids (positions) and text ids (paths and lines) are unique by
construction and are not checked.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from embedq.producer.formats.base import IdBlock
from embedq.protocol import DocId

MAX_DUPLICATE_EXAMPLES = 10


def hash_ids(block: IdBlock) -> np.ndarray:
    """uint64 per id: integer ids as themselves (exact), string ids by Python's 64-bit hash."""
    if isinstance(block, np.ndarray):
        return block.view(np.uint64)
    return np.fromiter(map(hash, block), dtype=np.int64, count=len(block)).view(np.uint64)


class IdHashes:
    """The hashes of a source's ids, added block by block during its scan."""

    def __init__(self) -> None:
        self._blocks: list[np.ndarray] = []

    def add(self, block: IdBlock) -> None:
        self._blocks.append(hash_ids(block))

    def repeats(self, blocks: Iterable[IdBlock], *, as_int: bool
                ) -> tuple[list[int], list[tuple[DocId, int, int]]]:
        """The positions of ids seen at an earlier position, and up to MAX_DUPLICATE_EXAMPLES examples
        (id, first position, repeat position); `blocks` are the same ids again, from position 0, read
        only when some hash repeats. `as_int`: the ids are integers (CSV blocks hold them as strings)."""
        candidates = _repeated_hashes(self._blocks)
        if not candidates.size:
            return [], []
        first_seen: dict[DocId, int] = {}
        examples: list[tuple[DocId, int, int]] = []
        repeats: list[int] = []
        pos = 0
        for block in blocks:
            for i in np.flatnonzero(np.isin(hash_ids(block), candidates)).tolist():
                # CSV blocks hold integer ids as their canonical strings; report them as ints.
                doc_id = int(block[i]) if as_int else block[i]
                first = first_seen.setdefault(doc_id, pos + i)
                if first != pos + i:
                    repeats.append(pos + i)
                    if len(examples) < MAX_DUPLICATE_EXAMPLES:
                        examples.append((doc_id, first, pos + i))
            pos += len(block)
        return repeats, examples


def _repeated_hashes(blocks: list[np.ndarray]) -> np.ndarray:
    """The hash values that occur more than once; about 8 bytes per id, sorted in place."""
    hashes = np.concatenate(blocks) if blocks else np.empty(0, np.uint64)
    blocks.clear()  # the concatenated copy replaces the blocks
    hashes.sort()
    repeats = hashes[1:][hashes[1:] == hashes[:-1]]
    return np.unique(repeats)
