"""What a registry event leads to, whichever way it was heard (webhook or poller).

- a new version of a watched model starts optimize, with the idempotency key ``mlflow:{name}:{version}:optimize``:
  whichever of webhook and poller comes second gets the run the first one created. Versions that Kiln
  registered itself (its optimize flow's challengers) never start optimize, or optimize would feed on its
  own output forever;
- a complete, signed decision on a version resumes the paused promote run that reviews it, with the signed
  statement as the form's answer (the flow verifies it again, exactly like a CLI decision). Tags alone,
  without a statement whose signature verifies, resume nothing.

The calls block (MLflow and Prefect clients); the webhook route runs them in a worker thread.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

from kiln.infra.paused_promotions import PausedPromotion, PrefectPromotions
from kiln.infra.starter import OPTIMIZE, Started
from kiln.settings import Settings
from kiln.tasks.core import tags as vocab
from kiln.tasks.core.tags import CHALLENGER

log = logging.getLogger(__name__)

CANDIDATE_TAG = vocab.CANDIDATE_KEY  # optimize's publish step tags every version it registers
OPTIMIZE_RUN_TAG = vocab.RUN_MODEL  # flows/optimize.py tags its MLflow run; set before any version exists
PROMOTE_RUN_TAG = vocab.PROMOTE_FLOW_RUN  # the paused promote flow run that reviews this version
# `promotion.record_decision` writes the summary, then the signed statement, then kiln.approval last: a decision
# is complete once kiln.approval names it. (The form's answer is built by hand: importing the promote flow
# would pull Prefect's flow machinery into every receiver that mounts the route.)
APPROVAL_KEYS = frozenset({vocab.APPROVAL, vocab.APPROVER, vocab.APPROVAL_REASON, vocab.APPROVAL_AT})


class Starter(Protocol):
    """What the registry events need from :class:`kiln.infra.starter.DeploymentStarter` (tests pass a recorder)."""

    def start_sync(self, deployment: str, parameters: dict[str, Any], *, idempotency_key: str | None = None,
                   tags: list[str] | None = None) -> Started: ...


@dataclass(frozen=True)
class Outcome:
    """What one event led to; the webhook answers it as JSON, the poller logs it."""

    status: str  # started | ignored | resumed | error
    reason: str = ""
    flow_runs: list[str] = field(default_factory=list)


class RegistryEvents:
    """The meaning of registry events, shared by the webhook route and the poller (blocking calls)."""

    def __init__(self, settings: Settings, starter: Starter, *, promotions: PrefectPromotions | None = None,
                 client: Any = None) -> None:
        self.settings, self.starter = settings, starter
        self.promotions = promotions or PrefectPromotions(getattr(starter, "api_url", None))
        self._client = client

    @property
    def client(self) -> Any:
        """The MLflow client for the settings' tracking and registry URIs, created on first use."""
        if self._client is None:
            from mlflow.tracking import MlflowClient

            # Not registry.connect(): that sets MLflow's process-wide URI, and a receiver should not.
            self._client = MlflowClient(self.settings.effective_tracking_uri, self.settings.registry_uri)
        return self._client

    def version_created(self, name: str, version: str, *, tags: dict[str, str] | None = None,
                        run_id: str | None = None, via: str = "webhook") -> Outcome:
        """Start optimize on ``name/version`` when the model is watched and the version is not Kiln's own."""
        if name not in self.settings.watch_models:
            return Outcome("ignored", f"{name} is not watched (KILN_WATCH_MODELS)")
        if self._registered_by_kiln(name, version, tags or {}, run_id):
            return Outcome("ignored", f"{name} v{version} was registered by Kiln's optimize flow")
        started = self.starter.start_sync(
            OPTIMIZE, {"params": {"model": f"{name}/{version}"}}, idempotency_key=optimize_key(name, version),
            tags=["kiln", f"trigger:mlflow-{via}", f"model:{name}"])
        return Outcome("started", f"{OPTIMIZE} for {name}/{version}", [started.flow_run_id])

    def _registered_by_kiln(self, name: str, version: str, tags: dict[str, str], run_id: str | None) -> bool:
        # publish.register_candidate tags the version just after creating it, so the creation event may not carry
        # the tag yet; the optimize flow's MLflow run is tagged before any version exists.
        if CANDIDATE_TAG in tags:
            return True
        mv = self.client.get_model_version(name, version)
        if CANDIDATE_TAG in mv.tags:
            return True
        run_id = run_id or mv.run_id
        if not run_id:
            return False
        from mlflow.exceptions import MlflowException

        try:
            return OPTIMIZE_RUN_TAG in self.client.get_run(run_id).data.tags
        except MlflowException:  # the run was deleted: nothing says Kiln made this version
            return False

    def resume_decided(self, name: str | None = None, version: str | None = None) -> Outcome:
        """Resume every paused promote run whose version carries a complete decision (``kiln.approval`` etc.)."""
        resumed, waiting, refused = [], [], []
        for run in self.promotions.paused(name):
            mv = self._reviewed_version(run)
            if mv is None or (version is not None and str(mv.version) != str(version)):
                continue
            answer = approval_answer(mv.tags)
            if answer is None:
                waiting.append(f"{run.model} v{mv.version}")
                continue
            why = self._unverified(answer, mv)
            if why is not None:
                log.warning("not resuming promote run %s for %s v%s: %s", run.flow_run_id, run.model, mv.version, why)
                refused.append(f"{run.model} v{mv.version}: {why}")
                continue
            if self.promotions.resume(run.flow_run_id, answer):
                log.info("resumed promote run %s for %s v%s with a signed %s", run.flow_run_id, run.model,
                         mv.version, mv.tags.get(vocab.APPROVAL))
                resumed.append(run.flow_run_id)
        if resumed:
            return Outcome("resumed", "signed decision", resumed)
        what = f"{name} v{version}" if name else "any version"
        if refused:
            return Outcome("ignored", f"decision not verified on {'; '.join(refused)}")
        return Outcome("ignored", f"no decision yet on {', '.join(waiting)}" if waiting
                       else f"no paused promote run waits on {what}")

    def _unverified(self, answer: dict[str, str], mv: Any) -> str | None:
        """Why the signed decision in ``answer`` does not verify for ``mv`` (None: it does). The promote run
        verifies it again, with every rule; this keeps forged tags from waking it at all."""
        from kiln.tasks.lifecycle.approvals import DecisionStatement, Signed, Trust, open_signed
        from kiln.tasks.lifecycle.approvers import ApprovalRefused

        try:
            statement = open_signed(Signed.from_token(answer["token"]), DecisionStatement,
                                    Trust.from_settings(self.settings))
        except ApprovalRefused as exc:
            return str(exc)
        if (statement.model, statement.version) != (mv.name, str(mv.version)):
            return f"signed for {statement.model} v{statement.version}"
        return None

    def _reviewed_version(self, run: PausedPromotion) -> Any:
        """The version a paused run reviews: the one linked to it by tag, else the model's current challenger."""
        from mlflow.exceptions import MlflowException

        linked = self.client.search_model_versions(
            f"name = {quote(run.model)} and tags.`{PROMOTE_RUN_TAG}` = {quote(run.flow_run_id)}")
        if linked:
            return linked[0]
        try:
            return self.client.get_model_version_by_alias(run.model, CHALLENGER)
        except MlflowException:
            return None


