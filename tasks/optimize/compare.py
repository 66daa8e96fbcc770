"""``kiln bench``: PyTorch fp32 eager vs each candidate, measured in one run on this machine, with intervals.

Quality comes from the (cached) evaluation on the test split, with per-row outcomes: each value gets its 95 %
interval and each model a paired difference with the baseline on the same rows. Latency is measured afresh
here, for every model at once, in interleaved rounds in one process (same threads, same inputs), so a slow
moment of the machine lands in the same round for all of them; a speed-up is baseline / candidate with a
round-paired interval. The machine's own noise (how much the per-round median of identical work varies) is
printed under the table: a speed-up whose interval includes 1.00× is not distinguishable from it.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from kiln.settings import Settings
from kiln.tasks.compress.recipes import build, resolve_recipes
from kiln.tasks.core.cache import StageCache
from kiln.tasks.core.stages import Artifact
from kiln.tasks.data.datasets import load_splits
from kiln.tasks.engines import EngineOptions
from kiln.tasks.evaluate import latency, paired
from kiln.tasks.evaluate.benchmark import BenchConfig
from kiln.tasks.evaluate.cost import cost_config
from kiln.tasks.evaluate.evidence import LEVEL, Interval
from kiln.tasks.optimize.candidates import (
    Evaluated,
    eval_frame,
    evaluate_candidate,
    package_candidate,
    resolve_source,
    stage_context_factory,
)
from kiln.tasks.optimize.cascade import build_cascade
from kiln.tasks.optimize.judging import intervals, time_together
from kiln.tasks.registry import client as registry
from kiln.tasks.reports.tables import cell, delta_cell

SOURCE = "torch fp32 eager"
RESAMPLES = 2000  # bootstrap draws per interval: the interval's ends move by well under its width between seeds
QUALITY = (("accuracy", "acc", "{:.4f}"), ("perplexity", "ppl", "{:.2f}"))  # the headline quality metric


def run_bench(settings: Settings, model: str, recipe_names: list[str], seconds: float,
              console: Console | None = None, baseline: str | None = None) -> dict[str, Any]:
    """Measure the source and each recipe's candidate together; print a table and the machine noise.

    Speed-ups are against PyTorch fp32 eager, or against ``baseline`` (a recipe name, added to the run if
    missing) when given: both measured here, in the same process, in the same interleaved rounds.

    Args:
        settings: Kiln settings (registry, cache, threads, seed).
        model: NAME, NAME@ALIAS or NAME/VERSION of a registered model (an engine leads back to its source).
        recipe_names: recipes whose candidates are compared with the source.
        seconds: timed seconds per model and batch size, spread over the interleaved rounds.
        console: where the table goes (default: stdout).
        baseline: recipe name the speed-ups and quality differences are against (default: the source).

    Returns:
        A JSON-serialisable result: ``threads``, ``baseline``, ``rounds``, ``batch_size``, ``level``,
        ``noise`` and ``rows`` (per model: ``metrics``, ``intervals``, ``speedup_b1``, ``speedup_bN``,
        ``quality_delta``).
    """
    if baseline and baseline not in recipe_names:
        recipe_names = [baseline, *recipe_names]
    console = console or Console()
    client = registry.connect(settings)
    source = resolve_source(client, registry.ModelRef.parse(model), settings.home / "downloads")
    splits = load_splits(source.data)
    frame = eval_frame(splits, None, settings.seed)
    cache = StageCache(settings.cache_dir)
    options = EngineOptions(threads=settings.threads)
    quality_bench = BenchConfig(max_seconds=settings.bench_seconds)  # as optimize: reuses its cached evaluations
    timing = BenchConfig(max_seconds=seconds, min_runs=20, cost=cost_config(settings))

    packages = [(SOURCE, source.folder, "fp32", source.key)]
    for recipe in resolve_recipes(recipe_names):
        if recipe.cascade is not None:  # its members and threshold as optimize builds them (the same cache)
            built, folder = build_cascade(recipe, source, splits, cache, source.meta.seq_len, settings, "onnxruntime")
            packages.append((recipe.name, folder, built.precision, built.key))
            continue
        make_ctx = stage_context_factory(source, splits, settings, source.meta.seq_len)
        built = build(recipe, Artifact("hf", source.folder), source.key, make_ctx, cache)
        folder = package_candidate(built, source, cache, source.meta.seq_len)
        packages.append((recipe.name, folder, built.precision, built.key))

    reference_eval, reference = evaluate_candidate(SOURCE, source.folder, "fp32", source.key, frame, cache,
                                                   options, quality_bench, keep_outputs=True)
    models = [reference_eval] + [
        evaluate_candidate(name, folder, precision, key, frame, cache, options, quality_bench, reference)[0]
        for name, folder, precision, key in packages[1:]]
    noise_b1 = time_together(models, frame["text"].tolist()[:256], options, timing)
    base = next(m for m in models if m.name == baseline) if baseline else models[0]
    result = json_safe({
        "model": model, "threads": settings.threads, "baseline": base.name, "rounds": timing.rounds,
        "batch_size": timing.batch_sizes[1], "level": LEVEL, "noise": _noise(models, noise_b1),
        "rows": [_row(m, base, settings.seed) for m in models],
    })
    console.print(_table(result))
    for line in noise_lines(result):
        console.print(line)
    return result


def json_safe(value: Any) -> Any:
    """``value`` with numpy scalars as Python numbers and non-finite floats as None (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _noise(models: list[Evaluated], noise_b1: dict[str, float]) -> dict[str, Any]:
    """Per model, the coefficient of variation of its per-round medians (batch 1 and batch N); their medians."""
    per_model = {m.name: {"b1": noise_b1[m.name], "bN": latency.noise_cv(m.latency, "batch")}
                 for m in models if m.latency is not None}
    return {"measure": "coefficient of variation of per-round median latency", "models": per_model,
            "median_b1": statistics.median(v["b1"] for v in per_model.values()),
            "median_bN": statistics.median(v["bN"] for v in per_model.values())}


def _row(model: Evaluated, base: Evaluated, seed: int) -> dict[str, Any]:
    """One model's values, intervals, speed-ups against ``base`` and quality difference from it."""
    shown = intervals(model, level=LEVEL, resamples=RESAMPLES, seed=seed)
    return {
        "model": model.name, "precision": model.precision, "metrics": dict(model.metrics),
        "intervals": {metric: iv.to_dict() for metric, iv in shown.items()},
        "speedup_b1": _speedup("latency_p50_ms", model, base, seed).to_dict(),
        "speedup_bN": _speedup("batch_latency_p50_ms", model, base, seed).to_dict(),
        "quality_delta": None if model is base else _quality_delta(model, base, seed),
    }


def _speedup(metric: str, model: Evaluated, base: Evaluated, seed: int) -> Interval:
    """baseline / candidate of ``metric`` with its round-paired interval (the inverse of candidate / baseline:
    the bounds swap); exactly 1 for the baseline itself."""
    if model is base:
        return Interval.exact(1.0)
    assert model.latency is not None and base.latency is not None  # time_together attached them
    ratio = latency.ratio_interval(metric, model.latency, base.latency, level=LEVEL, resamples=RESAMPLES, seed=seed)
    return Interval(1 / ratio.value, 1 / ratio.high, 1 / ratio.low, ratio.level)


def _quality_delta(model: Evaluated, base: Evaluated, seed: int) -> dict[str, Any] | None:
    """The headline quality metric of ``model`` minus the baseline's, paired on the same rows."""
    metric = _quality_metric(model.metrics)
    if metric is None or model.rows is None or base.rows is None or model.rows.rows != base.rows.rows:
        return None
    comp = paired.paired_comparison(metric, model.rows, base.rows, labels=model.labels, level=LEVEL,
                                    resamples=RESAMPLES, seed=seed)
    if comp is None:
        return None
    return {"metric": metric, **comp.difference.to_dict(), "ratio": comp.ratio.to_dict(), "method": comp.method}


def _quality_metric(metrics: dict[str, float]) -> str | None:
    return next((metric for metric, _, _ in QUALITY if metrics.get(metric) is not None), None)


def _table(result: dict[str, Any]) -> Table:
    n = result["batch_size"]
    table = Table(title=f"kiln bench — {result['threads']} threads, inputs padded to the serving length, "
                        f"{result['rounds']} interleaved rounds; {result['level']:.0%} intervals; speed-up and Δ "
                        f"vs {result['baseline']}", header_style="bold")
    for header in ("model", "precision", "quality", "Δ vs baseline", "p50 b1 ms", "speed-up b1", f"p50 b{n} ms",
                   f"speed-up b{n}", "size MB", "peak mem MB", "cost/1M req"):
        table.add_column(header, justify="left" if header in {"model", "precision"} else "right")
    for row in result["rows"]:
        metrics, ivs = row["metrics"], row["intervals"]
        table.add_row(
            row["model"], row["precision"], _quality_cell(metrics, ivs), _delta_cell(row["quality_delta"]),
            cell("latency_p50_ms", "{:.2f}", metrics, ivs), _speedup_cell(row["speedup_b1"]),
            cell("batch_latency_p50_ms", "{:.1f}", metrics, ivs), _speedup_cell(row["speedup_bN"]),
            cell("size_mb", "{:.1f}", metrics, ivs), cell("peak_memory_mb", "{:.0f}", metrics, ivs),
            cell("cost_per_million", "{:.2f}", metrics, ivs),
        )
    return table


def _quality_cell(metrics: dict[str, float], ivs: dict[str, dict]) -> str:
    """``acc 0.7736 ±0.0068`` (a fraction: its half-width) or ``ppl 41.20 [40.10, 42.30]`` (a skewed one)."""
    metric = _quality_metric(metrics)
    if metric is None:
        return "–"
    _, label, fmt = next(q for q in QUALITY if q[0] == metric)
    return f"{label} {cell(metric, fmt, metrics, ivs)}"


def _delta_cell(delta: dict[str, Any] | None) -> str:
    if delta is None:
        return "–"
    label = {"accuracy": "acc", "perplexity": "ppl"}.get(delta["metric"], delta["metric"])
    return f"{label} {delta_cell(delta['metric'], {'difference': delta, 'ratio': delta['ratio']})}"


def _speedup_cell(speedup: dict[str, float]) -> str:
    if speedup["low"] == speedup["high"]:
        return f"{speedup['value']:.2f}×"
    return f"{speedup['value']:.2f}× [{speedup['low']:.2f}, {speedup['high']:.2f}]"


def noise_lines(result: dict[str, Any]) -> list[str]:
    """The machine noise under the table: each model's round-to-round variation, then what it means."""
    noise, n = result["noise"], result["batch_size"]
    per_model = ", ".join(f"{name} {v['b1']:.1%} / {v['bN']:.1%}" for name, v in noise["models"].items())
    return [f"round-to-round noise (CV of per-round medians, b1 / b{n}): {per_model}",
            f"machine noise: per-round p50 varies by {noise['median_b1']:.1%} (CV, median over models); speed-ups "
            "whose interval includes 1.00× are not distinguishable from noise"]
