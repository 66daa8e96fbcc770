"""Plots people would rather look at than read: the accuracy / latency / size trade-off of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402


def pareto_png(summary: dict[str, Any], path: Path) -> Path:
    """Quality vs latency (batch 1) and quality vs size, one point per model; passing candidates in green,
    failing in red, the source in grey; the Pareto front joined by a line."""
    quality = "accuracy" if "accuracy" in summary["source"] else "perplexity"
    points = [("source", summary["source"], "source")] + [
        (name, c["metrics"], "pass" if c["passed"] else "fail") for name, c in summary["candidates"].items()
    ]
    colours = {"source": "#888888", "pass": "#2a9d3f", "fail": "#d62728"}
    front = set(summary.get("pareto_front") or [])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (x, xlabel) in zip(axes, [("latency_p50_ms", "p50 latency, batch 1 (ms)"), ("size_mb", "size (MB)")],
                               strict=True):
        for name, metrics, kind in points:
            if x in metrics and quality in metrics:
                ax.scatter(metrics[x], metrics[quality], s=60, color=colours[kind], zorder=3,
                           edgecolor="black" if name in front else "none")
                ax.annotate(name, (metrics[x], metrics[quality]), textcoords="offset points", xytext=(5, 5),
                            fontsize=8)
        line = sorted((m[x], m[quality]) for n, m, _ in points if n in front and x in m and quality in m)
        if len(line) > 1:
            ax.plot(*zip(*line, strict=True), color="#2a9d3f", alpha=0.4, zorder=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(quality)
        ax.grid(alpha=0.3)
    fig.suptitle("Candidates: green passed the gate, red failed, grey is the source; outlined = Pareto front")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
