"""A compression search: Optuna proposes recipes, the stage cache builds them, the budget says when to stop.

Exists because a hand-written recipe (layers, heads, widths, steps) is a guess for any model but the one it was
tuned on. Here the guess is Optuna's: a multi-objective TPE sampler over :mod:`search_space`, objectives
(quality ↑, latency at batch 1 ↓, size ↓). The study lives in Optuna's RDB storage (SQLite under KILN_HOME, or
``search_storage``), named after the model, the data and the space, so a re-run resumes it.

Trials are executed by a callable (``execute``: a batch of :class:`TrialJob` → :class:`TrialOutcome` each), so
the flow can fan them out; this module only asks, tells, and keeps time:

* no trial starts when the time left cannot fit the median trial so far;
* a trial in flight stops at the deadline (its distillation's progress callback raises);
* early stopping: Optuna's pruners are single-objective (``Trial.report`` refuses multi-objective studies), so
  each search trial has a shadow trial in a single-objective study of the distillation KL, one per student
  depth, where a :class:`optuna.pruners.MedianPruner` decides; a pruned shadow prunes the search trial.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from pydantic import BaseModel, Field, field_validator
from sqlalchemy.engine import make_url

from kiln.errors import ConfigError
from kiln.settings import Settings
from kiln.tasks.compress.recipes import Recipe
from kiln.tasks.optimize.search_space import SearchSpace, Shape, space_named, suggest_recipe

log = logging.getLogger(__name__)

OBJECTIVES = ("accuracy", "latency_p50_ms", "size_mb")  # the front's axes, as tasks/evaluate/policy names them
DIRECTIONS = ("maximize", "minimize", "minimize")
_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


def parse_budget(text: str) -> float:
    """``'20m'``, ``'90s'``, ``'1h30m'`` → seconds; anything else is a one-line :class:`ConfigError`."""
    raw = str(text).strip().lower()
    match = _DURATION.match(raw)
    if not raw or not match or not any(match.groups()):
        raise ConfigError(f"budget {text!r} is not a duration; write e.g. 90s, 20m or 1h30m")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise ConfigError(f"budget {text!r} is no time at all; give a positive duration such as 20m")
    return total


class SearchParams(BaseModel):
    """How long and how widely to search (the Prefect UI draws this as part of the optimize form)."""

    budget: str = Field("20m", description="Wall-clock budget, e.g. 90s, 20m, 1h30m.")
    trials: int | None = Field(None, ge=1, le=10_000, description="At most this many trials (this run).")
    seed: int = Field(0, description="Seed of the sampler.")
    space: str = Field("default", description="Search space preset (tasks/optimize/search_space.py PRESETS).")

    @field_validator("budget")
    @classmethod
    def _duration(cls, value: str) -> str:
        try:
            parse_budget(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("space")
    @classmethod
    def _known_space(cls, value: str) -> str:
        try:
            space_named(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return value

    @property
    def seconds(self) -> float:
        return parse_budget(self.budget)


def storage_url(settings: Settings) -> str:
    """The study storage: ``search_storage``, else SQLite at ``<home>/search.db``."""
    if settings.search_storage is not None:
        return settings.search_storage.get_secret_value()
    return f"sqlite:///{Path(settings.home).resolve() / 'search.db'}"


def storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage; SQLite waits on a writer instead of failing (trials tell from several threads).

    A plain ``postgresql://`` URL (how ``KILN_DATABASE_URL`` and libpq spell it) gets the psycopg 3 driver
    Kiln installs: SQLAlchemy 2.0 would otherwise look for psycopg2, which is not there.
    """
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


def study_name(model: str, data_digest: str, source_key: str, space: SearchSpace) -> str:
    """Same model version, data and space → same study (a re-run resumes it)."""
    digest = hashlib.sha256(json.dumps([data_digest, source_key, space.model_dump(mode="json"), OBJECTIVES],
                                       sort_keys=True).encode()).hexdigest()[:12]
    return f"kiln-search-{model}-{digest}"


