"""The torch backend: the model plus pooling, eager on CPU, pipelined on CUDA.

A BERT runs as embedq's own module (`engines.bert`), anything else through transformers. On CPU
`submit` computes at once and returns `Done`. On CUDA batches go through the shared
double-buffered pipeline (`cuda_pipeline`), the model running on its compute stream: with
`unpadded`, embedq's BERT runs each batch on its real tokens only (eager); a model
that runs padded is, with `cuda_graphs`, captured once per profile at its max_batch the first time
a batch needs it, and a batch of fewer rows runs the same graph with its spare rows as padding
(running the last, partly filled batches of a window eager instead was measured much slower).
torch and transformers are imported when an engine starts, so this module imports without them.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from embedq.errors import EngineError
from embedq.model import ModelInfo, Pooling

from .base import Done, EngineBase, EngineConfig, Pending, Profile, check_batch
from .cuda_pipeline import CudaPipeline
from .pooling import pooling_head

if TYPE_CHECKING:
    import torch

log = logging.getLogger("embedq.engines")
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def load_encoder(
    model: ModelInfo, *, device: str = "cpu", precision: str = "fp32", attention: str = "sdpa",
    native: bool = False,
) -> torch.nn.Module:
    """The model's transformer with pooling and normalization on top, in eval mode on `device`.

    Its forward takes `input_ids` int32 `(B, S)` and `lengths` int32 `(B,)` and returns `(B, dim)`
    float32; the attention mask is derived from `lengths` on the device. With `native`, a BERT
    runs as embedq's own module (`engines.bert`: no transformers import, unpadded batches), any
    other architecture through transformers. `attention` is "sdpa", falling back to "eager" for
    architectures without SDPA, or "eager".
    """
    import torch

    dtype = getattr(torch, TORCH_DTYPES[precision])
    if native:
        from .bert import load_native_bert, native_unsupported

        why_not = native_unsupported(model)
        if why_not is None:
            return load_native_bert(model, device=device, dtype=dtype)
        log.info("%s runs through transformers: %s", model.name, why_not)
    from transformers import AutoModel

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
    encoder = _sentence_encoder_class()(transformer, model.pooling, model.normalize, model.pool_skip)
    return encoder.to(device).eval()


@functools.cache
def _sentence_encoder_class() -> type[torch.nn.Module]:
    # Made on first use so that importing this module needs no torch.
    import torch

    class SentenceEncoder(torch.nn.Module):
        """Transformer + pooling + normalization: `(input_ids, lengths)` to `(B, dim)` float32."""

        def __init__(self, transformer: Any, pooling: Pooling, normalize: bool, skip: int = 0) -> None:
            super().__init__()
            self.transformer = transformer
            self.head = pooling_head(pooling, normalize, skip)
            self.causal = attends_causally(transformer)
            if self.causal and transformer.config._attn_implementation == "sdpa":
                from .attention import use_causal_attention

                use_causal_attention(transformer)  # no mask and no host sync in transformers' path
            self.attn_implementation = str(transformer.config._attn_implementation)

        def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            if self.causal:
                # A decoder: with right padding no real token attends to a pad (they all come after
                # it), so no mask is needed, and without one SDPA runs its causal flash or
                # memory-efficient kernel instead of building a (B, 1, S, S) mask (64 MiB a row at
                # 8k tokens). Nor a key/value cache: it would hold every layer's keys and values.
                states = self.transformer(input_ids=input_ids, use_cache=False).last_hidden_state
                return self.head(states, lengths)
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


def attends_causally(transformer: Any) -> bool:
    """Whether a loaded transformers model attends causally (a decoder), from its attention modules."""
    if getattr(transformer.config, "is_causal", True) is False:
        return False
    return any(getattr(module, "is_causal", False) is True for module in transformer.modules())


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
        self._pipeline: CudaPipeline | None = None

    def __enter__(self) -> TorchEngine:
        started = time.perf_counter()
        import torch

        device = _torch_device(self.config.device, self.config.precision)  # initialises CUDA
        if device.type == "cpu" and self.config.threads:
            # Process-wide: torch has one intra-op pool. The worker runs one engine per process.
            torch.set_num_threads(self.config.threads)
        imported = time.perf_counter()
        self._encoder = load_encoder(self.config.model, device=str(device), precision=self.config.precision,
                                     native=True)
        loaded = time.perf_counter()
        mode = "on CPU"
        if device.type == "cuda":
            unpadded = self.config.unpadded and getattr(self._encoder, "runs_unpadded", False)
            graphs = self.cuda_graphs and not unpadded
            mode = ("unpadded" if unpadded else "padded, in CUDA graphs captured as profiles are first used"
                    if graphs else "padded")
            runner = _TorchRunner(self._encoder, device, self.config.model.pad_token_id, graphs, unpadded)
            self._pipeline = CudaPipeline(runner, device, self._profiles, self.dim, self.config.model.pad_token_id,
                                          self.slots_per_profile)
        log.info("torch engine started (%s, %s): torch import and device %.1f s, weights %.1f s, pipeline %.1f s",
                 type(self._encoder).__name__, mode, imported - started, loaded - imported,
                 time.perf_counter() - loaded)
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
class _CapturedGraph:
    """One profile's CUDA graph, captured at max_batch, and the static buffers its replays use."""

    graph: Any  # torch.cuda.CUDAGraph
    ids: torch.Tensor
    lengths: torch.Tensor
    out: torch.Tensor


