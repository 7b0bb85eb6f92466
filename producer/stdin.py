"""Stdin as a source: spooled to a temporary file, then read like any other file.

A source is read at least twice (a scan of its ids, then its documents, from any position on a
resumed run), and a pipe can be read only once, so stdin is first copied to a temporary file while
its content is digested (the fingerprint of a stdin source is its content, having no path or
mtime). With `format="auto"` its format is sniffed from its first bytes, since it has no suffix.
Removing the spool is the `Source`'s job.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import sys
import tempfile

from embedq.producer.files import PARQUET_MAGIC, SNIFF_BYTES, SourceFile
from embedq.producer.formats.line_blocks import BLANK_BYTES
from embedq.producer.spec import SourceSpec


def spool_stdin() -> tuple[str, str]:
    """Copy stdin to a temporary file (so it can be scanned, then read) and digest its content."""
    stream = getattr(sys.stdin, "buffer", sys.stdin)
    digest = hashlib.sha256()
    fd, path = tempfile.mkstemp(prefix="embedq-stdin-", suffix=".spool")
    try:
        with os.fdopen(fd, "wb") as out:
            while block := stream.read(1 << 20):
                if isinstance(block, str):  # a text-mode stdin without .buffer
                    block = block.encode("utf-8", "surrogateescape")
                digest.update(block)
                out.write(block)
    except BaseException:
        os.unlink(path)
        raise
    return path, digest.hexdigest()


def stdin_file(spool: str, spec: SourceSpec) -> SourceFile:
    """The spooled stdin as the source's one file, its format resolved."""
    st = os.stat(spool)
    fmt = spec.format
    if fmt == "auto":
        fmt = _sniff_stdin(spool)
    return SourceFile(spool, "stdin", "stdin", st.st_size, st.st_mtime_ns, fmt)


def _sniff_stdin(spool: str) -> str:
    """Parquet by magic bytes; JSONL if the first non-blank line starts with '{'; else text lines."""
    with open(spool, "rb") as fh:
        head = fh.read(SNIFF_BYTES)
        if head.startswith(PARQUET_MAGIC):
            return "parquet"
        head = head.removeprefix(codecs.BOM_UTF8)
        while head and not head.strip(BLANK_BYTES):  # only blanks so far: look further
            more = fh.read(SNIFF_BYTES)
            if not more:
                break
            head += more
    return "jsonl" if head.lstrip(BLANK_BYTES).startswith(b"{") else "text"
