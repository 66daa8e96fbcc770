"""Signed statements: decisions, requests for work and rollout commands, and how they are verified.

    DecisionStatement  kind, model, version, package digest, approved|rejected, reason, time, nomination, signer
    RequestStatement   who asked for the work on a model (`kiln optimize --sign`): four-eyes knows who that was
    CommandStatement   pause | resume | promote | abort, for one rollout of one version

A statement is canonical JSON (sorted keys, no spaces), signed with an SSH key
(:mod:`~kiln.tasks.lifecycle.signatures`); :class:`Signed` is the pair, stored as one tag value (so the
statement and its signature arrive together) or carried as a base64 *token* (the Prefect form). Only the
registry and the approvers' ``allowed_signers`` file are needed to verify one: :func:`decision_state`
reads a version's tags and says what the decisions on its current nomination add up to. A decision counts
only when its signature verifies for its signer, the signer may decide, and it names this model, version,
package digest and the version's *open* nomination; a tag without such a statement never approves.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal, TypeVar

from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kiln.errors import KilnError
from kiln.settings import Settings
from kiln.tasks.core import tags as vocab
from kiln.tasks.lifecycle import signatures
from kiln.tasks.lifecycle.approvers import ApprovalPolicy, ApprovalRefused, Outcome, load_approval_policy
from kiln.tasks.registry.audit import now_iso
from kiln.tasks.registry.client import ModelRef, versions_of
from kiln.tasks.registry.nominations import current_nomination
from kiln.tasks.registry.pins import pinned_digest

MAX_REQUEST_AGE_S = 24 * 3600.0  # a signed request authenticates work registered within a day of it
CLOCK_SLACK_S = 300.0  # how far the signer's clock may be ahead of the registry's


class Statement(BaseModel):
    """Something a person signs: strict (no unknown keys), immutable, serialised one way only."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def payload(self) -> bytes:
        """The canonical bytes that are signed and stored."""
        return json.dumps(self.model_dump(), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class DecisionStatement(Statement):
    """An approver's approval or rejection of one nomination of one version, with its package digest."""

    kind: Literal["decision"] = "decision"
    model: str
    version: str
    digest: str = Field(..., description=f"The version's package digest ({vocab.PACKAGE_DIGEST}) when decided.")
    decision: Literal["approved", "rejected"]
    reason: str = Field(..., min_length=1)
    at: str
    nomination: str = Field(..., description=f"The nomination it answers ({vocab.NOMINATION} when decided).")
    signer: str


class RequestStatement(Statement):
    """Who asked for work on a model; one request authenticates the one version that work registers."""

    kind: Literal["request"] = "request"
    action: Literal["optimize"] = "optimize"
    model: str = Field(..., description="The model reference the work starts from (NAME, NAME@ALIAS, NAME/V).")
    at: str
    id: str = Field(..., pattern=r"^[0-9a-f]{16,64}$")
    signer: str


class CommandStatement(Statement):
    """A command to one running rollout of one version."""

    kind: Literal["rollout-command"] = "rollout-command"
    model: str
    version: str
    rollout: str = Field(..., description=f"The rollout's id ({vocab.ROLLOUT_ID}) the command is for.")
    command: Literal["pause", "resume", "promote", "abort"]
    reason: str = ""
    at: str
    id: str = Field(..., pattern=r"^[0-9a-f]{16,64}$")
    signer: str


S = TypeVar("S", bound=Statement)
NAMESPACES: dict[type[Statement], str] = {DecisionStatement: signatures.APPROVALS,
                                          RequestStatement: signatures.REQUESTS,
                                          CommandStatement: signatures.APPROVALS}


class Signed(BaseModel):
    """A statement (its canonical JSON) and the armored SSH signature over exactly those bytes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    statement: str
    signature: str

    def tag(self) -> str:
        """As a tag value."""
        return self.model_dump_json()

    def token(self) -> str:
        """As one line to paste (the Prefect approval form)."""
        return base64.urlsafe_b64encode(self.tag().encode()).decode()

    @classmethod
    def from_tag(cls, value: str) -> Signed | None:
        """The pair in a tag value, or None when it is not one."""
        try:
            return cls.model_validate_json(value)
        except ValidationError:
            return None

    @classmethod
    def from_token(cls, token: str) -> Signed:
        """The pair in a token, or :class:`ApprovalRefused` when it is not one."""
        try:
            signed = cls.from_tag(base64.urlsafe_b64decode(token.strip().encode()).decode())
        except (binascii.Error, UnicodeDecodeError, ValueError):
            signed = None
        if signed is None:
            raise ApprovalRefused("that is not a Kiln decision token; paste the whole line that "
                                  "`kiln approve|reject NAME VERSION --reason ... --print-token` printed")
        return signed


@dataclass(frozen=True)
class Trust:
    """What verification trusts: the approvers' keys (an allowed_signers file) and the approval policy."""

    signers: Path
    policy: ApprovalPolicy

    @classmethod
    def from_settings(cls, settings: Settings) -> Trust:
        return cls(settings.signers_file(), load_approval_policy(settings=settings))


def sign(statement: Statement, key: Path) -> Signed:
    """Sign ``statement`` with the SSH key at ``key`` (in its kind's namespace)."""
    payload = statement.payload()
    return Signed(statement=payload.decode(), signature=signatures.sign(payload, key, NAMESPACES[type(statement)]))


def open_signed(signed: Signed, kind: type[S], trust: Trust) -> S:
    """The statement in ``signed`` once its signature verifies for the principal it names; else
    :class:`ApprovalRefused` saying why (not that kind, not canonical, a signature that does not verify)."""
    try:
        statement = kind.model_validate_json(signed.statement)
    except ValidationError as exc:
        raise ApprovalRefused(f"not a valid {kind.__name__}: {exc.errors()[0]['msg']}") from None
    if statement.payload() != signed.statement.encode():
        raise ApprovalRefused("the statement is not in canonical form, so it is not what Kiln signs")
    why = signatures.verify(statement.payload(), signed.signature, trust.signers, statement.signer,
                            NAMESPACES[kind])
    if why is not None:
        raise ApprovalRefused(f"the signature does not verify for {statement.signer!r} against "
                              f"{trust.signers} ({why})")
    return statement


def whose_key(key: Path, trust: Trust, claimed: str | None = None) -> str:
    """The principal ``trust.signers`` lists for ``key``; ``claimed`` (``--approver``) only cross-checks it."""
    found = signatures.principals_of_key(key, trust.signers)
    if not found:
        raise ApprovalRefused(f"the key {key} is not in {trust.signers}; an approver's public key must be listed "
                              "there (`PRINCIPAL KEYTYPE PUBLICKEY`) before their decisions count")
    if claimed is not None:
        if claimed not in found:
            raise ApprovalRefused(f"--approver {claimed!r} does not match the key {key}, which {trust.signers} "
                                  f"lists for {', '.join(map(repr, found))}; the key, not the option, says who "
                                  "decides")
        return claimed
    usable = [p for p in found if not any(c in p for c in "*?!")]  # patterns name nobody in particular
    if len(usable) != 1:
        raise ApprovalRefused(f"{trust.signers} lists the key {key} for {', '.join(map(repr, found))}; say which "
                              "one you are with --approver")
    return usable[0]


def sign_request(model: str, key: Path, trust: Trust, claimed: str | None = None) -> Signed:
    """A signed request for work on ``model`` by whoever ``trust.signers`` lists for ``key``."""
    signer = whose_key(key, trust, claimed)
    return sign(RequestStatement(model=model, at=now_iso(), id=uuid.uuid4().hex, signer=signer), key)


def request_tags(token: str) -> dict[str, str]:
    """The version tags that carry a signed request (a token from :meth:`Signed.token`); verified when read."""
    signed = Signed.from_token(token)
    try:
        request = RequestStatement.model_validate_json(signed.statement)
    except ValidationError as exc:
        raise ApprovalRefused(f"not a signed request: {exc.errors()[0]['msg']}") from None
    return {vocab.REQUEST: signed.tag(), vocab.REQUEST_ID: request.id}


# ── reading a version's decisions from the registry ─────────────────────────────────────────────────
@dataclass(frozen=True)
class DecisionState:
    """What the verified decisions on a version's current nomination add up to."""

    outcome: Outcome
    why: str
    nomination: str | None
    requester: str | None = None  # the authenticated requester of the work, if any
    approvers: list[str] = field(default_factory=list)  # whose approvals count
    rejected_by: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)  # of the decisions that count
    ignored: list[str] = field(default_factory=list)  # each statement that does not count, and why

    @property
    def deciders(self) -> str:
        """Who decided: the approvers that count, or who rejected."""
        return ", ".join(self.approvers or self.rejected_by)

    def explain(self) -> str:
        """One line: the outcome's reason, then what was ignored and why."""
        return self.why + (f" (ignored: {'; '.join(self.ignored)})" if self.ignored else "")


