"""Terminal tables: the optimize run's candidates, and the benchmark's comparison."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

COLUMNS = [  # (metric, header, format)
    ("accuracy", "acc", "{:.4f}"), ("macro_f1", "macro-F1", "{:.4f}"), ("perplexity", "ppl", "{:.2f}"),
    ("next_token_agreement", "next-tok agree", "{:.3f}"),
    ("greedy_agreement", "greedy agree", "{:.3f}"), ("greedy_prefix_agreement", "greedy prefix", "{:.3f}"),
    ("tokens_per_s_b1", "tok/s b1", "{:.1f}"), ("ttft_ms", "TTFT ms", "{:.1f}"), ("itl_ms", "ITL ms", "{:.2f}"),
    ("latency_p50_ms", "p50 b1 ms", "{:.2f}"), ("latency_p95_ms", "p95 b1 ms", "{:.2f}"),
    ("latency_p99_ms", "p99 b1 ms", "{:.2f}"), ("batch_latency_p50_ms", "p50 b32 ms", "{:.1f}"),
    ("throughput_per_s", "b32 /s", "{:.0f}"), ("size_mb", "size MB", "{:.1f}"),
    ("peak_memory_mb", "peak mem MB", "{:.0f}"), ("parity_top1_agreement", "top-1 agree", "{:.4f}"),
    ("parity_max_abs", "max |Δ|", "{:.2e}"), ("instances_needed", "instances", "{:.0f}"),
    ("cost_per_million", "cost/1M req", "{:.2f}"),
]


POINTS = {"accuracy", "macro_f1", "next_token_agreement"}  # differences of fractions shown in points
DELTA_ROWS = [("accuracy", "Δ acc"), ("macro_f1", "Δ macro-F1"), ("perplexity", "ppl ratio"),
              ("latency_p50_ms", "p50 b1 ratio"), ("batch_latency_p50_ms", "p50 b32 ratio")]
VERDICTS = {"pass": "PASS", "fail": "FAIL", "inconclusive": "INCONCLUSIVE"}


def cell(metric: str, fmt: str, metrics: dict[str, Any], intervals: dict[str, Any] | None) -> str:
    """A metric with its interval: ``0.7736 ±0.0068`` for quality, ``3.76 [3.70, 3.83]`` for skewed ones."""
    if metric not in metrics:
        return "–"
    iv = (intervals or {}).get(metric)
    text = fmt.format(metrics[metric])
    if not iv or iv["low"] == iv["high"]:
        return text
    if metric in POINTS:
        return f"{text} ±{(iv['high'] - iv['low']) / 2:.4f}"
    return f"{text} [{fmt.format(iv['low'])}, {fmt.format(iv['high'])}]"


def delta_cell(metric: str, comparison: dict[str, Any] | None) -> str:
    """``−0.14 pt [−0.62, +0.34]`` (quality difference) or ``1.02× [0.99, 1.05]`` (ratio to the baseline)."""
    if not comparison:
        return "–"
    if metric in POINTS and "difference" in comparison:
        d = comparison["difference"]
        return f"{d['value'] * 100:+.2f} pt [{d['low'] * 100:+.2f}, {d['high'] * 100:+.2f}]"
    r = comparison["ratio"]
    return f"{r['value']:.3f}× [{r['low']:.3f}, {r['high']:.3f}]"


def optimize_table(summary: dict[str, Any]) -> Table:
    """Metrics down, models across (fits a terminal for a handful of candidates), each number with its 95 %
    interval, the paired comparison with the baseline, and the gate's verdict last."""
    intervals = summary.get("intervals") or {}
    cols = [("source", "fp32", summary["source"], intervals.get("source"), None, "baseline")]
    if summary.get("champion") and summary["champion"] != summary["source"]:
        cols.append(("champion", "", summary["champion"], intervals.get("champion"), None, "baseline"))
    registered = (summary.get("registered") or {}).get("recipe")
    for name, cand in summary["candidates"].items():
        verdict = VERDICTS.get(cand.get("verdict", ""), "PASS" if cand["passed"] else "FAIL")
        if name == registered:
            verdict += " → challenger"
        cols.append((name, cand["precision"], cand["metrics"], cand.get("intervals"), cand.get("vs_baseline"),
                     verdict))
    table = Table(title="kiln optimize — values with 95 % intervals; Δ and ratios paired with the "
                        f"{summary.get('baseline', 'baseline')}", header_style="bold")
    table.add_column("metric")
    for name, precision, *_ in cols:
        table.add_column(f"{name}\n{precision}".strip(), justify="right")
    for metric, header, fmt in COLUMNS:
        if any(metric in c[2] for c in cols):
            table.add_row(header, *[cell(metric, fmt, m, iv) for _, _, m, iv, _, _ in cols])
    for metric, header in DELTA_ROWS:
        if any(vs and metric in vs for *_, vs, _ in cols):
            table.add_row(header, *[delta_cell(metric, (vs or {}).get(metric)) if vs else "" for *_, vs, _ in cols],
                          style="cyan")
    table.add_row("gate", *[c[-1] for c in cols], style="bold")
    return table


def failed_clauses(summary: dict[str, Any]) -> list[str]:
    """Every clause that kept a candidate out: failed or inconclusive."""
    out = []
    for name, cand in summary["candidates"].items():
        if cand["passed"]:
            continue
        for clause in cand.get("clauses") or []:
            if clause["status"] != "pass":
                out.append(f"{name}: {clause['reason']}")
    return out


def noise_line(summary: dict[str, Any]) -> str | None:
    """How noisy the machine was while timing: the reader's scale for the latency ratios."""
    noise = summary.get("noise") or {}
    if not noise:
        return None
    worst = max(noise.values())
    ev = summary.get("evidence") or {}
    return (f"machine noise: per-round p50 varied by {min(noise.values()):.1%}–{worst:.1%} (CV over "
            f"{ev.get('rounds', '?')} interleaved rounds); quality judged on {ev.get('rows', '?')} rows "
            f"of {ev.get('available_rows', '?')}")


def print_optimize(summary: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    console.print(optimize_table(summary))
    for line in failed_clauses(summary):
        console.print(f"  [red]✗[/red] {line}")
    if line := noise_line(summary):
        console.print(line)
    if summary.get("pareto_front"):
        console.print(f"Pareto front (accuracy, latency, size): {', '.join(summary['pareto_front'])}")
    if summary.get("registered"):
        reg = summary["registered"]
        if reg.get("alias") == "champion":
            console.print(f"{reg['name']} v{reg['version']} ({reg['recipe']}) is already @champion: nothing nominated")
        else:
            console.print(f"[green]registered {reg['name']} v{reg['version']} ({reg['recipe']}) as @challenger[/green]")
