"""The torch backend: the Hugging Face transformer plus pooling, eager on CPU, pipelined on CUDA.

On CPU `submit` computes at once and returns `Done`. On CUDA each profile owns a ring of staging
slots (pinned host inputs and outputs, device inputs): `submit` fills a slot's pinned buffers,
copies them to the device on a copy stream, runs the model on a compute stream once the copy's
event fires, and copies only `(B, dim)` float32 back into the slot's pinned output; `result()`
waits on that batch's event. With `cuda_graphs=True` every profile is captured once at its
max_batch, and a batch of fewer rows runs the same graph with its spare rows left as padding.
torch and transformers are imported when an engine starts, so this module imports without them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from embedq.errors import EngineError
from embedq.model import ModelInfo, Pooling

from .base import Done, EngineBase, EngineConfig, Pending, Profile, check_batch
from .pooling import pooling_head

if TYPE_CHECKING:
    import torch

TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def load_encoder(
    model: ModelInfo, *, device: str = "cpu", precision: str = "fp32", attention: str = "sdpa"
) -> torch.nn.Module:
    """The model's transformer with pooling and normalization on top, in eval mode on `device`.

    Its forward takes `input_ids` int32 `(B, S)` and `lengths` int32 `(B,)` and returns `(B, dim)`
    float32; the attention mask is derived from `lengths` on the device. `attention` is "sdpa",
    falling back to "eager" for architectures without SDPA, or "eager".
    """
    import torch
    from transformers import AutoModel

    dtype = getattr(torch, TORCH_DTYPES[precision])

    def from_pretrained(implementation: str) -> Any:
        return AutoModel.from_pretrained(
            model.transformer_path, local_files_only=True, dtype=dtype, attn_implementation=implementation
        )

    try:
        try:
            transformer = from_pretrained(attention)
        except ValueError as exc:
            if attention != "sdpa" or "scaled_dot_product_attention" not in str(exc):
                raise
            transformer = from_pretrained("eager")
    except (OSError, ValueError) as exc:
        raise EngineError(
            f"transformers cannot load {model.transformer_path}: {exc}. Check that the model directory "
            "is complete and that the installed transformers knows its architecture."
        ) from exc
    hidden_size = int(getattr(transformer.config, "hidden_size", model.dim))
    if hidden_size != model.dim:
        raise EngineError(
            f"{model.name} has hidden size {hidden_size} but its pooling config says {model.dim}; "
            "the model directory is inconsistent."
        )
    encoder = _sentence_encoder_class()(transformer, model.pooling, model.normalize)
    return encoder.to(device).eval()


@functools.cache
def _sentence_encoder_class() -> type[torch.nn.Module]:
    # Made on first use so that importing this module needs no torch.
    import torch

    class SentenceEncoder(torch.nn.Module):
        """Transformer + pooling + normalization: `(input_ids, lengths)` to `(B, dim)` float32."""

        def __init__(self, transformer: Any, pooling: Pooling, normalize: bool) -> None:
            super().__init__()
            self.transformer = transformer
            self.head = pooling_head(pooling, normalize)
            self.attn_implementation = str(transformer.config._attn_implementation)

        def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            keep = positions.unsqueeze(0) < lengths.unsqueeze(1)
            hidden = self.transformer(
                input_ids=input_ids, attention_mask=self._attention_mask(keep)
            ).last_hidden_state
            return self.head(hidden, lengths)

        def _attention_mask(self, keep: torch.Tensor) -> torch.Tensor:
            # transformers passes a ready 4D mask through as it is. A 2D one it checks with
            # `mask.all()` (to skip it when nothing is padded): a host sync that would stall the
            # CUDA pipeline on every batch.
            mask = keep[:, None, None, :]
            if self.attn_implementation == "sdpa":
                return mask
            dtype = next(self.transformer.parameters()).dtype
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(dtype).min
            )

    return SentenceEncoder


class TorchEngine(EngineBase):
    """The torch backend: `cpu` or `cuda[:N]`, fp32 anywhere, fp16 and bf16 on CUDA."""

    name = "torch"

    def __init__(
        self, config: EngineConfig, *, slots_per_profile: int = 2
    ) -> None:
        cuda_graphs = config.cuda_graphs
        if not config.device.startswith("cuda"):
            if config.precision != "fp32":
                raise EngineError(
                    f"precision {config.precision} needs a CUDA device (device is {config.device!r}); "
                    "use --precision fp32 on CPU."
                )
            if cuda_graphs:
                raise EngineError("CUDA graphs need a CUDA device; leave them off on CPU.")
        if slots_per_profile < 2:
            raise ValueError("the CUDA pipeline double-buffers: slots_per_profile must be at least 2")
        super().__init__(config)
        self.cuda_graphs = cuda_graphs
        self.slots_per_profile = slots_per_profile
        self._encoder: Any = None
        self._pipeline: _CudaPipeline | None = None

    def __enter__(self) -> TorchEngine:
        import torch

        device = _torch_device(self.config.device, self.config.precision)
        if device.type == "cpu" and self.config.threads:
            # Process-wide: torch has one intra-op pool. The worker runs one engine per process.
            torch.set_num_threads(self.config.threads)
        self._encoder = load_encoder(self.config.model, device=str(device), precision=self.config.precision)
        if device.type == "cuda":
            self._pipeline = _CudaPipeline(
                self._encoder, device, self._profiles, self.dim, self.config.model.pad_token_id,
                self.slots_per_profile, self.cuda_graphs,
            )
        return self

    def __exit__(self, *exc: object) -> None:
        # Drop the engine's hold on the weights first, so the pipeline's close can free them.
        self._encoder = None
        if self._pipeline is not None:
            self._pipeline.close()
            self._pipeline = None

    def submit(self, input_ids: np.ndarray, lengths: np.ndarray) -> Pending:
        """Run one padded batch; on CPU now, on CUDA queued behind the batches already submitted."""
        if self._encoder is None:
            raise EngineError("the torch engine is not started; use it inside `with engine:`")
        profile = check_batch(self._profiles, input_ids, lengths)
        ids, lens = _int32(input_ids), _int32(lengths)
        if self._pipeline is not None:
            return self._pipeline.submit(profile, ids, lens)
        import torch

        with torch.inference_mode():
            return Done(self._encoder(torch.from_numpy(ids), torch.from_numpy(lens)).numpy())


def _int32(array: np.ndarray) -> np.ndarray:
    out = np.ascontiguousarray(array, dtype=np.int32)
    # torch.from_numpy warns on (and may not write through) read-only arrays such as Arrow views.
    return out if out.flags.writeable else out.copy()


def _torch_device(name: str, precision: str) -> torch.device:
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise EngineError(f"device {name!r} is not a torch device; use cpu, cuda or cuda:N.") from exc
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise EngineError(f"the torch engine runs on cpu or cuda[:N], not {name!r}.")
    if not torch.cuda.is_available():
        raise EngineError(
            f"device {name!r} asked for, but torch {torch.__version__} sees no CUDA GPU; "
            "install a CUDA build of torch, check CUDA_VISIBLE_DEVICES, or use --device cpu."
        )
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise EngineError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible.")
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise EngineError(f"GPU {torch.cuda.get_device_name(index)} has no bf16; use --precision fp16.")
    return torch.device("cuda", index)


@dataclass
class _Slot:
    """Buffers one batch in flight uses; reused once that batch's result is on the host."""

    host_ids: torch.Tensor  # pinned (max_batch, S) int32
    host_lengths: torch.Tensor  # pinned (max_batch,) int32
    host_out: torch.Tensor  # pinned (max_batch, dim) float32
    device_ids: torch.Tensor
    device_lengths: torch.Tensor
    copied: Any  # torch.cuda.Event: the H2D copy is done
    done: Any  # torch.cuda.Event: the result is in host_out
    pending: _CudaPending | None = None


