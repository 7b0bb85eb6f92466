"""Throughput per stage over time, drawn from the samples of each scenario (a PNG)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

STAGES = ("fetched", "tokenized", "embedded", "committed")


def plot(timelines: dict[str, list[dict[str, float]]], path: Path, smooth: float = 1.0) -> None:
    """Documents per second through each stage over time (averaged over `smooth` seconds, since
    the counters move a window at a time), one panel per scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 2
    rows = max(1, (len(timelines) + columns - 1) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(12, 3.2 * rows), squeeze=False)
    for ax, (label, samples) in zip(axes.flat, timelines.items(), strict=False):
        if len(samples) < 2:
            continue
        t = np.array([s["t"] for s in samples])
        for stage in STAGES:
            values = np.array([s[stage] for s in samples])
            earlier = np.interp(t - smooth, t, values, left=values[0])
            span = np.minimum(smooth, t - t[0])
            rate = np.divide(values - earlier, span, out=np.zeros_like(values, dtype=float), where=span > 0)
            ax.plot(t, rate / 1000.0, label=stage)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("seconds")
        ax.set_ylabel(f"k documents/s ({smooth:g} s average)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(timelines):]:
        ax.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def replot(json_paths: list[Path], path: Path) -> None:
    """Draw the plot again from saved results (several files are drawn side by side)."""
    timelines: dict[str, list[dict[str, float]]] = {}
    for json_path in json_paths:
        timelines.update(json.loads(json_path.read_text())["timelines"])
    plot(timelines, path)
