"""The audit trail: every state change of a model version, as tags on the version and a JSONL line.

Two records of one story, on purpose: the tags let someone reading only the MLflow UI see the state of
each version (``kiln.approval``, ``kiln.approver``, ``kiln.promoted_at``, ...); the append-only log
``<KILN_HOME>/audit.jsonl`` keeps every event in order, including refused approvals that change no tag.
:func:`history` merges both, so versions decided before the log existed still have a timeline.
"""

from __future__ import annotations

import getpass
import json
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from kiln.settings import Settings, load_settings
from kiln.tasks.core import tags as vocab
from kiln.tasks.registry.client import versions_of

AUDIT_FILE = "audit.jsonl"  # the events it holds are named in kiln.tasks.core.tags (EVENT_*)


def current_user(settings: Settings | None = None) -> str:
    """Who is acting: the ``user`` setting (``KILN_USER`` or kiln.yaml; set it in CI and on workers), else the
    login name. ``settings`` default: :func:`load_settings`."""
    return (settings or load_settings()).user or getpass.getuser()


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class AuditEvent:
    """One line of the audit log."""

    model: str
    version: str
    event: str
    actor: str
    reason: str = ""
    timestamp: str = field(default_factory=now_iso)
    details: dict[str, Any] = field(default_factory=dict)
    source: str = "log"  # "log" or "tags" (reconstructed from a version's tags by `history`)

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("source")
        return json.dumps(data, sort_keys=True, default=str)


class AuditLog:
    """Append-only JSONL file. Each event is one ``write`` on an ``O_APPEND`` descriptor, so lines from
    concurrent processes on one machine never interleave (POSIX appends of one short buffer are atomic
    on local file systems)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def under(cls, home: Path) -> AuditLog:
        return cls(home / AUDIT_FILE)

    def append(self, event: AuditEvent) -> AuditEvent:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (event.to_json() + "\n").encode())
        finally:
            os.close(fd)
        return event

    def read(self, model: str | None = None) -> list[AuditEvent]:
        """Events in file order; a torn or foreign line is skipped rather than hiding the rest."""
        if not self.path.is_file():
            return []
        events = []
        for line in self.path.read_text().splitlines():
            try:
                data = json.loads(line)
                event = AuditEvent(**{k: data[k] for k in data if k in AuditEvent.__dataclass_fields__})
            except (ValueError, TypeError):
                continue
            if model is None or event.model == model:
                events.append(event)
        return events


def record(client: MlflowClient | None, log: AuditLog, event: AuditEvent, tags: dict[str, str] | None = None) -> None:
    """Write ``tags`` on the version (when given) and then the log line: the tag is the state, the line the story."""
    if client is not None and tags:
        for key, value in tags.items():
            client.set_model_version_tag(event.model, event.version, key, str(value)[:5000])
    log.append(event)


def _ms_iso(ms: int | None) -> str:
    return datetime.fromtimestamp((ms or 0) / 1000, UTC).isoformat(timespec="milliseconds")


def events_from_tags(name: str, version: Any) -> list[AuditEvent]:
    """What a version's tags say happened to it (for versions changed outside Kiln's log)."""
    tags, v = version.tags, str(version.version)
    out = [AuditEvent(name, v, vocab.EVENT_REGISTERED, tags.get(vocab.TRIGGERED_BY, version.user_id or ""),
                      tags.get(vocab.RECIPE, ""), _ms_iso(version.creation_timestamp), source="tags")]
    if vocab.GATE in tags:
        out.append(AuditEvent(name, v, vocab.EVENT_GATE, "optimize",
                              f"{tags[vocab.GATE]}: {tags.get(vocab.GATE_REASONS, '')}",
                              _ms_iso(version.creation_timestamp), source="tags"))
    approval = tags.get(vocab.APPROVAL)
    if approval in (vocab.APPROVED, vocab.REJECTED, vocab.NOT_APPROVED):
        out.append(AuditEvent(name, v, approval, tags.get(vocab.APPROVER, ""), tags.get(vocab.APPROVAL_REASON, ""),
                              tags.get(vocab.APPROVAL_AT, _ms_iso(version.last_updated_timestamp)), source="tags"))
    for event, at, by, why in (
            (vocab.EVENT_PROMOTED, vocab.PROMOTED_AT, vocab.PROMOTED_BY, vocab.PROMOTION_REASON),
            (vocab.EVENT_DEMOTED, vocab.DEMOTED_AT, vocab.DEMOTED_BY, vocab.DEMOTION_REASON),
            (vocab.EVENT_ROLLED_BACK, vocab.ROLLED_BACK_AT, vocab.ROLLED_BACK_BY, vocab.ROLLBACK_REASON),
            (vocab.EVENT_RESTORED, vocab.RESTORED_AT, vocab.ROLLED_BACK_BY, vocab.ROLLBACK_REASON)):
        if at in tags:
            out.append(AuditEvent(name, v, event, tags.get(by, ""), tags.get(why, ""), tags[at], source="tags"))
    return out


def history(client: MlflowClient, name: str, log: AuditLog) -> list[AuditEvent]:
    """The timeline of ``name``: the log's events, plus events only the tags know, oldest first.

    A tag-derived event is dropped when the log already has the same (version, event): the log line
    carries the reason and exact time. Only the latest approval / promotion per version lives in tags.
    """
    logged = log.read(name)
    seen = {(e.version, e.event) for e in logged}
    from_tags = [e for v in versions_of(client, name) for e in events_from_tags(name, v)
                 if (e.version, e.event) not in seen]
    return sorted(logged + from_tags, key=lambda e: (e.timestamp, int(e.version) if e.version.isdigit() else 0))


def format_table(events: list[AuditEvent]) -> str:
    """A plain-text table for the terminal."""
    rows = [("time (UTC)", "version", "event", "actor", "reason")]
    rows += [(e.timestamp[:19].replace("T", " "), f"v{e.version}", e.event, e.actor or "-",
              (e.reason or "").replace("\n", " ")[:70]) for e in events]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4] for r in rows)
