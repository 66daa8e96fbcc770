"""Promotion: signed decisions on a challenger, and promoting or rolling back.

    sign_decision ─► record_decision: verified as any reader verifies it, then written (kiln.approval last)
    promote: the registry's signed decisions say approved ─► champion → previous, challenger → champion
    rollback: previous → champion (the demoted version keeps no alias; it is tagged rolled back)

Whether a move may happen is read from the registry alone, by every path that moves an alias toward
champion (the promote flow and CLI, the end of a canary, a manual ``kiln rollout promote``):
:func:`~kiln.tasks.lifecycle.approvals.decision_state` verifies each signed decision against the approvers'
keys and counts only those on the version's current nomination, for its pinned package. Tags typed by
hand never approve. The move itself is :mod:`kiln.tasks.registry.aliases`, under the model's lease, with
an optimistic check that the aliases read here before deciding are still the aliases when it is taken.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from kiln.errors import ConfigError
from kiln.settings import Settings, load_settings
from kiln.tasks.core import tags as vocab
from kiln.tasks.lifecycle import approvals
from kiln.tasks.lifecycle.approvals import DecisionState, DecisionStatement, Signed, Trust
from kiln.tasks.lifecycle.approvers import ApprovalPolicy, ApprovalRefused, load_approval_policy
from kiln.tasks.lifecycle.review import champion_metrics, metrics_table, review_markdown
from kiln.tasks.registry import aliases, audit
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.audit import AuditEvent, AuditLog
from kiln.tasks.registry.lease import ModelLease
from kiln.tasks.registry.lease_record import PromotionConflict, PromotionError
from kiln.tasks.registry.nominations import close_nomination, current_nomination
from kiln.tasks.registry.pins import pinned_digest

__all__ = ["ApprovalPolicy", "ApprovalRefused", "DecisionState", "PromotionConflict", "PromotionError",
           "champion_metrics", "decide", "decision_on", "load_approval_policy", "mark_not_approved",
           "metrics_table", "promote", "record_decision", "refusal", "refuse_if_rejected", "review_markdown",
           "rollback", "sign_decision"]


# ── decisions ────────────────────────────────────────────────────────────────────────────────────────
def decision_on(client: MlflowClient, name: str, version: str, settings: Settings | None = None) -> DecisionState:
    """What the verified decisions on ``name`` v``version``'s current nomination add up to."""
    settings = settings or load_settings()
    return approvals.decision_state(client, client.get_model_version(name, str(version)),
                                    Trust.from_settings(settings))


def sign_decision(client: MlflowClient, name: str, version: str, *, decision: Literal["approved", "rejected"],
                  reason: str, key: Path | None = None, settings: Settings | None = None,
                  approver: str | None = None) -> Signed:
    """Sign a decision on ``name`` v``version``'s current nomination with ``key`` (default: the ``signing_key``
    setting), after the checks its readers will make; writes nothing to the registry.

    The signer is whoever the approvers' allowed_signers file lists for the key; ``approver`` only
    cross-checks it (:class:`ApprovalRefused` when it differs). Refusals are logged.
    """
    settings = settings or load_settings()
    if not reason.strip():
        raise ConfigError("give a --reason: the decision is recorded for whoever reads the history")
    key = key or settings.signing_key
    if key is None:
        raise ConfigError("no signing key: set KILN_SIGNING_KEY (or signing_key in kiln.yaml) to your SSH private "
                          "key, or pass --key PATH; decisions are signed statements, not names")
    trust = Trust.from_settings(settings)
    mv = registry.resolve(client, registry.ModelRef(name, version=str(version)))
    version = str(mv.version)  # the SQL store answers with an int
    digest = pinned_digest(mv.tags, f"{name} v{version}")
    nomination = current_nomination(mv.tags)
    if nomination is None:
        raise PromotionError(f"{name} v{version} has no open nomination, so there is nothing to decide: only a "
                             "version Kiln nominated as @challenger (and not promoted or rolled back since) can be")
    with _refusals_logged(settings.home, name, version, approver or str(key), decision, reason):
        principal = approvals.whose_key(key, trust, approver)
    with _refusals_logged(settings.home, name, version, principal, decision, reason):
        _check(client, mv, trust, principal, decision)
    return approvals.sign(DecisionStatement(model=name, version=version, digest=digest, decision=decision,
                                            reason=reason.strip(), at=audit.now_iso(), nomination=nomination,
                                            signer=principal), key)