def optimize_key(name: str, version: str) -> str:
    """The idempotency key shared by the webhook and the poller: one optimize run per version, ever.

    Made of (model, version, action) only, never of a delivery: MLflow's retries, a redelivery or replay with a
    fresh delivery id, and the poller hearing the same version all get the run the first one created back from
    Prefect. (Versions are numbers, so a model name with ``:`` in it cannot make two keys collide.)
    """
    return f"mlflow:{name}:{version}:optimize"


def approval_answer(tags: dict[str, str]) -> dict[str, str] | None:
    """The promote flow's ``ApprovalInput`` (``{"token": ...}``) from a version's tags: the signed statement of
    the decision ``kiln.approval`` names, by the approver ``kiln.approver`` names; None while the decision is
    incomplete or no signed statement backs it. Not verified here: see ``RegistryEvents._unverified``."""
    from kiln.tasks.lifecycle.approvals import Signed

    decision, approver = tags.get(vocab.APPROVAL, ""), tags.get(vocab.APPROVER, "").strip()
    if decision not in (vocab.APPROVED, vocab.REJECTED) or not approver:
        return None
    signed = Signed.from_tag(tags.get(vocab.decision_tag(approver), ""))
    try:
        claimed = json.loads(signed.statement) if signed is not None else {}
    except ValueError:
        return None
    if not isinstance(claimed, dict) or (claimed.get("decision"), claimed.get("signer")) != (decision, approver):
        return None
    return {"token": signed.token()}


def quote(text: str) -> str:
    """``text`` as a string literal in an MLflow search filter, quotes included (see registry.client.literal)."""
    from kiln.tasks.registry.client import literal

    return literal(text)
