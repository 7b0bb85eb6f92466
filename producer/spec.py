"""What to read and how: the source settings the CLI's --format, --id-field, --text-field, ... flags set.

`SourceSpec` is a plain record that every part of the producer reads (file listing, stdin, the
format readers) and that `check_spec` validates before anything is opened, so that a wrong flag
stops the run with a usage error before any file is touched. It lives apart from `sources.py` so
that the readers can depend on it without depending on the `Source` that uses them.
"""

from __future__ import annotations

from dataclasses import dataclass

from embedq.errors import UsageError

FORMATS = ("auto", "parquet", "jsonl", "csv", "text")
TEXT_UNITS = ("line", "file")
STDIN = "-"


@dataclass(frozen=True)
class SourceSpec:
    """What to read and how; the CLI's --format, --id-field, --text-field, ... flags."""

    path: str  # a file, a directory, or "-" for stdin
    format: str = "auto"  # auto | parquet | jsonl | csv | text; auto goes by suffix
    id_field: str | None = None  # None: the "id" column/field if present, else int64 positions
    text_field: str = "text"
    text_unit: str = "line"  # text format only: "line" or "file"
    csv_delimiter: str | None = None  # None: "," or "\t" for .tsv


def check_spec(spec: SourceSpec) -> None:
    """Raise UsageError for settings that contradict themselves or name nothing."""
    if spec.format not in FORMATS:
        raise UsageError(f"unknown source format {spec.format!r}; choose one of {', '.join(FORMATS)}")
    if spec.text_unit not in TEXT_UNITS:
        raise UsageError(f"unknown text unit {spec.text_unit!r}; choose 'line' or 'file'")
    if spec.format == "text" and spec.id_field is not None:
        raise UsageError("text sources take their ids from file paths and line numbers; drop --id-field")
    if spec.id_field is not None and spec.id_field == spec.text_field:
        raise UsageError(f"--id-field and --text-field both name {spec.id_field!r}; name two fields")
    if spec.csv_delimiter is not None and len(spec.csv_delimiter) != 1:
        raise UsageError(f"--csv-delimiter must be one character, not {spec.csv_delimiter!r}")
    if not spec.path:
        raise UsageError("no source path given; name a file, a directory, or - for stdin")