@dataclass
class _CapturedGraph:
    """One profile's CUDA graph, captured at max_batch, and the static buffers its replays use."""

    graph: Any  # torch.cuda.CUDAGraph
    ids: torch.Tensor
    lengths: torch.Tensor
    out: torch.Tensor


@dataclass
class _ProfileLane:
    """One profile's ring of slots and, with CUDA graphs, its captured graph."""

    slots: list[_Slot]
    turn: int = 0
    captured: _CapturedGraph | None = None


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


class _CudaPipeline:
    """Double-buffered H2D (copy stream) -> model (compute stream) -> D2H of `(B, dim)` per profile."""

    def __init__(
        self, encoder: torch.nn.Module, device: torch.device, profiles: Sequence[Profile], dim: int,
        pad_id: int, slots_per_profile: int, cuda_graphs: bool,
    ) -> None:
        import torch

        self._torch = torch
        self._encoder: Any = encoder
        self._device = device
        self._copy_stream = torch.cuda.Stream(device)
        self._compute_stream = torch.cuda.Stream(device)
        self._lanes = {
            profile: _ProfileLane([self._new_slot(profile, dim, pad_id) for _ in range(slots_per_profile)])
            for profile in profiles
        }
        # The weights and buffers were written on the default stream; the two streams read them.
        torch.cuda.synchronize(device)
        if cuda_graphs:
            with torch.inference_mode():
                for profile, lane in self._lanes.items():
                    lane.captured = self._capture(profile, pad_id)

    def _new_slot(self, profile: Profile, dim: int, pad_id: int) -> _Slot:
        torch = self._torch
        rows, width = profile.max_batch, profile.max_seq_len
        return _Slot(
            host_ids=torch.full((rows, width), pad_id, dtype=torch.int32, pin_memory=True),
            host_lengths=torch.ones(rows, dtype=torch.int32, pin_memory=True),
            host_out=torch.empty((rows, dim), dtype=torch.float32, pin_memory=True),
            device_ids=torch.full((rows, width), pad_id, dtype=torch.int32, device=self._device),
            device_lengths=torch.ones(rows, dtype=torch.int32, device=self._device),
            copied=torch.cuda.Event(),
            # blocking: result() sleeps instead of spinning a core the tokenizer needs (spinning
            # measured no faster end to end on the H200, 2026-11-28: 38.3k against 38.3k docs/s).
            done=torch.cuda.Event(blocking=True),
        )

    def _capture(self, profile: Profile, pad_id: int) -> _CapturedGraph:
        """Capture the encoder once at (max_batch, max_seq_len); replays read the static inputs."""
        torch = self._torch
        rows, width = profile.max_batch, profile.max_seq_len
        static_ids = torch.full((rows, width), pad_id, dtype=torch.int32, device=self._device)
        static_lengths = torch.full((rows,), width, dtype=torch.int32, device=self._device)
        self._compute_stream.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(self._compute_stream):
            # Warm-up on the capture stream lets lazy initialisation (cuBLAS handles, autotuning)
            # happen outside the capture, as CUDA graphs require.
            for _ in range(3):
                self._encoder(static_ids, static_lengths)
        self._compute_stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        # Each graph gets its own memory pool: profiles replay in any order, and graphs sharing a
        # pool are only safe when replayed in their capture order.
        with torch.cuda.graph(graph, stream=self._compute_stream):
            static_out = self._encoder(static_ids, static_lengths)
        return _CapturedGraph(graph, static_ids, static_lengths, static_out)

    def submit(self, profile: Profile, ids: np.ndarray, lengths: np.ndarray) -> Pending:
        torch = self._torch
        lane = self._lanes[profile]
        slot = lane.slots[lane.turn]
        lane.turn = (lane.turn + 1) % len(lane.slots)
        if slot.pending is not None:
            # The batch that used this slot last must leave its pinned output before we reuse it;
            # this is also what bounds the batches in flight per profile.
            slot.pending.result()
        rows = ids.shape[0]
        # The slot's H2D copy finished before its last result was ready, so the pinned inputs are free.
        slot.host_ids.numpy()[:rows] = ids
        slot.host_lengths.numpy()[:rows] = lengths
        try:
            with torch.inference_mode():
                with torch.cuda.stream(self._copy_stream):
                    slot.device_ids[:rows].copy_(slot.host_ids[:rows], non_blocking=True)
                    slot.device_lengths[:rows].copy_(slot.host_lengths[:rows], non_blocking=True)
                    slot.copied.record(self._copy_stream)
                self._compute_stream.wait_event(slot.copied)
                with torch.cuda.stream(self._compute_stream):
                    out = self._run(lane, slot, rows)
                    slot.host_out[:rows].copy_(out[:rows], non_blocking=True)
                    slot.done.record(self._compute_stream)
        except torch.cuda.OutOfMemoryError as exc:
            raise EngineError(
                f"out of GPU memory on a {rows}x{profile.max_seq_len} batch of {profile}; "
                "give the profiles a smaller token budget."
            ) from exc
        pending = _CudaPending(slot, rows)
        slot.pending = pending
        return pending

    def _run(self, lane: _ProfileLane, slot: _Slot, rows: int) -> torch.Tensor:
        captured = lane.captured
        if captured is None:
            return self._encoder(slot.device_ids[:rows], slot.device_lengths[:rows])
        captured.ids[:rows].copy_(slot.device_ids[:rows])
        captured.lengths[:rows].copy_(slot.device_lengths[:rows])
        # Spare rows keep earlier (valid) ids; length 1 keeps their attention and pooling finite.
        captured.lengths[rows:].fill_(1)
        captured.graph.replay()
        return captured.out

    def close(self) -> None:
        torch = self._torch
        torch.cuda.synchronize(self._device)
        self._lanes.clear()
        self._encoder = None
        torch.cuda.empty_cache()
