"""The optimize flow: registered model in, measured and gated challenger out.

    resolve ─► check data ─► build candidates ─► evaluate (+ parity) ─► gate ─► log all ─► register best
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

import mlflow
from prefect import flow, task
from prefect.cache_policies import NONE
from prefect.futures import wait
from pydantic import BaseModel, Field, field_validator

from kiln.errors import ConfigError, DataCheckFailed, GateError, InsufficientEvidence
from kiln.flows import crashed, runners
from kiln.flows import search as search_flow
from kiln.settings import Settings, load_settings
from kiln.tasks.compress import recipes
from kiln.tasks.core import tags as vocab
from kiln.tasks.core.cache import StageCache
from kiln.tasks.core.stages import Artifact
from kiln.tasks.data import checks as datachecks
from kiln.tasks.data.datasets import DatasetSpec, Splits, load_splits
from kiln.tasks.engines import EngineOptions, engine_versions, resolve_backend
from kiln.tasks.evaluate.benchmark import BenchConfig
from kiln.tasks.evaluate.cost import cost_config
from kiln.tasks.evaluate.policy import Policy, load_policy, pareto_front, rank
from kiln.tasks.evaluate.quality import assess_artifact
from kiln.tasks.lifecycle import approvals
from kiln.tasks.models.predictor import PackageMeta
from kiln.tasks.optimize import candidates as cands
from kiln.tasks.optimize import cascade, judging, publish, speculative
from kiln.tasks.optimize.search import SearchParams
from kiln.tasks.registry import client as registry
from kiln.tasks.reports import review as review_report
from kiln.tasks.reports.plots import pareto_png

log = logging.getLogger(__name__)


Backend = Literal["onnxruntime", "tensorrt", "auto"]  # a dropdown in the form (tasks/engines: load_engine)
# The shipped named recipes, offered as a dropdown in the form. A recipe_file's own names go in their own
# free-text field (file_recipes): Prefect's UI draws an item that is "one of these or any name" as a raw JSON
# editor, never as a dropdown.
RECIPE_NAMES = sorted(recipes.library())


class OptimizeParams(BaseModel):
    """What to optimize and how to judge it (the Prefect UI draws this as a form)."""

    model: str = Field(..., description="Registered model: NAME (=NAME@champion), NAME@ALIAS or NAME/VERSION.")
    recipes: list[str] = Field(["onnx-fp32", "int8-dynamic"], description="Named recipes to build as candidates.",
                               json_schema_extra={"items": {"type": "string", "enum": RECIPE_NAMES}})
    recipe_file: str | None = Field(None, description="Optional YAML file with more named recipes.")
    file_recipes: list[str] = Field([], description="Recipes of recipe_file to build too, by name.")
    policy: str | None = Field(None, description="Gate policy YAML; default: the task's preset.")
    data: DatasetSpec | None = Field(None, description="Dataset; default: the one recorded on the model version.")
    eval_limit: int | None = Field(None, gt=0, description="Judge on a seeded sample of this many test rows.")
    backend: Backend = Field("onnxruntime", description="Engine backend: onnxruntime, tensorrt or auto.")
    seq_len: int = Field(64, ge=8, le=4096, description="Serving sequence length (latency inputs are padded to it).")
    bench: BenchConfig | None = Field(None, description="How latency is measured; default from settings.")
    request: str | None = Field(None, description="Who asked for this work, signed (`kiln optimize --sign` makes "
                                "it); four-eyes review then knows the requester. Without it nobody is.")
    search: SearchParams | None = Field(None, description="Also search for recipes (Optuna, within a budget); "
                                        "the Pareto front of the trials joins the recipes as candidates.")

    @field_validator("recipes")
    @classmethod
    def _each_recipe_once(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("name at least one recipe (see `kiln recipes`)")
        twice = sorted({name for name in value if value.count(name) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} named more than once; name each recipe once")
        return value

    @property
    def chosen_recipes(self) -> list[str]:
        """The recipes to build: the named ones, then those of recipe_file (each once)."""
        return list(dict.fromkeys(self.recipes + self.file_recipes))


# ── steps ────────────────────────────────────────────────────────────────────────────────────────────
@task(retries=2, retry_delay_seconds=2, cache_policy=NONE)
def resolve_source(settings: Settings, ref: str, data: DatasetSpec | None) -> cands.Source:
    client = registry.connect(settings)
    return cands.resolve_source(client, registry.ModelRef.parse(ref), settings.home / "downloads", data)


@task(cache_policy=NONE)
def check_data(spec: DatasetSpec, run_id: str) -> Splits:
    splits = load_splits(spec)
    try:
        report = datachecks.check_splits(splits)
    except DataCheckFailed as exc:
        mlflow.MlflowClient().log_dict(run_id, exc.report, "datachecks.json")
        raise
    mlflow.MlflowClient().log_dict(run_id, report, "datachecks.json")
    return splits


@task(cache_policy=NONE)
def build_candidate(recipe: recipes.Recipe, source: cands.Source, splits: Splits, cache: StageCache,
                    seq_len: int, settings: Settings, backend: str) -> tuple[recipes.BuiltCandidate, Path]:
    if recipe.cascade is not None:  # two members (cached builds) and a threshold chosen on validation
        return cascade.build_cascade(recipe, source, splits, cache, seq_len, settings, backend)
    if recipe.speculative is not None:  # a target and a draft (cached builds), packaged as one model
        return speculative.build_speculative(recipe, source, splits, cache, seq_len, settings, backend)
    make_ctx = cands.stage_context_factory(source, splits, settings, seq_len)
    built = recipes.build(recipe, Artifact("hf", source.folder), source.key, make_ctx, cache,
                          assess=assess_artifact)
    return built, cands.package_candidate(built, source, cache, seq_len, backend)


@task(cache_policy=NONE)
def placed_build(recipe: recipes.Recipe, source: cands.Source, splits: Splits, cache: StageCache, seq_len: int,
                 settings: Settings, backend: str) -> tuple[recipes.BuiltCandidate, Path, dict[str, Any]]:
    """:func:`build_candidate` on whichever worker the task runner picks, with where and when it ran."""
    started = time.time()
    built, folder = build_candidate.fn(recipe, source, splits, cache, seq_len, settings, backend)
    return built, folder, runners.placement(started)


def _build_all(chosen, source, splits, cache, seq_len, settings, backend):
    """Build every recipe at once on the flow's task runner (flows/runners.py); results in recipe order.

    Waits for all builds, then raises the first failure in recipe order, so what fails the flow does not
    depend on which worker finished first. The stage cache locks per key: two builds sharing a stage compute
    it once."""
    futures = [placed_build.submit(r, source, splits, cache, seq_len, settings, backend) for r in chosen]
    wait(futures)
    results = [future.result() for future in futures]
    return [(built, folder) for built, folder, _ in results], {b.recipe.name: where for b, _, where in results}


@task(cache_policy=NONE)
def evaluate_candidate(name: str, folder: Path, precision: str, key: str, frame: Any, cache: StageCache,
                       options: EngineOptions, bench: BenchConfig, reference: Any = None, keep_outputs: bool = False):
    return cands.evaluate_candidate(name, folder, precision, key, frame, cache, options, bench, reference, keep_outputs)


@task(cache_policy=NONE)
def log_candidate(run_id: str, cand: cands.Evaluated, staging: Path) -> str:
    return publish.log_candidate(run_id, cand, staging)


@task(retries=2, retry_delay_seconds=2, cache_policy=NONE)
def register_candidate(settings: Settings, source: cands.Source, cand: cands.Evaluated, model_id: str, run_id: str,
                       tags: dict[str, str]):
    return publish.register_candidate(registry.connect(settings), source, cand, model_id, run_id, tags, settings.home)


def preflight(params: OptimizeParams, settings: Settings) -> None:
    """Check everything a user can get wrong before a flow run starts: model, artifacts, policy,
    recipes, dataset. Raises a :class:`KilnError` naming the problem; writes nothing to the registry."""
    runners.task_runner(settings)  # KILN_TASK_RUNNER=dask without prefect-dask: refused here, not mid-run
    client = registry.connect(settings)
    source = cands.resolve_source(client, registry.ModelRef.parse(params.model), settings.home / "downloads",
                                  params.data)
    load_policy(Path(params.policy) if params.policy else None, source.meta.task)
    recipes.recipes_for(params.chosen_recipes, Path(params.recipe_file) if params.recipe_file else None, source.folder)
    if params.recipe_file:
        _check_file_used(Path(params.recipe_file), params.chosen_recipes)
    load_splits(source.data)


def _check_file_used(path: Path, chosen: list[str]) -> None:
    """A recipe file none of whose recipes is chosen would be read and ignored: say so instead of building
    only the presets (the file adds names; --recipes picks what is built)."""
    defined = list(recipes.library(path))
    if not set(defined) & set(chosen):
        raise ConfigError(f"recipe file {path} defines {', '.join(defined)} but none of them is chosen; name "
                          f"them in --recipes (e.g. --recipes {defined[0]})")


# ── the flow ─────────────────────────────────────────────────────────────────────────────────────────
# Candidate builds fan out on the runner the settings name (KILN_TASK_RUNNER), chosen when the run starts.
@flow(name="optimize", log_prints=True, task_runner=runners.SettingsTaskRunner(), **crashed.RELEASE_HOOKS)
def optimize(params: OptimizeParams) -> dict[str, Any]:
    """Build candidates from a registered model, gate them, and register the best as ``challenger``.

    Settings come from the worker's environment (``KILN_*``), not from the form: where the registry and
    the cache live is the deployment's business, not the person clicking "Run".
    """
    return run_optimize(params, load_settings())


def run_optimize(params: OptimizeParams, settings: Settings) -> dict[str, Any]:
    """The optimize flow's body (inside a flow run), with explicit settings."""
    crashed.claim_run(settings)  # runs of this flow whose process was killed: Crashed, not Running
    client = registry.connect(settings)
    cache = StageCache(settings.cache_dir)
    ref = registry.ModelRef.parse(params.model)
    requested = approvals.request_tags(params.request) if params.request else {}  # verified when decided on
    registry.resolve(client, ref)  # fail fast on a bad name or alias, before any other work
    source = resolve_source(settings, params.model, params.data)
    policy: Policy = load_policy(Path(params.policy) if params.policy else None, source.meta.task)
    chosen = recipes.recipes_for(params.chosen_recipes, Path(params.recipe_file) if params.recipe_file else None,
                                 source.folder)
    options = EngineOptions(backend=resolve_backend(params.backend), threads=settings.threads)
    bench = params.bench or BenchConfig(max_seconds=settings.bench_seconds, cost=cost_config(settings))

    run = client.create_run(registry.ensure_experiment(client, settings),
                            run_name=f"optimize {ref}", tags={vocab.RUN_MODEL: str(ref)})
    run_id = run.info.run_id
    try:
        client.log_param(run_id, "params", params.model_dump_json()[:6000])
        splits = check_data(source.data, run_id)
        searched = None
        if params.search is not None:  # the search's Pareto front joins the named recipes as candidates
            searched = search_flow.run_search(params.search, settings, source, splits, cache, options,
                                              params.seq_len, client, run_id)
            chosen = chosen + searched.recipes
        built, placed = _build_all(chosen, source, splits, cache, params.seq_len, settings, options.backend)
        judged = _evaluate_and_judge(settings, client, source, splits, built, policy, cache, options, bench,
                                     params.eval_limit)
        src, champion, evaluated, frame, baseline_name, noise = judged
        model_ids = {c.name: log_candidate(run_id, c, settings.home / "staging") for c in evaluated}
        passing = {c.name: c.metrics for c in evaluated if c.decision and c.decision.passed}
        summary = _summary(src, champion, evaluated, passing, policy)
        summary |= {"baseline": baseline_name, "noise": noise, "evidence": _evidence(policy, bench, frame, splits)}
        if searched is not None:
            summary["search"] = searched.summary
        summary["builds"] = placed
        client.log_dict(run_id, summary, "summary.json")
        plot = pareto_png(summary, settings.home / "staging" / run_id / "pareto.png")
        client.log_artifact(run_id, str(plot))

        _log_report(client, run_id, summary, str(ref), splits, plot)
        if not passing:
            client.set_terminated(run_id, "FAILED")
            _refuse(str(ref), evaluated, len(frame), len(splits.test), summary)
        best = next(c for c in evaluated if c.name == rank(policy, passing)[0])
        tags = {vocab.DATASET_DIGEST: splits.digest, vocab.BACKEND: options.backend,
                vocab.ENGINE: json.dumps(options.model_dump() | engine_versions()), vocab.BASELINE: baseline_name}
        tags |= requested
        if searched is not None and best.name in searched.yaml:  # rebuild it with --recipe-file
            tags[vocab.RECIPE_YAML] = searched.yaml[best.name]
        version = register_candidate(settings, source, best, model_ids[best.name], run_id, tags)
        champion_now = registry.aliases_of(client, version.name).get(vocab.CHAMPION) == str(version.version)
        summary["registered"] = {"name": version.name, "version": str(version.version), "recipe": best.name,
                                 "alias": vocab.CHAMPION if champion_now else vocab.CHALLENGER}
        client.log_dict(run_id, summary, "summary.json")
        _log_report(client, run_id, summary, str(ref), splits, plot)
        client.set_terminated(run_id, "FINISHED")
        return summary
    except Exception:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "FAILED")
        raise


