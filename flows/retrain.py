"""The retrain flow: a pushed commit in, a fine-tuned, registered (and optimized) version out.

    checkout SHA ─► read kiln-train.yaml ─► already registered? ─► check data ─► fine-tune ─► register ─► optimize
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NONE

from kiln.errors import ConfigError
from kiln.flows.optimize import OptimizeParams, optimize
from kiln.settings import Settings, load_settings
from kiln.tasks.core import tags as vocab
from kiln.tasks.lifecycle import retrain as steps
from kiln.tasks.lifecycle.checkout import checkout, clone_credentials
from kiln.tasks.lifecycle.retrain import RetrainParams, RetrainPlan
from kiln.tasks.registry import client as registry

__all__ = ["RetrainParams", "retrain", "run_retrain"]

log = logging.getLogger(__name__)


# ── steps ────────────────────────────────────────────────────────────────────────────────────────────
@task(cache_policy=NONE)
def read_commit(params: RetrainParams, settings: Settings) -> RetrainPlan:
    repo = params.repo or settings.repo
    if not repo:
        raise ConfigError("no repository to retrain from: pass repo (--repo) or set KILN_REPO")
    # The run names the repository; the worker's own settings hold what it clones with.
    with checkout(repo, params.sha, settings.home / "checkouts", clone_credentials(repo, settings)) as tree:
        return steps.plan(params, tree, settings, registry.connect(settings))


@task(cache_policy=NONE)
def find_registered(retrain_plan: RetrainPlan, settings: Settings):
    return steps.find_retrained(registry.connect(settings), retrain_plan)


@task(cache_policy=NONE)
def finetune(retrain_plan: RetrainPlan, settings: Settings) -> steps.Trained:
    splits = steps.load_data(retrain_plan)
    return steps.finetune(retrain_plan, splits, settings, registry.connect(settings))


@task(retries=2, retry_delay_seconds=2, cache_policy=NONE)
def register_trained(retrain_plan: RetrainPlan, trained: steps.Trained, settings: Settings):
    return steps.register_trained(retrain_plan, trained, settings, registry.connect(settings))


# ── the flow ─────────────────────────────────────────────────────────────────────────────────────────
@flow(name="retrain", log_prints=True)
def retrain(params: RetrainParams) -> dict[str, Any]:
    """Fine-tune at a commit and register the result (settings, e.g. KILN_REPO, from the worker's ``KILN_*``)."""
    return run_retrain(params, load_settings())


def run_retrain(params: RetrainParams, settings: Settings) -> dict[str, Any]:
    """The retrain flow's body (inside a flow run), with explicit settings."""
    retrain_plan = read_commit(params, settings)
    version = find_registered(retrain_plan, settings)
    reused = version is not None
    if version is None:
        version = register_trained(retrain_plan, finetune(retrain_plan, settings), settings)
    print(f"{'found' if reused else 'registered'} {version.name} v{version.version} for commit "
          f"{retrain_plan.tags[vocab.GIT_SHA][:12]} (base {retrain_plan.base})")
    summary: dict[str, Any] = {"name": version.name, "version": str(version.version), "reused": reused,
                               "sha": retrain_plan.tags[vocab.GIT_SHA], "base": retrain_plan.base}
    if params.chain_optimize:
        summary["optimize"] = optimize(OptimizeParams(model=f"{version.name}/{version.version}",
                                                      recipes=retrain_plan.config.recipes,
                                                      eval_limit=retrain_plan.config.eval_limit))
    return summary