def record_decision(client: MlflowClient, signed: Signed, *, settings: Settings | None = None,
                    model: str | None = None, version: str | None = None) -> DecisionState:
    """Verify ``signed`` exactly as promotion will, then write it; returns where the decisions now stand.

    ``model`` / ``version``: what the caller waits on (a promote run's form); a decision on anything else is
    refused. Write order: approver, reason and time, then the signed statement (one tag: statement and
    signature together), then ``kiln.approval`` last, so a crash half-way leaves no decision readers accept.
    """
    settings = settings or load_settings()
    trust = Trust.from_settings(settings)
    claimed = _claimed(signed)
    if claimed is None:
        raise ApprovalRefused("not a signed decision statement")
    with _refusals_logged(settings.home, claimed.model, claimed.version, f"{claimed.signer} (unverified)",
                          claimed.decision, claimed.reason):
        statement = approvals.open_signed(signed, DecisionStatement, trust)
        if model is not None and (statement.model, statement.version) != (model, str(version)):
            raise ApprovalRefused(f"this decision is on {statement.model} v{statement.version}, not {model} "
                                  f"v{version}")
    name, version = statement.model, statement.version
    mv = registry.resolve(client, registry.ModelRef(name, version=version))
    with _refusals_logged(settings.home, name, version, statement.signer, statement.decision, statement.reason):
        digest = pinned_digest(mv.tags, f"{name} v{version}")
        if statement.digest != digest:
            raise ApprovalRefused(f"this decision was signed for package {statement.digest[:12]}…, but {name} "
                                  f"v{version} is pinned to {digest[:12]}…; decide on what the registry holds")
        if statement.nomination != current_nomination(mv.tags):
            raise ApprovalRefused(f"this decision answers nomination {statement.nomination[:8]}…, not {name} "
                                  f"v{version}'s current one (it was re-nominated, promoted or rolled back "
                                  "since); decide again")
        _check(client, mv, trust, statement.signer, statement.decision)
    for key, value in ((vocab.APPROVER, statement.signer), (vocab.APPROVAL_REASON, statement.reason),
                       (vocab.APPROVAL_AT, statement.at), (vocab.decision_tag(statement.signer), signed.tag())):
        client.set_model_version_tag(name, version, key, value)
    state = approvals.decision_state(client, client.get_model_version(name, version), trust)
    audit.record(client, AuditLog.under(settings.home),
                 AuditEvent(name, version, statement.decision, statement.signer, statement.reason, statement.at,
                            {"nomination": statement.nomination, "outcome": state.outcome}),
                 {vocab.APPROVAL: state.outcome})  # last: the decision is complete once this is written
    return state


def _claimed(signed: Signed) -> DecisionStatement | None:
    """What ``signed`` claims, before it is verified: only to say, in the audit log, what was refused."""
    try:
        return DecisionStatement.model_validate_json(signed.statement)
    except ValueError:
        return None


def decide(client: MlflowClient, name: str, version: str, *, decision: Literal["approved", "rejected"],
           reason: str, key: Path | None = None, settings: Settings | None = None,
           approver: str | None = None) -> DecisionState:
    """Sign a decision with ``key`` and record it (:func:`sign_decision`, then :func:`record_decision`)."""
    settings = settings or load_settings()
    signed = sign_decision(client, name, version, decision=decision, reason=reason, key=key, settings=settings,
                           approver=approver)
    return record_decision(client, signed, settings=settings)


def _check(client: MlflowClient, mv: ModelVersion, trust: Trust, principal: str, decision: str) -> None:
    """The approval policy (may ``principal`` decide; four-eyes) and, for approvals, the gate."""
    requester, _ = approvals.requester_of(client, mv, trust)
    trust.policy.check(principal, requester, decision=decision)
    if decision == vocab.APPROVED and not vocab.gate_passed(mv.tags):
        raise ApprovalRefused(f"{mv.name} v{mv.version} did not pass its gate ({vocab.GATE}="
                              f"{mv.tags.get(vocab.GATE, 'missing')}); only a gated challenger can be approved")


@contextmanager
def _refusals_logged(home: Path, name: str, version: str, actor: str, decision: str, reason: str) -> Iterator[None]:
    """Log an :class:`ApprovalRefused` raised inside the block as an ``approval_refused`` audit event."""
    try:
        yield
    except ApprovalRefused as exc:
        AuditLog.under(home).append(AuditEvent(name, version, vocab.EVENT_APPROVAL_REFUSED, actor, str(exc),
                                               details={"decision": decision, "given_reason": reason}))
        raise


def mark_not_approved(client: MlflowClient, name: str, version: str, reason: str, home: Path) -> None:
    """No decision came in time: say so on the version; nothing moves."""
    audit.record(client, AuditLog.under(home), AuditEvent(name, version, vocab.NOT_APPROVED, "kiln", reason),
                 {vocab.APPROVAL: vocab.NOT_APPROVED, vocab.APPROVAL_REASON: reason,
                  vocab.APPROVAL_AT: audit.now_iso()})


def refusal(state: DecisionState, mv: ModelVersion) -> str | None:
    """Why ``mv`` may not be promoted on ``state`` (None: it may). Besides approved signed decisions, the
    decision must be complete: ``kiln.approval``, written last, must say so too."""
    name, version = mv.name, mv.version
    if state.outcome == vocab.REJECTED:
        return f"{name} v{version} was rejected ({state.why}); a rejected version is never promoted"
    if state.outcome != vocab.APPROVED:
        return f"{name} v{version} is not approved: {state.explain()}; run `kiln approve {name} {version}`"
    if mv.tags.get(vocab.APPROVAL) != vocab.APPROVED:
        return (f"the decision on {name} v{version} is incomplete ({vocab.APPROVAL}="
                f"{mv.tags.get(vocab.APPROVAL, 'none')}: its recording stopped half-way); run `kiln approve` again")
    return None