def _log_report(client, run_id: str, summary: dict[str, Any], model: str, splits: Splits, plot: Path) -> None:
    """The reviewer's page (``report.html``), rewritten once the outcome is known."""
    checks = mlflow.artifacts.load_dict(f"{client.get_run(run_id).info.artifact_uri}/datachecks.json")
    path = review_report.write(plot.with_name(review_report.REPORT_FILE), summary=summary, model=model,
                               run_id=run_id, datachecks=checks, pareto_png=plot)
    client.log_artifact(run_id, str(path))


def _evaluate_and_judge(settings, client, source, splits, built, policy, cache, options, bench, eval_limit):
    """Evaluate source, champion and candidates on the same rows, time them together, gate; while a candidate
    that could win is inconclusive and the policy allows, evaluate again on more rows (latency is kept)."""
    rows, noise = eval_limit, {}
    while True:
        frame = cands.eval_frame(splits, rows, settings.seed)
        src, reference = evaluate_candidate(f"source v{source.version.version}", source.folder, "fp32",
                                            source.key, frame, cache, options, bench, keep_outputs=True)
        champion = _champion(client, settings, source, frame, cache, options, bench, src)
        evaluated = []
        for candidate, folder in built:
            ev, _ = evaluate_candidate(candidate.recipe.name, folder, candidate.precision, candidate.key, frame,
                                       cache, options, bench, reference)
            ev.stages = [r.__dict__ for r in candidate.records]
            evaluated.append(ev)
        models = [src, *([champion] if champion and champion is not src else []), *evaluated]
        if not noise:
            with runners.serial_section():  # one timed section at a time, across runs and Dask workers
                noise = judging.time_together(models, frame["text"].tolist()[:256], options, bench, cache)
            timed = {m.name: m for m in models}
        else:  # more rows for quality only: the latency evidence measured before still stands
            for m in models:
                m.latency = timed[m.name].latency
                m.metrics = timed[m.name].metrics | m.metrics
        baseline, baseline_name = cands.baseline_for(policy, src, champion)
        judging.gate_all(policy, evaluated, baseline, baseline_name)
        contenders = judging.undecided_contenders(policy, evaluated)
        next_rows = judging.next_row_count(len(frame), len(splits.test))
        if not contenders or policy.evidence.inconclusive == "refuse" or next_rows is None:
            break
        log.info("inconclusive on %d rows: %s; judging again on %d rows", len(frame), ", ".join(contenders),
                 next_rows)
        rows = next_rows
    ev = policy.evidence
    for m in models:
        m.intervals = judging.intervals(m, resamples=ev.resamples, seed=ev.seed)
    return src, champion, evaluated, frame, baseline_name, noise


