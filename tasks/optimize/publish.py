"""Logging candidates to MLflow and registering the winner: the only place optimize writes the registry.

Every candidate is logged as an MLflow model (pyfunc around its engine) with its metrics and gate
decision; only the best passing one becomes a model version, tagged with its lineage and verdict, and
only then does the ``challenger`` alias move (through :mod:`kiln.tasks.registry.aliases`). The whole
registration runs under the model's ``publish`` lease, so it refuses (and registers nothing) while a
rollout, a promotion or a rollback of the model holds it. Re-running the same work finds the version it
registered before (tag ``kiln.candidate_key``) instead of registering a duplicate.

Two optimize runs of one model (two machines, or a redelivered trigger) therefore never register twice: the
check for that version and the registration both happen under the lease, which one holder at a time takes
(across processes and machines: :mod:`kiln.tasks.registry.lease`). A run that finds another *publish* holding
the lease waits for it, a few seconds as a rule, up to ``PUBLISH_WAIT_S``, and then finds what it registered.
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
from kiln.tasks.core import tags as vocab
from kiln.tasks.optimize.candidates import Evaluated, Source, git_commit
from kiln.tasks.registry import aliases, audit
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.lease import ModelLease, wait_for_publish
from kiln.tasks.registry.pins import package_digest
from kiln.tasks.registry.pyfunc import log_package

log = logging.getLogger(__name__)

PUBLISH_WAIT_S = 120.0  # how long to wait while another run publishes the same model (a publish takes seconds)


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
        # Each number's 95 % interval beside it: `int8.accuracy_low`, `int8.accuracy_high`.
        mlflow.log_metrics({f"{name}.{k}_{end}": float(getattr(iv, end)) for k, iv in cand.intervals.items()
                            for end in ("low", "high")})
        if cand.decision is not None:
            mlflow.log_dict(cand.decision.to_dict(), f"gate/{name}.json")
        for i, stage in enumerate(cand.stages):
            prefix = f"{name}.{i + 1}-{stage['stage']}"
            mlflow.log_params({f"{prefix}.params": json.dumps(stage["params"])[:500]})
            mlflow.log_metrics({f"{prefix}.{k}": float(v) for k, v in stage["metrics"].items()})
    return info.model_id


def register_candidate(client: MlflowClient, source: Source, cand: Evaluated, model_id: str, run_id: str,
                       extra_tags: dict[str, str], home: Path, *, wait_s: float = PUBLISH_WAIT_S) -> ModelVersion:
    """Register ``cand`` (once) as a new version of the source's registered model; move ``challenger``.

    Under the model's ``publish`` lease: waits (up to ``wait_s``) while another run publishes the model, then
    finds the version that run registered if it was this candidate;
    :class:`~kiln.tasks.registry.lease_record.LeaseHeld` at once while a rollout, promotion or rollback acts.
    """
    lease = wait_for_publish(client, source.version.name, home, wait_s)
    try:
        return _register(client, source, cand, model_id, run_id, extra_tags, home, lease)
    finally:
        lease.release()


def _register(client: MlflowClient, source: Source, cand: Evaluated, model_id: str, run_id: str,
              extra_tags: dict[str, str], home: Path, lease: ModelLease) -> ModelVersion:
    name = source.version.name
    existing = registry.find_version(client, name, vocab.CANDIDATE_KEY, cand.key)
    if existing is not None:
        outcome = existing.tags.get(vocab.ROLLOUT_STATUS)
        if outcome in ("rolled_back", "aborted"):
            # The same candidate already failed live traffic: re-running optimize must not nominate it again.
            why = existing.tags.get(vocab.ROLLOUT_REASON, "no reason recorded")[:200]
            raise GateError(f"candidate {cand.name} is {name} v{existing.version}, whose canary was "
                            f"{outcome.replace('_', ' ')} ({why}); not making it "
                            "@challenger again. Change the recipe, data or source model to build a new candidate")
        log.info("candidate %s already registered as %s v%s; not registering again", cand.name, name,
                 existing.version)
        version = existing
    else:
        # The candidate key and the pin go on at creation, in the same write: a registry event about this version
        # already says it is Kiln's own (and starts no other optimize run), and a crash before the other tags
        # leaves a version the retry finds by its key, completes and checks against its pin.
        version = mlflow.register_model(f"models:/{model_id}", name, tags={
            vocab.CANDIDATE_KEY: cand.key, vocab.PACKAGE_DIGEST: package_digest(cand.folder)})
    # Missing tags are written (the gate decision last), present ones never rewritten; then what the store holds
    # is read back and checked against the pin, before the alias moves: a partial publish, retried, ends fully
    # tagged and verified; an upload that went wrong leaves a version without an alias, never a corrupt challenger.
    version, written = registry.complete_tags(client, version, tags_for(source, cand, run_id) | extra_tags)
    registry.fetch_package(client, version, home / "downloads")
    # The alias moves last: a crash before this line leaves a tagged version with no alias, never the reverse.
    # A re-run that finds its version already @challenger leaves it (and the nomination decisions answer) alone.
    # The same work after a promotion finds the champion itself: nothing to nominate (challenger = champion is no
    # comparison at all).
    current = registry.aliases_of(client, name)
    if current.get(vocab.CHAMPION) == str(version.version):
        log.info("candidate %s is %s v%s, already @champion; nothing nominated", cand.name, name, version.version)
    elif current.get(vocab.CHALLENGER) != str(version.version):
        aliases.nominate(client, name, version.version, home=home, lease=lease)
    if vocab.GATE in written:  # this run completed the publication (a retry after a crash included)
        audit.AuditLog.under(home).append(audit.AuditEvent(
            model=name, version=str(version.version), event=vocab.EVENT_GATE, actor=audit.current_user(),
            reason=cand.decision.summary() if cand.decision else "", details={"recipe": cand.name, "run_id": run_id}))
    return client.get_model_version(name, version.version)


def tags_for(source: Source, cand: Evaluated, run_id: str) -> dict[str, Any]:
    """The tags of ``cand``'s model version: lineage, gate verdict, metrics, checksums and who asked."""
    decision = cand.decision
    return {
        vocab.CANDIDATE_KEY: cand.key,
        vocab.RECIPE: cand.name,
        vocab.PRECISION: cand.precision,
        vocab.TASK: source.meta.task,
        vocab.PARENT_VERSION: source.version.version,
        vocab.DATASET: source.data.model_dump_json(),
        vocab.GATE: vocab.GATE_PASSED if decision and decision.passed else vocab.GATE_FAILED,
        vocab.GATE_REASONS: json.dumps([r.reason for r in decision.results]) if decision else "[]",
        vocab.METRICS: json.dumps({k: round(v, 6) for k, v in cand.metrics.items()}),
        vocab.SHA256: json.dumps(json.loads((cand.folder / "kiln.json").read_text())["sha256"]),
        vocab.PACKAGE_DIGEST: package_digest(cand.folder),
        vocab.STAGES: json.dumps([{"stage": s["stage"], "params": s["params"],
                                   "metrics": {k: round(v, 4) for k, v in s["metrics"].items()}}
                                  for s in cand.stages])[:5000],
        vocab.GIT_COMMIT: git_commit(),
        vocab.TRIGGERED_BY: audit.current_user(),
        vocab.RUN_ID: run_id,
    }
