"""The exported ONNX file: checked, with the documented interface, cached and written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embedq.engines import onnx_export
from embedq.engines.cache import CACHE_DIR_ENV
from embedq.engines.onnx_export import EMBEDDINGS, INPUT_IDS, LENGTHS, export_onnx, onnx_path
from embedq.errors import EngineError
from embedq.model import ModelInfo

onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def exported(model_info: ModelInfo, onnx_cache_dir: Path) -> Path:
    return export_onnx(model_info, onnx_cache_dir)


def test_the_export_passes_the_onnx_checker(exported: Path) -> None:
    onnx.checker.check_model(str(exported))


def test_the_export_has_the_documented_inputs_outputs_and_dynamic_axes(
    exported: Path, model_info: ModelInfo
) -> None:
    graph = onnx.load(str(exported), load_external_data=False).graph

    def signature(values) -> list[tuple[str, int, list[str | int]]]:
        return [(v.name, v.type.tensor_type.elem_type,
                 [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]

    assert signature(graph.input) == [
        (INPUT_IDS, onnx.TensorProto.INT32, ["batch", "sequence"]),
        (LENGTHS, onnx.TensorProto.INT32, ["batch"]),
    ]
    assert signature(graph.output) == [(EMBEDDINGS, onnx.TensorProto.FLOAT, ["batch", model_info.dim])]


def test_the_export_records_which_model_and_settings_it_holds(exported: Path, model_info: ModelInfo) -> None:
    metadata = {p.key: p.value for p in onnx.load(str(exported), load_external_data=False).metadata_props}

    assert metadata["embedq.model_digest"] == model_info.digest
    assert metadata["embedq.pooling"] == model_info.pooling.value
    assert metadata["embedq.normalize"] == str(model_info.normalize)
    assert metadata["embedq.export_format"] == str(onnx_export.EXPORT_FORMAT)


def test_a_second_export_reuses_the_cached_file(
    exported: Path, model_info: ModelInfo, onnx_cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = exported.stat()

    def no_second_export(*_: object) -> None:
        raise AssertionError("exported again although the cache holds the file")

    monkeypatch.setattr(onnx_export, "_export", no_second_export)
    again = export_onnx(model_info, onnx_cache_dir)

    assert again == exported
    assert (again.stat().st_mtime_ns, again.stat().st_ino) == (before.st_mtime_ns, before.st_ino)
    assert [p.name for p in exported.parent.iterdir()] == [exported.name]


def test_an_export_that_fails_leaves_nothing_behind(
    model_info: ModelInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def half_written(_model: ModelInfo, destination: Path, *_: object) -> None:
        destination.write_bytes(b"\x08\x07 half an onnx file")
        raise EngineError("the exporter crashed")

    monkeypatch.setattr(onnx_export, "_export", half_written)
    with pytest.raises(EngineError, match="crashed"):
        export_onnx(model_info, tmp_path)

    assert not onnx_path(model_info, tmp_path).exists()
    assert list(onnx_path(model_info, tmp_path).parent.iterdir()) == []


def test_the_cache_is_keyed_by_pooling_and_normalization(model_info: ModelInfo, tmp_path: Path) -> None:
    paths = {
        onnx_path(model_info, tmp_path),
        onnx_path(model_info.with_overrides(pooling="cls"), tmp_path),
        onnx_path(model_info.with_overrides(normalize=False), tmp_path),
    }
    assert len(paths) == 3
    # The sequence length is a dynamic axis, so it does not split the cache.
    assert onnx_path(model_info.with_overrides(max_seq_len=128), tmp_path) == onnx_path(model_info, tmp_path)


def test_the_default_cache_dir_comes_from_the_environment(
    model_info: ModelInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path))
    assert onnx_path(model_info).is_relative_to(tmp_path)
    monkeypatch.delenv(CACHE_DIR_ENV)
    assert onnx_path(model_info).is_relative_to(Path.home() / ".cache" / "embedq" / "engines")


def test_the_graph_accepts_any_batch_and_sequence_size(exported: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    for rows, width in [(1, 3), (5, 40)]:
        ids = np.full((rows, width), 101, dtype=np.int32)
        lengths = np.arange(1, rows + 1, dtype=np.int32).clip(max=width)
        (out,) = session.run([EMBEDDINGS], {INPUT_IDS: ids, LENGTHS: lengths})
        assert out.shape == (rows, 384) and np.isfinite(out).all()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_export_writes_a_checked_graph_that_matches_torch(precision: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`embedq engine export`: the graph TensorRT builds from (fp16: strongly typed, in half precision),
    checked by onnx.checker and by ONNX Runtime against torch fp32 on the bundled sample texts."""
    import re

    import onnx
    from typer.testing import CliRunner

    from embedq.cli import app

    monkeypatch.setenv("EMBEDQ_CACHE_DIR", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["engine", "export", "--out", str(tmp_path / "out"), "--precision", precision])
    assert result.exit_code == 0, result.output
    found = re.search(r"min cosine (\d\.\d+), max L2 error", result.output)
    assert found and float(found.group(1)) >= (0.9999 if precision == "fp32" else 0.999), result.output
    graph = onnx.load(str(tmp_path / "out" / "model.onnx"))
    weights = {init.data_type for init in graph.graph.initializer if len(init.dims) == 2}
    assert weights == {onnx.TensorProto.FLOAT if precision == "fp32" else onnx.TensorProto.FLOAT16}
    assert {p.key: p.value for p in graph.metadata_props}["embedq.precision"] == precision
