"""The compression search without MLflow or Prefect: budgets, the space → recipe mapping, the ask/tell loop's
time keeping, and early stopping through a stage's progress callback."""

from __future__ import annotations

import shutil
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
from transformers import BertConfig

from kiln.errors import ConfigError
from kiln.settings import load_settings
from kiln.tasks.compress import recipes
from kiln.tasks.core.cache import StageCache
from kiln.tasks.core.stages import Artifact, StageResult
from kiln.tasks.engines import EngineOptions
from kiln.tasks.optimize import search
from kiln.tasks.optimize.search_space import PRESETS, Shape, kept_layers, space_named, suggest_recipe
from kiln.tasks.optimize.search_trial import TRIAL_BENCH, TrialEnv, evaluate_trial

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.mark.parametrize(("text", "seconds"), [("20m", 1200), ("90s", 90), ("1h30m", 5400), ("1.5h", 5400),
                                                (" 2M ", 120)])
def test_budgets_read_as_durations(text, seconds):
    assert search.parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["20", "20x", "", "m", "0m", "-5m", "20 minutes"])
def test_a_bad_budget_is_one_line(text):
    with pytest.raises(ConfigError, match="budget") as caught:
        search.parse_budget(text)
    assert "\n" not in str(caught.value)


def test_every_point_of_every_space_is_a_valid_recipe_with_the_shared_stage_first():
    config = BertConfig(num_hidden_layers=6, num_attention_heads=12)
    shape = Shape.of(config)
    for preset in PRESETS:
        space = space_named(preset)
        study = optuna.create_study(directions=list(search.DIRECTIONS),
                                    sampler=optuna.samplers.RandomSampler(seed=1))
        for _ in range(12):
            trial = study.ask()
            recipe = suggest_recipe(trial, space, shape, f"search-t{trial.number}")
            recipe.check_against(config)  # layers, heads within the model
            first = recipe.stages[0]
            assert first.stage == "distill" and first.params["layers"] == sorted(set(first.params["layers"]))
            assert [s.stage for s in recipe.stages][-2:] in (["export", "int8_dynamic"], ["export", "int8_static"])
            study.tell(trial, [0.5, 1.0, 1.0])
    assert kept_layers(6, 3, "spread") == [0, 2, 5] and kept_layers(6, 3, "first") == [0, 1, 2]


def test_unknown_space_and_non_classifier_are_refused():
    with pytest.raises(ConfigError, match="unknown search space 'huge'"):
        space_named("huge")
    with pytest.raises(ConfigError, match="classifiers"):
        search.check_space(BertConfig(), "causal-lm")


def _fake_execute(clock: list[float], seconds: float):
    def run(jobs):
        out = []
        for job in jobs:
            clock[0] += seconds
            metrics = {"accuracy": 0.5 + job.number / 100, "latency_p50_ms": 10.0 - job.number, "size_mb": 5.0}
            out.append(search.TrialOutcome(job.number, job.recipe, "complete", metrics, seconds=seconds))
        return out
    return run


def test_no_trial_starts_when_the_median_trial_cannot_fit():
    clock = [0.0]
    study = optuna.create_study(directions=list(search.DIRECTIONS))
    shape = Shape(layers=6, heads=12)
    done = search.run_trials(study, space_named("default"), shape, _fake_execute(clock, 10.0), budget_s=35,
                             clock=lambda: clock[0])
    # starts at 0, 10, 20; at 30 only 5 s are left for a 10 s trial
    assert [o.number for o in done] == [0, 1, 2] and clock[0] == 30
    capped = search.run_trials(study, space_named("default"), shape, _fake_execute(clock, 1.0), budget_s=1e6,
                               max_trials=2, n_parallel=3, clock=lambda: clock[0])
    assert len(capped) == 2 and len(study.trials) == 5
    assert all(t.user_attrs["recipe"]["stages"] for t in study.trials)
    assert {t.number for t, _ in search.front(study, cap=10)} <= {t.number for t in study.trials}


