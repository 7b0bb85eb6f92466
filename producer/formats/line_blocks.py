"""Reading a file as lines, for the line-based formats (JSON Lines, text) and for sniffing stdin.

Files are read in blocks of whole lines, never whole, so a huge file never sits in memory. A blank
line (ASCII whitespace only) is no document and takes no position; it is judged on the raw bytes,
the same way when counting lines to skip and when reading them, so that the two always agree on
positions. Line numbers are 1-based and count blank lines, so messages and text ids name the line
an editor shows. A UTF-8 byte order mark at the start of a file is dropped.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator

from embedq.producer.files import SourceFile, reading

BLANK_BYTES = b" \t\n\r\x0b\x0c"
# Text and JSONL files are read in blocks of whole lines: large enough that per-block overhead
# vanishes, small enough that a huge file never sits in memory at once.
BLOCK_BYTES = 8 << 20


def _blocks(f: SourceFile) -> Iterator[tuple[int, bytes]]:
    """(1-based number of its first line, block) over a file; a block is whole lines joined by "\\n"."""
    lineno = 1
    pending: list[bytes] = []  # the unfinished last line, in pieces (no quadratic re-joining)
    with reading(f.label), open(f.path, "rb") as fh:
        data = fh.read(BLOCK_BYTES).removeprefix(codecs.BOM_UTF8)
        while data:
            cut = data.rfind(b"\n")
            if cut < 0:
                pending.append(data)
            else:
                block = b"".join((*pending, data[:cut])) if pending else data[:cut]
                pending = [data[cut + 1:]]
                yield lineno, block
                lineno += block.count(b"\n") + 1
            data = fh.read(BLOCK_BYTES)
    tail = b"".join(pending)
    if tail:
        yield lineno, tail


def count_nonblank(f: SourceFile) -> int:
    """The non-blank lines of a file: its documents in a line-based format."""
    return sum(_count_nonblank(block) for _, block in _blocks(f))


def nonblank_lines(f: SourceFile, skip: int) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of every non-blank line after the first `skip` of them."""
    for first, block in _blocks(f):
        if skip:
            n = _count_nonblank(block)
            if n <= skip:
                skip -= n
                continue
        for i, line in enumerate(block.split(b"\n")):
            if line.strip(BLANK_BYTES):
                if skip:
                    skip -= 1
                    continue
                yield first + i, line


def _count_nonblank(block: bytes) -> int:
    return sum(1 for line in block.split(b"\n") if line.strip(BLANK_BYTES))
