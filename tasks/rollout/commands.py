"""The command channel of a running rollout: pause, resume, promote and abort, as signed statements.

``kiln rollout pause NAME`` (from any machine that reaches the registry) signs a
:class:`~kiln.tasks.lifecycle.approvals.CommandStatement` with the sender's SSH key, naming the model, the
challenger and the rollout's id (``kiln.rollout.id``, set by the driver when it starts), and writes it as the
tag ``kiln.rollout.command`` on the challenger. The driver's :class:`CommandReader` takes the tag (deletes
it), verifies the signature against the approvers' keys, checks that the signer may decide and that the
command is for this very rollout and not seen before, and only then acts. Anything else (a value typed
into the MLflow UI, a signature that does not verify, a command for another rollout, a replay) is
ignored, with a note in the rollout's status and the audit log.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from kiln.errors import ConfigError, KilnError
from kiln.settings import Settings
from kiln.tasks.core import tags as vocab
from kiln.tasks.lifecycle import approvals
from kiln.tasks.lifecycle.approvals import CommandStatement, Signed, Trust
from kiln.tasks.registry import audit
from kiln.tasks.registry import client as registry
from kiln.tasks.rollout.params import RolloutError
from kiln.tasks.rollout.status import driver_gone

log = logging.getLogger(__name__)

COMMANDS = ("pause", "resume", "promote", "abort")


def send_command(client: MlflowClient, model: str, command: str, *, settings: Settings, reason: str = "",
                 key: Path | None = None, approver: str | None = None) -> str:
    """Ask the running rollout of ``model`` to pause, resume, promote or abort; returns the challenger version.

    The command is signed with ``key`` (default: the ``signing_key`` setting) by whoever allowed_signers lists
    for it (``approver`` only cross-checks that), who must be one of the approvers; the driver acts on it
    within its ``poll_s``.
    """
    version, signed = sign_command(client, model, command, settings=settings, reason=reason, key=key,
                                   approver=approver)
    client.set_model_version_tag(model, version, vocab.ROLLOUT_COMMAND, signed.tag())
    return version


def sign_command(client: MlflowClient, model: str, command: str, *, settings: Settings, reason: str = "",
                 key: Path | None = None, approver: str | None = None) -> tuple[str, Signed]:
    """The signed command :func:`send_command` sends, not sent: also what a paused rollout's Prefect form takes
    (``kiln rollout resume NAME --print-token``). Returns the challenger version and the signed statement."""
    if command not in COMMANDS:
        raise ConfigError(f"unknown rollout command {command!r}; use one of {', '.join(COMMANDS)}")
    aliases = registry.existing_aliases(client, model)
    version = aliases.get(vocab.CHALLENGER)
    if version is None:
        raise RolloutError(f"{model!r} has no @challenger, so no rollout can be running (aliases: {aliases})")
    tags = client.get_model_version(model, version).tags
    status = tags.get(vocab.ROLLOUT_STATUS)
    if status not in ("running", "paused"):
        raise RolloutError(f"no rollout of {model} v{version} is running ({vocab.ROLLOUT_STATUS}={status or 'none'}); "
                           f"start one with `kiln rollout {model}`")
    rollout = tags.get(vocab.ROLLOUT_ID)
    if not rollout:
        raise RolloutError(f"the rollout of {model} v{version} names no id ({vocab.ROLLOUT_ID}), so no command can be "
                           "bound to it; it was started by an older Kiln: let it finish or restart it")
    key = key or settings.signing_key
    if key is None:
        raise ConfigError("no signing key: set KILN_SIGNING_KEY (or signing_key in kiln.yaml) to your SSH private "
                          "key, or pass --key PATH; rollout commands are signed statements")
    trust = Trust.from_settings(settings)
    signer = approvals.whose_key(key, trust, approver)
    trust.policy.may_decide(signer)
    statement = CommandStatement(model=model, version=version, rollout=rollout, command=command, reason=reason,
                                 at=audit.now_iso(), id=uuid.uuid4().hex, signer=signer)
    return version, approvals.sign(statement, key)


def refuse_if_driverless(client: MlflowClient, model: str) -> None:
    """Raise :class:`RolloutError` when ``model``'s challenger says a rollout runs but no driver holds it (killed):
    a command sent now would only wait, stale, for the next rollout to ignore it."""
    version = registry.existing_aliases(client, model).get(vocab.CHALLENGER)
    if version is None:
        return  # send_command says why no rollout can be running
    gone = driver_gone(client, model, version, client.get_model_version(model, version).tags.get(vocab.ROLLOUT_STATUS))
    if gone:
        raise RolloutError(f"{gone}; nothing was sent")


@dataclass
class CommandReader:
    """The commands of one rollout: verified, meant for it, each acted on at most once."""

    client: MlflowClient
    trust: Trust
    model: str
    version: str
    rollout: str
    seen: set[str] = field(default_factory=set)

    def take(self) -> tuple[dict[str, str] | None, str | None]:
        """The command waiting for this rollout, consumed, as ``{command, by, reason}``; or (None, why it was
        ignored) when one was there but does not count; (None, None) when there was none."""
        raw = self.take_raw()
        return self.check(raw) if raw else (None, None)

    def take_raw(self) -> str | None:
        """The command tag waiting for this rollout, consumed but not checked (None when there is none)."""
        raw = self.client.get_model_version(self.model, self.version).tags.get(vocab.ROLLOUT_COMMAND)
        if not raw:
            return None
        try:
            self.client.delete_model_version_tag(self.model, self.version, vocab.ROLLOUT_COMMAND)  # consumed
        except MlflowException:
            return None  # taken by someone else meanwhile
        return raw

    def check(self, raw: str) -> tuple[dict[str, str] | None, str | None]:
        """``raw`` (a tag value) as ``{command, by, reason}`` once it verifies as a command for this rollout, seen
        for the first time; else (None, why it does not count)."""
        signed = Signed.from_tag(raw)
        if signed is None:
            return None, (f"ignored an unsigned rollout command ({raw[:40]!r}): commands are signed statements "
                          f"(`kiln rollout pause|resume|promote|abort {self.model}`)")
        try:
            statement = approvals.open_signed(signed, CommandStatement, self.trust)
            self.trust.policy.may_decide(statement.signer)
        except KilnError as exc:  # a signature that does not verify, a signer who may not decide, no signers file
            return None, f"ignored a rollout command: {exc}"
        if (statement.model, statement.version, statement.rollout) != (self.model, self.version, self.rollout):
            return None, (f"ignored {statement.signer}'s {statement.command}: it is for rollout "
                          f"{statement.rollout[:8]}… of {statement.model} v{statement.version}, not this one")
        if statement.id in self.seen:
            return None, f"ignored a replay of {statement.signer}'s {statement.command} (command {statement.id[:8]}…)"
        self.seen.add(statement.id)
        return {"command": statement.command, "by": statement.signer, "reason": statement.reason}, None
