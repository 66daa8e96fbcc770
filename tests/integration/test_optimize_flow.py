"""The optimize flow as real Prefect flow runs against a real MLflow SQLite registry, on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from kiln.errors import DataCheckFailed, GateError
from kiln.flows.optimize import OptimizeParams, optimize
from kiln.tasks.data.datasets import DatasetSpec
from kiln.tasks.registry import aliases
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.onboard import register_folder
from tests.integration.helpers import registry_state


def _register(settings, tiny_models, family, spec, name="tiny"):
    client = registry.connect(settings)
    task = "sequence-classification" if family == "bert" else "causal-lm"
    if task == "causal-lm":
        spec = spec.model_copy(update={"label_column": None})
    register_folder(client, settings, tiny_models[family], name, task, spec)
    return client


def test_classifier_becomes_a_gated_challenger(settings, tiny_models, tiny_spec, monkeypatch):
    monkeypatch.setenv("KILN_COST_TARGET_P95_MS", "10000")  # every tiny model servable: cost is measured
    client = _register(settings, tiny_models, "bert", tiny_spec)
    summary = optimize(OptimizeParams(model="tiny@champion"))

    assert set(summary["candidates"]) == {"onnx-fp32", "int8-dynamic"}
    assert registry.aliases_of(client, "tiny") == {"champion": "1", "challenger": "2"}
    v2 = client.get_model_version("tiny", "2")
    tags = v2.tags
    assert tags["kiln.gate"] == "passed" and tags["kiln.parent_version"] == "1"
    assert tags["kiln.recipe"] == summary["registered"]["recipe"]
    assert tags["kiln.precision"] in {"fp32", "int8-dynamic"}
    assert len(tags["kiln.dataset_digest"]) == 16 and tags["kiln.git_commit"]
    assert all(c["metrics"]["peak_memory_mb"] > 0 for c in summary["candidates"].values())
    assert json.loads(tags["kiln.metrics"])["accuracy"] == pytest.approx(
        summary["candidates"][tags["kiln.recipe"]]["metrics"]["accuracy"], abs=1e-6)
    assert all("ok" in r for r in json.loads(tags["kiln.gate_reasons"]))

    run = client.get_run(tags["kiln.run_id"])
    assert run.info.status == "FINISHED"
    for name in ("onnx-fp32", "int8-dynamic"):
        for metric in ("accuracy", "macro_f1", "latency_p50_ms", "latency_p99_ms", "throughput_per_s", "size_mb",
                       "peak_memory_mb", "parity_top1_agreement", "cost_per_million"):
            assert f"{name}.{metric}" in run.data.metrics
    # Every stage is logged: duration, size, parameter count, and quality after the stage.
    for metric in ("seconds", "size_mb", "params", "stage_accuracy"):
        assert f"int8-dynamic.2-int8_dynamic.{metric}" in run.data.metrics
    assert run.data.metrics["int8-dynamic.2-int8_dynamic.size_mb"] < run.data.metrics["int8-dynamic.1-export.size_mb"]
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "pareto.png" in artifacts and "report.html" in artifacts
    report = (Path(mlflow.artifacts.download_artifacts(f"{run.info.artifact_uri}/report.html"))).read_text()
    assert all(name in report for name in ("onnx-fp32", "int8-dynamic", "data:image/png;base64", "cost/1M req"))
    assert "expect_column_values_to_not_be_in_set" in report and "as <code>@challenger</code>" in report
    logged = mlflow.get_logged_model(v2.source.removeprefix("models:/"))
    assert {m.key for m in logged.metrics} >= {"accuracy", "latency_p50_ms"}

    predictions = mlflow.pyfunc.load_model("models:/tiny@challenger").predict(["what a day", "awful traffic"])
    assert list(predictions.columns[:2]) == ["label", "score"] and len(predictions) == 2
    assert set(predictions["label"]) <= {"negative", "neutral", "positive"}
    assert predictions["score"].between(0, 1).all()


def test_rerun_skips_finished_work_and_never_duplicates_a_version(settings, tiny_models, tiny_spec):
    client = _register(settings, tiny_models, "bert", tiny_spec)
    optimize(OptimizeParams(model="tiny"))
    before = registry_state(client, "tiny")
    optimize(OptimizeParams(model="tiny"))
    assert registry_state(client, "tiny") == before
    assert len(client.search_model_versions("name='tiny'")) == 2
    # A candidate whose canary rolled it back is not nominated again by a re-run.
    client.set_model_version_tag("tiny", "2", "kiln.rollout.status", "rolled_back")
    client.delete_registered_model_alias("tiny", "challenger")
    with pytest.raises(GateError, match="canary was rolled back"):
        optimize(OptimizeParams(model="tiny"))
    assert registry.aliases_of(client, "tiny") == {"champion": "1"}


def test_the_same_engine_gated_against_itself_passes(settings, tiny_models, tiny_spec):
    """A real A/A run: the ONNX engine is registered and promoted to champion; the same engine, rebuilt as a
    candidate from the same source, is then gated against it with the default policy, timed in the same
    interleaved rounds. Identical predictions and indistinguishable speed: every clause passes."""
    client = _register(settings, tiny_models, "bert", tiny_spec)
    optimize(OptimizeParams(model="tiny/1", recipes=["onnx-fp32"]))
    aliases.promote(client, "tiny", home=settings.home, expected=registry.aliases_of(client, "tiny"))
    assert registry.aliases_of(client, "tiny") == {"champion": "2", "previous": "1"}

    summary = optimize(OptimizeParams(model="tiny/1", recipes=["onnx-fp32"]))
    cand = summary["candidates"]["onnx-fp32"]
    assert summary["baseline"] == "champion" and cand["verdict"] == "pass", cand["reasons"]
    by_metric = {c["clause"].split()[0]: c for c in cand["clauses"]}
    assert by_metric["accuracy"]["comparison"] == pytest.approx(
        {"value": 0.0, "low": 0.0, "high": 0.0, "level": 0.95})  # the same predictions on every row
    latency = by_metric["latency_p50_ms"]
    assert latency["comparison_kind"] == "ratio" and latency["comparison"]["low"] <= latency["comparison"]["value"]
    assert summary["registered"] == {"name": "tiny", "version": "2", "recipe": "onnx-fp32", "alias": "champion"}
    assert registry.aliases_of(client, "tiny") == {"champion": "2", "previous": "1"}  # nothing to nominate


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_causal_lm_through_the_same_flow(settings, tiny_models, tiny_spec, family):
    client = _register(settings, tiny_models, family, tiny_spec, name=f"lm-{family}")
    summary = optimize(OptimizeParams(model=f"lm-{family}", eval_limit=24))
    fp32 = summary["candidates"]["onnx-fp32"]["metrics"]
    assert fp32["perplexity"] == pytest.approx(summary["source"]["perplexity"], rel=1e-3)
    assert fp32["next_token_agreement"] > 0.99
    assert registry.aliases_of(client, f"lm-{family}")["challenger"] == "2"
    out = mlflow.pyfunc.load_model(f"models:/lm-{family}@challenger").predict(["the car"], params={"max_new_tokens": 3})
    assert out.columns.tolist() == ["generated_text"] and out["generated_text"][0].startswith("the car")


def test_failed_gate_registers_nothing_and_spells_out_clauses(settings, tiny_models, tiny_spec, tmp_path,
                                                              monkeypatch):
    monkeypatch.setenv("KILN_COST_TARGET_P95_MS", "10000")  # every tiny model servable: cost is measured
    client = _register(settings, tiny_models, "bert", tiny_spec)
    policy = tmp_path / "strict.yaml"
    policy.write_text("clauses: ['size_mb <= 0.001', 'accuracy >= champion + 0.5', "
                      "'cost_per_million <= champion * 0.001']\n")
    before = registry_state(client, "tiny")
    with pytest.raises(GateError, match=r"size_mb .* <= 0.001: FAILED .*accuracy .* FAILED.*cost_per_million .*"
                                        r"FAILED"):
        optimize(OptimizeParams(model="tiny", policy=str(policy)))
    assert registry_state(client, "tiny") == before
    run = client.search_runs([client.get_experiment_by_name(settings.experiment).experiment_id],
                             "tags.`kiln.model` = 'tiny@champion'")[0]
    assert run.info.status == "FAILED"
    gate = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/gate/int8-dynamic.json")
    assert not gate["passed"] and len([c for c in gate["clauses"] if not c["passed"]]) == 3
    cost = next(c for c in gate["clauses"] if c["clause"].startswith("cost_per_million"))
    assert cost["observed"] > 0 and cost["threshold"] > 0  # measured for candidate and champion alike


def test_failing_data_checks_stop_the_flow_with_a_logged_report(settings, tiny_models, tiny_spec, tmp_path,
                                                                tiny_splits):
    client = _register(settings, tiny_models, "bert", tiny_spec)
    frame = tiny_splits.train.copy()
    frame.loc[0, "text"] = "z" * 5000  # longer than the suite allows
    frame.loc[1:3, "label"] = None
    path = tmp_path / "bad.csv"
    frame.to_csv(path, index=False)
    before = registry_state(client, "tiny")
    with pytest.raises(DataCheckFailed, match="expect_column_value_lengths_to_be_between"):
        optimize(OptimizeParams(model="tiny", data=DatasetSpec(source=str(path), label_column="label")))
    assert registry_state(client, "tiny") == before
    run = client.search_runs([client.get_experiment_by_name(settings.experiment).experiment_id])[0]
    report = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/datachecks.json")
    assert report["success"] is False


def test_hybrid_recipe_prune_distill_quantize(settings, tiny_models, tiny_spec, tmp_path):
    """prune FFN → distil from the source → shrink the vocabulary → export → INT8, on a tiny BERT.

    The vocabulary stage rewrites the tokenizer: later stages, the quality checks and the package must
    all use the new one (an old token id would index past the smaller embedding).
    """
    recipe_file = tmp_path / "recipes.yaml"
    recipe_file.write_text(
        "prune+distill+int8:\n  stages:\n"
        "    - {stage: prune_ffn, params: {fraction: 0.5, importance: activation}}\n"
        "    - {stage: distill, params: {teacher: source, max_steps: 6, batch_size: 16}}\n"
        "    - {stage: prune_vocab, params: {keep_single_chars: false}}\n"
        "    - {stage: export}\n"
        "    - {stage: int8_dynamic}\n"
    )
    policy = tmp_path / "lenient.yaml"
    policy.write_text("clauses: ['size_mb <= 100']\nparity: {default: {top1_agreement: 0.0}}\n")
    _register(settings, tiny_models, "bert", tiny_spec)
    summary = optimize(OptimizeParams(model="tiny", recipes=["onnx-fp32", "prune+distill+int8"],
                                      recipe_file=str(recipe_file), policy=str(policy)))
    hybrid = summary["candidates"]["prune+distill+int8"]  # "+" is not allowed in MLflow names: sanitised
    assert hybrid["passed"] and hybrid["metrics"]["accuracy"] > 0
    assert hybrid["metrics"]["size_mb"] < summary["candidates"]["onnx-fp32"]["metrics"]["size_mb"] / 2