class _TorchRunner:
    """The model on the pipeline's compute stream: eager, or one captured CUDA graph per profile."""

    def __init__(self, encoder: torch.nn.Module, device: torch.device, pad_id: int, cuda_graphs: bool,
                 unpadded: bool = False) -> None:
        import torch

        self._torch = torch
        self._encoder: Any = encoder
        self._device = device
        self._pad_id = pad_id
        self._cuda_graphs = cuda_graphs
        self._unpadded = unpadded
        self._graphs: dict[Profile, _CapturedGraph] = {}

    def prepare(self, profiles: Sequence[Profile], stream: torch.cuda.Stream) -> None:
        """Nothing ahead: a profile's graph is captured the first time a batch needs it, so the first
        vector does not wait for every profile's capture, and a small job captures only the
        profiles its documents use."""

    def _capture(self, profile: Profile, stream: torch.cuda.Stream) -> _CapturedGraph:
        """Capture the encoder once at (max_batch, max_seq_len); replays read the static inputs."""
        torch = self._torch
        rows, width = profile.max_batch, profile.max_seq_len
        static_ids = torch.full((rows, width), self._pad_id, dtype=torch.int32, device=self._device)
        static_lengths = torch.full((rows,), width, dtype=torch.int32, device=self._device)
        with torch.cuda.stream(stream):
            # Warm-up on the capture stream lets lazy initialisation (cuBLAS handles, autotuning)
            # happen outside the capture, as CUDA graphs require.
            for _ in range(3):
                self._encoder(static_ids, static_lengths)
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        # Each graph gets its own memory pool: profiles replay in any order, and graphs sharing a
        # pool are only safe when replayed in their capture order. Captured mid-run on the engine
        # thread: "thread_local" keeps CUDA calls of other threads (a sampler reading memory
        # figures) from invalidating the capture.
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            static_out = self._encoder(static_ids, static_lengths)
        return _CapturedGraph(graph, static_ids, static_lengths, static_out)

    def run(self, profile: Profile, ids: torch.Tensor, lengths: torch.Tensor, rows: int, tokens: int,
            out: torch.Tensor, stream: torch.cuda.Stream) -> torch.Tensor:
        if self._unpadded:
            unpadded: torch.Tensor = self._encoder(ids[:rows], lengths[:rows], tokens=tokens)
            return unpadded
        if not self._cuda_graphs:
            result: torch.Tensor = self._encoder(ids[:rows], lengths[:rows])
            return result
        captured = self._graphs.get(profile)
        if captured is None:
            started = time.perf_counter()
            captured = self._graphs[profile] = self._capture(profile, stream)
            log.debug("captured the CUDA graph of %s in %.2f s", profile, time.perf_counter() - started)
        captured.ids[:rows].copy_(ids[:rows])
        captured.lengths[:rows].copy_(lengths[:rows])
        # Spare rows keep earlier (valid) ids; length 1 keeps their attention and pooling finite.
        captured.lengths[rows:].fill_(1)
        captured.graph.replay()
        return captured.out
