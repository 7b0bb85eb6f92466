"""What one benchmark run measures (`Scenario`) and what it found (`Result`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from embedq.config import Settings
from embedq.engines.factory import EngineSpec

# The backend every scenario times; "auto" would pick TensorRT on a GPU where it is installed, and
# the bench's figures (README) are torch's.
BENCH_BACKEND = "torch"

# The bench's job, against a first run's defaults: the producer fills the whole stream before the
# worker starts (a backlog bound it never reaches), so the worker is timed alone; one window more
# prefetched and twice the commit threads, as a worker on a GPU node is run.
JOB_SETTINGS = Settings(batch_size=512, backlog=10**9, prefetch=3, lease_seconds=60, commit_threads=4)


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
    chunk_tokens: int = 0  # the job's `--chunk` (0: documents truncated at max_seq_len)
    chunk_overlap: int = 0

    @property
    def label(self) -> str:
        where = "pretokenized" if self.pretokenize else "worker-tokenized"
        chunks = f" / chunk {self.chunk_tokens}/{self.chunk_overlap}" if self.chunk_tokens else ""
        kernels = ""
        if self.device.startswith("cuda"):
            kernels = f" / unpad {self.unpad}" + (", CUDA graphs" if self.cuda_graphs else "")
        return f"{self.model} / {self.corpus} x{self.repeat} / {where}{chunks}{kernels}"

    @property
    def job_settings(self) -> Settings:
        """The settings of this scenario's job: `JOB_SETTINGS`, chunked as `--chunk` says."""
        return replace(JOB_SETTINGS, chunk_tokens=self.chunk_tokens, chunk_overlap=self.chunk_overlap)

    def engine_spec(self, token_budget: int, seq_lens: Sequence[int]) -> EngineSpec:
        """The engine this scenario times, with profiles of `seq_lens` sized to `token_budget`."""
        return EngineSpec(backend=BENCH_BACKEND, device=self.device, precision=self.precision,
                          token_budget=token_budget, seq_lens=tuple(seq_lens), cuda_graphs=self.cuda_graphs,
                          unpad=self.unpad)


@dataclass
class Result:
    """One scenario's measurements (None where not measured)."""

    scenario: Scenario
    documents: int = 0  # source documents embedded
    rows: int = 0  # rows written: the documents, or in a chunked job their chunks
    verified: bool | None = None  # `embedq verify` on the output: every source document there, whole, once
    real_tokens: int = 0  # tokens embedded (each chunk's, in a chunked job)
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
