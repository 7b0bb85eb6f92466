"""Format readers, one module per format, picked by name from a small registry (as engines/ picks backends).

Each reader implements `Reader` (formats/base.py): it counts a file's documents, yields their ids
for the scan and their documents for chunks, and says which id field and id type the source has.
The `Source` never asks which format it reads. Every reader needs pyarrow or msgspec, which the
producer imports anyway, so the registry imports them all.
"""

from __future__ import annotations

from embedq.producer.files import SourceFile
from embedq.producer.formats.base import IdBlock, Piece, Reader
from embedq.producer.formats.csv import CsvReader
from embedq.producer.formats.jsonl import JsonlReader
from embedq.producer.formats.parquet import ParquetReader
from embedq.producer.formats.text import TextReader
from embedq.producer.spec import SourceSpec

__all__ = ["READERS", "IdBlock", "Piece", "Reader", "make_reader"]

READERS: dict[str, type[Reader]] = {
    "parquet": ParquetReader, "jsonl": JsonlReader, "csv": CsvReader, "text": TextReader,
}


def make_reader(fmt: str, spec: SourceSpec, files: list[SourceFile]) -> Reader:
    """The reader of format `fmt` (a resolved format, not "auto") for a source's files."""
    return READERS[fmt](spec, files)
