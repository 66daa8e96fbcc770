"""The optimize flow's search step: trials as Prefect tasks, the study's Pareto front as candidates.

    open study ─► ask n_parallel ─► trial tasks (build, measure; timings serial) ─► tell ─► nested run ─► …
               └─► budget or cap reached ─► Pareto front ─► recipes (YAML + plot in the optimize run)

Wiring only: what a trial is lives in kiln.tasks.optimize.search_trial, how the study is driven in
kiln.tasks.optimize.search.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from prefect import task
from prefect.cache_policies import NONE
from rich.console import Console

from kiln.credentials import redact
from kiln.flows.runners import serial_section  # one serial section for every timing (threads, processes, Dask)
from kiln.settings import Settings
from kiln.tasks.compress.recipes import Recipe
from kiln.tasks.core.cache import StageCache
from kiln.tasks.data.datasets import Splits
from kiln.tasks.engines import EngineOptions
from kiln.tasks.optimize import candidates as cands
from kiln.tasks.optimize import search
from kiln.tasks.optimize.search_space import recipe_yaml, space_named
from kiln.tasks.optimize.search_trial import TRIAL_BENCH, TrialEnv, evaluate_trial, log_trial
from kiln.tasks.reports.plots import trials_png


@dataclass
class Searched:
    """The search's outcome for the optimize flow: front recipes (candidates), their YAML, a summary."""

    recipes: list[Recipe]
    yaml: dict[str, str]  # recipe name -> a recipe file holding just it (recorded on the registered version)
    summary: dict[str, Any]


@task(cache_policy=NONE)
def search_trial(job: search.TrialJob, env: TrialEnv) -> search.TrialOutcome:
    return evaluate_trial(job, env)


def _execute(env: TrialEnv):
    def run(jobs: Sequence[search.TrialJob]) -> list[search.TrialOutcome]:
        futures = [search_trial.submit(job, env) for job in jobs]
        return [f.result() for f in futures]
    return run


def run_search(params: search.SearchParams, settings: Settings, source: cands.Source, splits: Splits,
               cache: StageCache, options: EngineOptions, seq_len: int, client, run_id: str) -> Searched:
    """Search within ``params.budget``; log every trial under ``run_id``; return the front as candidates."""
    from transformers import AutoConfig

    space = space_named(params.space)
    shape = search.check_space(AutoConfig.from_pretrained(str(source.folder)), source.meta.task)
    url = search.storage_url(settings)
    name = search.study_name(source.version.name, splits.digest, source.key, space)
    study = search.open_study(url, name, params.seed)
    bench = TRIAL_BENCH.model_copy(update={"max_seconds": min(TRIAL_BENCH.max_seconds, settings.bench_seconds)})
    env = TrialEnv(source, splits, cache, settings, seq_len, options, eval_rows=space.eval_rows, bench=bench,
                   serial=serial_section)
    console = Console(stderr=True)
    console.print(f"[bold]search[/bold] {name}: budget {params.budget}, "
                  f"{len(study.trials)} earlier trials in {redact(url)}")

    def record(outcome: search.TrialOutcome) -> None:
        log_trial(client, run_id, name, outcome)
        m = outcome.metrics
        shown = (f"acc {m['accuracy']:.4f}  p50 {m['latency_p50_ms']:.2f} ms  {m['size_mb']:.1f} MB"
                 if outcome.state == "complete" else outcome.reason)
        console.print(f"  trial {outcome.number:>3} {outcome.state:<8} {outcome.seconds:6.0f}s  {shown}")

    outcomes = search.run_trials(study, space, shape, _execute(env), budget_s=params.seconds,
                                 max_trials=params.trials, n_parallel=settings.search_parallel, url=url,
                                 on_result=record)
    best = search.front(study, space.front_cap)
    front_numbers = [t.number for t, _ in best]
    trials = [{"number": t.number, "state": t.state.name.lower(), "values": t.values,
               "metrics": t.user_attrs.get("metrics", {}), "seconds": t.user_attrs.get("seconds"),
               "recipe": t.user_attrs.get("recipe", {}).get("name"),
               "description": t.user_attrs.get("recipe", {}).get("description"),
               "reason": t.user_attrs.get("reason")} for t in study.trials]
    staging = settings.home / "staging" / run_id / "search"
    client.log_artifact(run_id, str(trials_png(trials, front_numbers, staging / "trials.png")), "search")
    recipes = [r for _, r in best]
    client.log_dict(run_id, recipe_yaml(recipes), "search/recipes.yaml")
    summary = {"study": name, "storage": redact(url), "budget": params.budget, "space": params.space,
               "trials_this_run": len(outcomes), "states": {s: sum(o.state == s for o in outcomes)
                                                            for s in ("complete", "pruned", "failed")},
               "front": [r.name for r in recipes], "trials": trials}
    client.log_dict(run_id, summary, "search/trials.json")
    return Searched(recipes, {r.name: yaml.safe_dump(recipe_yaml([r]), sort_keys=False) for r in recipes}, summary)
