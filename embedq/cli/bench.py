"""`embedq bench`: the benchmark's options and their checks; the benchmark itself is `embedq.bench`.

Its options are its own, not settings: a benchmark states every number it ran with, whatever the
environment or `embedq.toml` say.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer

from embedq.cli.options import flag
from embedq.config import Unpad
from embedq.errors import UsageError

if TYPE_CHECKING:
    from embedq.bench.corpus import Corpus

_CORPORA = ["passages", "glosses"]
_LONG = "long"  # built from passages.parquet (`embedq.bench.corpus.long_documents`)
_MODELS = ["minilm", "bert-base"]
_TOKENIZE_MODES = ["producer", "worker"]


def bench(
    corpus: Annotated[list[str] | None, typer.Option(
        "--corpus", help="glosses, passages (from --corpus-dir), long (documents of a few thousand tokens, "
        "joined from the passages) or NAME=PATH of a Parquet file with id and text columns; repeatable.",
        metavar="NAME[=PATH]", show_default="glosses and passages")] = None,
    corpus_dir: Annotated[str | None, typer.Option(
        "--corpus-dir", help="Where glosses.parquet and passages.parquet are (`python tests/make_corpus.py DIR` "
        "builds them).", metavar="DIR", envvar="EMBEDQ_CORPUS_DIR", show_envvar=True,
        show_default="~/.cache/embedq-test-corpus")] = None,
    model_names: Annotated[list[str] | None, typer.Option(
        "--model", help="minilm (the real all-MiniLM-L6-v2), or random weights of a shape, for speed only: "
        "bert-base, tiny, qwen3-0.6b (a Qwen3-Embedding-0.6B decoder, to 8,192 tokens; time it with --precision "
        "bf16) or qwen3-tiny; repeatable.", metavar="NAME", show_default="minilm and bert-base")] = None,
    model_path: Annotated[str | None, typer.Option(
        "--model-path", help="Directory of the MiniLM weights.", metavar="DIR",
        show_default="the bundled model")] = None,
    tokenize: Annotated[list[str] | None, typer.Option(
        "--tokenize", help="Where tokenization happens: worker, or producer (--pretokenize); repeatable.",
        metavar="WHERE", show_default="both")] = None,
    repeat: Annotated[int, typer.Option("--repeat", help="Corpus copies (ids made distinct).", metavar="N")] = 1,
    limit: Annotated[int | None, typer.Option("--limit", help="Use only the first N documents of a corpus.",
                                              metavar="N", show_default="all")] = None,
    chunk: Annotated[int, typer.Option(
        "--chunk", help="Run every job chunked, as `embedq run --chunk`: documents cut into chunks of at most this "
        "many tokens, each embedded (0: truncated at the model's maximum).", metavar="TOKENS")] = 0,
    overlap: Annotated[int, typer.Option("--overlap", help="Text tokens that neighbouring chunks share (with "
                                         "--chunk).", metavar="TOKENS")] = 0,
    device: Annotated[str, typer.Option("--device", help="cuda, cuda:N or cpu.", metavar="DEVICE")] = "cuda",
    precision: Annotated[Literal["fp16", "bf16", "fp32"], typer.Option(
        "--precision", help="Engine precision.")] = "fp16",
    token_budget: Annotated[int, typer.Option("--token-budget", help="Padded tokens per engine batch.",
                                              metavar="TOKENS")] = 65536,
    window_docs: Annotated[int, typer.Option("--window-docs", help="Documents per window and part.",
                                             metavar="N")] = 32768,
    tokenizer_processes: Annotated[int | None, typer.Option(
        "--tokenizer-processes", help="Tokenizer pool size.", metavar="N", show_default="all cores but two")] = None,
    cuda_graphs: Annotated[bool, flag("--cuda-graphs/--no-cuda-graphs",
                                      help="Capture a CUDA graph per profile (models that run padded).")] = True,
    unpad: Annotated[Unpad, typer.Option("--unpad", help="Run BERT-family models unpadded (auto: hidden size "
                                         "768 and up).")] = "auto",
    baselines: Annotated[bool, flag("--baselines/--no-baselines",
                                    help="Also time sentence-transformers and the tokenizer alone.")] = True,
    check_precision: Annotated[bool, flag(
        "--check-precision", help="Also compare fp16 and bf16 with fp32 on every document (GPU).")] = False,
    json_out: Annotated[str, typer.Option("--json", help="Where to write the results.", metavar="FILE")] = "bench.json",
    plot_out: Annotated[str, typer.Option("--plot", help="Where to draw throughput per stage.",
                                          metavar="FILE")] = "bench.png",
    out_dir: Annotated[str | None, typer.Option(
        "--out-dir", help="Where the worker writes its Parquet parts (fsynced).", metavar="DIR",
        show_default="a temporary directory")] = None,
    replot: Annotated[list[str] | None, typer.Option(
        "--replot", help="Only draw --plot again from saved --json results (repeatable); runs nothing.",
        metavar="FILE", show_default=False)] = None,
    gpus: Annotated[str | None, typer.Option(
        "--gpus", help="Run each scenario on this many GPUs of this node instead, one worker process per GPU, "
        "comma-separated counts (1,2); 1 always runs first, for the scaling efficiency (of the whole run, and "
        "of each worker's steady rate, without its start and its last window). No baselines.",
        metavar="N,N,...", show_default="one in-process worker")] = None,
    redis: Annotated[str | None, typer.Option(
        "--redis", help="Redis URL to use.", metavar="URL",
        show_default="a private redis-server, so its memory figures are the benchmark's")] = None,
) -> None:
    """Measure end-to-end throughput on this machine against the GPU-only ceiling, sentence-transformers
    and the tokenizer alone; print a table, write JSON and a plot."""
    from embedq.bench import SHAPES, run_bench

    if replot:
        from embedq.bench import replot as draw

        draw([Path(p) for p in replot], Path(plot_out))
        return
    gpu_counts = _gpu_counts(gpus, device)
    _check_device(device)
    corpora = _corpora(corpus or _CORPORA, corpus_dir)
    models = model_names or _MODELS
    for name in models:
        if name != "minilm" and name not in SHAPES:
            raise UsageError(f"--model {name!r}: choose minilm or one of {', '.join(SHAPES)}")
    modes = tokenize or _TOKENIZE_MODES
    if set(modes) - set(_TOKENIZE_MODES):
        raise UsageError("--tokenize takes worker or producer")
    if chunk < 0 or overlap < 0 or (overlap and not chunk):
        raise UsageError(f"--chunk and --overlap take 0 or more tokens, --overlap only with --chunk; got --chunk "
                         f"{chunk} --overlap {overlap}")
    from embedq.tokenization import usable_cores

    processes = tokenizer_processes if tokenizer_processes is not None else max(1, len(usable_cores()) - 2)
    run_bench(corpora, models, modes, repeat=repeat, limit=limit, device=device, precision=precision,
              redis_url=redis, json_path=Path(json_out), plot_path=Path(plot_out), tokenizer_processes=processes,
              baselines=baselines, token_budget=token_budget, window_docs=window_docs,
              check_precision=check_precision, cuda_graphs=cuda_graphs, model_path=model_path,
              unpad=unpad, out_dir=Path(out_dir) if out_dir else None, gpu_counts=gpu_counts,
              fleet_tokenizer_processes=tokenizer_processes, chunk_tokens=chunk, chunk_overlap=overlap)


def _gpu_counts(spec: str | None, device: str) -> list[int] | None:
    """--gpus 1,2 -> [1, 2], checked against this machine's GPUs (on --device cpu: worker processes)."""
    if spec is None:
        return None
    try:
        counts = sorted({int(part) for part in spec.split(",") if part.strip()})
    except ValueError:
        raise UsageError(f"--gpus takes GPU counts such as 1,2; got {spec!r}") from None
    if not counts or counts[0] < 1:
        raise UsageError(f"--gpus takes GPU counts of at least 1; got {spec!r}")
    if device.startswith("cuda"):
        from embedq.engines.device import cuda_device_count

        available = cuda_device_count()
        if counts[-1] > available:
            raise UsageError(f"--gpus {spec}: this machine has {available} CUDA GPU(s)")
    return counts


