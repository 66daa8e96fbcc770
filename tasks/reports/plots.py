"""Plots people would rather look at than read: the accuracy / latency / size trade-off of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402


def pareto_png(summary: dict[str, Any], path: Path) -> Path:
    """Quality vs latency (batch 1), quality vs size and, when measured, quality vs cost per million requests,
    one point per model; passing candidates in green, failing in red, the source in grey; the Pareto front
    joined by a line."""
    quality = "accuracy" if "accuracy" in summary["source"] else "perplexity"
    points = [("source", summary["source"], "source")] + [
        (name, c["metrics"], "pass" if c["passed"] else "fail") for name, c in summary["candidates"].items()
    ]
    colours = {"source": "#888888", "pass": "#2a9d3f", "fail": "#d62728"}
    front = set(summary.get("pareto_front") or [])
    panels = [("latency_p50_ms", "p50 latency, batch 1 (ms)"), ("size_mb", "size (MB)")]
    if any("cost_per_million" in m for _, m, _ in points):  # quality vs cost (kiln.tasks.evaluate.cost)
        panels.append(("cost_per_million", "cost per 1M requests"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2))
    for ax, (x, xlabel) in zip(axes, panels, strict=True):
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


def rollout_png(verdicts: list[dict[str, Any]], title: str, path: Path) -> Path:
    """A rollout at a glance: per analysis, the challenger's traffic weight, error rate, p95 latency ratio to
    the champion, agreement and accuracy; each analysis marked green (pass), red (fail) or grey (inconclusive)."""
    from matplotlib.ticker import MaxNLocator

    # (figure key, title, dotted reference line, y range or None for automatic)
    panels = [("weight", "weight %", None, (-5, 105)), ("challenger_error_rate", "error rate", None, None),
              ("p95_ratio", "p95 / champion p95", 1.0, None), ("agreement", "agreement", None, (0, 1.02)),
              ("challenger_accuracy", "accuracy (challenger ●, champion ○)", None, (0, 1.02))]
    colours = {"pass": "#2a9d3f", "fail": "#d62728", "inconclusive": "#888888"}
    x = [v["analysis"] + 1 for v in verdicts]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2))
    for ax, (key, label, ref, ylim) in zip(axes, panels, strict=True):
        values = [v["weight"] if key == "weight" else v["figures"].get(key) for v in verdicts]
        shown = [(i, y, v["outcome"]) for i, y, v in zip(x, values, verdicts, strict=True) if y is not None]
        if shown:
            ax.plot([i for i, _, _ in shown], [y for _, y, _ in shown], color="#444444", alpha=0.4, zorder=2)
            ax.scatter([i for i, _, _ in shown], [y for _, y, _ in shown], zorder=3,
                       color=[colours.get(o, "#888888") for _, _, o in shown])
        if key == "challenger_accuracy":
            champ = [(i, v["figures"].get("champion_accuracy")) for i, v in zip(x, verdicts, strict=True)]
            champ = [(i, y) for i, y in champ if y is not None]
            if champ:
                ax.scatter(*zip(*champ, strict=True), facecolors="none", edgecolors="#444444", zorder=3)
        if ref is not None:
            ax.axhline(ref, color="#444444", linestyle=":", alpha=0.6)
        if ylim is not None:
            ax.set_ylim(*ylim)
        elif key == "challenger_error_rate":
            ax.set_ylim(0, max([0.05, *(y * 1.2 for _, y, _ in shown)]))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("analysis")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def trials_png(trials: list[dict[str, Any]], front: list[int], path: Path) -> Path:
    """A compression search's trials: accuracy vs latency (batch 1) and vs size, one point per complete trial,
    the Pareto front outlined and joined, labelled with trial numbers."""
    done = [t for t in trials if t.get("state") == "complete" and t.get("metrics")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (x, xlabel) in zip(axes, [("latency_p50_ms", "p50 latency, batch 1 (ms)"), ("size_mb", "size (MB)")],
                               strict=True):
        for t in done:
            m, on_front = t["metrics"], t["number"] in front
            ax.scatter(m[x], m["accuracy"], s=60 if on_front else 30, zorder=3,
                       color="#2a9d3f" if on_front else "#9aa5b1", edgecolor="black" if on_front else "none")
            ax.annotate(str(t["number"]), (m[x], m["accuracy"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
        line = sorted((t["metrics"][x], t["metrics"]["accuracy"]) for t in done if t["number"] in front)
        if len(line) > 1:
            ax.plot(*zip(*line, strict=True), color="#2a9d3f", alpha=0.4, zorder=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy (validation sample)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Search: {len(done)} complete trials of {len(trials)}; green = Pareto front")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
