"""A cascade candidate end to end on the tiny model: built from a cascade recipe like the optimize flow builds a
candidate (cached member stages, threshold chosen on validation), evaluated and timed like any candidate,
logged and loaded back through MLflow pyfunc, and served as one OIP v2 model whose escalations show in
``/metrics``. (The whole flow with a cascade recipe runs the same functions; it is not run here: 80 s.)"""

from __future__ import annotations

import json
import re

import mlflow
import numpy as np
import pytest
from starlette.testclient import TestClient

from kiln.infra.server import create_app
from kiln.tasks.compress.recipes import resolve_recipes
from kiln.tasks.core.cache import StageCache
from kiln.tasks.engines import EngineOptions
from kiln.tasks.evaluate import benchmark
from kiln.tasks.evaluate.benchmark import BenchConfig
from kiln.tasks.models.cascade import package_cascade
from kiln.tasks.models.predictor import Predictor
from kiln.tasks.optimize import candidates as cands
from kiln.tasks.optimize import judging, publish
from kiln.tasks.optimize.cascade import build_cascade, validation_outcomes
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.onboard import register_folder


def _metric(text: str, name: str) -> float:
    found = re.search(rf'^{name}\{{model="tiny",version="1"\}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def test_a_cascade_candidate_is_built_evaluated_logged_and_served_as_one_model(settings, tiny_models, tiny_spec,
                                                                               tiny_splits, tmp_path, monkeypatch):
    # The memory probe's own code, in this process: a fresh Python importing torch costs ~10 s on two cores.
    monkeypatch.setattr(benchmark, "peak_memory_mb", benchmark._probe)
    client = registry.connect(settings)
    register_folder(client, settings, tiny_models["bert"], "tiny", "sequence-classification", tiny_spec)
    source = cands.resolve_source(client, registry.ModelRef.parse("tiny@champion"), settings.home / "downloads")
    extra = tmp_path / "recipes.yaml"
    extra.write_text("tiny-cascade: {cascade: {small: int8-dynamic, large: champion, max_accuracy_drop: 0.003}}\n")
    (recipe,) = resolve_recipes(["tiny-cascade"], extra)
    cache = StageCache(settings.cache_dir)

    built, folder = build_cascade(recipe, source, tiny_splits, cache, 64, settings, "onnxruntime")
    assert built.precision == "cascade" and [r.stage for r in built.records] == ["export", "int8_dynamic", "cascade"]
    # The threshold meets the target on the validation split, through the cascade as it runs.
    chosen = json.loads((folder / "cascade.json").read_text())["chosen"]
    options = EngineOptions(threads=settings.threads)
    _, predicted, truth = validation_outcomes(folder, tiny_splits.validation, tiny_splits.labels, options)
    accuracy = float(np.mean(predicted == truth))
    assert accuracy == pytest.approx(chosen["accuracy"])
    assert accuracy >= chosen["large_accuracy"] - 0.003 - 1e-9
    # Built again: every stage, the threshold and the package come from the cache.
    again, folder_again = build_cascade(recipe, source, tiny_splits, cache, 64, settings, "onnxruntime")
    assert folder_again == folder and all(r.cached for r in again.records)

    # Evaluated and timed like any candidate (the flow's own functions).
    frame = cands.eval_frame(tiny_splits, 64, settings.seed)
    bench = BenchConfig(warmup=1, min_runs=4, max_seconds=0.2, rounds=4)
    ev, _ = cands.evaluate_candidate(recipe.name, folder, built.precision, built.key, frame, cache, options, bench)
    judging.time_together([ev], frame["text"].tolist()[:32], options, bench)
    assert {"accuracy", "escalation_rate", "latency_p50_ms", "latency_p95_ms", "throughput_per_s", "size_mb",
            "peak_memory_mb"} <= set(ev.metrics)
    assert 0.0 <= ev.metrics["escalation_rate"] <= 1.0

    # Logged as one MLflow model; pyfunc loads and predicts with the cascade.
    run = client.create_run(registry.ensure_experiment(client, settings))
    model_id = publish.log_candidate(run.info.run_id, ev, settings.home / "staging")
    loaded = mlflow.pyfunc.load_model(f"models:/{model_id}")
    assert loaded.unwrap_python_model().predictor.is_cascade
    answer = loaded.predict(tiny_splits.test["text"].tolist()[:4])
    assert len(answer) == 4 and set(answer["label"]) <= set(tiny_splits.labels)

    # Served as one OIP v2 model. Its members repackaged with a threshold no tiny-model answer reaches, so
    # every row escalates: the metrics count each one.
    eager = package_cascade(folder / "small", folder / "large", tmp_path / "eager", 1.0, recipe="eager",
                            member_recipes={"small": "int8-dynamic", "large": "champion"})
    texts = tiny_splits.test["text"].tolist()[:5]
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}
    with TestClient(create_app({"tiny": Predictor(eager, options)})) as http:
        before = http.get("/metrics").text
        reply = http.post("/v2/models/tiny/infer", json=body)
        assert reply.status_code == 200, reply.text
        labels = next(o for o in reply.json()["outputs"] if o["name"] == "label")["data"]
        assert len(labels) == len(texts)
        after = http.get("/metrics").text
    assert _metric(after, "kiln_cascade_escalations_total") - _metric(before, "kiln_cascade_escalations_total") == 5
    assert _metric(after, "kiln_cascade_rows_total") == 5
    assert 'kiln_cascade_stage_seconds_count{model="tiny",stage="large",version="1"} 1.0' in after