def _check_device(device: str) -> None:
    """A benchmark on a GPU that is not there is a usage error, said before anything is loaded."""
    if not device.startswith("cuda"):
        return
    from embedq.engines.device import cuda_device_count

    count = cuda_device_count()
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        raise UsageError(f"embedq bench runs on {device} by default, and this machine has "
                         f"{'no CUDA GPU' if count == 0 else f'{count} CUDA GPU(s)'}; pass --device cpu to measure "
                         "this CPU (with --model tiny and --limit for a short run).")


def _corpora(items: list[str], corpus_dir: str | None) -> list[Corpus]:
    """Each --corpus: NAME=PATH, NAME.parquet in the corpus directory, or long (built from its passages)."""
    from embedq.bench.corpus import Corpus

    base = Path(corpus_dir or Path.home() / ".cache" / "embedq-test-corpus")
    corpora = []
    for item in items:
        name, _, path = item.partition("=")
        joined = name == _LONG and not path
        resolved = Path(path) if path else base / f"{'passages' if joined else name}.parquet"
        if resolved.is_file() and resolved.suffix != ".parquet":
            raise UsageError(f"corpus {name!r}: {resolved} is not a Parquet file; the benchmark reads Parquet with "
                             "id and text columns.")
        if not resolved.is_file():
            raise UsageError(f"corpus {name!r}: {resolved} does not exist; build it with "
                             f"`python tests/make_corpus.py {base}` or pass NAME=PATH.")
        corpora.append(Corpus(name, resolved, joined=joined))
    return corpora
