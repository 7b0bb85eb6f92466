"""What one benchmark run measures (`Scenario`) and what it found (`Result`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from embedq.engines.factory import EngineSpec

# The backend every scenario times; "auto" would pick TensorRT on a GPU where it is installed, and
# the bench's figures (README) are torch's.
BENCH_BACKEND = "torch"


@dataclass
class Scenario:
    """One benchmark run's settings."""

    corpus: str
    model: str
    pretokenize: bool
    repeat: int = 1
    limit: int | None = None
    device: str = "cuda"
    precision: str = "fp16"
    cuda_graphs: bool = True
    unpad: str = "auto"

    @property
    def label(self) -> str:
        where = "pretokenized" if self.pretokenize else "worker-tokenized"
        kernels = ""
        if self.device.startswith("cuda"):
            kernels = f" / unpad {self.unpad}" + (", CUDA graphs" if self.cuda_graphs else "")
        return f"{self.model} / {self.corpus} x{self.repeat} / {where}{kernels}"

    def engine_spec(self, token_budget: int, seq_lens: Sequence[int]) -> EngineSpec:
        """The engine this scenario times, with profiles of `seq_lens` sized to `token_budget`."""
        return EngineSpec(backend=BENCH_BACKEND, device=self.device, precision=self.precision,
                          token_budget=token_budget, seq_lens=tuple(seq_lens), cuda_graphs=self.cuda_graphs,
                          unpad=self.unpad)


@dataclass
class Result:
    """One scenario's measurements (None where not measured)."""

    scenario: Scenario
    documents: int = 0
    real_tokens: int = 0
    e2e_seconds: float = 0.0
    e2e_tokens_per_s: float = 0.0
    e2e_docs_per_s: float = 0.0
    produce_seconds: float = 0.0
    gpu_only_tokens_per_s: float | None = None
    gpu_only_docs_per_s: float | None = None
    st_tokens_per_s: float | None = None
    st_docs_per_s: float | None = None
    tokenizer_all_cores_tokens_per_s: float | None = None
    tokenizer_all_cores_docs_per_s: float | None = None
    tokenizer_pool_tokens_per_s: float | None = None
    tokenizer_pool_docs_per_s: float | None = None
    padding_ratio: float = 0.0
    seq_lens: list[int] = field(default_factory=list)
    gpu_busy: float | None = None
    peak_rss_bytes: int = 0
    peak_gpu_bytes: int | None = None
    peak_redis_bytes: int = 0
    timeline: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The JSON record of this result: every figure but the timeline, with the ratios."""
        out = asdict(self)
        out.pop("timeline")
        out["label"] = self.scenario.label
        if self.gpu_only_tokens_per_s:
            out["e2e_over_gpu_only"] = self.e2e_tokens_per_s / self.gpu_only_tokens_per_s
        if self.st_tokens_per_s:
            out["e2e_over_st"] = self.e2e_tokens_per_s / self.st_tokens_per_s
        return out
