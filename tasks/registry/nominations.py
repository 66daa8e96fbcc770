"""Nominations: each time a version becomes @challenger it gets a fresh nomination id, and a decision counts
only for the nomination it names.

    nominate (aliases) ─► open_nomination: summary of the last decision cleared, new kiln.nomination id
    promote / rollback / a failed canary ─► close_nomination: no open nomination, so nothing counts

So a rollback or a re-nomination voids every earlier decision: an old ``approved`` statement names an
old nomination. The id is random, so nobody can sign a decision for a nomination before it exists.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Mapping

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from kiln.tasks.core import tags as vocab
from kiln.tasks.registry.audit import now_iso

# The summary of the last decision (for people): a new nomination starts with none.
_SUMMARY = (vocab.APPROVAL, vocab.APPROVER, vocab.APPROVAL_REASON, vocab.APPROVAL_AT)


def open_nomination(client: MlflowClient, name: str, version: str) -> str:
    """Give ``name`` v``version`` a fresh nomination (call it before the @challenger alias moves); returns its id.

    The summary tags of earlier decisions go first, the new id last: a crash half-way leaves the old
    nomination open with no summary, never a new nomination that looks decided.
    """
    mv = client.get_model_version(name, str(version))
    for key in _SUMMARY:
        if key in mv.tags:
            client.delete_model_version_tag(name, str(version), key)
    nomination = uuid.uuid4().hex
    client.set_model_version_tag(name, str(version), vocab.NOMINATED_AT, now_iso())
    client.set_model_version_tag(name, str(version), vocab.NOMINATION, nomination)
    return nomination


def close_nomination(client: MlflowClient, name: str, version: str) -> None:
    """End ``name`` v``version``'s nomination (promoted, rolled back, withdrawn): no decision counts for it any
    more, even if someone points @challenger at it again outside Kiln."""
    with contextlib.suppress(MlflowException):  # closed already
        client.delete_model_version_tag(name, str(version), vocab.NOMINATION)


def current_nomination(tags: Mapping[str, str]) -> str | None:
    """The id of a version's open nomination (its tags), or None."""
    return (tags.get(vocab.NOMINATION) or "").strip() or None
