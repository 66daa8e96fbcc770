"""The promote flow: show the challenger, wait for a person's decision, move the aliases.

    review (gate + metrics table) ─► wait for approval (registry tag, or the Prefect UI form) ─► promote | stop

Two ways to decide, one rule for both: the decision must come from a listed approver (and, with
four-eyes review, not from whoever triggered the run). ``approval="registry"`` polls the challenger's
``kiln.approval`` tag, set by ``kiln approve`` / ``kiln reject`` or by hand in the MLflow UI;
``approval="ui"`` pauses the flow run with an :class:`ApprovalInput` form in the Prefect UI. Either way, an
answer from someone not allowed is logged and refused, and the flow keeps waiting; no answer in time
tags the challenger ``kiln.approval=not_approved`` and moves nothing.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from kiln.settings import Settings, load_settings
from kiln.tasks.core import tags as vocab
from kiln.tasks.lifecycle import promotion
from kiln.tasks.registry import audit
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.lock import PromotionError

log = logging.getLogger(__name__)


class PromoteParams(BaseModel):
    """Which model to promote and how long to wait for a decision (the Prefect UI draws this as a form)."""

    model: str = Field(..., description="Registered model name; its @challenger is the candidate.")
    timeout_s: float = Field(3600, gt=0, description="Seconds to wait for a decision before giving up.")
    poll_interval_s: float = Field(5, gt=0, description="Seconds between looks at the registry (or the form).")
    approval: Literal["registry", "ui"] = Field(
        "registry", description=f"registry: wait for the {vocab.APPROVAL} tag (kiln approve, MLflow UI); "
                                "ui: pause this flow run with an approval form in the Prefect UI.")


class ApprovalInput(RunInput):
    """The form an approver fills in the Prefect UI to resume a paused promote run."""

    decision: Literal["approve", "reject"] = Field("approve", description="Promote the challenger, or not.")
    approver: str = Field(..., description="Your user name; must be listed in KILN_APPROVERS.")
    reason: str = Field(..., min_length=1, description="Why; recorded on the version and in the audit log.")


class Decision(BaseModel):
    outcome: Literal["approved", "rejected", "not_approved"]
    approver: str = ""
    reason: str = ""


# ── steps ────────────────────────────────────────────────────────────────────────────────────────────
# No retries on these two: their failures are KilnErrors (no challenger, a conflict) that a retry
# would only turn into a more confusing message.
@task(cache_policy=NONE)
def review(settings: Settings, name: str) -> tuple[str, str]:
    """The challenger's version and the Markdown an approver reads (also kept as a flow-run artifact)."""
    client = registry.connect(settings)
    challenger = registry.resolve(client, registry.ModelRef(name, alias=vocab.CHALLENGER))
    if not vocab.gate_passed(challenger.tags):
        raise PromotionError(f"{name} v{challenger.version} did not pass its gate; nothing to approve")
    markdown = promotion.review_markdown(client, name, challenger)
    create_markdown_artifact(markdown, key=f"promote-{_slug(name)}", description=f"Review of {name}")
    return str(challenger.version), markdown


def wait_on_registry(settings: Settings, name: str, version: str, timeout_s: float, poll_s: float) -> Decision:
    """Poll the version's ``kiln.approval`` tag; a decision by someone not allowed is refused and reset."""
    client = registry.connect(settings)
    policy = promotion.load_approval_policy(settings=settings)
    deadline = time.monotonic() + timeout_s
    while True:
        mv = client.get_model_version(name, version)
        tags = mv.tags
        state, approver = tags.get(vocab.APPROVAL), tags.get(vocab.APPROVER, "")
        if state in (vocab.APPROVED, vocab.REJECTED):
            try:  # `kiln approve` checked this already; a tag set by hand in the MLflow UI was not
                policy.check(approver, promotion.triggered_by(client, mv), decision=state)
                return Decision(outcome=state, approver=approver, reason=tags.get(vocab.APPROVAL_REASON, ""))
            except promotion.ApprovalRefused as exc:
                _refuse(client, settings.home, name, version, approver, str(exc), state)
        if time.monotonic() >= deadline:
            return Decision(outcome="not_approved", reason=f"no decision within {timeout_s:g} s")
        time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.01)))


