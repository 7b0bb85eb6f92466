"""Pooling maths: token states `(B, S, D)` and lengths `(B,)` to one vector per document `(B, D)`.

The torch version runs on the device inside the torch engine and inside the exported ONNX graph;
the numpy version is the plain reference the tests hold both against. Both follow
sentence-transformers: mean divides by the count clamped at 1e-9, `last` is the token at
`lengths - 1` (right padding), and normalization is `torch.nn.functional.normalize` (eps 1e-12).
`skip` leaves a job's prompt out as sentence-transformers' Pooling `include_prompt=False` does: its
mask loses the first `skip` positions, so mean skips them and `cls` reads the first token after them
(the first still in the mask; position 0 when nothing is); `last` reads the last token as before.
torch is imported inside the functions, so this module imports without it.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

from embedq.model import Pooling

if TYPE_CHECKING:
    import torch

MEAN_COUNT_EPS = 1e-9
NORMALIZE_EPS = 1e-12


def pool_reference(hidden: np.ndarray, lengths: np.ndarray, pooling: Pooling, normalize: bool,
                   skip: int = 0) -> np.ndarray:
    """The numpy reference: pool `(B, S, D)` states of right-padded sequences into `(B, D)` float32,
    leaving out the first `skip` positions (see the module docstring)."""
    states = np.asarray(hidden, dtype=np.float64)
    lengths = np.asarray(lengths, dtype=np.int64)
    if pooling is Pooling.MEAN:
        positions = np.arange(states.shape[1])[None, :]
        keep = ((positions < lengths[:, None]) & (positions >= skip)).astype(np.float64)
        summed = np.einsum("bsd,bs->bd", states, keep)
        pooled = summed / np.maximum(keep.sum(axis=1, keepdims=True), MEAN_COUNT_EPS)
    elif pooling is Pooling.CLS:
        pooled = states[np.arange(states.shape[0]), np.where(lengths > skip, skip, 0)]
    elif pooling is Pooling.LAST:
        pooled = states[np.arange(states.shape[0]), lengths - 1]
    else:  # pragma: no cover - Pooling has exactly these members
        raise ValueError(f"unknown pooling {pooling!r}")
    if normalize:
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        pooled = pooled / np.maximum(norms, NORMALIZE_EPS)
    return pooled.astype(np.float32)


def pool_hidden_states(
    hidden: torch.Tensor, lengths: torch.Tensor, pooling: Pooling, normalize: bool, skip: int = 0
) -> torch.Tensor:
    """Pool `(B, S, D)` states of right-padded sequences into `(B, D)` float32, on their device,
    leaving out the first `skip` positions (see the module docstring)."""
    import torch

    # Pool in fp32 whatever the model ran in: a mean of 256 fp16 states loses digits otherwise,
    # and the output contract is float32 anyway.
    states = hidden.float()
    if pooling is Pooling.MEAN:
        positions = torch.arange(states.shape[1], device=states.device)
        keep = positions.unsqueeze(0) < lengths.unsqueeze(1)
        if skip:
            keep = keep & (positions.unsqueeze(0) >= skip)
        keep = keep.to(states.dtype)
        summed = (states * keep.unsqueeze(-1)).sum(dim=1)
        pooled = summed / keep.sum(dim=1, keepdim=True).clamp(min=MEAN_COUNT_EPS)
    elif pooling is Pooling.CLS and skip:
        index = (lengths > skip).long().mul(skip).view(-1, 1, 1).expand(-1, 1, states.shape[2])
        pooled = states.gather(1, index).squeeze(1)
    elif pooling is Pooling.CLS:
        pooled = states[:, 0]
    elif pooling is Pooling.LAST:
        # gather rather than advanced indexing: it exports to one ONNX GatherElements, which
        # TensorRT and ONNX Runtime both run without a host round trip.
        index = (lengths.long() - 1).view(-1, 1, 1).expand(-1, 1, states.shape[2])
        pooled = states.gather(1, index).squeeze(1)
    else:  # pragma: no cover - Pooling has exactly these members
        raise ValueError(f"unknown pooling {pooling!r}")
    if normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=1, eps=NORMALIZE_EPS)
    return pooled


def pooling_head(pooling: Pooling, normalize: bool, skip: int = 0) -> torch.nn.Module:
    """`pool_hidden_states` as an `nn.Module` taking `(hidden, lengths)`, to compose with a transformer."""
    return _pooling_head_class()(Pooling(pooling), normalize, skip)


@functools.cache
def _pooling_head_class() -> type[torch.nn.Module]:
    # The class is made on first use so that importing this module needs no torch.
    import torch

    class PoolingHead(torch.nn.Module):
        """Pooling and optional L2 normalization of right-padded token states."""

        def __init__(self, pooling: Pooling, normalize: bool, skip: int = 0) -> None:
            super().__init__()
            self.pooling = pooling
            self.normalize = normalize
            self.skip = skip

        def forward(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            return pool_hidden_states(hidden, lengths, self.pooling, self.normalize, self.skip)

        def extra_repr(self) -> str:
            return f"pooling={self.pooling.value}, normalize={self.normalize}, skip={self.skip}"

    return PoolingHead
