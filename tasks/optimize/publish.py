"""Logging candidates to MLflow and registering the winner: the only place optimize writes the registry.

Every candidate is logged as an MLflow model (pyfunc around its engine) with its metrics and gate
decision; only the best passing one becomes a model version, tagged with its lineage and verdict, and
only then does the ``challenger`` alias move. Re-running the same work finds the version it registered
before (tag ``kiln.candidate_key``) instead of registering a duplicate.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from kiln.errors import GateError
from kiln.tasks.optimize.candidates import Evaluated, Source, git_commit
from kiln.tasks.registry import audit
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.pyfunc import log_package

log = logging.getLogger(__name__)


def mlflow_key(text: str) -> str:
    """``text`` with the characters MLflow refuses in metric/param/model names (e.g. ``+``) replaced."""
    return re.sub(r"[^\w\-. :/]", "_", text)


def log_candidate(run_id: str, cand: Evaluated, staging: Path) -> str:
    """Log ``cand`` as a pyfunc model in run ``run_id`` with its metrics; returns the model id."""
    name = mlflow_key(cand.name)
    with mlflow.start_run(run_id=run_id):
        info = log_package(cand.folder, name, staging)
        mlflow.log_metrics({k: float(v) for k, v in cand.metrics.items()}, model_id=info.model_id)
        mlflow.log_metrics({f"{name}.{k}": float(v) for k, v in cand.metrics.items()})
        if cand.decision is not None:
            mlflow.log_dict({"passed": cand.decision.passed, "clauses": [r.__dict__ for r in cand.decision.results]},
                            f"gate/{name}.json")
        for i, stage in enumerate(cand.stages):
            prefix = f"{name}.{i + 1}-{stage['stage']}"
            mlflow.log_params({f"{prefix}.params": json.dumps(stage["params"])[:500]})
            mlflow.log_metrics({f"{prefix}.{k}": float(v) for k, v in stage["metrics"].items()})
    return info.model_id


def register(client: MlflowClient, source: Source, cand: Evaluated, model_id: str, run_id: str,
             extra_tags: dict[str, str], home: Path) -> ModelVersion:
    """Register ``cand`` (once) as a new version of the source's registered model; move ``challenger``."""
    name = source.version.name
    existing = registry.find_version(client, name, "kiln.candidate_key", cand.key)
    if existing is not None:
        outcome = existing.tags.get("kiln.rollout.status")
        if outcome in ("rolled_back", "aborted"):
            # The same candidate already failed live traffic: re-running optimize must not nominate it again.
            why = existing.tags.get("kiln.rollout.reason", "no reason recorded")[:200]
            raise GateError(f"candidate {cand.name} is {name} v{existing.version}, whose canary was "
                            f"{outcome.replace('_', ' ')} ({why}); not making it "
                            "@challenger again. Change the recipe, data or source model to build a new candidate")
        log.info("candidate %s already registered as %s v%s; not registering again", cand.name, name,
                 existing.version)
        version = existing
    else:
        # The candidate key goes on at creation, so a registry event about this version already says it is
        # Kiln's own (and does not start another optimize run).
        version = mlflow.register_model(f"models:/{model_id}", name, tags={"kiln.candidate_key": cand.key})
        registry.set_tags(client, version, tags_for(source, cand, run_id) | extra_tags)
        # Read back what the store now holds, checked against the tags just written, before the alias moves:
        # an upload that went wrong leaves a tagged version without an alias, never a corrupt challenger.
        registry.fetch_package(client, client.get_model_version(name, version.version), home / "downloads")
    # The alias moves last: a crash before this line leaves a tagged version with no alias, never the reverse.
    client.set_registered_model_alias(name, registry.CHALLENGER, version.version)
    if existing is None:
        audit.AuditLog.under(home).append(audit.AuditEvent(
            model=name, version=str(version.version), event="gate", actor=audit.current_user(),
            reason=cand.decision.summary() if cand.decision else "", details={"recipe": cand.name, "run_id": run_id}))
    return client.get_model_version(name, version.version)


def tags_for(source: Source, cand: Evaluated, run_id: str) -> dict[str, Any]:
    decision = cand.decision
    return {
        "kiln.candidate_key": cand.key,
        "kiln.recipe": cand.name,
        "kiln.precision": cand.precision,
        "kiln.task": source.meta.task,
        "kiln.parent_version": source.version.version,
        "kiln.dataset": source.data.model_dump_json(),
        "kiln.gate": "passed" if decision and decision.passed else "failed",
        "kiln.gate_reasons": json.dumps([r.reason for r in decision.results]) if decision else "[]",
        "kiln.metrics": json.dumps({k: round(v, 6) for k, v in cand.metrics.items()}),
        "kiln.sha256": json.dumps(json.loads((cand.folder / "kiln.json").read_text())["sha256"]),
        "kiln.stages": json.dumps([{"stage": s["stage"], "params": s["params"],
                                    "metrics": {k: round(v, 4) for k, v in s["metrics"].items()}}
                                   for s in cand.stages])[:5000],
        "kiln.git_commit": git_commit(),
        "kiln.triggered_by": audit.current_user(),
        "kiln.run_id": run_id,
    }
