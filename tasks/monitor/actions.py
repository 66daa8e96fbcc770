"""What a breach sets off, exactly once: the per-model action guard, the signed webhook, the rollback.

**One action at a time per model.** :class:`ActionGuard` keeps the action in flight in a tag on the registered
model (``kiln.monitor.action``: JSON ``{action, id, started_at, timeout_s, detail}``), so someone reading the
MLflow UI sees it, and every monitor process, on any machine, reads the same record. :meth:`ActionGuard.begin`
returns an id only when no action is in flight; :meth:`ActionGuard.finish` clears it and records how it ended
(``kiln.monitor.last_action`` and two lines of the audit log, ``kiln history NAME``). An action never finished
(its process died) stops blocking after its ``timeout_s``: it is stale, and the next begin says it replaces it.

MLflow has no compare-and-set on tags, so begin is made as safe as it allows: contenders on one machine take a
file lock under ``KILN_HOME/locks`` around read-check-write. Across machines, the common case is a real
compare-and-set: :meth:`ActionGuard.finish` deletes the tag, and a SQL store (also behind an MLflow server)
inserts a missing tag under a unique key, so of two writers of an absent tag one fails and backs off. Replacing
a stale record is an update, so there each writer waits :data:`SETTLE_S` and reads its record back, and only the
one whose record is there goes on (the last writer wins); both win only if one's read and write are further apart
than the settle time, a stall of the registry between two calls of one begin.

Tasks never import Prefect: the Prefect event and the retraining are started by ``flows/monitor.py``.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from kiln.errors import KilnError, ModelNotFoundError
from kiln.settings import Settings, load_settings
from kiln.tasks.core import tags as vocab
from kiln.tasks.lifecycle import promotion
from kiln.tasks.registry import audit
from kiln.tasks.registry.client import existing_aliases

log = logging.getLogger(__name__)

ACTOR = "kiln-monitor"  # who the audit log and the rollback tags name
SETTLE_S = 0.2  # how long begin waits before reading its record back (see the module docstring)
SIGNATURE_HEADER = "X-Kiln-Signature"  # sha256=<hex HMAC-SHA256 of the body>, as GitHub's X-Hub-Signature-256
_MAX_DETAIL_CHARS = 20_000  # the registry takes 100,000 per tag; a record this long is already unreadable


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


class ActionGuard:
    """The monitor's action in flight for the registered model ``name`` (see the module docstring).

    Args:
        client: the registry.
        name: the registered model.
        home: ``KILN_HOME`` (the machine's lock and the audit log); default: the settings'.
        clock: epoch seconds (tests pass their own).
        settle_s: how long :meth:`begin` waits before reading its record back.
    """

    def __init__(self, client: MlflowClient, name: str, *, home: Path | None = None,
                 clock: Callable[[], float] = time.time, settle_s: float = SETTLE_S) -> None:
        self.client, self.name, self.clock, self.settle_s = client, name, clock, settle_s
        self.home = Path(home) if home is not None else load_settings().home

    # -- reading --
    def _record(self) -> dict[str, Any] | None:
        try:
            tags = self.client.get_registered_model(self.name).tags
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise ModelNotFoundError(f"no registered model {self.name!r} to guard monitor actions on; check the "
                                         "name (`kiln show`)") from None
            raise
        raw = tags.get(vocab.MONITOR_ACTION)
        if not raw:
            return None
        try:
            record = json.loads(raw)
            float(record["started_ts"]), float(record["timeout_s"]), str(record["id"])
        except (ValueError, TypeError, KeyError):
            # Unreadable (edited by hand): shown as stale, so it never blocks the monitor for good.
            return {"id": "", "action": "?", "started_at": "?", "started_ts": 0.0, "timeout_s": 0.0,
                    "detail": {}, "corrupt": str(raw)[:200]}
        return record

    def _age(self, record: Mapping[str, Any]) -> float:
        return self.clock() - float(record["started_ts"])

    def current(self) -> dict[str, Any] | None:
        """The recorded action (in flight or stale) with ``age_s`` and ``stale`` added; None when there is none."""
        record = self._record()
        if record is None:
            return None
        age = self._age(record)
        return {**record, "age_s": round(age, 3), "stale": age > float(record["timeout_s"])}

    def in_flight(self) -> dict[str, Any] | None:
        """The action in flight (``{action, id, started_at, timeout_s, detail, age_s}``), or None.

        A stale one (older than its ``timeout_s``, or unreadable) counts as not in flight; the log says so."""
        record = self.current()
        if record is None:
            return None
        if record["stale"]:
            what = ("unreadable" if "corrupt" in record else
                    f"started {record['started_at']}, {record['age_s']:.0f} s ago")
            log.warning("the monitor's %s action %s on %s is stale (%s, timeout %g s): no longer in flight",
                        record["action"], record["id"] or "?", self.name, what, float(record["timeout_s"]))
            return None
        return {k: v for k, v in record.items() if k != "stale"}

    # -- acting --
    def begin(self, action: str, detail: Mapping[str, Any], timeout_s: float) -> str | None:
        """Record ``action`` as in flight and return its id; None when another action is in flight.

        Args:
            action: what is started (``notify``, ``rollback``, ``retrain``, or several joined by ``+``).
            detail: JSON-serialisable context (the version judged, the breaches); ``detail["version"]`` names the
                version in the audit log.
            timeout_s: after this long an unfinished action is stale and no longer blocks a new one.
        """
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, not {timeout_s}")
        with self._machine_lock():
            now = self.clock()
            previous = self.current()
            if previous is not None and not previous["stale"]:
                return None
            record: dict[str, Any] = {"action": action, "id": uuid.uuid4().hex[:12], "started_at": _iso(now),
                                      "started_ts": round(now, 3), "timeout_s": float(timeout_s),
                                      "detail": _bounded(detail)}
            if previous is not None:
                record["replaces"] = {k: previous.get(k) for k in ("id", "action", "started_at")}
                log.warning("the monitor's %s action %s on %s is stale; %s replaces it", previous["action"],
                            previous["id"] or "?", self.name, action)
            try:
                self.client.set_registered_model_tag(self.name, vocab.MONITOR_ACTION, json.dumps(record, default=str))
            except MlflowException as exc:  # e.g. the SQL store's unique key: another writer inserted it first
                log.info("writing the monitor's action on %s failed (%s); reading who holds it", self.name,
                         (str(exc).splitlines() or ["?"])[0][:160])
            else:
                if self.settle_s > 0:
                    time.sleep(self.settle_s)
            back = self._record()
            if back is None or back.get("id") != record["id"]:
                log.warning("another monitor began an action on %s at the same time; it acts, this one does not",
                            self.name)
                return None
        self._audit(vocab.EVENT_MONITOR_ACTION_STARTED, record, action,
                    {"id": record["id"], "detail": record["detail"], "replaces": record.get("replaces")})
        return record["id"]

    def finish(self, action_id: str, outcome: str) -> None:
        """Clear the action ``action_id`` (when it is still the one in flight) and record its ``outcome``.

        An id that is no longer recorded (replaced after it went stale) clears nothing, but its outcome is
        still recorded."""
        with self._machine_lock():
            record = self._record()
            ours = record is not None and record.get("id") == action_id
            if ours:
                self.client.delete_registered_model_tag(self.name, vocab.MONITOR_ACTION)
            else:
                log.warning("the monitor's action %s on %s is no longer the one recorded; recording its outcome only",
                            action_id, self.name)
                record = {"id": action_id, "action": "?", "started_at": "?", "detail": {}}
            assert record is not None
            last = {"action": record.get("action"), "id": action_id, "started_at": record.get("started_at"),
                    "finished_at": _iso(self.clock()), "outcome": outcome[:2000],
                    "version": str((record.get("detail") or {}).get("version", ""))}
            self.client.set_registered_model_tag(self.name, vocab.MONITOR_LAST_ACTION, json.dumps(last))
        self._audit(vocab.EVENT_MONITOR_ACTION_FINISHED, record, outcome[:500], {"id": action_id, "cleared": ours})

    def _audit(self, event: str, record: Mapping[str, Any], reason: str, details: dict[str, Any]) -> None:
        version = str((record.get("detail") or {}).get("version", ""))
        audit.AuditLog.under(self.home).append(audit.AuditEvent(self.name, version, event, ACTOR, reason,
                                                                details=details))

    @contextmanager
    def _machine_lock(self) -> Iterator[None]:
        """This machine's contenders for the guard, one at a time (blocking: the section is a few registry calls)."""
        folder = self.home / "locks"
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / ("monitor-" + re.sub(r"[^\w.-]", "_", self.name) + ".lock"), os.O_RDWR | os.O_CREAT,
                     0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock


def _bounded(detail: Mapping[str, Any]) -> dict[str, Any]:
    """``detail`` made JSON-safe, cut down when it would not fit a readable tag."""
    safe = json.loads(json.dumps(dict(detail), default=str))
    text = json.dumps(safe)
    if len(text) <= _MAX_DETAIL_CHARS:
        return safe
    keep = {k: v for k, v in safe.items() if len(json.dumps(v)) <= 500}
    return keep | {"truncated": f"{len(text):,} characters of detail, cut to the short fields"}


# ---- notify ------------------------------------------------------------------------------------------------


def signature(body: bytes, secret: str) -> str:
    """The ``X-Kiln-Signature`` value of ``body``: ``sha256=<hex HMAC-SHA256 with secret>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_signature(body: bytes, header: str | None, secret: str) -> bool:
    """Whether ``header`` is ``body``'s signature with ``secret`` (constant-time): what a receiver checks."""
    return bool(header) and hmac.compare_digest(signature(body, secret), str(header))


def _where(url: str) -> str:
    """Scheme, host and port only: a webhook's path or query often is its secret (Slack, Teams)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}" + (f":{parts.port}" if parts.port else "")


def notify(url: str, payload: Mapping[str, Any], secret: str | None, *, timeout_s: float = 10.0,
           transport: httpx.BaseTransport | None = None) -> str:
    """POST ``payload`` as JSON to the webhook ``url``; never raises: returns what happened, in one line.

    With ``secret`` the body is signed (``X-Kiln-Signature: sha256=<hex>``, HMAC-SHA256 of the exact bytes
    sent; check it with :func:`verify_signature`). ``X-Kiln-Delivery`` is a fresh id per call, for receivers
    that drop repeats. Redirects are not followed. The outcome names only the webhook's scheme and host.

    Returns:
        ``notified <host> (HTTP 200)``, or ``failed: ...`` saying why (unreachable, timeout, HTTP status).
    """
    where = _where(url)
    try:
        body = json.dumps(dict(payload), sort_keys=True, default=str).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "kiln-monitor",
                   "X-Kiln-Event": "monitor", "X-Kiln-Delivery": uuid.uuid4().hex}
        if secret:
            headers[SIGNATURE_HEADER] = signature(body, secret)
        with httpx.Client(timeout=timeout_s, transport=transport, follow_redirects=False) as http:
            response = http.post(url, content=body, headers=headers)
    except httpx.TimeoutException:
        return f"failed: {where} did not answer within {timeout_s:g} s"
    except httpx.HTTPError as exc:
        return f"failed: cannot reach {where} ({exc.__class__.__name__}); check the policy's notify_url"
    except Exception as exc:  # a notification never takes the monitor down with it  # noqa: BLE001
        return f"failed: {exc.__class__.__name__} sending to {where}: {str(exc)[:120]}"
    if response.status_code >= 300:
        return f"failed: {where} answered HTTP {response.status_code}"
    return f"notified {where} (HTTP {response.status_code})"


# ---- rollback ----------------------------------------------------------------------------------------------


def rollback_champion(client: MlflowClient, settings: Settings, name: str, reason: str) -> str:
    """Put ``@previous`` back as ``@champion`` through the promotion path (its lease, tags and audit), as
    ``kiln-monitor``; returns the outcome in one line and never raises for a registry state that forbids it.

    Returns:
        ``rolled back NAME: @champion is vN again (was vM)``, or ``cannot roll back NAME: ...`` (no
        ``@previous``, the lease held by a rollout, the registry unreachable).
    """
    try:
        before = existing_aliases(client, name).get(vocab.CHAMPION)
        mv = promotion.rollback(client, name, actor=ACTOR, reason=reason, home=settings.home)
    except (KilnError, MlflowException) as exc:
        return f"cannot roll back {name}: {(str(exc).splitlines() or [type(exc).__name__])[0][:300]}"
    was = f" (was v{before})" if before and before != str(mv.version) else ""
    return f"rolled back {name}: @champion is v{mv.version} again{was}"
