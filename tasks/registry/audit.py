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

AUDIT_FILE = "audit.jsonl"

# Events, as written to the log and shown by `kiln history`.
REGISTERED, GATE, APPROVED, REJECTED, NOT_APPROVED = "registered", "gate", "approved", "rejected", "not_approved"
APPROVAL_REFUSED, PROMOTED, DEMOTED, ROLLED_BACK, RESTORED = (
    "approval_refused", "promoted", "demoted", "rolled_back", "restored")


def current_user() -> str:
    """Who is acting: ``$KILN_USER`` (set it in CI and on workers), else the login name."""
    return os.environ.get("KILN_USER") or getpass.getuser()


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
    out = [AuditEvent(name, v, REGISTERED, tags.get("kiln.triggered_by", version.user_id or ""),
                      tags.get("kiln.recipe", ""), _ms_iso(version.creation_timestamp), source="tags")]
    if "kiln.gate" in tags:
        out.append(AuditEvent(name, v, GATE, "optimize", f"{tags['kiln.gate']}: {tags.get('kiln.gate_reasons', '')}",
                              _ms_iso(version.creation_timestamp), source="tags"))
    approval = tags.get("kiln.approval")
    if approval in (APPROVED, REJECTED, NOT_APPROVED):
        out.append(AuditEvent(name, v, approval, tags.get("kiln.approver", ""), tags.get("kiln.approval_reason", ""),
                              tags.get("kiln.approval_at", _ms_iso(version.last_updated_timestamp)), source="tags"))
    for event, at, by, why in ((PROMOTED, "kiln.promoted_at", "kiln.promoted_by", "kiln.promotion_reason"),
                               (DEMOTED, "kiln.demoted_at", "kiln.demoted_by", "kiln.demotion_reason"),
                               (ROLLED_BACK, "kiln.rolled_back_at", "kiln.rolled_back_by", "kiln.rollback_reason"),
                               (RESTORED, "kiln.restored_at", "kiln.rolled_back_by", "kiln.rollback_reason")):
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
    from_tags = [e for v in client.search_model_versions(f"name = '{name}'") for e in events_from_tags(name, v)
                 if (e.version, e.event) not in seen]
    return sorted(logged + from_tags, key=lambda e: (e.timestamp, int(e.version) if e.version.isdigit() else 0))


def format_table(events: list[AuditEvent]) -> str:
    """A plain-text table for the terminal."""
    rows = [("time (UTC)", "version", "event", "actor", "reason")]
    rows += [(e.timestamp[:19].replace("T", " "), f"v{e.version}", e.event, e.actor or "-",
              (e.reason or "").replace("\n", " ")[:70]) for e in events]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4] for r in rows)
