"""``kiln bench``: PyTorch fp32 eager vs each candidate, measured in one run on this machine.

Quality comes from the (cached) evaluation on the test split; latency is measured afresh here, for
every model in the same process with the same threads, so the ratios are fair.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from kiln.settings import Settings
from kiln.tasks.compress.recipes import build, resolve_recipes
from kiln.tasks.core.cache import StageCache
from kiln.tasks.core.stages import Artifact
from kiln.tasks.data.datasets import load_splits
from kiln.tasks.engines import EngineOptions
from kiln.tasks.evaluate.benchmark import BenchConfig, measure
from kiln.tasks.optimize.candidates import (
    eval_frame,
    evaluate_candidate,
    package_candidate,
    resolve_source,
    stage_context_factory,
)
from kiln.tasks.registry import client as registry


def run_bench(settings: Settings, model: str, recipe_names: list[str], seconds: float,
              console: Console | None = None, baseline: str | None = None) -> list[dict]:
    """Measure the source and each recipe's candidate; print a table; return its rows.

    Speed-ups are against PyTorch fp32 eager, or against ``baseline`` (a recipe name, added to the run if
    missing) when given: both measured here, in the same process, with the same threads.
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
    timing = BenchConfig(max_seconds=seconds, min_runs=20)

    models = [("torch fp32 eager", source.folder, "fp32", source.key)]
    for recipe in resolve_recipes(recipe_names):
        make_ctx = stage_context_factory(source, splits, settings, source.meta.seq_len)
        built = build(recipe, Artifact("hf", source.folder), source.key, make_ctx, cache)
        folder = package_candidate(built, source, cache, source.meta.seq_len)
        models.append((recipe.name, folder, built.precision, built.key))

    rows = []
    _, reference = evaluate_candidate(models[0][0], source.folder, "fp32", source.key, frame, cache, options,
                            quality_bench, keep_outputs=True)
    for name, folder, precision, key in models:
        ev, _ = evaluate_candidate(name, folder, precision, key, frame, cache, options, quality_bench,
                         None if folder == source.folder else reference)
        speed = measure(folder, frame["text"].tolist()[:256], options, timing)
        rows.append({"model": name, "precision": precision, **{k: ev.metrics.get(k) for k in
                     ("accuracy", "macro_f1", "perplexity")}, **speed})
    base = next(r for r in rows if r["model"] == baseline) if baseline else rows[0]
    console.print(_table(rows, settings.threads, base))
    return rows


def _table(rows: list[dict], threads: int, base: dict) -> Table:
    table = Table(title=f"kiln bench — {threads} threads, inputs padded to the serving length; speed-up vs "
                        f"{base['model']}", header_style="bold")
    for header in ("model", "precision", "quality", "p50 b1 ms", "speed-up b1", "p50 b32 ms", "speed-up b32",
                   "size MB", "peak mem MB"):
        table.add_column(header, justify="left" if header in {"model", "precision"} else "right")
    for row in rows:
        quality = (f"acc {row['accuracy']:.4f}" if row.get("accuracy") is not None
                   else f"ppl {row['perplexity']:.2f}" if row.get("perplexity") is not None else "–")
        table.add_row(
            row["model"], row["precision"], quality, f"{row['latency_p50_ms']:.2f}",
            f"{base['latency_p50_ms'] / row['latency_p50_ms']:.2f}×", f"{row['batch_latency_p50_ms']:.1f}",
            f"{base['batch_latency_p50_ms'] / row['batch_latency_p50_ms']:.2f}×", f"{row['size_mb']:.1f}",
            f"{row['peak_memory_mb']:.0f}",
        )
    return table