def open_study(url: str, name: str, seed: int) -> optuna.Study:
    """The search study (created, or loaded to resume). TPE rather than NSGA-II: a 20-minute budget is ten-odd
    trials, and NSGA-II is random search until its first generation (50 trials) is complete."""
    # No warn_independent_sampling: deprecated in Optuna 4.9 (a FutureWarning per run), and off by default since.
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=4, multivariate=True, constant_liar=True)
    return optuna.create_study(study_name=name, storage=storage(url), directions=list(DIRECTIONS), sampler=sampler,
                               load_if_exists=True)


@dataclass(frozen=True)
class PruneSpec:
    """Where a trial's shadow (KL) trial lives, so a worker in another process can report to it."""

    storage: str
    study: str
    trial_id: int
    startup_trials: int = 2
    warmup_steps: int = 0

    def pruner(self) -> optuna.pruners.BasePruner:
        return optuna.pruners.MedianPruner(n_startup_trials=self.startup_trials, n_warmup_steps=self.warmup_steps)


@dataclass
class TrialJob:
    """One trial to build and measure (picklable: it may travel to a Dask worker)."""

    number: int
    recipe: Recipe
    deadline: float  # time.time() after which the trial stops
    prune: PruneSpec | None = None


@dataclass
class TrialOutcome:
    """What one trial came to: ``complete`` with metrics, ``pruned`` (early stop or budget), or ``failed``."""

    number: int
    recipe: Recipe
    state: str
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    reason: str = ""
    last_kl: float | None = None
    stages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def values(self) -> list[float]:
        return [self.metrics[m] for m in OBJECTIVES]


class TrialStopped(optuna.TrialPruned):
    """Raised from a distillation's progress callback: the trial is pruned, or the budget is spent."""


def progress_hook(job: TrialJob, clock: Callable[[], float] = time.time
                  ) -> tuple[Callable[[str, int, dict[str, float]], None], dict[str, float]]:
    """The ``StageContext.progress`` callback of ``job``'s first stage, and a dict holding its last KL.

    Stops the stage (raises :class:`TrialStopped`) past the deadline, or when the median pruner prunes the
    shadow trial on the KL reported at this step.
    """
    seen: dict[str, float] = {}
    shadow: list[optuna.Trial] = []

    def report(stage: str, step: int, metrics: dict[str, float]) -> None:
        if clock() > job.deadline:
            raise TrialStopped(f"budget spent at {stage} step {step}")
        if job.prune is None or "kl" not in metrics:
            return
        seen["kl"] = float(metrics["kl"])
        if not shadow:
            spec = job.prune
            study = optuna.load_study(study_name=spec.study, storage=storage(spec.storage), pruner=spec.pruner())
            shadow.append(optuna.Trial(study, spec.trial_id))
        shadow[0].report(seen["kl"], step)
        if shadow[0].should_prune():
            raise TrialStopped(f"KL {seen['kl']:.4g} at {stage} step {step} is worse than the median of "
                               "earlier trials with as many layers")

    return report, seen


Execute = Callable[[Sequence[TrialJob]], list[TrialOutcome]]


