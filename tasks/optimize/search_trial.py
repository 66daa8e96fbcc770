"""One search trial: build its recipe through the cached stages, measure it, and log it as a nested MLflow run.

Exists apart from :mod:`search` (which only asks and tells) because this is the part that runs on a worker:
everything it needs travels in a :class:`TrialEnv` and a :class:`~kiln.tasks.optimize.search.TrialJob`.
A trial is measured like a candidate, but cheaply: quality on a seeded sample of the validation split (never the
test split the gate judges on), latency at batch 1 and batch N timed alone (inside ``serial``, so no two
timings overlap), size of the package.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.tracking import MlflowClient

from kiln.settings import Settings
from kiln.tasks.compress import recipes
from kiln.tasks.core import tags as vocab
from kiln.tasks.core.cache import StageCache, code_version, make_key
from kiln.tasks.core.device import key_part, resolve_device
from kiln.tasks.core.stages import Artifact, StageContext
from kiln.tasks.data.datasets import Splits
from kiln.tasks.engines import EngineOptions
from kiln.tasks.evaluate.benchmark import BenchConfig
from kiln.tasks.evaluate.latency import latency_metrics, measure_interleaved
from kiln.tasks.evaluate.quality import quality
from kiln.tasks.models.predictor import Predictor, size_mb
from kiln.tasks.optimize import candidates as cands
from kiln.tasks.optimize.search import TrialJob, TrialOutcome, TrialStopped, progress_hook

log = logging.getLogger(__name__)

# Timing of a trial: enough to rank trials, a fraction of what the gate spends (the gate times its candidates
# again, together, in interleaved rounds).
TRIAL_BENCH = BenchConfig(warmup=2, min_runs=8, max_seconds=1.0, rounds=4)


@dataclass
class TrialEnv:
    """What every trial of one search shares."""

    source: cands.Source
    splits: Splits
    cache: StageCache
    settings: Settings
    seq_len: int
    options: EngineOptions
    eval_rows: int = 512
    bench: BenchConfig = field(default_factory=lambda: TRIAL_BENCH)  # flows: capped by the bench_seconds setting
    serial: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext


def first_stage_key(recipe: recipes.Recipe, source_key: str, device: str) -> str:
    """The cache key of ``recipe``'s first stage, as :func:`recipes.build` makes it."""
    spec = recipe.stages[0]
    fn = recipes.stage_function(spec.stage)
    part = key_part(device) if spec.stage in recipes.TRAINS_ON_DEVICE else ()
    return make_key(source_key, spec.stage, spec.params, code_version(fn), *part)


def evaluate_trial(job: TrialJob, env: TrialEnv) -> TrialOutcome:
    """Build and measure one trial; a pruned or failed trial is an outcome, never an exception."""
    started = time.time()
    base = cands.stage_context_factory(env.source, env.splits, env.settings, env.seq_len)
    hook, seen = progress_hook(job)
    first = f".{first_stage_key(job.recipe, env.source.key, resolve_device(env.settings.device))}.partial"

    def make_ctx(workdir: Path) -> StageContext:
        ctx = base(workdir)
        if Path(workdir).name == first:  # early stopping watches the first (shared, most costly) distillation
            ctx.progress = hook
        else:  # later stages stop only for the deadline
            ctx.progress = progress_hook(TrialJob(job.number, job.recipe, job.deadline))[0]
        return ctx

    def outcome(state: str, reason: str = "", **more: Any) -> TrialOutcome:
        return TrialOutcome(job.number, job.recipe, state, seconds=time.time() - started, reason=reason,
                            last_kl=seen.get("kl"), **more)

    try:
        built = recipes.build(job.recipe, Artifact("hf", env.source.folder), env.source.key, make_ctx, env.cache)
        folder = cands.package_candidate(built, env.source, env.cache, env.seq_len, env.options.backend)
        metrics = _measure(job, built.key, folder, env)
    except TrialStopped as exc:
        return outcome("pruned", str(exc))
    except Exception as exc:  # one bad point of the space must not end the search: recorded, told as failed
        log.warning("search trial %d failed: %s", job.number, exc, exc_info=True)
        return outcome("failed", f"{type(exc).__name__}: {exc}")
    return outcome("complete", metrics=metrics, stages=[r.__dict__ for r in built.records])


def _measure(job: TrialJob, key: str, folder: Path, env: TrialEnv) -> dict[str, float]:
    frame = env.splits.validation
    if len(frame) > env.eval_rows:
        frame = frame.sample(n=env.eval_rows, random_state=env.settings.seed).reset_index(drop=True)
    eval_key = make_key("search-eval", key, pd.util.hash_pandas_object(frame, index=False).sum(),
                        env.options.model_dump(), code_version(quality))

    def run(_workdir: Path) -> dict[str, Any]:
        metrics, _, _ = quality(Predictor(folder, env.options), frame, desc=f"trial {job.number}")
        return {"metrics": metrics}

    scored, _ = env.cache.run(eval_key, run)
    with env.serial():  # timings never overlap, whatever runs the trials
        samples = measure_interleaved({job.recipe.name: folder}, frame["text"].tolist()[:256], env.options,
                                      env.bench)[job.recipe.name]
    return scored["metrics"] | latency_metrics(samples) | {"size_mb": size_mb(folder)}


def log_trial(client: MlflowClient, parent_run_id: str, study: str, outcome: TrialOutcome) -> str:
    """The trial as a nested run of the optimize run: its recipe as params, its metrics, its state."""
    parent = client.get_run(parent_run_id)
    tags = {"mlflow.parentRunId": parent_run_id, vocab.SEARCH_STUDY: study, vocab.SEARCH_TRIAL: str(outcome.number),
            vocab.SEARCH_STATE: outcome.state, vocab.RECIPE: outcome.recipe.name}
    run = client.create_run(parent.info.experiment_id, run_name=f"trial {outcome.number} ({outcome.state})",
                            tags=tags)
    params = {"description": outcome.recipe.description[:500]}
    for i, spec in enumerate(outcome.recipe.stages, 1):
        params[f"{i}-{spec.stage}"] = json.dumps(spec.params, sort_keys=True)[:500]
    for name, value in params.items():
        client.log_param(run.info.run_id, name, value)
    for name, value in (outcome.metrics | {"trial_seconds": outcome.seconds}).items():
        client.log_metric(run.info.run_id, name, float(value))
    if outcome.reason:
        client.set_tag(run.info.run_id, "reason", outcome.reason[:4000])
    client.log_dict(run.info.run_id, {"recipe": outcome.recipe.model_dump(mode="json"), "stages": outcome.stages},
                    "trial.json")
    client.set_terminated(run.info.run_id, {"complete": "FINISHED", "pruned": "KILLED"}.get(outcome.state, "FAILED"))
    return run.info.run_id