def test_a_trial_the_deadline_stopped_is_asked_again_by_the_next_run():
    clock = [0.0]
    study = optuna.create_study(directions=list(search.DIRECTIONS), sampler=optuna.samplers.RandomSampler(seed=0))
    shape, space = Shape(layers=6, heads=12), space_named("default")

    def stopped(jobs):
        return [search.TrialOutcome(j.number, j.recipe, "pruned", seconds=5, reason="budget spent at distill step 40")
                for j in jobs]

    (first,) = search.run_trials(study, space, shape, stopped, budget_s=100, max_trials=1, clock=lambda: clock[0])
    assert study.trials[0].params == space.start[0]  # a new study starts from the space's start points
    starts = len(space.start)
    assert starts >= 2
    search.run_trials(study, space, shape, _fake_execute(clock, 1.0), budget_s=100, max_trials=starts,
                      clock=lambda: clock[0])
    # the queue as it was: the other start points ...
    assert [t.params for t in study.trials[1:starts]] == space.start[1:]
    assert study.trials[starts].params == study.trials[0].params  # ... then the stopped trial, again
    assert search.run_trials(study, space, shape, _fake_execute(clock, 1.0), budget_s=100, max_trials=1,
                             clock=lambda: clock[0])[0].recipe.stages != first.recipe.stages  # resumed once only


def fake_distill(artifact, params: dict[str, Any], ctx) -> StageResult:
    """A first stage that reports a fixed KL every step, as distill does through ``ctx.progress``."""
    for step in range(1, 6):
        if getattr(ctx, "progress", None):
            ctx.progress("distill", step * 10, {"kl": params["kl"]})
    shutil.copytree(artifact.path, ctx.workdir / "model")
    return StageResult(Artifact("hf", ctx.workdir / "model"))


def test_a_trial_whose_distillation_lags_is_pruned_and_a_spent_budget_stops_one(tmp_path, monkeypatch, tiny_models,
                                                                                  tiny_splits):
    monkeypatch.setitem(recipes.STAGES, "fake_distill", f"{__name__}:fake_distill")
    monkeypatch.setenv("KILN_HOME", str(tmp_path / ".kiln"))
    settings = load_settings()
    source = SimpleNamespace(folder=tiny_models["bert"], key="tiny-source", meta=SimpleNamespace(
                             task="sequence-classification", labels=tiny_splits.labels))
    env = TrialEnv(source, tiny_splits, StageCache(tmp_path / "cache"), settings, 32, EngineOptions(threads=1),
                   eval_rows=32, bench=TRIAL_BENCH.model_copy(update={"max_seconds": 0.1, "warmup": 1}))
    url = f"sqlite:///{tmp_path / 'search.db'}"

    def job(number: int, kl: float, deadline: float = 1e12):
        recipe = recipes.Recipe(name=f"t{number}", stages=[
            recipes.StageSpec(stage="fake_distill", params={"kl": kl, "layers": [0]}),
            recipes.StageSpec(stage="export"), recipes.StageSpec(stage="int8_dynamic")])
        study, shadow = search._shadow(url, "unit", recipe)
        spec = search.PruneSpec(url, study.study_name, shadow._trial_id, startup_trials=1)
        return search.TrialJob(number, recipe, deadline, spec), study, shadow

    good, study, shadow = job(0, kl=0.1)
    first = evaluate_trial(good, env)
    assert first.state == "complete" and first.last_kl == 0.1 and first.metrics["size_mb"] > 0
    search._tell_shadow(study, shadow, first)

    bad, study, shadow = job(1, kl=5.0)
    pruned = evaluate_trial(bad, env)
    assert pruned.state == "pruned" and "worse than the median" in pruned.reason
    search._tell_shadow(study, shadow, pruned)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED"]

    late, _, _ = job(2, kl=0.05, deadline=0.0)
    stopped = evaluate_trial(late, env)
    assert stopped.state == "pruned" and "budget spent" in stopped.reason


def test_the_cli_table_marks_the_front():
    from rich.console import Console

    from kiln.cli.search import print_search, search_params

    trials = [{"number": 0, "state": "complete", "recipe": "search-t0", "description": "search: layers [0, 2]",
               "seconds": 61.0, "metrics": {"accuracy": 0.77, "latency_p50_ms": 0.7, "throughput_per_s": 900.0,
                                            "size_mb": 6.1}},
              {"number": 1, "state": "pruned", "recipe": "search-t1", "reason": "budget spent at distill step 40",
               "seconds": 20.0, "metrics": {}}]
    summary = {"search": {"study": "kiln-search-x", "trials_this_run": 2, "states": {"complete": 1, "pruned": 1},
                          "budget": "20m", "front": ["search-t0"], "trials": trials}}
    console = Console(record=True, width=200)
    print_search(summary, console)
    text = console.export_text()
    assert "★ 0" in text and "0.7700" in text and "budget spent" in text
    with pytest.raises(ConfigError, match="add --search"):
        search_params(False, "5m", None, "default", 0)
    assert search_params(True, None, 3, "quick", 1).model_dump() == {"budget": "20m", "trials": 3, "seed": 1,
                                                                      "space": "quick"}
