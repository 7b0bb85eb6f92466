"""`embedq engine export|build`: the ONNX graph both ONNX Runtime and TensorRT run, and TensorRT plans.

`export` writes the graph (pooling and normalization inside) and checks it: `onnx.checker`, then
ONNX Runtime against the torch model in fp32 on sample texts (per-document cosine and L2 error).
`build` makes a TensorRT plan with one optimization profile per bucket, into the engine cache where
workers look for it (or `--out`), with its manifest; a worker builds it itself on first use
otherwise, so this command is for building ahead (a node image, a fleet's shared cache).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import numpy as np
import typer

from embedq.cli.options import ModelOpt, SeqLensOpt, TokenBudgetOpt
from embedq.errors import UsageError

if TYPE_CHECKING:
    from embedq.model import ModelInfo

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample.jsonl"
CHECK_DOCS = 256

ExportPrecision = Literal["fp32", "fp16", "bf16"]
CheckOpt = Annotated[bool, typer.Option("--check/--no-check", metavar="",
                                        help="Compare with the torch model in fp32 on the bundled sample texts.")]


def export(
    out: Annotated[str, typer.Option("--out", "-o", help="Directory for model.onnx.", metavar="DIR",
                                     show_default=False)],
    model: ModelOpt = None,
    precision: Annotated[ExportPrecision, typer.Option(
        "--precision", help="Type of the weights and computation (TensorRT builds in the graph's types).")] = "fp32",
    device: Annotated[str, typer.Option("--device", help="Where to trace the model.", metavar="DEVICE")] = "cpu",
    check: CheckOpt = True,
) -> None:
    """Export MODEL (pooling and normalization inside) to one ONNX file, checked against torch."""
    from embedq.engines.onnx_export import ONNX_FILE, export_onnx
    from embedq.model import load_model_info

    info = load_model_info(model)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    cached = export_onnx(info, precision=precision, device=device)
    target = folder / ONNX_FILE
    shutil.copyfile(cached, target)
    typer.echo(f"{target}: {target.stat().st_size / 1e6:.1f} MB, {precision}, opset 17, onnx.checker OK")
    if check:
        worst_cosine, worst_l2 = _check_onnx(info, target)
        typer.echo(f"ONNX Runtime against torch fp32 on {CHECK_DOCS} sample texts: min cosine {worst_cosine:.7f}, "
                   f"max L2 error {worst_l2:.2e}")
        if worst_cosine < (0.9999 if precision == "fp32" else 0.999):
            raise typer.Exit(8)


def build(
    source: Annotated[str | None, typer.Argument(
        help="A model directory, or an ONNX file from `embedq engine export`.", metavar="MODEL|ONNX",
        show_default="the bundled all-MiniLM-L6-v2")] = None,
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="With an ONNX file: the model it was exported from (for its tokenizer and digest).",
        metavar="DIR", show_default="the bundled all-MiniLM-L6-v2")] = None,
    precision: Annotated[ExportPrecision, typer.Option("--precision", help="Engine precision.")] = "fp16",
    device: Annotated[str, typer.Option("--device", help="The GPU to build for.", metavar="DEVICE")] = "cuda",
    seq_lens: SeqLensOpt = None, token_budget: TokenBudgetOpt = None,
    out: Annotated[str | None, typer.Option(
        "--out", "-o", help="Where to write engine.plan and manifest.json.", metavar="DIR",
        show_default="the engine cache workers load from ($EMBEDQ_CACHE_DIR or ~/.cache/embedq/engines)")] = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", metavar="", help="Build even if a matching plan is cached.")]
    = False,
) -> None:
    """Build a TensorRT engine for MODEL with one optimization profile per bucket (`--seq-lens`)."""
    from embedq.config import parse_seq_lens
    from embedq.engines.factory import GPU_TOKEN_BUDGET
    from embedq.engines.onnx_export import export_onnx
    from embedq.engines.profiles import DEFAULT_SEQ_LENS, profile_table
    from embedq.engines.tensorrt_build import cached_plan
    from embedq.model import load_model_info

    onnx_file: Path | None = None
    if source is not None and source.endswith(".onnx"):
        onnx_file = Path(source)
        if not onnx_file.is_file():
            raise UsageError(f"{onnx_file} does not exist")
    info = load_model_info(model if onnx_file is not None else source)
    lens = parse_seq_lens(seq_lens) if seq_lens else DEFAULT_SEQ_LENS
    profiles = profile_table(info.max_seq_len, token_budget or GPU_TOKEN_BUDGET, lens)
    if onnx_file is None:
        onnx_file = export_onnx(info, precision=precision, device=device)
    built = cached_plan(info, onnx_file, profiles, precision, device=device,
                        folder=Path(out) if out is not None else None, force=rebuild)
    manifest = built.manifest
    typer.echo(f"{built.folder}: {'built' if built.built_now else 'already cached'}, "
               f"{manifest['engine_bytes'] / 1e6:.1f} MB, {len(profiles)} profiles, {precision}, "
               f"{manifest['tensorrt']['flavour']} {manifest['tensorrt']['version']} for {manifest['gpu']['name']} "
               f"(compute capability {manifest['gpu']['compute_capability']}), built in {manifest['build_seconds']} s")
    typer.echo(json.dumps({k: manifest[k] for k in ("model_digest", "onnx_digest", "tokenizer_digest")}))


def _check_onnx(info: ModelInfo, path: Path) -> tuple[float, float]:
    """min cosine and max L2 distance per document between ONNX Runtime on `path` and torch fp32."""
    from embedq.api import encode
    from embedq.engines.onnx_export import run_onnxruntime
    from embedq.tokenization import Tokenizer

    texts = [json.loads(line)["text"] for line in SAMPLE.read_text(encoding="utf-8").splitlines()[:CHECK_DOCS]]
    reference = encode(texts, info.path, backend="torch", device="cpu", precision="fp32")
    docs = Tokenizer(info.tokenizer_file, info.max_seq_len).encode(texts)
    return compare(reference, run_onnxruntime(path, docs, info.pad_token_id))


def compare(reference: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """Per document, as the TensorRT BERT sample reports it: (min cosine, max L2 distance)."""
    reference, got = reference.astype(np.float64), got.astype(np.float64)
    cosine = (reference * got).sum(1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(got, axis=1))
    return float(cosine.min()), float(np.linalg.norm(reference - got, axis=1).max())


