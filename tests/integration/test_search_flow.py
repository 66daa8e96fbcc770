"""``kiln optimize --search`` end to end on the tiny classifier: trials as nested MLflow runs, the Pareto front as
candidates, a gated challenger whose recorded recipe rebuilds to the same cache keys, and a resumed study."""

from __future__ import annotations

import mlflow
import optuna
import yaml
from typer.testing import CliRunner

from kiln.cli.app import app
from kiln.flows.optimize import OptimizeParams, optimize
from kiln.tasks.compress import recipes
from kiln.tasks.core.cache import StageCache
from kiln.tasks.core.stages import Artifact
from kiln.tasks.optimize import search
from kiln.tasks.optimize.candidates import resolve_source, stage_context_factory
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.onboard import register_folder


def test_search_registers_a_gated_front_member_with_a_rebuildable_recipe(settings, tiny_models, tiny_spec, tmp_path,
                                                                         tiny_splits):
    client = registry.connect(settings)
    register_folder(client, settings, tiny_models["bert"], "tiny", "sequence-classification", tiny_spec)
    policy = tmp_path / "smallest.yaml"  # every candidate passes; the smallest wins (a search trial: INT8)
    policy.write_text("objective: {metric: size_mb, goal: minimize}\nwhen_no_champion: source\n"
                      "clauses: ['size_mb <= 500']\n")
    params = OptimizeParams(model="tiny", recipes=["onnx-fp32"], policy=str(policy), eval_limit=40,
                            search=search.SearchParams(budget="10m", trials=3, space="quick"))
    summary = optimize(params)

    found = summary["search"]
    assert found["trials_this_run"] == 3 and found["front"]
    assert set(found["front"]) <= set(summary["candidates"])  # front members were gated like any candidate
    run_id = client.get_model_version("tiny", summary["registered"]["version"]).tags["kiln.run_id"]
    nested = client.search_runs([client.get_run(run_id).info.experiment_id],
                                f"tags.mlflow.parentRunId = '{run_id}'")
    assert len(nested) == 3
    assert {r.data.tags["kiln.search.state"] for r in nested} <= {"complete", "pruned", "failed"}
    assert all(r.data.params["1-distill"] for r in nested)
    done = [r for r in nested if r.data.tags["kiln.search.state"] == "complete"]
    assert done and all({"accuracy", "latency_p50_ms", "size_mb"} <= set(r.data.metrics) for r in done)
    artifacts = {a.path for a in client.list_artifacts(run_id, "search")}
    assert {"search/trials.png", "search/recipes.yaml", "search/trials.json"} <= artifacts

    registered = summary["registered"]
    assert registered["recipe"] in found["front"] and registered["alias"] == "challenger"
    version = client.get_model_version("tiny", registered["version"])
    recipe_file = tmp_path / "found.yaml"
    recipe_file.write_text(version.tags["kiln.recipe_yaml"])
    assert list(yaml.safe_load(recipe_file.read_text())) == [registered["recipe"]]

    # The recorded recipe, read back as a user's --recipe-file, rebuilds from the cache to the same key.
    (again,) = recipes.recipes_for([registered["recipe"]], recipe_file, tiny_models["bert"])
    source = resolve_source(client, registry.ModelRef.parse("tiny"), settings.home / "downloads")
    make_ctx = stage_context_factory(source, tiny_splits, settings, 64)
    rebuilt = recipes.build(again, Artifact("hf", source.folder), source.key, make_ctx, StageCache(settings.cache_dir))
    assert all(r.cached for r in rebuilt.records)
    assert rebuilt.key == version.tags["kiln.candidate_key"]

    # A re-run with the same model, data and space resumes the study instead of starting over.
    study = optuna.load_study(study_name=found["study"], storage=search.storage(search.storage_url(settings)))
    assert len(study.trials) == 3
    summary_json = mlflow.artifacts.load_dict(f"{client.get_run(run_id).info.artifact_uri}/summary.json")
    assert summary_json["search"]["study"] == found["study"]


def test_a_bad_budget_is_refused_in_one_line(settings):
    result = CliRunner().invoke(app, ["optimize", "--model", "tiny", "--search", "--budget", "20x"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "budget '20x' is not a duration" in lines[0], result.output
    assert CliRunner().invoke(app, ["optimize", "--model", "tiny", "--budget", "5m"]).exit_code == 2


def test_the_study_lives_in_postgresql_and_two_trials_run_at_once(settings, tiny_models, tiny_spec, postgres_url,
                                                                   monkeypatch):
    # The URL as a user writes it (libpq's spelling): Kiln picks the psycopg 3 driver itself.
    assert postgres_url.startswith("postgresql://")
    monkeypatch.setenv("KILN_SEARCH_STORAGE", postgres_url)
    monkeypatch.setenv("KILN_SEARCH_PARALLEL", "2")
    client = registry.connect(settings)
    register_folder(client, settings, tiny_models["bert"], "tiny", "sequence-classification", tiny_spec)
    params = OptimizeParams(model="tiny", recipes=["onnx-fp32"], eval_limit=40,
                            search=search.SearchParams(budget="10m", trials=2, space="quick"))
    found = optimize(params)["search"]
    assert found["trials_this_run"] == 2

    study = optuna.load_study(study_name=found["study"], storage=search.storage(postgres_url))
    assert len(study.trials) == 2 and all(t.state.is_finished() for t in study.trials)
    assert not (settings.home / "search.db").exists()  # nothing went to the SQLite default

    again = optimize(params.model_copy(update={"search": search.SearchParams(budget="10m", trials=1,
                                                                             space="quick")}))["search"]
    assert again["study"] == found["study"]
    assert len(optuna.load_study(study_name=found["study"], storage=search.storage(postgres_url)).trials) == 3