def decision_state(client: MlflowClient, mv: ModelVersion, trust: Trust) -> DecisionState:
    """The decisions on ``mv``'s open nomination, verified from its tags alone.

    Raises :class:`~kiln.errors.ArtifactError` when the version has no valid package pin: nothing can be
    decided about a package the registry does not pin.
    """
    name, version, tags = mv.name, str(mv.version), mv.tags
    digest = pinned_digest(tags, f"{name} v{version}")
    nomination = current_nomination(tags)
    if nomination is None:
        return DecisionState("pending", f"{name} v{version} has no open nomination (it is not a @challenger "
                             "nominated by Kiln, or it was promoted, rolled back or withdrawn since); decisions "
                             "count only for the nomination they name", None)
    requester, note = requester_of(client, mv, trust)
    approvals: dict[str, DecisionStatement] = {}
    rejections: dict[str, DecisionStatement] = {}
    ignored = [note] if note else []
    for key in sorted(k for k in tags if k.startswith(vocab.DECISION_PREFIX)):
        try:
            statement = _counted(tags[key], trust, name, version, digest, nomination)
        except ApprovalRefused as exc:
            ignored.append(f"{key}: {exc}")
            continue
        if statement is None:
            continue  # a decision on an earlier nomination: history, not a problem
        if key != vocab.decision_tag(statement.signer):
            ignored.append(f"{key}: {statement.signer!r}'s decision belongs in {vocab.decision_tag(statement.signer)}")
            continue
        (approvals if statement.decision == vocab.APPROVED else rejections)[statement.signer] = statement
    ordered = sorted(approvals.values(), key=lambda s: s.at)
    verdict = trust.policy.judge([s.signer for s in ordered],
                                 [(s.signer, s.reason) for s in rejections.values()], requester)
    counted = [rejections[p] for p in verdict.rejected_by] or [approvals[p] for p in verdict.approvers]
    return DecisionState(verdict.outcome, verdict.why, nomination, requester, verdict.approvers, verdict.rejected_by,
                         [s.reason for s in counted], ignored)


