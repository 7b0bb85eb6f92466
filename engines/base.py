"""The one abstraction every inference backend implements: `Engine`.

An engine is built or captured per bucket `Profile` (max_seq_len, max_batch). It takes token ids
already bucketed and padded, runs the transformer, pools and normalizes on its device, and hands
back only `(batch, dim)` float32. Used as a context manager: `__enter__` does the slow part
(load weights, export, build, capture), `__exit__` frees the device.

`submit` may return before the work is done (GPU engines run asynchronously and double-buffer);
`Pending.result()` blocks until that batch's embeddings are on the host. A caller that submits
batch k+1 before collecting batch k keeps the device busy while the host prepares the next one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from embedq.model import ModelInfo

PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True, order=True)
class Profile:
    """One bucket shape: sequences padded to `max_seq_len`, at most `max_batch` of them."""

    max_seq_len: int
    max_batch: int

    def __post_init__(self) -> None:
        if self.max_seq_len < 1 or self.max_batch < 1:
            raise ValueError(f"profile sizes must be positive, got {self}")

    @property
    def tokens(self) -> int:
        """Padded tokens of a full batch: the token budget this profile was sized to."""
        return self.max_seq_len * self.max_batch


@dataclass(frozen=True)
class EngineConfig:
    """What to build: the model and its settings, where, in what precision, for which shapes."""

    model: ModelInfo
    profiles: tuple[Profile, ...]
    device: str = "cpu"
    precision: str = "fp32"
    cache_dir: str | None = None
    threads: int | None = None
    # Capture the model once per profile ahead of time where the backend and device can (CUDA
    # graphs for torch on CUDA); backends without such a mode ignore it.
    cuda_graphs: bool = False
    # Run each batch without its padding where the backend can (the torch engine's own BERT on
    # CUDA: packed tokens, variable-length attention). Such batches change shape, so they run eager,
    # and `cuda_graphs` applies to the models that run padded.
    unpadded: bool = False
    # Backends with a cache of built engines (TensorRT): rebuild one built from anything else, or refuse it.
    rebuild: bool = True

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not self.profiles:
            raise ValueError("an engine needs at least one profile")


class Pending(Protocol):
    """A submitted batch; `result()` waits for it and returns `(batch, dim)` float32."""

    def result(self) -> np.ndarray: ...


@runtime_checkable
class Engine(Protocol):
    """An inference backend: activate with `with`, then `submit` padded batches."""

    name: str
    config: EngineConfig

    @property
    def dim(self) -> int: ...

    @property
    def profiles(self) -> Sequence[Profile]: ...

    def __enter__(self) -> Engine: ...

    def __exit__(self, *exc: object) -> None: ...

    def submit(self, input_ids: np.ndarray, lengths: np.ndarray) -> Pending:
        """Start one batch. `input_ids` is int32 `(B, S)` with S a profile's max_seq_len and
        B <= its max_batch, padded with the model's pad id; `lengths` is int32 `(B,)` (>= 1)."""
        ...


class EngineBase:
    """What every backend shares: its config, dimension and sorted profiles."""

    name = "base"

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._profiles = tuple(sorted(config.profiles))

    @property
    def dim(self) -> int:
        return self.config.model.dim

    @property
    def profiles(self) -> Sequence[Profile]:
        return self._profiles


class Done:
    """A `Pending` whose result is already computed (synchronous backends)."""

    __slots__ = ("_value",)

    def __init__(self, value: np.ndarray) -> None:
        self._value = value

    def result(self) -> np.ndarray:
        return self._value


def profile_for(profiles: Sequence[Profile], seq_len: int) -> Profile:
    """The profile a padded batch of width `seq_len` runs under (the one with that max_seq_len)."""
    for profile in profiles:
        if profile.max_seq_len == seq_len:
            return profile
    raise ValueError(f"no profile has max_seq_len {seq_len}; profiles are {list(profiles)}")


def check_batch(profiles: Sequence[Profile], input_ids: np.ndarray, lengths: np.ndarray) -> Profile:
    """Validate a submitted batch against the engine's profiles; returns the profile it fits."""
    if input_ids.ndim != 2 or lengths.shape != (input_ids.shape[0],):
        raise ValueError(f"input_ids must be (B, S) and lengths (B,), got {input_ids.shape}, {lengths.shape}")
    profile = profile_for(profiles, int(input_ids.shape[1]))
    if not 1 <= input_ids.shape[0] <= profile.max_batch:
        raise ValueError(f"batch of {input_ids.shape[0]} does not fit {profile}")
    if lengths.size and (int(lengths.min()) < 1 or int(lengths.max()) > profile.max_seq_len):
        raise ValueError(f"lengths must lie in 1..{profile.max_seq_len}")
    return profile
