"""Who may decide on a challenger, and when the signed decisions on it add up to "approved".

    ApprovalPolicy: approvers (principals of allowed_signers; unset: all of them), four_eyes
    judge(approvals, rejections, requester) ─► approved | rejected | pending, with the reason spelled out

Identities are principals whose signatures verified (:mod:`kiln.tasks.lifecycle.approvals`), never names
typed into a form. Four-eyes review: whoever *requested* the work (a signed request, see
:class:`~kiln.tasks.lifecycle.approvals.RequestStatement`) may not approve it, and when nobody is
authenticated as having requested it (a webhook, a schedule, an unsigned command) two different approvers
must approve. Any one valid rejection decides: a rejected version is never promoted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kiln.errors import ConfigError, validation_problems
from kiln.settings import Settings, load_settings
from kiln.tasks.core import tags as vocab
from kiln.tasks.registry.lease_record import PromotionError
from kiln.yamlfile import read_mapping

Outcome = Literal["approved", "rejected", "pending"]


class ApprovalRefused(PromotionError):
    """This decision does not count: the signer may not decide, the signature or the statement is wrong."""


class ApprovalPolicy(BaseModel):
    """Who may approve or reject a challenger, and whether four-eyes review applies."""

    model_config = ConfigDict(extra="forbid")  # `four_eye:` for `four_eyes:` is an error, not four-eyes off

    approvers: list[str] | None = Field(None, description=(
        "Principals (from allowed_signers) allowed to decide; unset: every principal whose key allowed_signers "
        "lists for the kiln-approval namespace; []: nobody."))
    four_eyes: bool = Field(False, description=(
        "Whoever requested the work may not approve it; without an authenticated requester (webhook, "
        "schedule, unsigned command), two different approvers must approve."))

    @field_validator("approvers", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value

    def may_decide(self, principal: str) -> None:
        """Raise :class:`ApprovalRefused` unless ``principal`` is one of the approvers."""
        if self.approvers is not None and not self.approvers:
            raise ApprovalRefused("nobody may approve: approvers is an empty list; list principals of "
                                  "allowed_signers in KILN_APPROVERS, kiln.yaml or approvers.yaml, or unset it")
        if self.approvers is not None and principal not in self.approvers:
            raise ApprovalRefused(f"{principal!r} may not approve (approvers: {', '.join(self.approvers)})")

    def check(self, principal: str, requester: str | None, *, decision: str = vocab.APPROVED) -> None:
        """Raise :class:`ApprovalRefused` naming the rule ``principal``'s decision breaks. Four-eyes applies to
        approvals only: rejecting your own work is always safe."""
        self.may_decide(principal)
        if self.four_eyes and decision == vocab.APPROVED and requester == principal:
            raise ApprovalRefused(f"four-eyes review: {principal!r} requested this version (signed request) and "
                                  "may not approve it; ask another approver")

    def needed(self, requester: str | None) -> int:
        """How many different approvers must approve: two under four-eyes when nobody authenticated asked."""
        return 2 if self.four_eyes and requester is None else 1

    def judge(self, approvals: list[str], rejections: list[tuple[str, str]], requester: str | None) -> Verdict:
        """The outcome of verified decisions (their signers; rejections with their reasons) on one nomination.

        Args:
            approvals: Principals whose signed approval verified, in the order they decided.
            rejections: (principal, reason) of each verified rejection.
            requester: The authenticated requester of the work, or None.
        """
        if rejections:
            return Verdict("rejected", "; ".join(f"rejected by {who}: {why}" for who, why in rejections),
                           [], [who for who, _ in rejections])
        counted = list(dict.fromkeys(p for p in approvals if not (self.four_eyes and p == requester)))
        need = self.needed(requester)
        if len(counted) >= need:
            return Verdict("approved", f"approved by {', '.join(counted)}", counted, [])
        so_far = f"{len(counted)} of {need} so far" + (f" ({', '.join(counted)})" if counted else "")
        if need == 2:
            why = ("four-eyes review: nobody is authenticated as having requested this version (no valid signed "
                   f"request), so two different approvers must approve; {so_far}")
        else:
            why = "no valid signed approval for its current nomination yet"
        return Verdict("pending", why, counted, [])


@dataclass(frozen=True)
class Verdict:
    """What the verified decisions on one nomination add up to, and why."""

    outcome: Outcome
    why: str
    approvers: list[str] = field(default_factory=list)  # whose approvals count
    rejected_by: list[str] = field(default_factory=list)


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
        values = read_mapping(path, "approval policy", "a mapping with approvers: and four_eyes:")
    values |= {key: value for key in ("approvers", "four_eyes") if (value := getattr(settings, key)) is not None}
    try:
        return ApprovalPolicy.model_validate(values)
    except ValidationError as exc:
        problems = validation_problems(exc, model=ApprovalPolicy)
        raise ConfigError(f"invalid approval policy {path} ({problems}); fix the file") from exc
