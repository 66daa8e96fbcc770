"""The command channel of a running rollout: pause, resume, promote and abort, as a tag on the challenger.

``kiln rollout pause NAME`` (from any machine that reaches the registry) writes the tag
``kiln.rollout.command`` on the challenger version; the driver polls it, acts on it and deletes it, so
each command is acted on exactly once. Someone with only the MLflow UI can stop a rollout too, by
typing ``pause`` or ``abort`` as the tag's value.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from typing import Literal

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from kiln.tasks.core import tags as vocab
from kiln.tasks.registry import audit
from kiln.tasks.registry import client as registry
from kiln.tasks.rollout.params import RolloutError

log = logging.getLogger(__name__)

Command = Literal["pause", "resume", "promote", "abort"]
COMMANDS = ("pause", "resume", "promote", "abort")


def send_command(client: MlflowClient, model: str, command: Command, *, actor: str, reason: str = "") -> str:
    """Ask the running rollout of ``model`` to pause, resume, promote or abort; returns the challenger version.

    The command is a tag on the challenger version; the driver acts on it within ``poll_s`` seconds.
    """
    aliases = registry.existing_aliases(client, model)
    version = aliases.get(vocab.CHALLENGER)
    if version is None:
        raise RolloutError(f"{model!r} has no @challenger, so no rollout can be running (aliases: {aliases})")
    status = client.get_model_version(model, version).tags.get(vocab.ROLLOUT_STATUS)
    if status not in ("running", "paused"):
        raise RolloutError(f"no rollout of {model} v{version} is running ({vocab.ROLLOUT_STATUS}={status or 'none'}); "
                           f"start one with `kiln rollout {model}`")
    payload = {"command": command, "by": actor, "reason": reason, "id": uuid.uuid4().hex, "at": audit.now_iso()}
    client.set_model_version_tag(model, version, vocab.ROLLOUT_COMMAND, json.dumps(payload))
    return version


def take_command(client: MlflowClient, model: str, version: str) -> dict[str, str] | None:
    """The command waiting on ``model`` v``version``, consumed (deleted), or None; unknown commands are ignored."""
    raw = client.get_model_version(model, version).tags.get(vocab.ROLLOUT_COMMAND)
    if not raw:
        return None
    with contextlib.suppress(MlflowException):
        client.delete_model_version_tag(model, version, vocab.ROLLOUT_COMMAND)  # consumed: acted on exactly once
    try:
        command = json.loads(raw)
    except json.JSONDecodeError:
        command = {"command": raw.strip()}  # typed by hand in the MLflow UI: "pause"
    if command.get("command") not in COMMANDS:
        log.warning("ignoring unknown rollout command %r on %s v%s", raw[:80], model, version)
        return None
    command.setdefault("by", "mlflow-ui")
    command.setdefault("reason", "")
    return command
