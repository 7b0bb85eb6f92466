"""The plain-text reader: one document per non-blank line, or one per file (`text_unit`).

Text documents have no id field: a line's id is "relpath:line" (1-based, counting blank lines, so
it names the line an editor shows) and a file's id is "relpath", the '/'-separated path relative to
the source root. Those ids are unique by construction, so a text source needs no duplicate check,
but they must be valid UTF-8, which a file name need not be.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator

from embedq.errors import SourceError
from embedq.producer.files import SourceFile, reading
from embedq.producer.formats.base import IdBlock, Piece, Reader, decode_text, group_pieces
from embedq.producer.formats.line_blocks import count_nonblank, nonblank_lines
from embedq.producer.spec import SourceSpec


class TextReader(Reader):
    """Plain text: one document per non-blank line (id "relpath:line") or per file (id "relpath")."""

    def __init__(self, spec: SourceSpec, files: list[SourceFile]) -> None:
        super().__init__(spec, files)
        self.id_type = "string"
        for f in files:  # the paths become ids, which must be valid UTF-8
            try:
                f.rel.encode("utf-8")
            except UnicodeEncodeError:
                raise SourceError(
                    f"the name of {f.label!r} is not valid UTF-8 and cannot become a document id; rename it"
                ) from None

    def count(self, f: SourceFile, pos: int) -> int:
        if self.spec.text_unit == "file":
            return 1
        return count_nonblank(f)

    def id_blocks(self, f: SourceFile, pos: int) -> Iterator[IdBlock]:
        yield range(self.count(f, pos))

    def pieces(self, f: SourceFile, skip: int, size: int, pos: int) -> Iterator[Piece]:
        if self.spec.text_unit == "file":
            if not skip:
                with reading(f.label), open(f.path, "rb") as fh:
                    text, problem = decode_text(fh.read().removeprefix(codecs.BOM_UTF8))
                yield Piece([f.rel], [text], {0: problem} if problem else {})
            return
        docs = ((f"{f.rel}:{lineno}", *decode_text(line.removesuffix(b"\r")))
                for lineno, line in nonblank_lines(f, skip))
        yield from group_pieces(docs, size, with_ids=True)
