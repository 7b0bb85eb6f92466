"""Source readers: every format yields the same documents at the same positions, every time."""

from __future__ import annotations

import gc
import io
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedq.errors import SourceError, UsageError
from embedq.producer import duplicates, stdin
from embedq.producer.formats import line_blocks
from embedq.producer.sources import Source, SourceSpec, open_source

DOCS = [("a-1", "the first document"), ("a-2", "a second one, with a comma"), ("a-3", "héllo wörld ✓"),
        ("a-4", 'quotes "inside" and\nan embedded newline'), ("a-5", "the fifth")]


# --- helpers -----------------------------------------------------------------------------------


def read_all(source: Source, start: int = 0, chunk_size: int = 4096) -> list[tuple[Any, str, str | None]]:
    """(id, text, problem) of every document from `start` on, checking chunk positions on the way."""
    out: list[tuple[Any, str, str | None]] = []
    for chunk in source.chunks(start, chunk_size):
        assert chunk.pos == start + len(out)
        assert len(chunk.ids) == len(chunk.texts)
        out.extend((i, t, chunk.problems.get(k)) for k, (i, t) in enumerate(zip(chunk.ids, chunk.texts, strict=True)))
    return out


def docs_of(spec: SourceSpec) -> list[tuple[Any, str, str | None]]:
    with open_source(spec) as source:
        return read_all(source)