def _refuse(ref: str, evaluated: list[cands.Evaluated], used: int, available: int, summary: dict) -> None:
    """Raise why nothing was registered: failed clauses, or not enough evidence to decide. The error carries
    the run's summary (``kiln optimize --json`` prints it)."""
    if any(c.decision.status == "inconclusive" for c in evaluated):
        more = ("all test rows were used" if used >= available else
                "the policy's evidence.inconclusive is 'refuse'")
        error: GateError = InsufficientEvidence(
            f"not enough evidence to pass any candidate for {ref} on {used} evaluation rows ({more}); nothing "
            "registered. Widen the clause's margin, raise alpha, or evaluate on more rows. "
            + " | ".join(f"{c.name}: {c.decision.summary()}" for c in evaluated))
    else:
        error = GateError(f"no candidate passed the gate for {ref}; nothing registered. "
                          + " | ".join(f"{c.name}: {c.decision.summary()}" for c in evaluated))
    error.summary = summary
    raise error


def _evidence(policy: Policy, bench: BenchConfig, frame, splits: Splits) -> dict[str, Any]:
    ev = policy.evidence
    return {"rows": len(frame), "available_rows": len(splits.test), "level": 0.95, "alpha": ev.alpha,
            "latency_alpha": ev.latency_alpha, "latency_tolerance": ev.latency_tolerance, "rounds": bench.rounds,
            "resamples": ev.resamples}


