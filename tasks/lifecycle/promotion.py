"""Promotion: who may approve a challenger, recording the decision, and promoting or rolling back.

    approve / reject (policy-checked, recorded) ─► promote: champion → previous, challenger → champion
    rollback: previous → champion (the demoted version keeps no alias; it is tagged rolled back)

This module decides whether a move may happen (gate passed, approved) and records it (tags and audit
log); the move itself is :mod:`kiln.tasks.registry.aliases`, under the model's lock, with an optimistic
check that the aliases read here before deciding are still the aliases when the lock is taken.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Literal

import mlflow
import yaml
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import BaseModel, Field, ValidationError, field_validator

from kiln.errors import ConfigError, validation_problems
from kiln.settings import Settings, load_settings
from kiln.tasks.core import tags as vocab
from kiln.tasks.registry import aliases, audit
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.audit import AuditEvent, AuditLog
from kiln.tasks.registry.lock import PromotionConflict, PromotionError

log = logging.getLogger(__name__)


class ApprovalRefused(PromotionError):
    """The approver is not allowed to decide on this version."""


# ── who may approve ──────────────────────────────────────────────────────────────────────────────────
class ApprovalPolicy(BaseModel):
    """Who may approve or reject a challenger."""

    approvers: list[str] = Field(default_factory=list, description="Users allowed to decide; empty: nobody.")
    four_eyes: bool = Field(False, description="The approver must not be who triggered the run that built it.")

    @field_validator("approvers", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value

    def check(self, approver: str, triggered_by: str | None, *, decision: str = vocab.APPROVED) -> None:
        """Raise :class:`ApprovalRefused` naming the rule broken. Four-eyes applies to approvals only:
        rejecting your own work is always safe."""
        if not self.approvers:
            raise ApprovalRefused("no approvers are configured; list them in KILN_APPROVERS=alice,bob, "
                                  "in kiln.yaml (approvers: [alice, bob]) or in <KILN_HOME>/approvers.yaml")
        if approver not in self.approvers:
            raise ApprovalRefused(f"{approver!r} may not approve (approvers: {', '.join(self.approvers)})")
        if self.four_eyes and decision == vocab.APPROVED:
            if not triggered_by:
                raise ApprovalRefused("four-eyes review is on but nobody is recorded as having triggered this "
                                      f"version (tag {vocab.TRIGGERED_BY}); set the tag or KILN_FOUR_EYES=false")
            if triggered_by == approver:
                raise ApprovalRefused(f"four-eyes review: {approver!r} triggered this version and may not "
                                      "approve it; ask another approver")


def load_approval_policy(home: Path | None = None, path: Path | None = None, *,
                         settings: Settings | None = None) -> ApprovalPolicy:
    """The policy from a YAML file, with the ``approvers`` / ``four_eyes`` settings on top when they are set.

    Args:
        home: Project folder whose ``approvers.yaml`` is the default file; default: ``settings.home``.
        path: The policy file; default: the ``approval_policy`` setting, else ``<home>/approvers.yaml``.
        settings: Where ``approvers``, ``four_eyes`` and ``approval_policy`` come from (``KILN_APPROVERS``,
            ``KILN_FOUR_EYES``, ``KILN_APPROVAL_POLICY`` or kiln.yaml); default: :func:`load_settings`.
            Settings beat the file, as the environment beats kiln.yaml.
    """
    settings = settings or load_settings()
    home = home or settings.home
    path = path or settings.approval_policy
    if path is None and (home / "approvers.yaml").is_file():
        path = home / "approvers.yaml"
    values: dict[str, Any] = {}
    if path is not None:
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"approval policy {path} is unreadable ({exc}); fix or remove it") from exc
        if not isinstance(values, dict):
            raise ConfigError(f"approval policy {path} must be a mapping with approvers: and four_eyes:")
    values |= {key: value for key in ("approvers", "four_eyes") if (value := getattr(settings, key)) is not None}
    try:
        return ApprovalPolicy(**values)
    except ValidationError as exc:
        problems = validation_problems(exc)
        raise ConfigError(f"invalid approval policy {path} ({problems}); fix the file") from exc


def triggered_by(client: MlflowClient, version: ModelVersion) -> str | None:
    """Who started the work that built ``version``: tag ``kiln.triggered_by``, else its run's user."""
    if version.tags.get(vocab.TRIGGERED_BY):
        return version.tags[vocab.TRIGGERED_BY]
    run_id = version.tags.get(vocab.RUN_ID) or version.run_id
    if run_id:
        with contextlib.suppress(MlflowException):
            user = client.get_run(run_id).data.tags.get("mlflow.user")
            if user and user != "unknown":
                return user
    return None


