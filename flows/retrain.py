"""The retrain flow: a pushed commit in, a fine-tuned, registered (and optimized) version out.

    checkout SHA ─► read kiln-train.yaml ─► already registered? ─► check data ─► fine-tune ─► register ─► optimize
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NONE

from kiln.errors import ConfigError
from kiln.flows.crashed import RELEASE_HOOKS, claim_run
from kiln.flows.optimize import OptimizeParams, optimize
from kiln.settings import Settings, load_settings
from kiln.tasks.core import tags as vocab
from kiln.tasks.lifecycle import retrain as steps
from kiln.tasks.lifecycle.checkout import checkout, clone_credentials, public_repo, webhook_repository
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
    if params.triggered_by.startswith("webhook:") and not webhook_repository(repo, settings):
        raise ConfigError(f"{public_repo(repo)} is neither KILN_REPO nor one of KILN_WEBHOOK_REPOSITORIES on this "
                          "worker; a push cannot choose what a worker clones: set one of them")
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
@flow(name="retrain", log_prints=True, **RELEASE_HOOKS)  # a refused config leaves no run lease
def retrain(params: RetrainParams) -> dict[str, Any]:
    """Fine-tune at a commit and register the result (settings, e.g. KILN_REPO, from the worker's ``KILN_*``)."""
    return run_retrain(params, load_settings())


def run_retrain(params: RetrainParams, settings: Settings) -> dict[str, Any]:
    """The retrain flow's body (inside a flow run), with explicit settings."""
    claim_run(settings)  # runs of this flow whose process was killed: Crashed, not Running (flows/crashed.py)
    retrain_plan = read_commit(params, settings)
    version = find_registered(retrain_plan, settings)
    reused = version is not None
    if version is None:
        version = register_trained(retrain_plan, finetune(retrain_plan, settings), settings)
    print(f"{'found' if reused else 'registered'} {version.name} v{version.version} for commit "
          f"{retrain_plan.tags[vocab.GIT_SHA][:12]} (base {retrain_plan.base})")
    summary: dict[str, Any] = {"name": version.name, "version": str(version.version), "reused": reused,
                               "sha": retrain_plan.tags[vocab.GIT_SHA], "base": retrain_plan.base}
    if retrain_plan.new_model:  # a push never crowns a model: no @champion without gate and promotion
        summary["new_model"] = True
        print(f"{version.name} is a new model: v{version.version} has no alias (not @champion); promote it with "
              "`kiln promote` once it passes its gate")
    if params.chain_optimize:
        summary["optimize"] = optimize(OptimizeParams(model=f"{version.name}/{version.version}",
                                                      recipes=retrain_plan.config.recipes,
                                                      eval_limit=retrain_plan.config.eval_limit))
    return summary