def _champion(client, settings, source, frame, cache, options, bench, src) -> cands.Evaluated | None:
    """The champion measured in this run: the source itself, another version, or none yet."""
    aliases = registry.aliases_of(client, source.version.name)
    if vocab.CHAMPION not in aliases:
        return None
    if aliases[vocab.CHAMPION] == str(source.version.version):
        return src
    version = client.get_model_version(source.version.name, aliases[vocab.CHAMPION])
    folder = registry.fetch_package(client, version, settings.home / "downloads")
    meta = PackageMeta.read(folder)
    ev, _ = evaluate_candidate(f"champion v{version.version}", folder, meta.precision,
                               f"{version.name}/{version.version}/{version.run_id}", frame, cache, options, bench)
    return ev


def _summary(src, champion, evaluated, passing, policy) -> dict[str, Any]:
    everything = {c.name: c.metrics for c in evaluated}
    baseline = champion or src
    return {
        "source": src.metrics,
        "champion": champion.metrics if champion else None,
        "intervals": {"source": _dicts(src.intervals), "champion": _dicts(champion.intervals) if champion else None},
        "candidates": {c.name: {"precision": c.precision, "metrics": c.metrics, "intervals": _dicts(c.intervals),
                                "vs_baseline": judging.deltas(c, baseline, resamples=policy.evidence.resamples,
                                                              seed=policy.evidence.seed),
                                "verdict": c.decision.status, "passed": c.decision.passed,
                                "reasons": [r.reason for r in c.decision.results],
                                "clauses": [r.to_dict() for r in c.decision.results]} for c in evaluated},
        "ranking": rank(policy, passing) if passing else [],
        "pareto_front": pareto_front(everything) if everything else [],
    }


def _dicts(intervals: dict) -> dict[str, dict[str, float]]:
    return {k: v.to_dict() for k, v in intervals.items()}


if __name__ == "__main__":
    import sys

    print(json.dumps(optimize(OptimizeParams(model=sys.argv[1])), indent=2, default=str))
