"""`embedq profile`: tokenize a sample of a source and print the bucket lengths proposed for it.

The maths is `engines.profiles.propose_seq_lens`; this command reads the sample and prints.
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Annotated

import typer

from embedq.cli.options import (
    AsJsonOpt,
    FormatOpt,
    IdFieldOpt,
    MaxSeqOpt,
    ModelOpt,
    SourceArg,
    TextFieldOpt,
    TextUnitOpt,
)
from embedq.cli.settings import load_model, settings_from, source_spec
from embedq.errors import UsageError

if TYPE_CHECKING:
    import numpy as np

    from embedq.engines.profiles import SeqLenProposal
    from embedq.model import ModelInfo
    from embedq.producer.sources import SourceSpec


def profile(
    ctx: typer.Context,
    source: SourceArg,
    fmt: FormatOpt = "auto", id_field: IdFieldOpt = None, text_field: TextFieldOpt = "text",
    text_unit: TextUnitOpt = "line", model: ModelOpt = None, max_seq_len: MaxSeqOpt = None,
    sample: Annotated[int, typer.Option("--sample", help="Documents to tokenize (the first N).")] = 100_000,
    target_waste: Annotated[float, typer.Option("--target-waste", help="Padding allowed over real tokens.")] = 0.10,
    as_json: AsJsonOpt = False,
) -> None:
    """Propose bucket lengths (--seq-lens) for SOURCE from its token-length histogram.

    Pads at most --target-waste over the real tokens with the fewest profiles.
    """
    from embedq.engines.profiles import propose_seq_lens

    info = load_model(settings_from(ctx))
    lengths, truncated = _sample_lengths(source_spec(ctx.params), info, sample)
    if not lengths.size:
        raise UsageError("no usable documents in the sample")
    proposal = propose_seq_lens(lengths, truncated, info.max_seq_len, target_waste=target_waste)
    typer.echo(json.dumps(dataclasses.asdict(proposal), indent=1) if as_json else _render(proposal))


def _sample_lengths(spec: SourceSpec, model: ModelInfo, sample: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lengths and truncation flags of the first `sample` usable documents of the source."""
    import numpy as np

    from embedq.producer.sources import open_source
    from embedq.tokenization import Tokenizer

    tokenizer = Tokenizer(model.tokenizer_file, model.max_seq_len)
    lengths, truncated, seen = [], [], 0
    with open_source(spec) as src:
        for chunk in src.chunks(chunk_size=8192):
            texts = [t for i, t in enumerate(chunk.texts[: sample - seen]) if i not in chunk.problems]
            docs = tokenizer.encode(texts)
            lengths.append(docs.lengths)
            truncated.append(docs.truncated)
            seen += len(chunk.texts)
            if seen >= sample:
                break
    if not lengths:
        return np.zeros(0, np.int32), np.zeros(0, bool)
    return np.concatenate(lengths), np.concatenate(truncated)


def _render(proposal: SeqLenProposal) -> str:
    pct = proposal.percentiles
    return "\n".join([
        f"{proposal.documents:,} documents, {proposal.tokens:,} tokens: mean {proposal.mean:.1f}, "
        f"p50 {pct[50]}, p90 {pct[90]}, p99 {pct[99]}, max {proposal.max} "
        f"({proposal.truncated:,} truncated at {proposal.max_seq_len})",
        f"default profiles pad to {proposal.default_padding:.3f}x the real tokens",
        f"proposed profiles pad to {proposal.padding:.3f}x with {len(proposal.seq_lens)} lengths:",
        f"  --seq-lens {','.join(map(str, proposal.seq_lens))}",
    ])