def run_trials(study: optuna.Study, space: SearchSpace, shape: Shape, execute: Execute, *, budget_s: float,
               max_trials: int | None = None, n_parallel: int = 1, url: str | None = None,
               on_result: Callable[[TrialOutcome], None] | None = None, clock: Callable[[], float] = time.time,
               ) -> list[TrialOutcome]:
    """Ask, build (through ``execute``), tell, until the budget or the trial cap is reached.

    Args:
        url: the storage URL, for shadow KL studies (early stopping); None: no pruning.
        on_result: called with each outcome as it is told (the flow logs a nested run, the CLI a table row).
    """
    deadline = clock() + budget_s
    outcomes: list[TrialOutcome] = []
    if not study.trials:  # a new study tries the space's start points first
        for point in space.start:
            study.enqueue_trial(point, skip_if_exists=True)
    _resume_stopped(study)
    while max_trials is None or len(outcomes) < max_trials:
        left = deadline - clock()
        durations = [o.seconds for o in outcomes if o.state == "complete"] or [o.seconds for o in outcomes]
        if left <= 0 or (durations and statistics.median(durations) > left):
            log.info("search: %.0fs left, a trial takes about %.0fs: no new trial", max(left, 0),
                     statistics.median(durations) if durations else 0)
            break
        size = n_parallel if max_trials is None else min(n_parallel, max_trials - len(outcomes))
        asked = [study.ask() for _ in range(size)]
        jobs, shadows = [], []
        for trial in asked:
            recipe = suggest_recipe(trial, space, shape, f"search-t{trial.number}")
            trial.set_user_attr("recipe", recipe.model_dump(mode="json"))
            shadow = _shadow(url, study.study_name, recipe) if url else None
            shadows.append(shadow)
            prune = PruneSpec(url, shadow[0].study_name, shadow[1]._trial_id) if shadow else None
            jobs.append(TrialJob(trial.number, recipe, deadline, prune))
        for trial, shadow, outcome in zip(asked, shadows, execute(jobs), strict=True):
            _tell(study, trial, outcome)
            if shadow:
                _tell_shadow(*shadow, outcome)
            outcomes.append(outcome)
            log.info("search trial %d %s in %.0fs %s", outcome.number, outcome.state, outcome.seconds,
                     outcome.reason or {m: round(outcome.metrics.get(m, float("nan")), 4) for m in OBJECTIVES})
            if on_result:
                on_result(outcome)
    return outcomes


def _resume_stopped(study: optuna.Study) -> None:
    """Queue again the trials an earlier run's deadline stopped: their distillation checkpoints are in
    the stage cache, so the re-run continues them instead of starting over. Each is resumed once."""
    resumed = set(study.user_attrs.get("resumed", []))
    stopped = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,))
               if str(t.user_attrs.get("reason", "")).startswith("budget spent") and t.number not in resumed]
    for t in stopped:
        study.enqueue_trial(t.params)
    if stopped:
        study.set_user_attr("resumed", sorted(resumed | {t.number for t in stopped}))


def _shadow(url: str, name: str, recipe: Recipe) -> tuple[optuna.Study, optuna.Trial]:
    """The KL study of students as deep as ``recipe``'s (one per depth: a shallower student always has a
    higher KL, so comparing across depths would prune exactly the fast trials the search is for)."""
    first = recipe.stages[0].params
    depth = len(first.get("layers") or []) or "x"
    study = optuna.create_study(study_name=f"{name}-kl-{depth}l", storage=storage(url), direction="minimize",
                                load_if_exists=True)
    return study, study.ask()


def _tell(study: optuna.Study, trial: optuna.Trial, outcome: TrialOutcome) -> None:
    trial.set_user_attr("seconds", outcome.seconds)
    trial.set_user_attr("metrics", outcome.metrics)
    if outcome.reason:
        trial.set_user_attr("reason", outcome.reason[:2000])
    if outcome.state == "complete":
        study.tell(trial, outcome.values)
    else:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED if outcome.state == "pruned"
                   else optuna.trial.TrialState.FAIL)


def _tell_shadow(study: optuna.Study, trial: optuna.Trial, outcome: TrialOutcome) -> None:
    if outcome.state == "pruned":
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    elif outcome.last_kl is not None and outcome.state == "complete":
        study.tell(trial, outcome.last_kl)
    else:  # nothing reported (its distillation came from the cache) or failed: no evidence for the pruner
        study.tell(trial, state=optuna.trial.TrialState.FAIL)


def front(study: optuna.Study, cap: int) -> list[tuple[optuna.trial.FrozenTrial, Recipe]]:
    """The study's Pareto front (every run of it, resumed ones included), fastest first, at most ``cap``,
    each with its recipe."""
    best = sorted(study.best_trials, key=lambda t: (t.values[1], -t.values[0]))
    return [(t, Recipe.model_validate(t.user_attrs["recipe"])) for t in best[:cap] if "recipe" in t.user_attrs]


def check_space(model_config: Any, task: str) -> Shape:
    """The teacher's shape, after refusing a model the search cannot judge (it needs a classifier)."""
    if task != "sequence-classification":
        raise ConfigError(f"--search builds classifiers (objectives: accuracy, latency, size); this model is a {task}")
    return Shape.of(model_config)
