"""The double-buffered CUDA pipeline every GPU backend shares: H2D copy -> run -> D2H of `(B, dim)`.

Each profile owns a ring of staging slots (pinned host inputs and outputs, device inputs and an
output buffer): `submit` fills a slot's pinned buffers, copies them to the device on a copy
stream, runs the batch on a compute stream once the copy's event fires, and copies only
`(B, dim)` float32 back into the slot's pinned output; `result()` waits on that batch's event.
What "runs the batch" means is the backend's `BatchRunner`: the torch module (eager or a captured
CUDA graph), or a TensorRT execution context. torch provides the memory, streams and events.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from embedq.errors import EngineError

from .base import Pending, Profile

if TYPE_CHECKING:
    import torch


class BatchRunner(Protocol):
    """What a backend does on the compute stream for one batch."""

    def prepare(self, profiles: Sequence[Profile], stream: torch.cuda.Stream) -> None:
        """Once, before the first batch (capture graphs, select optimization profiles)."""
        ...

    def run(self, profile: Profile, ids: torch.Tensor, lengths: torch.Tensor, rows: int, tokens: int,
            out: torch.Tensor, stream: torch.cuda.Stream) -> torch.Tensor:
        """Queue one batch on `stream` (also the current stream): `ids` `(max_batch, S)` and `lengths`
        `(max_batch,)` on the device, their first `rows` real, with `tokens` real tokens in all. Returns
        the device tensor whose first `rows` rows will hold the `(rows, dim)` float32 embeddings:
        `out` (the slot's own buffer, `(max_batch, dim)`) or one of the runner's."""
        ...


@dataclass
class _Slot:
    """Buffers one batch in flight uses; reused once that batch's result is on the host."""

    host_ids: torch.Tensor  # pinned (max_batch, S) int32
    host_lengths: torch.Tensor  # pinned (max_batch,) int32
    host_out: torch.Tensor  # pinned (max_batch, dim) float32
    device_ids: torch.Tensor
    device_lengths: torch.Tensor
    device_out: torch.Tensor  # (max_batch, dim) float32, for runners that write into a given buffer
    copied: Any  # torch.cuda.Event: the H2D copy is done
    done: Any  # torch.cuda.Event: the result is in host_out
    pending: _CudaPending | None = None


@dataclass
class _ProfileLane:
    """One profile's ring of slots."""

    slots: list[_Slot]
    turn: int = 0


class _CudaPending:
    """A batch queued on the GPU; `result()` waits for its D2H copy and keeps its own copy of it."""

    __slots__ = ("_rows", "_slot", "_value")

    def __init__(self, slot: _Slot, rows: int) -> None:
        self._slot = slot
        self._rows = rows
        self._value: np.ndarray | None = None

    def result(self) -> np.ndarray:
        if self._value is None:
            self._slot.done.synchronize()
            # Copied out because the pinned buffer is the slot's, and the slot serves a later batch.
            self._value = self._slot.host_out.numpy()[: self._rows].copy()
            if self._slot.pending is self:
                self._slot.pending = None
        return self._value


class CudaPipeline:
    """Double-buffered H2D (copy stream) -> runner (compute stream) -> D2H of `(B, dim)` per profile."""

    def __init__(self, runner: BatchRunner, device: torch.device, profiles: Sequence[Profile], dim: int,
                 pad_id: int, slots_per_profile: int = 2, *, output_buffers: bool = False) -> None:
        import torch

        if slots_per_profile < 2:
            raise ValueError("the CUDA pipeline double-buffers: slots_per_profile must be at least 2")
        self._torch = torch
        self._runner: Any = runner
        self._device = device
        self._output_buffers = output_buffers
        self._copy_stream = torch.cuda.Stream(device)
        self.compute_stream = torch.cuda.Stream(device)
        self._lanes = {
            profile: _ProfileLane([self._new_slot(profile, dim, pad_id) for _ in range(slots_per_profile)])
            for profile in profiles
        }
        # The weights and buffers were written on the default stream; the two streams read them.
        torch.cuda.synchronize(device)
        runner.prepare(profiles, self.compute_stream)

    def _new_slot(self, profile: Profile, dim: int, pad_id: int) -> _Slot:
        torch = self._torch
        rows, width = profile.max_batch, profile.max_seq_len
        return _Slot(
            host_ids=torch.full((rows, width), pad_id, dtype=torch.int32, pin_memory=True),
            host_lengths=torch.ones(rows, dtype=torch.int32, pin_memory=True),
            host_out=torch.empty((rows, dim), dtype=torch.float32, pin_memory=True),
            device_ids=torch.full((rows, width), pad_id, dtype=torch.int32, device=self._device),
            device_lengths=torch.ones(rows, dtype=torch.int32, device=self._device),
            device_out=torch.empty((rows if self._output_buffers else 0, dim), dtype=torch.float32,
                                   device=self._device),
            copied=torch.cuda.Event(),
            # blocking: result() sleeps instead of spinning a core the tokenizer needs (spinning
            # measured no faster end to end on the H200, 2026-11-28: 38.3k against 38.3k docs/s).
            done=torch.cuda.Event(blocking=True),
        )

    def submit(self, profile: Profile, ids: np.ndarray, lengths: np.ndarray) -> Pending:
        torch = self._torch
        lane = self._lanes[profile]
        slot = lane.slots[lane.turn]
        lane.turn = (lane.turn + 1) % len(lane.slots)
        if slot.pending is not None:
            # The batch that used this slot last must leave its pinned output before we reuse it;
            # this is also what bounds the batches in flight per profile.
            slot.pending.result()
        rows, tokens = ids.shape[0], int(lengths.sum())
        # The slot's H2D copy finished before its last result was ready, so the pinned inputs are free.
        slot.host_ids.numpy()[:rows] = ids
        slot.host_lengths.numpy()[:rows] = lengths
        try:
            with torch.inference_mode():
                with torch.cuda.stream(self._copy_stream):
                    slot.device_ids[:rows].copy_(slot.host_ids[:rows], non_blocking=True)
                    slot.device_lengths[:rows].copy_(slot.host_lengths[:rows], non_blocking=True)
                    slot.copied.record(self._copy_stream)
                self.compute_stream.wait_event(slot.copied)
                with torch.cuda.stream(self.compute_stream):
                    out = self._runner.run(profile, slot.device_ids, slot.device_lengths, rows, tokens,
                                           slot.device_out, self.compute_stream)
                    slot.host_out[:rows].copy_(out[:rows], non_blocking=True)
                    slot.done.record(self.compute_stream)
        except torch.cuda.OutOfMemoryError as exc:
            raise EngineError(
                f"out of GPU memory on a {rows}x{profile.max_seq_len} batch of {profile}; "
                "give the profiles a smaller token budget."
            ) from exc
        pending = _CudaPending(slot, rows)
        slot.pending = pending
        return pending

    def close(self) -> None:
        torch = self._torch
        torch.cuda.synchronize(self._device)
        self._lanes.clear()
        self._runner = None
        torch.cuda.empty_cache()