def write_parquet(path: Path, ids: list[Any] | None, texts: list[Any], **kwargs: Any) -> Path:
    columns: dict[str, Any] = {} if ids is None else {"id": ids}
    columns["text"] = texts
    pq.write_table(pa.table(columns), path, **kwargs)
    return path


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_csv(path: Path, rows: Sequence[tuple[str, ...]], header: str = "id,text", delimiter: str = ",") -> Path:
    def field(value: str) -> str:
        return '"' + value.replace('"', '""') + '"' if any(c in value for c in f'"\n{delimiter}') else value

    lines = [header] + [delimiter.join(field(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def error_of(spec: SourceSpec, action: Callable[[Source], Any] = Source.scan) -> str:
    with pytest.raises(SourceError) as info, open_source(spec) as source:
        action(source)
    return str(info.value)


# --- every format round-trips ids and texts ---------------------------------------------------


def test_parquet_round_trips_string_ids_and_texts(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet", [i for i, _ in DOCS], [t for _, t in DOCS])
    assert docs_of(SourceSpec(str(path))) == [(i, t, None) for i, t in DOCS]


def test_parquet_round_trips_integer_ids_and_binary_texts(tmp_path: Path) -> None:
    table = pa.table({"id": pa.array([7, 3, 9], pa.uint32()),
                      "body": pa.array([b"x y", "é".encode(), b"z"], pa.large_binary())})
    pq.write_table(table, tmp_path / "d.pq")
    spec = SourceSpec(str(tmp_path / "d.pq"), text_field="body")
    assert docs_of(spec) == [(7, "x y", None), (3, "é", None), (9, "z", None)]
    with open_source(spec) as source:
        assert source.scan().id_type == "int64"


def test_jsonl_round_trips_and_ignores_other_fields(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "text": t, "extra": [1, 2]} for i, t in DOCS])
    assert docs_of(SourceSpec(str(path))) == [(i, t, None) for i, t in DOCS]


def test_csv_round_trips_quoted_texts_with_commas_and_newlines(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", DOCS)
    assert docs_of(SourceSpec(str(path))) == [(i, t, None) for i, t in DOCS]


def test_tsv_uses_a_tab_delimiter_by_suffix(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.tsv", DOCS, header="id\ttext", delimiter="\t")
    assert docs_of(SourceSpec(str(path))) == [(i, t, None) for i, t in DOCS]


def test_csv_delimiter_can_be_named(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", DOCS, header="id;text", delimiter=";")
    assert docs_of(SourceSpec(str(path), csv_delimiter=";")) == [(i, t, None) for i, t in DOCS]


def test_text_lines_are_documents_with_path_and_one_based_line_ids(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_bytes(b"\xef\xbb\xbffirst line\r\n\n   \nsecond line\nlast, no newline")
    assert docs_of(SourceSpec(str(tmp_path / "notes.txt"))) == [
        ("notes.txt:1", "first line", None), ("notes.txt:4", "second line", None),
        ("notes.txt:5", "last, no newline", None),
    ]


def test_text_files_are_one_document_each_with_relative_path_ids(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.md").write_text("# B\n\nbody\n")
    (tmp_path / "sub" / "a.txt").write_text("A")
    assert docs_of(SourceSpec(str(tmp_path), text_unit="file")) == [
        ("b.md", "# B\n\nbody\n", None), ("sub/a.txt", "A", None),
    ]


def test_a_file_with_an_unknown_suffix_is_read_as_text_when_it_is_text(tmp_path: Path) -> None:
    (tmp_path / "corpus.data").write_text("one\ntwo\n")
    assert [t for _, t, _ in docs_of(SourceSpec(str(tmp_path / "corpus.data")))] == ["one", "two"]


def test_a_parquet_file_without_the_suffix_is_recognised_by_its_magic_bytes(tmp_path: Path) -> None:
    write_parquet(tmp_path / "export", ["x"], ["hello"])
    with open_source(SourceSpec(str(tmp_path / "export"))) as source:
        assert source.format == "parquet"
        assert read_all(source) == [("x", "hello", None)]


def test_a_directory_reads_files_recursively_in_sorted_path_order_skipping_hidden(tmp_path: Path) -> None:
    for rel, ids in [("b.jsonl", ["b"]), ("a/z.jsonl", ["az"]), ("a.jsonl", ["a"]), ("a/b/c.jsonl", ["abc"]),
                     (".hidden.jsonl", ["h1"]), ("_SUCCESS.jsonl", ["h2"]), (".git/x.jsonl", ["h3"]),
                     ("_tmp/y.jsonl", ["h4"])]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(tmp_path / rel, [{"id": i, "text": f"text of {i}"} for i in ids])
    # Code-point order of the relative path: "a.jsonl" < "a/b/c.jsonl" < "a/z.jsonl" < "b.jsonl".
    assert [i for i, _, _ in docs_of(SourceSpec(str(tmp_path)))] == ["a", "abc", "az", "b"]


def test_an_explicit_format_reads_every_file_in_it(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "part-1.log", [{"id": 1, "text": "x"}])
    write_jsonl(tmp_path / "part-2.txt", [{"id": 2, "text": "y"}])
    assert docs_of(SourceSpec(str(tmp_path), format="jsonl")) == [(1, "x", None), (2, "y", None)]


def test_lines_are_numbered_right_across_read_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tiny blocks: lines, a BOM and a long line all straddle block boundaries.
    lines = ["short", "", "a much longer line that spans several blocks " * 3, "x", "\r", "end"]
    (tmp_path / "d.txt").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode())
    write_jsonl(tmp_path / "d.jsonl", [{"text": line} for line in lines if line.strip()])
    expected_text = docs_of(SourceSpec(str(tmp_path / "d.txt")))
    expected_jsonl = docs_of(SourceSpec(str(tmp_path / "d.jsonl")))
    assert [i for i, _, _ in expected_text] == ["d.txt:1", "d.txt:3", "d.txt:4", "d.txt:6"]
    monkeypatch.setattr(line_blocks, "BLOCK_BYTES", 7)
    assert docs_of(SourceSpec(str(tmp_path / "d.txt"))) == expected_text
    assert docs_of(SourceSpec(str(tmp_path / "d.jsonl"))) == expected_jsonl
    with open_source(SourceSpec(str(tmp_path / "d.txt"))) as source:
        assert read_all(source, start=2) == expected_text[2:]


def test_describe_names_the_path_format_and_fields(tmp_path: Path) -> None:
    write_parquet(tmp_path / "p.parquet", ["a"], ["x"])
    with open_source(SourceSpec(str(tmp_path / "p.parquet"))) as source:
        assert source.describe() == f"{tmp_path / 'p.parquet'} (parquet, id=id, text=text)"
    write_parquet(tmp_path / "q.parquet", None, ["x"])
    with open_source(SourceSpec(str(tmp_path))) as source:
        assert source.describe() == f"{tmp_path}/ (2 parquet files, id=id, text=text)"
    (tmp_path / "t.txt").write_text("x")
    with open_source(SourceSpec(str(tmp_path / "t.txt"))) as source:
        assert source.describe().endswith("(text, one document per line, id=path:line)")


# --- deterministic order; `start` equals slicing ----------------------------------------------


def _corpus_texts(n: int, tag: str) -> list[str]:
    return [f"{tag} document number {i} " + "word " * (i % 7) for i in range(n)]


@pytest.fixture(scope="module")
def sources_for_skipping(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SourceSpec]:
    """One source per format and layout, each some tens of documents long with uneven files."""
    root = tmp_path_factory.mktemp("skipping")
    specs: dict[str, SourceSpec] = {}
    texts = _corpus_texts(57, "p")
    # Row groups of 8 let `start` skip whole row groups, and batches cut inside them.
    specs["parquet"] = SourceSpec(str(write_parquet(root / "one.parquet", [f"p{i}" for i in range(57)],
                                                    texts, row_group_size=8)))
    pdir = root / "pdir"
    pdir.mkdir()
    for k, (lo, hi) in enumerate([(0, 5), (5, 5), (5, 31), (31, 40)]):  # one file is empty
        write_parquet(pdir / f"part-{k}.parquet", list(range(lo, hi)), texts[lo:hi], row_group_size=4)
    specs["parquet-dir"] = SourceSpec(str(pdir))
    records: list[Any] = [{"id": f"j{i}", "text": t} for i, t in enumerate(_corpus_texts(45, "j"))]
    jsonl = root / "one.jsonl"
    jsonl.write_text("".join(json.dumps(r) + ("\n\n   \n" if i % 5 == 0 else "\n") for i, r in enumerate(records)))
    specs["jsonl"] = SourceSpec(str(jsonl))
    jdir = root / "jdir"
    (jdir / "sub").mkdir(parents=True)
    write_jsonl(jdir / "a.jsonl", [{"text": t} for t in _corpus_texts(13, "a")])
    write_jsonl(jdir / "sub" / "b.ndjson", [{"text": t} for t in _corpus_texts(0, "b")])
    write_jsonl(jdir / "c.jsonl", [{"text": t} for t in _corpus_texts(21, "c")])
    specs["jsonl-dir-generated-ids"] = SourceSpec(str(jdir))
    specs["csv"] = SourceSpec(str(write_csv(root / "one.csv", [(str(i), t) for i, t in
                                                              enumerate(_corpus_texts(38, "c"))])))
    cdir = root / "cdir"
    cdir.mkdir()
    write_csv(cdir / "1.csv", [(f"x{i}", t) for i, t in enumerate(_corpus_texts(9, "x"))])
    write_csv(cdir / "2.csv", [(f"y{i}", t) for i, t in enumerate(_corpus_texts(17, "y"))])
    specs["csv-dir"] = SourceSpec(str(cdir))
    tdir = root / "tdir"
    (tdir / "deep").mkdir(parents=True)
    (tdir / "one.txt").write_text("\n".join(_corpus_texts(11, "t")) + "\n\n\n")
    (tdir / "deep" / "two.md").write_text("\n\n".join(_corpus_texts(23, "u")))
    (tdir / "three.txt").write_text("")
    specs["text-lines-dir"] = SourceSpec(str(tdir))
    fdir = root / "fdir"
    fdir.mkdir()
    for i, t in enumerate(_corpus_texts(19, "f")):
        (fdir / f"doc-{i:02d}.txt").write_text(t)
    specs["text-files-dir"] = SourceSpec(str(fdir), text_unit="file")
    return specs


FORMAT_CASES = ["parquet", "parquet-dir", "jsonl", "jsonl-dir-generated-ids", "csv", "csv-dir",
                "text-lines-dir", "text-files-dir"]


@pytest.mark.parametrize("case", FORMAT_CASES)
def test_reading_twice_yields_the_same_documents_in_the_same_order(
    sources_for_skipping: dict[str, SourceSpec], case: str
) -> None:
    first = docs_of(sources_for_skipping[case])
    assert first == docs_of(sources_for_skipping[case])
    with open_source(sources_for_skipping[case]) as source:
        assert source.scan().count == len(first)
        assert len({i for i, _, _ in first}) == len(first)


@pytest.mark.parametrize("case", FORMAT_CASES)
@pytest.mark.parametrize("scanned", [False, True], ids=["unscanned", "scanned"])
def test_start_skipping_equals_slicing_the_full_sequence(
    sources_for_skipping: dict[str, SourceSpec], case: str, scanned: bool
) -> None:
    spec = sources_for_skipping[case]
    full = docs_of(spec)
    with open_source(spec) as source:
        if scanned:  # a scan caches per-file counts; skipping must agree without them too
            source.scan()
        for start in [0, 1, 4, 5, 8, 9, 12, 13, 30, 31, len(full) - 1, len(full), len(full) + 3]:
            for chunk_size in [1, 3, 8, 64]:
                assert read_all(source, start, chunk_size) == full[start:], (start, chunk_size)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(FORMAT_CASES), start=st.integers(0, 60), chunk_size=st.integers(1, 70))
def test_chunks_are_full_size_and_aligned_to_start(
    sources_for_skipping: dict[str, SourceSpec], case: str, start: int, chunk_size: int
) -> None:
    with open_source(sources_for_skipping[case]) as source:
        count = source.scan().count
        chunks = list(source.chunks(start, chunk_size))
    assert [c.pos for c in chunks] == list(range(start, count, chunk_size))
    assert all(len(c.ids) == chunk_size for c in chunks[:-1])
    assert sum(len(c.ids) for c in chunks) == max(0, count - start)


def test_chunks_reject_a_negative_start_or_empty_chunks(tmp_path: Path) -> None:
    with open_source(SourceSpec(str(write_parquet(tmp_path / "d.parquet", ["a"], ["x"])))) as source:
        with pytest.raises(ValueError):
            source.chunks(-1)
        with pytest.raises(ValueError):
            source.chunks(0, 0)


# --- ids: generated, typed, checked -----------------------------------------------------------


def test_ids_are_int64_positions_when_there_is_no_id_field(tmp_path: Path) -> None:
    write_parquet(tmp_path / "1.parquet", None, ["a", "b"])
    write_parquet(tmp_path / "2.parquet", None, ["c"])
    with open_source(SourceSpec(str(tmp_path))) as source:
        assert source.id_field is None
        assert source.scan().id_type == "int64"
        assert read_all(source) == [(0, "a", None), (1, "b", None), (2, "c", None)]
        assert read_all(source, start=2) == [(2, "c", None)]
    write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}, {"text": "y"}])
    assert [i for i, _, _ in docs_of(SourceSpec(str(tmp_path / "d.jsonl")))] == [0, 1]
    write_csv(tmp_path / "d.csv", [("x",), ("y",)], header="text")
    assert [i for i, _, _ in docs_of(SourceSpec(str(tmp_path / "d.csv")))] == [0, 1]


def test_a_named_id_field_is_used_instead_of_id(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": 1, "key": "k1", "text": "x"}])
    assert docs_of(SourceSpec(str(path), id_field="key")) == [("k1", "x", None)]


def test_jsonl_integer_ids_stay_integers(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": -(2**63), "text": "x"}, {"id": 2**63 - 1, "text": "y"}])
    with open_source(SourceSpec(str(path))) as source:
        assert source.scan().id_type == "int64"
        assert [i for i, _, _ in read_all(source)] == [-(2**63), 2**63 - 1]


def test_csv_ids_are_int64_only_when_every_id_is_a_canonical_integer(tmp_path: Path) -> None:
    cases = {"ints": (["1", "-20", "300"], [1, -20, 300], "int64"),
             "zero-padded": (["007", "8", "9"], ["007", "8", "9"], "string"),
             "mixed": (["1", "2", "x"], ["1", "2", "x"], "string"),
             "too-big": (["1", "99999999999999999999"], ["1", "99999999999999999999"], "string")}
    for name, (raw, expected, id_type) in cases.items():
        path = write_csv(tmp_path / f"{name}.csv", [(i, "text") for i in raw])
        with open_source(SourceSpec(str(path))) as source:
            assert source.scan().id_type == id_type, name
            assert [i for i, _, _ in read_all(source)] == expected, name


@pytest.mark.parametrize(("bad_id", "kind"), [(1.5, "a float"), (True, "a boolean"), (None, "null"),
                                              ([1], "an array")])
def test_jsonl_ids_that_are_not_strings_or_integers_stop_with_their_position(
    tmp_path: Path, bad_id: Any, kind: str
) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": "x"}, {"id": bad_id, "text": "y"}])
    message = error_of(SourceSpec(str(path)))
    assert f"d.jsonl:2 (position 1): id {bad_id!r} is {kind}" in message


def test_jsonl_mixed_id_types_stop_at_the_first_offending_position(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}, {"id": 3, "text": "z"}])
    message = error_of(SourceSpec(str(path)))
    assert "d.jsonl:3 (position 2): ids are integers here but strings before" in message
    # chunks() checks too, also when it starts past the first document
    assert "position 2" in error_of(SourceSpec(str(path)), lambda s: read_all(s, start=1))


def test_jsonl_ids_beyond_int64_stop_the_source(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": 1, "text": "x"}, {"id": 2**63, "text": "y"}])
    assert "does not fit in int64" in error_of(SourceSpec(str(path)))


def test_mixed_id_types_across_parquet_files_name_the_first_offending_position(tmp_path: Path) -> None:
    write_parquet(tmp_path / "a.parquet", ["x", "y"], ["1", "2"])
    write_parquet(tmp_path / "b.parquet", [1, 2], ["3", "4"])
    message = error_of(SourceSpec(str(tmp_path)))
    assert "b.parquet (position 2): ids are integers here but strings before" in message
    assert "b.parquet (position 2)" in error_of(SourceSpec(str(tmp_path)), lambda s: read_all(s, start=2))


def test_mixed_id_types_across_csv_files_stop_the_source(tmp_path: Path) -> None:
    write_csv(tmp_path / "a.csv", [("1", "x")])
    write_csv(tmp_path / "b.csv", [("k", "y")])
    assert "b.csv (position 1): ids are strings here but integers before" in error_of(SourceSpec(str(tmp_path)))


def test_a_csv_file_of_only_a_header_does_not_set_the_id_type(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("id,text\n")
    write_csv(tmp_path / "b.csv", [("k", "y")])
    with open_source(SourceSpec(str(tmp_path))) as source:
        assert source.scan().id_type == "string"
        assert read_all(source) == [("k", "y", None)]


def test_an_empty_parquet_file_does_not_set_the_id_type(tmp_path: Path) -> None:
    write_parquet(tmp_path / "a.parquet", [], [])  # columns of type null
    write_parquet(tmp_path / "b.parquet", ["k"], ["y"])
    with open_source(SourceSpec(str(tmp_path))) as source:
        assert source.scan().id_type == "string"
        assert read_all(source) == [("k", "y", None)]


def test_a_parquet_float_id_column_stops_the_source(tmp_path: Path) -> None:
    write_parquet(tmp_path / "d.parquet", [1.0, 2.0], ["x", "y"])
    assert "id column 'id' has type double; ids must be strings or integers" in error_of(
        SourceSpec(str(tmp_path / "d.parquet")))


def test_a_null_parquet_id_stops_the_source_with_its_position(tmp_path: Path) -> None:
    write_parquet(tmp_path / "d.parquet", ["a", "b", None], ["x", "y", "z"])
    assert "the id at position 2 is null" in error_of(SourceSpec(str(tmp_path / "d.parquet")))
    assert "position 2" in error_of(SourceSpec(str(tmp_path / "d.parquet")), read_all)


def test_an_empty_csv_id_stops_the_source_with_its_row(tmp_path: Path) -> None:
    write_csv(tmp_path / "d.csv", [("a", "x"), ("", "y")])
    assert "data row 2 (position 1) has an empty id" in error_of(SourceSpec(str(tmp_path / "d.csv")))


def test_a_jsonl_id_field_present_only_after_the_first_line_is_still_required(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}, {"id": "b", "text": "y"}])
    assert "d.jsonl:1 (position 0): no 'id' field" in error_of(SourceSpec(str(tmp_path / "d.jsonl")))


def test_a_jsonl_line_without_the_id_field_stops_the_source(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": "x"}, {"text": "y"}])
    assert "d.jsonl:2 (position 1): no 'id' field" in error_of(SourceSpec(str(tmp_path / "d.jsonl")))


# --- duplicates --------------------------------------------------------------------------------


def test_scan_finds_duplicate_string_ids_with_their_positions(tmp_path: Path) -> None:
    write_parquet(tmp_path / "a.parquet", ["x", "y", "x"], ["1", "2", "3"])
    write_parquet(tmp_path / "b.parquet", ["z", "y", "x"], ["4", "5", "6"])
    scan = open_source(SourceSpec(str(tmp_path))).scan()
    assert scan.count == 6
    assert scan.n_duplicates == 3
    assert scan.duplicate_ids == [("x", 0, 2), ("y", 1, 4), ("x", 0, 5)]


def test_scan_finds_duplicate_integer_ids_and_reports_them_as_integers(tmp_path: Path) -> None:
    write_csv(tmp_path / "d.csv", [("5", "a"), ("6", "b"), ("5", "c")])
    assert open_source(SourceSpec(str(tmp_path / "d.csv"))).scan().duplicate_ids == [(5, 0, 2)]
    write_jsonl(tmp_path / "d.jsonl", [{"id": -1, "text": "a"}, {"id": -2, "text": "b"}, {"id": -2, "text": "c"}])
    scan = open_source(SourceSpec(str(tmp_path / "d.jsonl"))).scan()
    assert (scan.n_duplicates, scan.duplicate_ids) == (1, [(-2, 1, 2)])


def test_scan_counts_every_duplicate_but_keeps_ten_examples(tmp_path: Path) -> None:
    ids = [f"id-{i % 20}" for i in range(100)]
    write_parquet(tmp_path / "d.parquet", ids, ["t"] * 100)
    scan = open_source(SourceSpec(str(tmp_path / "d.parquet"))).scan()
    assert scan.n_duplicates == 80
    assert scan.duplicate_ids == [(f"id-{i}", i, 20 + i) for i in range(10)]


def test_scan_reports_no_duplicates_for_unique_ids_even_when_hashes_collide(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every id hashes alike: the second pass must compare the ids themselves.
    monkeypatch.setattr(duplicates, "hash_ids", lambda block: duplicates.np.zeros(len(block), duplicates.np.uint64))
    write_parquet(tmp_path / "d.parquet", ["a", "b", "c", "b"], ["t"] * 4)
    scan = open_source(SourceSpec(str(tmp_path / "d.parquet"))).scan()
    assert (scan.n_duplicates, scan.duplicate_ids) == (1, [("b", 1, 3)])


# --- fingerprints ------------------------------------------------------------------------------


def test_the_fingerprint_is_stable_and_independent_of_where_the_source_lies(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    write_jsonl(tmp_path / "a" / "d.jsonl", [{"text": "x"}])
    before = open_source(SourceSpec(str(tmp_path / "a"))).fingerprint
    assert open_source(SourceSpec(str(tmp_path / "a"))).scan().fingerprint == before
    os.rename(tmp_path / "a", tmp_path / "moved")
    assert open_source(SourceSpec(str(tmp_path / "moved"))).fingerprint == before


def test_the_fingerprint_changes_with_content_mtime_and_settings(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": "x", "body": "y"}])
    base = open_source(SourceSpec(str(path))).fingerprint
    assert open_source(SourceSpec(str(path), text_field="body")).fingerprint != base
    st_ = path.stat()
    os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns + 1))
    assert open_source(SourceSpec(str(path))).fingerprint != base


# --- stdin -------------------------------------------------------------------------------------


def _stdin(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def test_stdin_jsonl_is_detected_spooled_and_removed_on_close(monkeypatch: pytest.MonkeyPatch) -> None:
    _stdin(monkeypatch, b'\n{"id": "a", "text": "x"}\n{"id": "b", "text": "y"}\n')
    with open_source(SourceSpec("-")) as source:
        spool = source._spool
        assert spool is not None and os.path.exists(spool)
        assert source.format == "jsonl"
        assert source.describe() == "stdin (jsonl, id=id, text=text)"
        assert source.scan().count == 2
        assert read_all(source) == [("a", "x", None), ("b", "y", None)]
        assert read_all(source, start=1) == [("b", "y", None)]
    assert not os.path.exists(spool)


def test_stdin_text_is_read_by_line(monkeypatch: pytest.MonkeyPatch) -> None:
    _stdin(monkeypatch, b"one\n\ntwo\n")
    with open_source(SourceSpec("-")) as source:
        assert source.format == "text"
        assert read_all(source) == [("stdin:1", "one", None), ("stdin:3", "two", None)]


def test_stdin_accepts_a_plain_bytes_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.BytesIO(b"a\xffb\n"))
    with open_source(SourceSpec("-")) as source:
        assert read_all(source) == [("stdin:1", "", "invalid UTF-8 at byte 1")]


def test_stdin_fingerprint_is_a_digest_of_its_content(monkeypatch: pytest.MonkeyPatch) -> None:
    fingerprints = []
    for data in [b"one\n", b"one\n", b"two\n"]:
        _stdin(monkeypatch, data)
        with open_source(SourceSpec("-")) as source:
            fingerprints.append(source.fingerprint)
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]


def test_a_stdin_spool_is_removed_when_the_source_is_dropped_unclosed(monkeypatch: pytest.MonkeyPatch) -> None:
    _stdin(monkeypatch, b"one\n")
    source = open_source(SourceSpec("-"))
    spool = source._spool
    assert spool is not None and os.path.exists(spool)
    del source
    gc.collect()
    assert not os.path.exists(spool)


def test_a_stdin_spool_is_removed_when_opening_fails(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(stdin.tempfile, "tempdir", str(tmp_path))
    _stdin(monkeypatch, b'{"id": "a", "body": "x"}\n')
    with pytest.raises(SourceError):
        open_source(SourceSpec("-"))
    assert list(tmp_path.iterdir()) == []


# --- errors that stop the source ---------------------------------------------------------------


def test_a_missing_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"nope\.parquet does not exist; check the path"):
        open_source(SourceSpec(str(tmp_path / "nope.parquet")))


def test_an_unreadable_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    path.chmod(0)
    if os.geteuid() == 0:  # root reads anything: make the permission check see what a user would
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(path) else real_access(p, mode))
    for spec in [SourceSpec(str(path)), SourceSpec(str(tmp_path))]:
        with pytest.raises(SourceError, match=r"cannot read .*d\.jsonl: permission denied"):
            open_source(spec)


def test_a_pipe_given_as_a_path_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(SourceError, match="is not a regular file; to read a pipe, pass -"):
        open_source(SourceSpec(str(tmp_path / "fifo")))


def test_a_directory_without_documents_is_refused(tmp_path: Path) -> None:
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x.txt").write_text("hidden")
    with pytest.raises(SourceError, match="holds no readable documents"):
        open_source(SourceSpec(str(tmp_path)))


def test_a_source_whose_files_hold_no_documents_fails_its_scan(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("\n\n")
    (tmp_path / "b.txt").write_text("")
    assert "holds no documents (2 files, all empty or blank)" in error_of(SourceSpec(str(tmp_path)))


def test_a_directory_mixing_formats_is_refused_with_examples(tmp_path: Path) -> None:
    write_parquet(tmp_path / "a.parquet", ["a"], ["x"])
    (tmp_path / "README.md").write_text("about")
    with pytest.raises(SourceError, match=r"mixes file formats: 1 parquet \(a\.parquet\); 1 text \(README\.md\)"):
        open_source(SourceSpec(str(tmp_path)))


def test_a_binary_file_of_unknown_format_is_refused(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    (tmp_path / "b.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00\xff\x00")
    with pytest.raises(SourceError, match=r"cannot tell the format of .*b\.jsonl\.gz.*pass --format"):
        open_source(SourceSpec(str(tmp_path)))


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
@pytest.mark.parametrize(("role", "field"), [("text", {"text_field": "body"}), ("id", {"id_field": "key"})])
def test_a_missing_column_lists_the_columns_there_are(
    tmp_path: Path, fmt: str, role: str, field: dict[str, str]
) -> None:
    path = {"parquet": lambda: write_parquet(tmp_path / "d.parquet", ["a"], ["x"]),
            "jsonl": lambda: write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": "x"}]),
            "csv": lambda: write_csv(tmp_path / "d.csv", [("a", "x")])}[fmt]()
    name = next(iter(field.values()))
    with pytest.raises(SourceError, match=rf"no {role} column or field '{name}' \(it has: 'id', 'text'\); "
                                          rf"name the right one with --{role}-field"):
        open_source(SourceSpec(str(path), **field))


def test_a_later_file_without_the_text_column_is_named(tmp_path: Path) -> None:
    write_csv(tmp_path / "a.csv", [("a", "x")])
    write_csv(tmp_path / "b.csv", [("b", "y")], header="id,body")
    assert "b.csv has no text column or field 'text'" in error_of(SourceSpec(str(tmp_path)))
    write_parquet(tmp_path / "c.parquet", ["a"], ["x"])
    pq.write_table(pa.table({"id": ["b"], "body": ["y"]}), tmp_path / "d.parquet")
    spec = SourceSpec(str(tmp_path), format="parquet")
    (tmp_path / "a.csv").unlink()
    (tmp_path / "b.csv").unlink()
    assert "d.parquet has no text column or field 'text'" in error_of(spec, read_all)


def test_a_malformed_jsonl_line_is_named_by_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"id": "a", "text": "x"}\n\n{"id": "b", "text": \n')
    message = error_of(SourceSpec(str(tmp_path / "d.jsonl")))
    assert "d.jsonl:3: not valid JSON" in message and "fix or remove the line" in message


def test_a_jsonl_line_that_is_not_an_object_is_named(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"id": "a", "text": "x"}\n["b", "y"]\n')
    assert "d.jsonl:2: the line is an array, not a JSON object" in error_of(SourceSpec(str(tmp_path / "d.jsonl")))


def test_a_json_array_file_gets_a_hint_to_convert_it(tmp_path: Path) -> None:
    (tmp_path / "d.json").write_text('[\n{"id": "a", "text": "x"}\n]\n')
    with pytest.raises(SourceError, match=r"d\.json:1: .*jq -c"):
        open_source(SourceSpec(str(tmp_path / "d.json")))


def test_a_file_that_is_not_parquet_is_named(tmp_path: Path) -> None:
    (tmp_path / "d.parquet").write_text("id,text\na,x\n")
    with pytest.raises(SourceError, match=r"d\.parquet is not a readable Parquet file"):
        open_source(SourceSpec(str(tmp_path / "d.parquet")))


def test_a_csv_row_with_the_wrong_number_of_fields_is_named(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("id,text\na,x\nb\n")
    assert "d.csv: a row ('b') has 1 fields, not 2" in error_of(SourceSpec(str(tmp_path / "d.csv")))


@pytest.mark.parametrize("spec", [SourceSpec("x", format="xml"), SourceSpec("x", text_unit="page"),
                                  SourceSpec("x", format="text", id_field="id"),
                                  SourceSpec("x", id_field="text"), SourceSpec("x", csv_delimiter="||")])
def test_invalid_settings_are_usage_errors(spec: SourceSpec) -> None:
    with pytest.raises(UsageError):
        open_source(spec)


# --- per-document problems: kept, with a reason, never fatal ----------------------------------


def test_text_lines_with_invalid_utf8_are_kept_with_the_byte_offset(tmp_path: Path) -> None:
    (tmp_path / "d.txt").write_bytes(b"good\nab\xffcd\n\xe2\x82\nalso good\n")
    assert docs_of(SourceSpec(str(tmp_path / "d.txt"))) == [
        ("d.txt:1", "good", None), ("d.txt:2", "", "invalid UTF-8 at byte 2"),
        ("d.txt:3", "", "invalid UTF-8 at byte 0"), ("d.txt:4", "also good", None),
    ]


def test_text_files_that_are_empty_or_undecodable_are_kept_with_a_reason(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"fine")
    (tmp_path / "b.txt").write_bytes(b"")
    (tmp_path / "c.txt").write_bytes(b" \n\t")
    (tmp_path / "d.txt").write_bytes(b"ok\xc3(")
    assert docs_of(SourceSpec(str(tmp_path), text_unit="file")) == [
        ("a.txt", "fine", None), ("b.txt", "", "empty text"), ("c.txt", "", "empty text"),
        ("d.txt", "", "invalid UTF-8 at byte 2"),
    ]


def test_a_text_line_of_unicode_spaces_is_an_empty_document(tmp_path: Path) -> None:
    (tmp_path / "d.txt").write_text("x\n\u00a0\u3000\n")
    assert docs_of(SourceSpec(str(tmp_path / "d.txt")))[1] == ("d.txt:2", "", "empty text")


def test_jsonl_text_problems_are_kept_with_a_reason(tmp_path: Path) -> None:
    lines = [b'{"id": "a", "text": "fine"}', b'{"id": "b"}', b'{"id": "c", "text": null}',
             b'{"id": "d", "text": "  "}', b'{"id": "e", "text": 42}', b'{"id": "f", "text": "ab\xffc"}',
             b'{"id": "g", "text": "x\\ud800y"}', b'{"id": "h", "text": "\\u00e9 fine"}']
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    assert docs_of(SourceSpec(str(tmp_path / "d.jsonl"))) == [
        ("a", "fine", None), ("b", "", "missing text"), ("c", "", "missing text"), ("d", "", "empty text"),
        ("e", "", "text is an integer, not a string"), ("f", "", "invalid UTF-8 at byte 2"),
        ("g", "", "invalid Unicode: lone surrogate U+D800 at character 1"), ("h", "é fine", None),
    ]


def test_a_first_jsonl_document_without_text_is_a_problem_not_an_error(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d.jsonl", [{"id": "a"}, {"id": "b", "text": "y"}])
    assert docs_of(SourceSpec(str(tmp_path / "d.jsonl"))) == [("a", "", "missing text"), ("b", "y", None)]


def test_a_jsonl_id_with_invalid_utf8_stops_the_source(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_bytes(b'{"id": "a", "text": "x"}\n{"id": "b\xff", "text": "y"}\n')
    assert "d.jsonl:2 (position 1): the id is not valid UTF-8" in error_of(SourceSpec(str(tmp_path / "d.jsonl")))


def test_parquet_text_problems_are_kept_with_a_reason(tmp_path: Path) -> None:
    write_parquet(tmp_path / "s.parquet", ["a", "b", "c", "d"], ["fine", None, "", " \t\n"])
    assert docs_of(SourceSpec(str(tmp_path / "s.parquet"))) == [
        ("a", "fine", None), ("b", "", "missing text"), ("c", "", "empty text"), ("d", "", "empty text"),
    ]
    texts = pa.array([b"fine", b"bad\xff", None, b""], pa.binary())
    pq.write_table(pa.table({"id": [1, 2, 3, 4], "text": texts}), tmp_path / "b.parquet")
    assert docs_of(SourceSpec(str(tmp_path / "b.parquet"))) == [
        (1, "fine", None), (2, "", "invalid UTF-8 at byte 3"), (3, "", "missing text"), (4, "", "empty text"),
    ]


def test_csv_text_problems_are_kept_with_a_reason(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_bytes(b'id,text\na,fine\nb,\nc," "\nd,x\xffy\n')
    assert docs_of(SourceSpec(str(tmp_path / "d.csv"))) == [
        ("a", "fine", None), ("b", "", "empty text"), ("c", "", "empty text"), ("d", "", "invalid UTF-8 at byte 1"),
    ]


def test_problems_keep_their_index_when_chunks_span_files(tmp_path: Path) -> None:
    write_parquet(tmp_path / "1.parquet", ["a", "b"], ["x", ""])
    write_parquet(tmp_path / "2.parquet", ["c", "d", "e"], [None, "y", " "])
    with open_source(SourceSpec(str(tmp_path))) as source:
        chunks = list(source.chunks(1, chunk_size=3))
    assert [(c.pos, c.ids, c.problems) for c in chunks] == [
        (1, ["b", "c", "d"], {0: "empty text", 1: "missing text"}), (4, ["e"], {0: "empty text"}),
    ]


# --- the real corpora ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "count"), [("glosses", 117_659), ("passages", 14_518)])
def test_the_real_corpora_scan_and_read_completely(corpus_dir: Path, name: str, count: int) -> None:
    with open_source(SourceSpec(str(corpus_dir / f"{name}.parquet"))) as source:
        scan = source.scan()
        assert (scan.count, scan.id_type, scan.n_duplicates) == (count, "string", 0)
        n = 0
        for chunk in source.chunks(chunk_size=5000):
            assert chunk.pos == n
            n += len(chunk.ids)
        assert n == count
        last = list(source.chunks(start=count - 1))
        assert last[0].ids == [f"{name}-{count - 1}"] and last[0].texts[0]
