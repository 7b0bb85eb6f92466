"""Causal attention for decoders: no mask, no host synchronization, no S x S matrix.

A decoder embedder runs right-padded, so no real token attends to a pad (they all come after it)
and causal attention needs no mask at all. transformers' own SDPA path still prepares one: with no
mask it checks the position ids for packed sequences (`(mask[:, -1] == 0).all()`), a host
synchronization in every forward (seen on the H200 with torch's sync debug mode). For an
implementation registered under its own name transformers builds no mask, so embedq registers this
one for every decoder: torch's SDPA, causal, straight on the heads. (Removing the sync did not
change the end-to-end rate of a 0.6B decoder on short passages, 24-26% of its GPU-only rate: there
the eager forward's own launch cost, about 22 ms a call on the H200 host, is the limit.)

Grouped-query attention (fewer key/value heads than query heads, as in Qwen3) goes to torch with
`enable_gqa` in fp16 and bf16, which the flash kernel takes as it is. In fp32 torch's CUDA SDPA has
no kernel for it but the math one, which builds the (B, H, S, S) scores (37 GiB for 16 rows of 8,192
tokens of a tiny Qwen3 on the H200), so there the key/value heads are repeated first and the
memory-efficient kernel runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from embedq.errors import EngineError

if TYPE_CHECKING:
    import torch

NAME = "embedq_causal"


def use_causal_attention(transformer: Any) -> None:
    """Switch a loaded transformers decoder to `causal_attention`."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, causal_attention)
    transformer.set_attn_implementation(NAME)


def causal_attention(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention contract: (B, H, S, D) query, key and value in; (B, S, H, D) out."""
    import torch

    if attention_mask is not None or kwargs.get("sliding_window") is not None:
        raise EngineError("embedq's decoder attention takes neither an attention mask nor a sliding window")
    groups = query.shape[1] // key.shape[1]
    causal = query.shape[2] > 1
    attend = torch.nn.functional.scaled_dot_product_attention
    if groups > 1 and query.dtype != torch.float32:
        out = attend(query, key, value, dropout_p=0.0, scale=scaling, is_causal=causal, enable_gqa=True)
    else:
        if groups > 1:
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
        out = attend(query, key, value, dropout_p=0.0, scale=scaling, is_causal=causal)
    return out.transpose(1, 2).contiguous(), None