def refuse_if_rejected(client: MlflowClient, name: str, settings: Settings | None = None) -> None:
    """:class:`PromotionError` when ``name``'s @challenger carries a valid signed rejection (a rollout of it
    must not start); nothing when there is no challenger (whoever needs one says so)."""
    version = registry.existing_aliases(client, name).get(vocab.CHALLENGER)
    if version is None:
        return
    state = decision_on(client, name, version, settings)
    if state.outcome == vocab.REJECTED:
        raise PromotionError(f"{name} v{version} was rejected ({state.why}); a rejected version is never rolled "
                             "out or promoted")


# ── promotion and rollback ───────────────────────────────────────────────────────────────────────────
def promote(client: MlflowClient, name: str, *, approver: str, reason: str, home: Path | None = None,
            expected_challenger: str | None = None, lease: ModelLease | None = None,
            settings: Settings | None = None) -> ModelVersion:
    """``champion`` → ``previous``, ``challenger`` → ``champion``, ``challenger`` removed; returns the new champion.

    Refuses (:class:`PromotionError`) without a challenger, with a challenger that failed its gate, and unless
    the signed decisions on its current nomination say approved (:func:`refusal`); and
    (:class:`PromotionConflict`) when someone else holds the model's lease (a running rollout, another
    promotion) or the aliases changed since they were read. ``lease``: the caller's own, already held (a
    rollout's). ``approver``: who is recorded as promoting. The promoted version's nomination is closed.
    """
    settings = settings or load_settings()
    home = home or settings.home
    before = registry.existing_aliases(client, name)
    target = before.get(vocab.CHALLENGER)
    if target is None:
        raise PromotionError(f"{name!r} has no @challenger to promote (aliases: {aliases.describe(before)}); "
                             "run `kiln optimize` first")
    if expected_challenger is not None and str(expected_challenger) != target:
        raise PromotionConflict(f"@challenger of {name!r} is now v{target}, not v{expected_challenger}; "
                                "review the new challenger")
    mv = client.get_model_version(name, target)
    if not vocab.gate_passed(mv.tags):
        raise PromotionError(f"{name} v{target} did not pass its gate "
                             f"({vocab.GATE}={mv.tags.get(vocab.GATE, 'missing')})")
    why = refusal(approvals.decision_state(client, mv, Trust.from_settings(settings)), mv)
    if why is not None:
        raise PromotionError(why)
    old = aliases.promote(client, name, home=home, expected=before, lease=lease)
    close_nomination(client, name, target)  # answered: its decisions never count again
    book, at = AuditLog.under(home), audit.now_iso()
    if old and old != target:
        audit.record(client, book, AuditEvent(name, old, vocab.EVENT_DEMOTED, approver, reason, at, {"by": target}),
                     {vocab.DEMOTED_AT: at, vocab.DEMOTED_BY: approver, vocab.DEMOTION_REASON: reason})
    audit.record(client, book, AuditEvent(name, target, vocab.EVENT_PROMOTED, approver, reason, at, {"replaced": old}),
                 {vocab.PROMOTED_AT: at, vocab.PROMOTED_BY: approver, vocab.PROMOTION_REASON: reason})
    return client.get_model_version(name, target)


def rollback(client: MlflowClient, name: str, *, actor: str, reason: str, home: Path | None = None,
             lease: ModelLease | None = None) -> ModelVersion:
    """Put ``previous`` back as ``champion`` in one move; returns the restored champion.

    The demoted champion gets no alias and its nomination is closed (a version that was rolled back is not
    a rollback target, so a second rollback fails rather than flipping back to it, and its old approval never
    promotes it again); ``previous`` is removed, ``challenger`` is left alone. Both versions are tagged and
    logged.
    """
    home = home or load_settings().home
    before = registry.existing_aliases(client, name)
    target = before.get(vocab.PREVIOUS)
    if target is None:
        raise PromotionError(f"{name!r} has no @previous to roll back to (aliases: {aliases.describe(before)})")
    bad = aliases.restore_previous(client, name, home=home, expected=before, lease=lease)
    book, at = AuditLog.under(home), audit.now_iso()
    tags = {vocab.ROLLED_BACK_BY: actor, vocab.ROLLBACK_REASON: reason}
    if bad and bad != target:
        close_nomination(client, name, bad)
        audit.record(client, book, AuditEvent(name, bad, vocab.EVENT_ROLLED_BACK, actor, reason, at,
                                              {"restored": target}), tags | {vocab.ROLLED_BACK_AT: at})
    audit.record(client, book, AuditEvent(name, target, vocab.EVENT_RESTORED, actor, reason, at, {"replaced": bad}),
                 tags | {vocab.RESTORED_AT: at})
    return client.get_model_version(name, target)
