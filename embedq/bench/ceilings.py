"""The ceilings around an end-to-end run: the tokenizer alone, the engine alone (GPU-only), and the
baseline people use, sentence-transformers `encode`, on the same texts and model."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from embedq.engines.base import Engine, Pending
    from embedq.model import ModelInfo
    from embedq.tokenization import Encode, TokenizedDocs


def measure_tokenizers(model: ModelInfo, texts: list[str], processes: int, *,
                       chunked: bool = False) -> dict[str, float]:
    """The tokenizer alone, as the job runs it (a `chunked` job's keeps every token): `tokenizers`
    with all cores (rayon), and embedq's process pool."""
    from embedq.tokenization import Tokenizer, TokenizerPool

    out = _time_encode("all_cores", Tokenizer.for_model(model, chunked=chunked).encode, texts)
    if processes > 0:
        with TokenizerPool.for_model(model, processes, chunked=chunked) as pool:
            out.update(_time_encode("pool", pool.encode, texts))
    return out


def _time_encode(name: str, encode: Encode, texts: list[str]) -> dict[str, float]:
    """`{name}_tokens_per_s` and `{name}_docs_per_s` of `encode` over `texts`, after a warm-up call."""
    encode(texts[:1000])
    started = time.perf_counter()
    docs = encode(texts)
    seconds = time.perf_counter() - started
    return {f"{name}_tokens_per_s": float(docs.lengths.sum()) / seconds, f"{name}_docs_per_s": len(texts) / seconds}


def warm_up(engine: Engine, pad_id: int) -> None:
    """One full batch through every profile, as a timed run should find the engine: a CUDA graph
    engine captures a profile's graph the first time a batch needs it, which took about 2 s of a
    fresh worker's first 40 on the H200 (and weighs twice as much in a run half as long)."""
    import numpy as np

    pending = [engine.submit(np.full((p.max_batch, p.max_seq_len), pad_id, dtype=np.int32),
                             np.full(p.max_batch, p.max_seq_len, dtype=np.int32)) for p in engine.profiles]
    for item in pending:
        item.result()


def measure_gpu_only(engine: Engine, docs: TokenizedDocs, pad_id: int) -> float:
    """The engine alone on the same buckets, every batch padded in host memory beforehand: seconds
    for all of `docs` (after a warm-up pass)."""
    from embedq.worker.buckets import pad_batch, plan_buckets

    buckets = plan_buckets(docs.lengths, engine.profiles)
    offsets = docs.offsets
    batches = [pad_batch(docs.tokens, offsets, docs.lengths, b.rows, b.profile.max_seq_len, pad_id)
               for b in buckets]

    def one_pass() -> float:
        started = time.perf_counter()
        pending: list[Pending] = []
        for ids, lengths in batches:
            pending.append(engine.submit(ids, lengths))
            if len(pending) >= 2:
                pending.pop(0).result()
        for item in pending:
            item.result()
        return time.perf_counter() - started

    one_pass()  # warm-up: every shape once (kernel choice, allocator, autotuning)
    return one_pass()


def sentence_transformers_batch(mean_tokens: float) -> int:
    """The batch size the baseline runs with for texts of `mean_tokens`: 256 for short texts, 128
    for passages, and 16 for documents of thousands of tokens, whose batches (padded to their
    longest, sorted by length) would otherwise reach hundreds of thousands of tokens; where attention
    materializes its scores, an 8k-token decoder holds batch x heads x length^2 of them a layer
    (34 GB at 16 x 16 x 8,192^2 in bf16)."""
    return 256 if mean_tokens < 64 else 128 if mean_tokens < 1000 else 16


def measure_sentence_transformers(model: ModelInfo, texts: list[str], tokens: int, device: str,
                                  precision: str) -> float:
    """sentence-transformers `encode` on `texts` (of `tokens` in all): seconds for all of them,
    after a warm-up on the first few batches."""
    # The baseline is sentence-transformers on torch as people run it, so torch directly here.
    import torch
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model.path), device=device)
    st = st.to({"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision])
    st.max_seq_length = model.max_seq_len
    batch = sentence_transformers_batch(tokens / max(1, len(texts)))
    st.encode(texts[:min(512, 4 * batch)], batch_size=batch)
    started = time.perf_counter()
    st.encode(texts, batch_size=batch)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    del st
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return seconds