# ── decisions ────────────────────────────────────────────────────────────────────────────────────────
def decide(client: MlflowClient, name: str, version: str, *, decision: Literal["approved", "rejected"],
           approver: str, reason: str, policy: ApprovalPolicy | None = None, home: Path | None = None) -> ModelVersion:
    """Approve or reject ``name`` v``version`` after checking ``policy``; refusals are logged too."""
    home = home or load_settings().home
    book = AuditLog.under(home)
    if not reason.strip():
        raise ConfigError("give a --reason: the decision is recorded for whoever reads the history")
    mv = registry.resolve(client, registry.ModelRef(name, version=str(version)))
    version = str(mv.version)  # the SQL store answers with an int
    policy = policy or load_approval_policy(home)
    try:
        policy.check(approver, triggered_by(client, mv), decision=decision)
    except ApprovalRefused as exc:
        book.append(AuditEvent(name, version, vocab.EVENT_APPROVAL_REFUSED, approver, str(exc),
                               details={"decision": decision, "given_reason": reason}))
        raise
    if decision == vocab.APPROVED and not vocab.gate_passed(mv.tags):
        raise PromotionError(f"{name} v{mv.version} did not pass its gate ({vocab.GATE}="
                             f"{mv.tags.get(vocab.GATE, 'missing')}); only a gated challenger can be approved")
    audit.record(client, book, AuditEvent(name, version, decision, approver, reason),
                 {vocab.APPROVAL: decision, vocab.APPROVER: approver, vocab.APPROVAL_REASON: reason,
                  vocab.APPROVAL_AT: audit.now_iso()})
    return client.get_model_version(name, version)


def mark_not_approved(client: MlflowClient, name: str, version: str, reason: str, home: Path) -> None:
    """No decision came in time: say so on the version; nothing moves."""
    audit.record(client, AuditLog.under(home), AuditEvent(name, version, vocab.NOT_APPROVED, "kiln", reason),
                 {vocab.APPROVAL: vocab.NOT_APPROVED, vocab.APPROVAL_REASON: reason,
                  vocab.APPROVAL_AT: audit.now_iso()})


# ── promotion and rollback ───────────────────────────────────────────────────────────────────────────
def promote(client: MlflowClient, name: str, *, approver: str, reason: str, home: Path | None = None,
            expected_challenger: str | None = None, require_approval: bool = True) -> ModelVersion:
    """``champion`` → ``previous``, ``challenger`` → ``champion``, ``challenger`` removed; returns the new champion.

    Refuses (:class:`PromotionError`) without a challenger, with a challenger that failed its gate or is
    not approved, and (:class:`PromotionConflict`) when another promotion holds the lock or the aliases
    changed since they were read (e.g. a new challenger arrived while an approver was looking at the old one).
    """
    home = home or load_settings().home
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
    if require_approval and mv.tags.get(vocab.APPROVAL) != vocab.APPROVED:
        raise PromotionError(f"{name} v{target} is not approved ({vocab.APPROVAL}="
                             f"{mv.tags.get(vocab.APPROVAL, 'none')}); run `kiln approve {name} {target}`")
    old = aliases.promote(client, name, home=home, expected=before)
    book, at = AuditLog.under(home), audit.now_iso()
    if old and old != target:
        audit.record(client, book, AuditEvent(name, old, vocab.EVENT_DEMOTED, approver, reason, at, {"by": target}),
                     {vocab.DEMOTED_AT: at, vocab.DEMOTED_BY: approver, vocab.DEMOTION_REASON: reason})
    audit.record(client, book, AuditEvent(name, target, vocab.EVENT_PROMOTED, approver, reason, at, {"replaced": old}),
                 {vocab.PROMOTED_AT: at, vocab.PROMOTED_BY: approver, vocab.PROMOTION_REASON: reason})
    return client.get_model_version(name, target)


