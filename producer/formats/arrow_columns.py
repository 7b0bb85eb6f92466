"""Arrow record batches as documents: what the two Arrow-based readers, Parquet and CSV, share.

A text column becomes texts and per-document problems in a few vectorized passes (UTF-8 checked for
the whole array at once, empty and whitespace-only texts found by compute kernels), falling back
to decoding value by value only when a column holds invalid UTF-8. Both readers also start a
resumed read part-way into a stream of batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedq.documents import EMPTY_TEXT, MISSING_TEXT
from embedq.producer.formats.base import decode_text

_BINARY_TO_STRING = {pa.binary(): pa.string(), pa.large_binary(): pa.large_string()}
# Compute kernels such as binary_length do not take the view types yet.
_VIEW_TO_PLAIN = {pa.string_view(): pa.large_string(), pa.binary_view(): pa.large_binary()}


def arrow_texts(arr: pa.Array) -> tuple[list[str], dict[int, str]]:
    """Texts of an Arrow string or binary array, with the problems of unusable ones; vectorized."""
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_null(arr.type):
        return [""] * len(arr), dict.fromkeys(range(len(arr)), MISSING_TEXT)
    if arr.type in _VIEW_TO_PLAIN:
        arr = arr.cast(_VIEW_TO_PLAIN[arr.type])
    if arr.type in _BINARY_TO_STRING:
        try:
            arr = arr.cast(_BINARY_TO_STRING[arr.type])  # checks the UTF-8 of the whole array at once
        except pa.ArrowInvalid:
            return _decode_each(arr.to_pylist())
    try:
        texts = arr.to_pylist()
    except UnicodeDecodeError:  # a string column that holds invalid UTF-8 after all
        return _decode_each(arr.cast(pa.large_binary()).to_pylist())
    problems: dict[int, str] = {}
    unusable = pc.or_(pc.equal(pc.binary_length(arr), 0), pc.utf8_is_space(arr))
    if arr.null_count:
        unusable = unusable.fill_null(True)
    if pc.any(unusable).as_py():
        for i in np.flatnonzero(unusable.to_numpy(zero_copy_only=False)).tolist():
            problems[i] = MISSING_TEXT if texts[i] is None else EMPTY_TEXT
            texts[i] = ""
    return texts, problems


def rows_after(skip: int, batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """The batches without their first `skip` rows."""
    for batch in batches:
        if skip >= batch.num_rows:
            skip -= batch.num_rows
            continue
        yield batch.slice(skip) if skip else batch
        skip = 0


def _decode_each(values: list[bytes | None]) -> tuple[list[str], dict[int, str]]:
    """The slow path for binary texts with invalid UTF-8: decode one by one."""
    texts: list[str] = []
    problems: dict[int, str] = {}
    for i, raw in enumerate(values):
        text, problem = ("", MISSING_TEXT) if raw is None else decode_text(raw)
        if problem:
            problems[i] = problem
        texts.append(text)
    return texts, problems
