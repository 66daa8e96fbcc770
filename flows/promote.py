"""The promote flow: show the challenger, wait for an approver's signed decision, move the aliases.

    review (gate + metrics table) ─► wait for a signed decision (registry, or a token in the Prefect form)
      ─► promote | stop

Two ways to decide, one proof for both: a decision statement signed with an approver's SSH key.
``approval="registry"`` polls the challenger's signed decisions (``kiln approve`` / ``kiln reject`` write
them); ``approval="ui"`` pauses the flow run with an :class:`ApprovalInput` form in the Prefect UI that
takes the token ``kiln approve ... --print-token`` prints, verified and recorded exactly like a CLI
decision. Tags typed into the MLflow UI never decide: an ``approved`` tag that no verified statement backs
is logged, reset to ``refused``, and the flow keeps waiting. No decision in time tags the challenger
``kiln.approval=not_approved`` and moves nothing; the promotion itself checks the decisions again.
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

from kiln.flows import crashed
from kiln.settings import Settings, load_settings
from kiln.tasks.core import tags as vocab
from kiln.tasks.lifecycle import promotion
from kiln.tasks.lifecycle.approvals import Signed
from kiln.tasks.registry import audit
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.lease_record import PromotionError, refuse_if_held

log = logging.getLogger(__name__)


class PromoteParams(BaseModel):
    """Which model to promote and how long to wait for a decision (the Prefect UI draws this as a form)."""

    model: str = Field(..., description="Registered model name; its @challenger is the candidate.")
    timeout_s: float = Field(3600, gt=0, description="Seconds to wait for a decision before giving up.")
    poll_interval_s: float = Field(5, gt=0, description="Seconds between looks at the registry (or the form).")
    approval: Literal["registry", "ui"] = Field(
        "registry", description="registry: wait for a signed decision in the registry (kiln approve / kiln reject); "
                                "ui: pause this flow run with a form that takes a signed decision token.")


class ApprovalInput(RunInput):
    """The form an approver fills in the Prefect UI to resume a paused promote run: a signed decision."""

    token: str = Field(..., min_length=16, description=(
        "Your signed decision: the line `kiln approve NAME VERSION --reason \"...\" --print-token` (or `kiln "
        "reject ...`) prints. Who decided, approve or reject, and why are inside it, signed with your SSH key."))


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
    refuse_if_held(client, name)  # a running rollout (or another promotion) would refuse the move: say so now
    markdown = promotion.review_markdown(client, name, challenger)
    create_markdown_artifact(markdown, key=f"promote-{_slug(name)}", description=f"Review of {name}")
    return str(challenger.version), markdown


def _decided(client, settings: Settings, name: str, version: str) -> Decision | None:
    """The verified decision on ``name`` v``version``, or None while there is none (forged tags refused)."""
    mv = client.get_model_version(name, version)
    state = promotion.decision_on(client, name, version, settings)
    if state.outcome == vocab.REJECTED:  # any valid rejection stops it, complete or not
        return Decision(outcome="rejected", approver=state.deciders, reason="; ".join(state.reasons))
    if state.outcome == vocab.APPROVED and promotion.refusal(state, mv) is None:
        return Decision(outcome="approved", approver=state.deciders, reason="; ".join(state.reasons))
    claimed = mv.tags.get(vocab.APPROVAL)
    if claimed in (vocab.APPROVED, vocab.REJECTED) and state.outcome != claimed:
        # Typed into the MLflow UI, or left by a decision that no longer counts: not a decision.
        why = f"{vocab.APPROVAL}={claimed} is not backed by a valid signed decision: {state.explain()}"
        _refuse(client, settings.home, name, version, mv.tags.get(vocab.APPROVER, ""), why, claimed)
    return None


def wait_on_registry(settings: Settings, name: str, version: str, timeout_s: float, poll_s: float) -> Decision:
    """Poll the version's signed decisions until they say approved or rejected, or the time is up."""
    client = registry.connect(settings)
    deadline = time.monotonic() + timeout_s
    while True:
        decision = _decided(client, settings, name, version)
        if decision is not None:
            return decision
        if time.monotonic() >= deadline:
            return Decision(outcome="not_approved", reason=f"no decision within {timeout_s:g} s")
        time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.01)))


def wait_on_form(settings: Settings, name: str, version: str, markdown: str, timeout_s: float,
                 poll_s: float) -> Decision:
    """Pause the flow run with :class:`ApprovalInput`; a token that does not verify, or is not enough yet (a
    second approver under four-eyes), is recorded or refused and the form asks again."""
    client = registry.connect(settings)
    if flow_run.id:  # lets a signed decision in the registry (webhook or poller) resume this paused run
        client.set_model_version_tag(name, version, vocab.PROMOTE_FLOW_RUN, flow_run.id)
    deadline = time.monotonic() + timeout_s
    note = ""
    while (left := deadline - time.monotonic()) > 0:
        form = ApprovalInput.with_initial_data(description=note + markdown)
        try:
            answer = pause_flow_run(wait_for_input=form, timeout=max(int(left), 1), poll_interval=max(int(poll_s), 1))
        except FlowPauseTimeout:
            break
        try:
            state = promotion.record_decision(client, Signed.from_token(answer.token), settings=settings,
                                              model=name, version=version)
        except promotion.ApprovalRefused as exc:
            log.warning("refused a decision token for %s v%s: %s", name, version, exc)
            note = f"**Refused:** {exc}\n\n"
            continue
        decision = _decided(client, settings, name, version)
        if decision is not None:
            return decision
        note = f"**Recorded; not decided yet:** {state.explain()}\n\n"
    return Decision(outcome="not_approved", reason=f"no decision within {timeout_s:g} s")


@task(cache_policy=NONE)
def promote_version(settings: Settings, name: str, version: str, decision: Decision) -> str:
    client = registry.connect(settings)
    return str(promotion.promote(client, name, approver=decision.approver, reason=decision.reason,
                                 home=settings.home, expected_challenger=version, settings=settings).version)


@task(cache_policy=NONE)
def record_no_decision(settings: Settings, name: str, version: str, reason: str) -> None:
    promotion.mark_not_approved(registry.connect(settings), name, version, reason, settings.home)


def _refuse(client, home: Path, name: str, version: str, approver: str, why: str, state: str) -> None:
    log.warning("refused %s of %s v%s by %r: %s", state, name, version, approver, why)
    audit.record(client, audit.AuditLog.under(home),
                 audit.AuditEvent(name, version, vocab.EVENT_APPROVAL_REFUSED, approver, why,
                                  details={"decision": state}),
                 {vocab.APPROVAL: vocab.REFUSED, vocab.APPROVAL_REASON: why[:500]})


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower())


# ── the flow ─────────────────────────────────────────────────────────────────────────────────────────
@flow(name="promote", log_prints=True, **crashed.RELEASE_HOOKS)
def promote(params: PromoteParams) -> dict[str, Any]:
    """Show the challenger, wait for an approver's decision, and promote it to champion on approval.

    Settings (registry, audit log, approvers) come from the worker's environment (``KILN_*``).
    """
    settings = load_settings()
    crashed.claim_run(settings)  # runs of this flow whose process was killed: Crashed, not Running
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
