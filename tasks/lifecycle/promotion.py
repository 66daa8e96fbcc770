"""Promotion: who may approve a challenger, recording the decision, and moving aliases under a lock.

    approve / reject (policy-checked, recorded) ─► promote: champion → previous, challenger → champion
    rollback: previous → champion (the demoted version keeps no alias; it is tagged rolled back)

Moving aliases is the only way a promotion happens, and MLflow moves one alias per call, so a move is
three calls. They run under :class:`ModelLock` after an optimistic check (the aliases read before the
lock must equal the aliases read under it), and are ordered so that a crash half-way leaves a state the
next ``promote`` finishes (``champion`` and ``challenger`` on the same version), never two champions.

What the lock guarantees, honestly: on one machine an ``fcntl`` lock under ``KILN_HOME`` excludes other
processes; across machines sharing a registry, the lock is a registered model named ``kiln-lock.NAME``
whose creation is atomic in MLflow's SQL stores (unique name), so exactly one creator wins. A holder that
crashes leaves the lock until it expires (``ttl_s``); breaking an expired lock is not atomic, so two
processes breaking the same stale lock at the same instant could both proceed, and the optimistic check
is then the last line. Anyone moving aliases outside Kiln (MLflow UI) bypasses all of it; the final
check reports such a change instead of hiding it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Literal

import mlflow
import yaml
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import BaseModel, Field, ValidationError, field_validator

from kiln.errors import ConfigError, KilnError, validation_problems
from kiln.settings import load_settings
from kiln.tasks.registry import audit
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.audit import AuditEvent, AuditLog

log = logging.getLogger(__name__)

APPROVED, REJECTED, NOT_APPROVED, REFUSED = "approved", "rejected", "not_approved", "refused"


class PromotionError(KilnError):
    """A promotion, approval or rollback cannot happen in the registry's current state."""


class PromotionConflict(PromotionError):
    """Someone else is promoting the same model, or its aliases changed underneath."""


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

    def check(self, approver: str, triggered_by: str | None, *, decision: str = APPROVED) -> None:
        """Raise :class:`ApprovalRefused` naming the rule broken. Four-eyes applies to approvals only:
        rejecting your own work is always safe."""
        if not self.approvers:
            raise ApprovalRefused("no approvers are configured; list them in KILN_APPROVERS=alice,bob "
                                  "or in <KILN_HOME>/approvers.yaml")
        if approver not in self.approvers:
            raise ApprovalRefused(f"{approver!r} may not approve (approvers: {', '.join(self.approvers)})")
        if self.four_eyes and decision == APPROVED:
            if not triggered_by:
                raise ApprovalRefused("four-eyes review is on but nobody is recorded as having triggered this "
                                      "version (tag kiln.triggered_by); set the tag or KILN_FOUR_EYES=false")
            if triggered_by == approver:
                raise ApprovalRefused(f"four-eyes review: {approver!r} triggered this version and may not "
                                      "approve it; ask another approver")


def load_approval_policy(home: Path | None = None, path: Path | None = None) -> ApprovalPolicy:
    """The policy from a YAML file (``path``, ``$KILN_APPROVAL_POLICY`` or ``<home>/approvers.yaml``),
    then ``KILN_APPROVERS`` / ``KILN_FOUR_EYES`` on top (environment beats file, as for settings)."""
    home = home or load_settings().home
    path = path or (Path(os.environ["KILN_APPROVAL_POLICY"]) if "KILN_APPROVAL_POLICY" in os.environ else None)
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
    if "KILN_APPROVERS" in os.environ:
        values["approvers"] = os.environ["KILN_APPROVERS"]
    if "KILN_FOUR_EYES" in os.environ:
        values["four_eyes"] = os.environ["KILN_FOUR_EYES"]
    try:
        return ApprovalPolicy(**values)
    except ValidationError as exc:
        problems = validation_problems(exc)
        raise ConfigError(f"invalid approval policy ({problems}); fix KILN_APPROVERS/KILN_FOUR_EYES or the file") \
            from exc


def triggered_by(client: MlflowClient, version: ModelVersion) -> str | None:
    """Who started the work that built ``version``: tag ``kiln.triggered_by``, else its run's user."""
    if version.tags.get("kiln.triggered_by"):
        return version.tags["kiln.triggered_by"]
    run_id = version.tags.get("kiln.run_id") or version.run_id
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
        book.append(AuditEvent(name, version, audit.APPROVAL_REFUSED, approver, str(exc),
                               details={"decision": decision, "given_reason": reason}))
        raise
    if decision == APPROVED and mv.tags.get("kiln.gate") != "passed":
        raise PromotionError(f"{name} v{mv.version} did not pass its gate (kiln.gate="
                             f"{mv.tags.get('kiln.gate', 'missing')}); only a gated challenger can be approved")
    audit.record(client, book, AuditEvent(name, version, decision, approver, reason),
                 {"kiln.approval": decision, "kiln.approver": approver, "kiln.approval_reason": reason,
                  "kiln.approval_at": audit.now_iso()})
    return client.get_model_version(name, version)