def _counted(value: str, trust: Trust, name: str, version: str, digest: str,
             nomination: str) -> DecisionStatement | None:
    """The decision in one tag when it counts for this nomination; None when it answers another one."""
    signed = Signed.from_tag(value)
    if signed is None:
        raise ApprovalRefused("not a signed statement")
    try:  # read before it is verified, only to pass over what can never count here
        claims = json.loads(signed.statement)
        claimed = (claims.get("model"), claims.get("version")), claims.get("nomination")
    except (ValueError, AttributeError):
        raise ApprovalRefused("not a signed statement") from None
    if claimed[0] != (name, version):
        raise ApprovalRefused(f"a decision on {claimed[0][0]} v{claimed[0][1]}, not {name} v{version}")
    if claimed[1] != nomination:
        return None  # a decision on an earlier nomination of this version: its history
    statement = open_signed(signed, DecisionStatement, trust)
    if statement.digest != digest:
        raise ApprovalRefused(f"signed for package {statement.digest[:12]}…, but v{version} is pinned to "
                              f"{digest[:12]}…")
    trust.policy.may_decide(statement.signer)
    return statement


def requester_of(client: MlflowClient, mv: ModelVersion, trust: Trust) -> tuple[str | None, str]:
    """The authenticated requester of the work that registered ``mv`` (its signed request), else None and why not.

    A request counts for one version of the model it names, registered within ``MAX_REQUEST_AGE_S`` after it
    was signed; the same request on another version of the model authenticates neither.
    """
    raw = mv.tags.get(vocab.REQUEST)
    if not raw:
        return None, ""
    signed = Signed.from_tag(raw)
    try:
        if signed is None:
            raise ApprovalRefused("not a signed statement")
        request = open_signed(signed, RequestStatement, trust)
    except ApprovalRefused as exc:
        return None, f"request: {exc}"
    try:
        requested = ModelRef.parse(request.model).name
    except KilnError:
        requested = request.model
    if requested != mv.name:
        return None, f"request: for {request.model}, not {mv.name}"
    if mv.tags.get(vocab.REQUEST_ID) != request.id:
        return None, f"request: {vocab.REQUEST_ID} does not name this request"
    others = [v.version for v in versions_of(client, mv.name, **{vocab.REQUEST_ID: request.id})
              if str(v.version) != str(mv.version)]
    if others:
        return None, f"request: also claimed by v{', v'.join(map(str, others))}"
    try:
        signed_at = datetime.fromisoformat(request.at).timestamp()
    except ValueError:
        return None, f"request: its time {request.at!r} is not a time"
    created = (mv.creation_timestamp or 0) / 1000
    if not signed_at - CLOCK_SLACK_S <= created <= signed_at + MAX_REQUEST_AGE_S:
        return None, f"request: signed at {request.at}, which is not within a day before v{mv.version} was registered"
    return request.signer, ""