def rollback(client: MlflowClient, name: str, *, actor: str, reason: str, home: Path | None = None) -> ModelVersion:
    """Put ``previous`` back as ``champion`` in one move; returns the restored champion.

    The demoted champion gets no alias (a version that was rolled back is not a rollback target, so a
    second rollback fails rather than flipping back to it); ``previous`` is removed, ``challenger`` is
    left alone. Both versions are tagged and logged.
    """
    home = home or load_settings().home
    before = registry.existing_aliases(client, name)
    target = before.get(vocab.PREVIOUS)
    if target is None:
        raise PromotionError(f"{name!r} has no @previous to roll back to (aliases: {aliases.describe(before)})")
    bad = aliases.restore_previous(client, name, home=home, expected=before)
    book, at = AuditLog.under(home), audit.now_iso()
    tags = {vocab.ROLLED_BACK_BY: actor, vocab.ROLLBACK_REASON: reason}
    if bad and bad != target:
        audit.record(client, book, AuditEvent(name, bad, vocab.EVENT_ROLLED_BACK, actor, reason, at,
                                              {"restored": target}), tags | {vocab.ROLLED_BACK_AT: at})
    audit.record(client, book, AuditEvent(name, target, vocab.EVENT_RESTORED, actor, reason, at, {"replaced": bad}),
                 tags | {vocab.RESTORED_AT: at})
    return client.get_model_version(name, target)


# ── what the approver sees ───────────────────────────────────────────────────────────────────────────
def metrics_table(champion: dict[str, float] | None, challenger: dict[str, float], champion_label: str = "champion",
                  challenger_label: str = "challenger") -> str:
    """A Markdown table: one row per metric, champion vs challenger, relative change."""
    rows = [f"| metric | {champion_label} | {challenger_label} | change |", "|---|---:|---:|---:|"]
    for key in sorted(set(challenger) | set(champion or {})):
        new, old = challenger.get(key), (champion or {}).get(key)
        change = f"{(new - old) / abs(old):+.1%}" if new is not None and old not in (None, 0) else "—"
        rows.append(f"| {key} | {_num(old)} | {_num(new)} | {change} |")
    return "\n".join(rows)


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def champion_metrics(client: MlflowClient, challenger: ModelVersion, champion: ModelVersion | None) -> dict | None:
    """The champion's metrics as measured in the challenger's own optimize run (same data, same machine),
    else the champion's ``kiln.metrics`` tag."""
    run_id = challenger.tags.get(vocab.RUN_ID)
    if run_id:
        with contextlib.suppress(Exception):  # no run, no summary: fall back to the tag
            summary = mlflow.artifacts.load_dict(f"{client.get_run(run_id).info.artifact_uri}/summary.json")
            if summary.get("champion"):
                return summary["champion"]
    if champion is not None and vocab.METRICS in champion.tags:
        return json.loads(champion.tags[vocab.METRICS])
    return None


def review_markdown(client: MlflowClient, name: str, challenger: ModelVersion) -> str:
    """What an approver needs: gate verdict with its reasons and the metric comparison."""
    now = registry.aliases_of(client, name)
    champion = client.get_model_version(name, now[vocab.CHAMPION]) if vocab.CHAMPION in now else None
    tags = challenger.tags
    reasons = json.loads(tags.get(vocab.GATE_REASONS, "[]"))
    table = metrics_table(champion_metrics(client, challenger, champion), json.loads(tags.get(vocab.METRICS, "{}")),
                          f"champion v{champion.version}" if champion else "champion (none)",
                          f"challenger v{challenger.version}")
    lines = [f"## Promote {name} v{challenger.version} ({tags.get(vocab.RECIPE, '?')}) to champion?", "",
             f"Gate: **{tags.get(vocab.GATE, 'unknown')}**", ""] + [f"- {r}" for r in reasons] + ["", table]
    if tags.get(vocab.RUN_ID):
        report = f"{client.get_run(tags[vocab.RUN_ID]).info.artifact_uri}/report.html"
        lines += ["", f"Full review (candidates, gate clauses, Pareto plots, data checks): [report.html]({report})"]
    return "\n".join(lines)