def mark_not_approved(client: MlflowClient, name: str, version: str, reason: str, home: Path) -> None:
    """No decision came in time: say so on the version; nothing moves."""
    audit.record(client, AuditLog.under(home), AuditEvent(name, version, audit.NOT_APPROVED, "kiln", reason),
                 {"kiln.approval": NOT_APPROVED, "kiln.approval_reason": reason, "kiln.approval_at": audit.now_iso()})


# ── the lock ─────────────────────────────────────────────────────────────────────────────────────────
class ModelLock:
    """Exclusive right to move ``name``'s aliases; fails fast (never waits) with :class:`PromotionConflict`."""

    def __init__(self, client: MlflowClient, name: str, home: Path, *, owner: str | None = None,
                 ttl_s: float = 300.0) -> None:
        self.client, self.name, self.home, self.ttl_s = client, name, home, ttl_s
        self.owner = owner or f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lock_model = f"kiln-lock.{name}"
        self._fd: int | None = None

    def __enter__(self) -> ModelLock:
        folder = self.home / "locks"
        folder.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(folder / (re.sub(r"[^\w.-]", "_", self.name) + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._close()
            raise PromotionConflict(f"another process on this machine is promoting {self.name!r}; "
                                    "wait for it and look at `kiln history`") from None
        try:
            self._take_registry_lock()
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            with contextlib.suppress(MlflowException):
                if self._holder()[0] == self.owner:
                    self.client.delete_registered_model(self.lock_model)
        finally:
            self._close()

    def _take_registry_lock(self) -> None:
        for _ in range(2):
            expires = time.time() + self.ttl_s
            try:
                self.client.create_registered_model(
                    self.lock_model, tags={"kiln.lock_owner": self.owner, "kiln.lock_expires": f"{expires:.3f}"},
                    description=f"Kiln promotion lock for {self.name}; deleted when the promotion ends.")
                return
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise PromotionConflict(f"could not take the promotion lock for {self.name!r} "
                                            f"({str(exc).splitlines()[0][:120]}); retry") from exc
            holder, until = self._holder()
            if until > time.time():
                raise PromotionConflict(f"{holder} is promoting {self.name!r} (lock held until "
                                        f"{time.strftime('%H:%M:%S', time.localtime(until))}); wait for it")
            log.warning("breaking the expired promotion lock of %s held by %s", self.name, holder)
            with contextlib.suppress(MlflowException):
                self.client.delete_registered_model(self.lock_model)
        raise PromotionConflict(f"could not take the promotion lock for {self.name!r}; retry")

    def _holder(self) -> tuple[str, float]:
        try:
            tags = self.client.get_registered_model(self.lock_model).tags
        except MlflowException:
            return "", 0.0
        return tags.get("kiln.lock_owner", "?"), float(tags.get("kiln.lock_expires", 0))

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


# ── alias moves ──────────────────────────────────────────────────────────────────────────────────────
def promote(client: MlflowClient, name: str, *, approver: str, reason: str, home: Path | None = None,
            expected_challenger: str | None = None, require_approval: bool = True) -> ModelVersion:
    """``champion`` → ``previous``, ``challenger`` → ``champion``, ``challenger`` removed; returns the new champion.

    Refuses (:class:`PromotionError`) without a challenger, with a challenger that failed its gate or is
    not approved, and (:class:`PromotionConflict`) when another promotion holds the lock or the aliases
    changed since they were read (e.g. a new challenger arrived while an approver was looking at the old one).
    """
    home = home or load_settings().home
    before = registry.existing_aliases(client, name)
    target = before.get(registry.CHALLENGER)
    if target is None:
        raise PromotionError(f"{name!r} has no @challenger to promote (aliases: {_fmt(before)}); "
                             "run `kiln optimize` first")
    if expected_challenger is not None and str(expected_challenger) != target:
        raise PromotionConflict(f"@challenger of {name!r} is now v{target}, not v{expected_challenger}; "
                                "review the new challenger")
    mv = client.get_model_version(name, target)
    if mv.tags.get("kiln.gate") != "passed":
        raise PromotionError(f"{name} v{target} did not pass its gate "
                             f"(kiln.gate={mv.tags.get('kiln.gate', 'missing')})")
    if require_approval and mv.tags.get("kiln.approval") != APPROVED:
        raise PromotionError(f"{name} v{target} is not approved (kiln.approval={mv.tags.get('kiln.approval', 'none')}"
                             f"); run `kiln approve {name} {target}`")
    with ModelLock(client, name, home):
        _same(client, name, before)
        old = before.get(registry.CHAMPION)
        # Order matters: previous first (harmless alone), then champion, then drop challenger.
        if old and old != target:
            client.set_registered_model_alias(name, registry.PREVIOUS, old)
        client.set_registered_model_alias(name, registry.CHAMPION, target)
        client.delete_registered_model_alias(name, registry.CHALLENGER)
        expected = {k: v for k, v in before.items() if k != registry.CHALLENGER} | {registry.CHAMPION: target}
        if old and old != target:
            expected[registry.PREVIOUS] = old
        _same(client, name, expected, after=True)
    book, at = AuditLog.under(home), audit.now_iso()
    if old and old != target:
        audit.record(client, book, AuditEvent(name, old, audit.DEMOTED, approver, reason, at, {"by": target}),
                     {"kiln.demoted_at": at, "kiln.demoted_by": approver, "kiln.demotion_reason": reason})
    audit.record(client, book, AuditEvent(name, target, audit.PROMOTED, approver, reason, at, {"replaced": old}),
                 {"kiln.promoted_at": at, "kiln.promoted_by": approver, "kiln.promotion_reason": reason})
    return client.get_model_version(name, target)


def rollback(client: MlflowClient, name: str, *, actor: str, reason: str, home: Path | None = None) -> ModelVersion:
    """Put ``previous`` back as ``champion`` in one move; returns the restored champion.

    The demoted champion gets no alias (a version that was rolled back is not a rollback target, so a
    second rollback fails rather than flipping back to it); ``previous`` is removed, ``challenger`` is
    left alone. Both versions are tagged and logged.
    """
    home = home or load_settings().home
    before = registry.existing_aliases(client, name)
    target = before.get(registry.PREVIOUS)
    if target is None:
        raise PromotionError(f"{name!r} has no @previous to roll back to (aliases: {_fmt(before)})")
    bad = before.get(registry.CHAMPION)
    with ModelLock(client, name, home):
        _same(client, name, before)
        client.set_registered_model_alias(name, registry.CHAMPION, target)
        client.delete_registered_model_alias(name, registry.PREVIOUS)
        expected = {k: v for k, v in before.items() if k != registry.PREVIOUS} | {registry.CHAMPION: target}
        _same(client, name, expected, after=True)
    book, at = AuditLog.under(home), audit.now_iso()
    tags = {"kiln.rolled_back_by": actor, "kiln.rollback_reason": reason}
    if bad and bad != target:
        audit.record(client, book, AuditEvent(name, bad, audit.ROLLED_BACK, actor, reason, at, {"restored": target}),
                     tags | {"kiln.rolled_back_at": at})
    audit.record(client, book, AuditEvent(name, target, audit.RESTORED, actor, reason, at, {"replaced": bad}),
                 tags | {"kiln.restored_at": at})
    return client.get_model_version(name, target)


def _same(client: MlflowClient, name: str, expected: dict[str, str], *, after: bool = False) -> None:
    now = registry.aliases_of(client, name)
    if now != expected:
        when = "after moving them" if after else "while waiting for the lock"
        raise PromotionConflict(f"aliases of {name!r} changed {when} (expected {_fmt(expected)}, found {_fmt(now)}); "
                                "someone else moved them: check `kiln history` and retry")


def _fmt(aliases: dict[str, str]) -> str:
    return ", ".join(f"@{a}→v{v}" for a, v in sorted(aliases.items())) or "none"


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
    run_id = challenger.tags.get("kiln.run_id")
    if run_id:
        with contextlib.suppress(Exception):  # no run, no summary: fall back to the tag
            summary = mlflow.artifacts.load_dict(f"{client.get_run(run_id).info.artifact_uri}/summary.json")
            if summary.get("champion"):
                return summary["champion"]
    if champion is not None and "kiln.metrics" in champion.tags:
        return json.loads(champion.tags["kiln.metrics"])
    return None


def review_markdown(client: MlflowClient, name: str, challenger: ModelVersion) -> str:
    """What an approver needs: gate verdict with its reasons and the metric comparison."""
    aliases = registry.aliases_of(client, name)
    champion = client.get_model_version(name, aliases[registry.CHAMPION]) if registry.CHAMPION in aliases else None
    tags = challenger.tags
    reasons = json.loads(tags.get("kiln.gate_reasons", "[]"))
    table = metrics_table(champion_metrics(client, challenger, champion), json.loads(tags.get("kiln.metrics", "{}")),
                          f"champion v{champion.version}" if champion else "champion (none)",
                          f"challenger v{challenger.version}")
    lines = [f"## Promote {name} v{challenger.version} ({tags.get('kiln.recipe', '?')}) to champion?", "",
             f"Gate: **{tags.get('kiln.gate', 'unknown')}**", ""] + [f"- {r}" for r in reasons] + ["", table]
    if tags.get("kiln.run_id"):
        report = f"{client.get_run(tags['kiln.run_id']).info.artifact_uri}/report.html"
        lines += ["", f"Full review (candidates, gate clauses, Pareto plots, data checks): [report.html]({report})"]
    return "\n".join(lines)
