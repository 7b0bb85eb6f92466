"""A BERT encoder of embedq's own, read straight from `model.safetensors`, for two reasons:

- **Start-up.** It needs torch and safetensors only: no `transformers` import (seconds) and no
  `from_pretrained` machinery. Architectures it does not know go to transformers as before.
- **Unpadded batches.** Given the batch's token count, it packs the real tokens of a padded batch
  into one `(T, hidden)` sequence, so the linear layers (most of BERT's work) skip the padding,
  and attention runs as variable-length flash attention (`torch.nn.attention.varlen`), without
  a mask. Packing uses `nonzero_static`, so it needs no host round trip; the shapes change per
  batch, so this path runs eager, not in a CUDA graph.

Without a token count it runs the padded batch as transformers' SDPA BERT does (a boolean mask),
which is what CUDA graphs capture. The maths follows transformers' `BertModel` (post-norm layers,
exact GELU, absolute positions, token type 0) and is held against it in the tests.
torch is imported inside the functions, so this module imports without it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedq.model import ModelInfo, Pooling

from .pooling import MEAN_COUNT_EPS, NORMALIZE_EPS, pool_hidden_states

if TYPE_CHECKING:
    import torch

WEIGHTS_FILE = "model.safetensors"


@functools.cache
def _varlen_attention() -> Any:
    """torch's variable-length flash attention, or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def native_unsupported(model: ModelInfo) -> str | None:
    """Why embedq's own BERT cannot run `model` (then transformers does), or None if it can."""
    path = Path(model.transformer_path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        return f"no readable config.json ({exc})"
    checks = {
        "model_type is not bert": config.get("model_type") != "bert",
        "position embeddings are not absolute": config.get("position_embedding_type", "absolute") != "absolute",
        "the activation is not exact GELU": config.get("hidden_act") != "gelu",
        f"no {WEIGHTS_FILE}": not (path / WEIGHTS_FILE).is_file(),
    }
    return next((why for why, failed in checks.items() if failed), None)


def load_native_bert(model: ModelInfo, *, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """The model as a `NativeBert` on `device` in `dtype`, with pooling and normalization."""
    from safetensors.torch import load_file

    from embedq.errors import EngineError

    path = Path(model.transformer_path)
    config = json.loads((path / "config.json").read_text())
    tensors = load_file(str(path / WEIGHTS_FILE), device=str(device))
    # Checkpoints of BertFor* heads keep the encoder under "bert."; take that part.
    prefix = "bert." if any(k.startswith("bert.encoder.") for k in tensors) else ""

    def weight(name: str) -> torch.Tensor:
        try:
            return tensors[prefix + name].to(dtype)
        except KeyError:
            raise EngineError(f"{path / WEIGHTS_FILE} has no {prefix + name}: the checkpoint is not a "
                              "BertModel's.") from None

    module = _native_class()(config, weight, model.pooling, model.normalize, model.pool_skip)
    return module.eval().requires_grad_(False)


@functools.cache
def _native_class() -> type[torch.nn.Module]:
    # Made on first use so that importing this module needs no torch. The modules hold the
    # checkpoint's tensors as they are (no random initialisation first: that alone took a second).
    import torch
    from torch import nn
    from torch.nn import functional as F

    Weights = Callable[[str], torch.Tensor]

    Pair = tuple[torch.Tensor, torch.Tensor]

    class Embeddings(nn.Module):
        def __init__(self, c: dict[str, Any], weight: Weights) -> None:
            super().__init__()
            self.eps = c.get("layer_norm_eps", 1e-12)
            self.words = weight("embeddings.word_embeddings.weight")
            self.positions = weight("embeddings.position_embeddings.weight")
            # Token type 0 for every token: its embedding is one constant vector.
            self.token_type = weight("embeddings.token_type_embeddings.weight")[0]
            self.norm = weight("embeddings.LayerNorm.weight"), weight("embeddings.LayerNorm.bias")

        def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            states = F.embedding(ids, self.words) + F.embedding(positions, self.positions) + self.token_type
            return F.layer_norm(states, states.shape[-1:], *self.norm, eps=self.eps)

    class Layer(nn.Module):
        """One post-norm encoder layer; query, key and value as one (3 hidden, hidden) projection."""

        def __init__(self, c: dict[str, Any], weight: Weights, index: int) -> None:
            super().__init__()
            self.eps = c.get("layer_norm_eps", 1e-12)
            self.heads = c["num_attention_heads"]

            def pair(name: str) -> Pair:
                return weight(f"encoder.layer.{index}.{name}.weight"), weight(f"encoder.layer.{index}.{name}.bias")

            self.attention_out = pair("attention.output.dense")
            self.attention_norm = pair("attention.output.LayerNorm")
            self.intermediate = pair("intermediate.dense")
            self.out = pair("output.dense")
            self.out_norm = pair("output.LayerNorm")
            query, key, value = (pair(f"attention.self.{p}") for p in ("query", "key", "value"))
            self.qkv = torch.cat([query[0], key[0], value[0]]), torch.cat([query[1], key[1], value[1]])

        def forward(self, states: torch.Tensor, attend: Any) -> torch.Tensor:
            q, k, v = F.linear(states, *self.qkv).unflatten(-1, (3, self.heads, -1)).unbind(-3)
            states = self._norm(states + F.linear(attend(q, k, v).flatten(-2), *self.attention_out),
                                self.attention_norm)
            inner = F.gelu(F.linear(states, *self.intermediate))
            return self._norm(states + F.linear(inner, *self.out), self.out_norm)

        def _norm(self, states: torch.Tensor, weights: Pair) -> torch.Tensor:
            return F.layer_norm(states, states.shape[-1:], *weights, eps=self.eps)

    class NativeBert(nn.Module):
        """BERT + pooling + normalization: `(input_ids (B, S), lengths (B,))` to `(B, dim)` float32;
        with `tokens` (the batch's real token count) it runs unpadded."""

        runs_unpadded = True

        def __init__(self, c: dict[str, Any], weight: Weights, pooling: Pooling, normalize: bool,
                     skip: int = 0) -> None:
            super().__init__()
            self.embeddings = Embeddings(c, weight)
            self.layers = nn.ModuleList(Layer(c, weight, i) for i in range(c["num_hidden_layers"]))
            self.pooling = Pooling(pooling)
            self.normalize = normalize
            self.skip = skip  # leading tokens (a prompt's) that pooling leaves out: `pooling.py`

        def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor, tokens: int | None = None) -> torch.Tensor:
            if tokens is None:
                return self._padded(input_ids, lengths)
            return self._unpadded(input_ids, lengths, tokens)

        def _padded(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            positions = torch.arange(ids.shape[1], device=ids.device)
            keep = positions.unsqueeze(0) < lengths.unsqueeze(1)
            mask = keep[:, None, None, :]

            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                # (B, S, heads, d) -> (B, heads, S, d) and back, as transformers' SDPA BERT does.
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     attn_mask=mask)
                return out.transpose(1, 2)

            states = self.embeddings(ids, positions.unsqueeze(0))
            for layer in self.layers:
                states = layer(states, attend)
            return pool_hidden_states(states, lengths, self.pooling, self.normalize, self.skip)

        def _unpadded(self, ids: torch.Tensor, lengths: torch.Tensor, tokens: int) -> torch.Tensor:
            rows, width = ids.shape
            keep = torch.arange(width, device=ids.device).unsqueeze(0) < lengths.unsqueeze(1)
            # Where each real token sits in the flattened batch: static size, so no host round trip.
            where = torch.nonzero_static(keep.flatten(), size=tokens).squeeze(1)
            positions = where % width
            starts = torch.zeros(rows + 1, dtype=torch.int32, device=ids.device)
            starts[1:] = torch.cumsum(lengths, 0)
            attend = _packed_attention(starts, keep, where)
            states = self.embeddings(ids.flatten()[where], positions)
            for layer in self.layers:
                states = layer(states, attend)
            return self._pool_packed(states.float(), where, starts, lengths, width)

        def _pool_packed(self, states: torch.Tensor, where: torch.Tensor, starts: torch.Tensor,
                         lengths: torch.Tensor, width: int) -> torch.Tensor:
            """`pool_hidden_states` for packed states (fp32): row i is the segment starts[i]:starts[i+1],
            `where` their places in the padded batch."""
            rows = lengths.shape[0]
            if self.pooling is Pooling.MEAN:
                # Summed in the padded layout (a scatter to distinct places, then a sum over the row),
                # not with index_add_: its atomic adds on CUDA would make the same batch come out
                # different in the last bits from one run to the next.
                padded = states.new_zeros(rows * width, states.shape[1])
                padded[where] = states
                summed = padded.view(rows, width, -1)[:, self.skip:].sum(1)
                counted = (lengths - self.skip).clamp(min=0) if self.skip else lengths
                pooled = summed / counted.to(states.dtype).unsqueeze(1).clamp(min=MEAN_COUNT_EPS)
            elif self.pooling is Pooling.CLS:
                first = starts[:-1].long() + (lengths > self.skip).long() * self.skip
                pooled = states[first]
            else:
                pooled = states[starts[1:].long() - 1]
            if self.normalize:
                pooled = F.normalize(pooled, p=2.0, dim=1, eps=NORMALIZE_EPS)
            return pooled

    def _packed_attention(starts: torch.Tensor, keep: torch.Tensor, where: torch.Tensor) -> Any:
        """Attention over packed rows: `starts` their segments, `keep` `(B, S)` the padded batch's
        real places, `where` the flat place of each packed token."""
        varlen = _varlen_attention()
        rows, width = keep.shape
        mask = keep[:, None, None, :]

        def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            result: torch.Tensor = varlen(q, k, v, starts, starts, width, width)
            return result

        def scattered(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # Where flash attention cannot run (CPU, fp32): back to (B, S) for SDPA with a mask.
            heads, d = q.shape[1:]

            def padded(x: torch.Tensor) -> torch.Tensor:
                out = x.new_zeros(rows * width, heads, d)
                out[where] = x
                return out.view(rows, width, heads, d).transpose(1, 2)

            out = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=mask)
            return out.transpose(1, 2).reshape(rows * width, heads, d)[where]

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if varlen is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
                return flash(q, k, v)
            return scattered(q, k, v)

        return attend

    return NativeBert
