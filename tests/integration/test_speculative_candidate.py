"""A speculative candidate end to end on the tiny Llama: a ``speculative`` recipe built like the optimize flow
builds a candidate (the ``draft`` stage derives a 1-layer draft from the champion, the champion is exported with
its KV cache), evaluated like any candidate (acceptance rate and speed-up recorded for the gate), logged and
loaded back through MLflow pyfunc, where it answers exactly what the champion's own greedy decoding answers."""

from __future__ import annotations

import mlflow
import pandas as pd

from kiln.tasks.compress.recipes import resolve_recipes
from kiln.tasks.core.cache import StageCache
from kiln.tasks.engines import EngineOptions
from kiln.tasks.evaluate import benchmark
from kiln.tasks.evaluate.benchmark import BenchConfig
from kiln.tasks.models.predictor import Predictor
from kiln.tasks.optimize import candidates as cands
from kiln.tasks.optimize import publish
from kiln.tasks.optimize.speculative import build_speculative
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.onboard import register_folder

RECIPES = """
tiny-draft:
  stages:
    - {stage: draft, params: {layers: [1], prompts: 8, prompt_tokens: 4, new_tokens: 6,
                              distill: {max_steps: 2, batch_size: 4}}}
    - {stage: export}
tiny-speculative: {speculative: {draft: tiny-draft, target: champion, lookahead: 3}}
"""


def test_a_speculative_candidate_is_built_evaluated_and_loaded_as_one_model(settings, tiny_models, tiny_spec,
                                                                             tiny_splits, tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark, "peak_memory_mb", benchmark._probe)  # no fresh Python importing torch
    client = registry.connect(settings)
    register_folder(client, settings, tiny_models["llama"], "lm", "causal-lm",
                    tiny_spec.model_copy(update={"label_column": None}))
    source = cands.resolve_source(client, registry.ModelRef.parse("lm@champion"), settings.home / "downloads")
    extra = tmp_path / "recipes.yaml"
    extra.write_text(RECIPES)
    (recipe,) = resolve_recipes(["tiny-speculative"], extra)
    cache = StageCache(settings.cache_dir)

    built, folder = build_speculative(recipe, source, tiny_splits, cache, 32, settings, "onnxruntime")
    assert [r.stage for r in built.records] == ["draft", "export", "speculative"]
    assert 0.0 <= built.records[-1].metrics["validation_acceptance_rate"] <= 1.0
    again, _ = build_speculative(recipe, source, tiny_splits, cache, 32, settings, "onnxruntime")
    assert all(r.cached for r in again.records)

    options = EngineOptions(threads=settings.threads)
    frame = cands.eval_frame(tiny_splits, 8, settings.seed)
    bench = BenchConfig(warmup=1, min_runs=4, max_seconds=0.1, rounds=4)
    ev, _ = cands.evaluate_candidate(recipe.name, folder, built.precision, built.key, frame, cache, options, bench)
    assert 0.0 <= ev.metrics["acceptance_rate"] <= 1.0 and ev.metrics["speculative_speedup"] > 0

    run = client.create_run(registry.ensure_experiment(client, settings))
    model_id = publish.log_candidate(run.info.run_id, ev, settings.home / "staging")
    loaded = mlflow.pyfunc.load_model(f"models:/{model_id}")
    assert loaded.unwrap_python_model().predictor.is_speculative
    texts = ["the movie was", "boring"]
    answer = loaded.predict(texts, params={"max_new_tokens": 6})
    champion_alone = Predictor(source.folder).predict(texts, max_new_tokens=6)  # transformers, no draft
    pd.testing.assert_series_equal(answer["generated_text"], champion_alone["generated_text"])
