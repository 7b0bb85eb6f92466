"""How far fp16 and bf16 embeddings stray from fp32 on the benchmark's own documents."""

from __future__ import annotations

import numpy as np

from embedq.bench.scenarios import BENCH_BACKEND
from embedq.engines.factory import EngineSpec, engine_for
from embedq.model import ModelInfo


def precision_check(model: ModelInfo, texts: list[str], device: str, token_budget: int) -> dict[str, float]:
    """Lowest cosine of fp16 and bf16 embeddings against fp32, over every document given."""
    from embedq.tokenization import Tokenizer
    from embedq.worker.pipeline import embed_documents

    docs = Tokenizer(model.tokenizer_file, model.max_seq_len).encode(texts)
    vectors = {}
    for precision in ("fp32", "fp16", "bf16"):
        # Eager, as this check has always run (EngineSpec's default captures CUDA graphs), on the
        # default profile table.
        spec = EngineSpec(backend=BENCH_BACKEND, device=device, precision=precision, token_budget=token_budget,
                          cuda_graphs=False)
        with engine_for(model, spec) as engine:
            vectors[precision] = embed_documents(engine, docs, model.pad_token_id)
    reference = vectors["fp32"] / np.linalg.norm(vectors["fp32"], axis=1, keepdims=True)
    out: dict[str, float] = {}
    for precision in ("fp16", "bf16"):
        other = vectors[precision] / np.linalg.norm(vectors[precision], axis=1, keepdims=True)
        out[f"min_cosine_{precision}_vs_fp32"] = float((reference * other).sum(axis=1).min())
    out["documents"] = len(texts)
    return out
