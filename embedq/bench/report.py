"""The results as people read them (a Markdown table) and as scripts do (JSON, with the machine)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from embedq.bench.scenarios import Result


def render(results: list[Result], precision: dict[str, float] | None) -> str:
    """One table row per scenario (a chunked one's documents with their chunks), then the precision
    check's figures if it ran."""
    def rate(value: float | None, unit: str = "") -> str:
        if value is None:
            return "-"
        if value < 1e3:  # long documents: tens of documents a second
            return f"{value:.1f}{unit}"
        return f"{value / 1e6:.2f}M{unit}" if value >= 1e6 else f"{value / 1e3:.1f}k{unit}"

    def documents(r: Result) -> str:
        verdict = {None: "", True: ", verified", False: ", NOT VERIFIED"}[r.verified]
        chunks = f" in {r.rows:,} chunks" if r.scenario.chunk_tokens else ""
        return f"{r.documents:,}{chunks}{verdict}"

    lines = ["| scenario | docs | e2e tokens/s | e2e docs/s | GPU-only tokens/s | e2e/GPU-only | ST tokens/s | "
             "e2e/ST | tokenizer all cores | tokenizer pool | padding | GPU busy | peak RSS | peak GPU mem | "
             "peak Redis |",
             "|" + " --- |" * 15]
    for r in results:
        lines.append(
            f"| {r.scenario.label} | {documents(r)} | {rate(r.e2e_tokens_per_s)} | {rate(r.e2e_docs_per_s)} | "
            f"{rate(r.gpu_only_tokens_per_s)} | "
            f"{(r.e2e_tokens_per_s / r.gpu_only_tokens_per_s) if r.gpu_only_tokens_per_s else 0:.0%} | "
            f"{rate(r.st_tokens_per_s)} | "
            f"{(r.e2e_tokens_per_s / r.st_tokens_per_s) if r.st_tokens_per_s else 0:.1f}x | "
            f"{rate(r.tokenizer_all_cores_tokens_per_s)} ({rate(r.tokenizer_all_cores_docs_per_s, ' docs')}) | "
            f"{rate(r.tokenizer_pool_tokens_per_s)} ({rate(r.tokenizer_pool_docs_per_s, ' docs')}) | "
            f"{r.padding_ratio:.3f} | {'-' if r.gpu_busy is None else f'{r.gpu_busy:.0%}'} | "
            f"{r.peak_rss_bytes / 2**30:.2f} GiB | "
            f"{'-' if r.peak_gpu_bytes is None else f'{r.peak_gpu_bytes / 2**30:.2f} GiB'} | "
            f"{r.peak_redis_bytes / 2**20:.0f} MiB |")
    if precision:
        lines.append("")
        lines.append("precision: " + ", ".join(f"{k} {v:.6f}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in precision.items()))
    return "\n".join(lines)


def save_results(path: Path, results: list[Result], precision: dict[str, float] | None) -> None:
    """The JSON file: the machine, the precision check, each result's summary and its timeline."""
    path.write_text(json.dumps({"environment": environment(), "precision": precision,
                                "results": [r.summary() for r in results],
                                "timelines": {r.scenario.label: r.timeline for r in results}}, indent=1))


def environment() -> dict[str, Any]:
    """The machine the figures come from: date, host, cores, Python, and torch and the GPU if present."""
    from embedq.engines.device import torch_runtime

    info: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "host": platform.node(), "cpus": os.cpu_count(),
                            "python": platform.python_version()}
    with contextlib.suppress(Exception):
        info.update(torch_runtime())
    return info
