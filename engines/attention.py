"""Causal attention for a decoder in fp32 on a GPU, without an S x S matrix.

transformers' SDPA attention hands grouped-query attention (fewer key/value heads than query heads,
as in Qwen3) to torch with `enable_gqa`. On CUDA, torch 2.11 runs that in fp32 only in its math
kernel, which builds the (B, H, S, S) scores: 37 GiB for 16 rows of 8,192 tokens of a tiny Qwen3,
measured on the H200. With the key/value heads repeated first, the memory-efficient kernel runs
instead. In fp16 and bf16 the flash kernel takes grouped heads as they are, so embedq uses this only
for a decoder in fp32 on a GPU. There, as everywhere for a decoder, embedq passes no attention mask
(right padding: no real token attends to a pad), so a custom implementation, for which transformers
builds no mask, loses nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from embedq.errors import EngineError

if TYPE_CHECKING:
    import torch

NAME = "embedq_causal_repeated_kv"


def use_repeated_kv_attention(transformer: Any) -> None:
    """Switch a loaded transformers decoder to `causal_attention_repeating_kv`."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, causal_attention_repeating_kv)
    transformer.set_attn_implementation(NAME)


def causal_attention_repeating_kv(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention contract: (B, H, S, D) query, key and value in; (B, S, H, D) out."""
    import torch

    if attention_mask is not None or kwargs.get("sliding_window") is not None:
        raise EngineError("embedq's fp32 decoder attention takes neither an attention mask nor a sliding window")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, dropout_p=0.0, scale=scaling, is_causal=query.shape[2] > 1)
    return out.transpose(1, 2).contiguous(), None