def wait_on_form(settings: Settings, name: str, version: str, markdown: str, timeout_s: float,
                 poll_s: float) -> Decision:
    """Pause the flow run with :class:`ApprovalInput`; invalid answers (unknown approver) ask again."""
    client = registry.connect(settings)
    if flow_run.id:  # lets a kiln.approval tag (registry webhook or poller) resume this paused run
        client.set_model_version_tag(name, version, vocab.PROMOTE_FLOW_RUN, flow_run.id)
    policy = promotion.load_approval_policy(settings=settings)
    deadline = time.monotonic() + timeout_s
    note = ""
    while (left := deadline - time.monotonic()) > 0:
        form = ApprovalInput.with_initial_data(description=note + markdown, decision="approve")
        try:
            answer = pause_flow_run(wait_for_input=form, timeout=max(int(left), 1), poll_interval=max(int(poll_s), 1))
        except FlowPauseTimeout:
            break
        state = vocab.APPROVED if answer.decision == "approve" else vocab.REJECTED
        mv = client.get_model_version(name, version)
        try:
            policy.check(answer.approver, promotion.triggered_by(client, mv), decision=state)
        except promotion.ApprovalRefused as exc:
            _refuse(client, settings.home, name, version, answer.approver, str(exc), state)
            note = f"**Refused:** {exc}\n\n"
            continue
        promotion.decide(client, name, version, decision=state, approver=answer.approver, reason=answer.reason,
                         policy=policy, home=settings.home)
        return Decision(outcome=state, approver=answer.approver, reason=answer.reason)
    return Decision(outcome="not_approved", reason=f"no decision within {timeout_s:g} s")


@task(cache_policy=NONE)
def promote_version(settings: Settings, name: str, version: str, decision: Decision) -> str:
    client = registry.connect(settings)
    return str(promotion.promote(client, name, approver=decision.approver, reason=decision.reason,
                                 home=settings.home, expected_challenger=version).version)


@task(cache_policy=NONE)
def record_no_decision(settings: Settings, name: str, version: str, reason: str) -> None:
    promotion.mark_not_approved(registry.connect(settings), name, version, reason, settings.home)


def _refuse(client, home: Path, name: str, version: str, approver: str, why: str, state: str) -> None:
    log.warning("refused %s of %s v%s by %r: %s", state, name, version, approver, why)
    audit.record(client, audit.AuditLog.under(home),
                 audit.AuditEvent(name, version, vocab.EVENT_APPROVAL_REFUSED, approver, why,
                                  details={"decision": state}),
                 {vocab.APPROVAL: vocab.REFUSED, vocab.APPROVAL_REASON: why})


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower())


# ── the flow ─────────────────────────────────────────────────────────────────────────────────────────
@flow(name="promote", log_prints=True)
def promote(params: PromoteParams) -> dict[str, Any]:
    """Show the challenger, wait for an approver's decision, and promote it to champion on approval.

    Settings (registry, audit log, approvers) come from the worker's environment (``KILN_*``).
    """
    settings = load_settings()
    version, markdown = review(settings, params.model)
    print(markdown)
    if params.approval == "ui":
        decision = wait_on_form(settings, params.model, version, markdown, params.timeout_s, params.poll_interval_s)
    else:
        decision = wait_on_registry(settings, params.model, version, params.timeout_s, params.poll_interval_s)
    result = {"model": params.model, "version": version} | decision.model_dump()
    if decision.outcome == vocab.APPROVED:
        result["champion"] = promote_version(settings, params.model, version, decision)
    elif decision.outcome == vocab.NOT_APPROVED:
        record_no_decision(settings, params.model, version, decision.reason)
    print(f"{params.model} v{version}: {decision.outcome}" + (f" by {decision.approver}" if decision.approver else ""))
    return result
