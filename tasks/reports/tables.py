"""Terminal tables: the optimize run's candidates, and the benchmark's comparison."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

COLUMNS = [  # (metric, header, format)
    ("accuracy", "acc", "{:.4f}"), ("macro_f1", "macro-F1", "{:.4f}"), ("perplexity", "ppl", "{:.2f}"),
    ("next_token_agreement", "next-tok agree", "{:.3f}"),
    ("latency_p50_ms", "p50 b1 ms", "{:.2f}"), ("latency_p95_ms", "p95 b1 ms", "{:.2f}"),
    ("latency_p99_ms", "p99 b1 ms", "{:.2f}"), ("batch_latency_p50_ms", "p50 b32 ms", "{:.1f}"),
    ("throughput_per_s", "b32 /s", "{:.0f}"), ("size_mb", "size MB", "{:.1f}"),
    ("peak_memory_mb", "peak mem MB", "{:.0f}"), ("parity_top1_agreement", "top-1 agree", "{:.4f}"),
    ("parity_max_abs", "max |Δ|", "{:.2e}"),
]


def optimize_table(summary: dict[str, Any]) -> Table:
    """Metrics down, models across (fits a terminal for a handful of candidates), the gate's verdict last."""
    cols = [("source", "fp32", summary["source"], "baseline")]
    if summary.get("champion") and summary["champion"] != summary["source"]:
        cols.append(("champion", "", summary["champion"], "baseline"))
    registered = (summary.get("registered") or {}).get("recipe")
    for name, cand in summary["candidates"].items():
        verdict = "PASS" if cand["passed"] else "FAIL"
        if name == registered:
            verdict += " → challenger"
        cols.append((name, cand["precision"], cand["metrics"], verdict))
    table = Table(title="kiln optimize", header_style="bold")
    table.add_column("metric")
    for name, precision, _, _ in cols:
        table.add_column(f"{name}\n{precision}".strip(), justify="right")
    for metric, header, fmt in COLUMNS:
        if any(metric in metrics for _, _, metrics, _ in cols):
            table.add_row(header, *[fmt.format(m[metric]) if metric in m else "–" for _, _, m, _ in cols])
    table.add_row("gate", *[verdict for _, _, _, verdict in cols], style="bold")
    return table


def failed_clauses(summary: dict[str, Any]) -> list[str]:
    return [f"{name}: {reason}" for name, cand in summary["candidates"].items() if not cand["passed"]
            for reason in cand["reasons"] if "FAILED" in reason or "failed" in reason or "not measured" in reason]


def print_optimize(summary: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    console.print(optimize_table(summary))
    for line in failed_clauses(summary):
        console.print(f"  [red]✗[/red] {line}")
    if summary.get("pareto_front"):
        console.print(f"Pareto front (accuracy, latency, size): {', '.join(summary['pareto_front'])}")
    if summary.get("registered"):
        reg = summary["registered"]
        console.print(f"[green]registered {reg['name']} v{reg['version']} ({reg['recipe']}) as @challenger[/green]")
