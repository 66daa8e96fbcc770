"""Polling the registry: the embedded SQLite store sends no webhooks, and MLflow drops a delivery after its
retries, so a poller looks at the watched models on a timer (``python -m kiln.infra.registry_events``).

What a new version or an approval tag leads to is :class:`RegistryEvents`' business, the same as for a
webhook; the poller only finds the versions it has not seen and remembers them in ``<home>/events``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from kiln.errors import ConfigError
from kiln.infra.registry_actions import RegistryEvents, Starter, quote
from kiln.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class PollReport:
    """What one look at the registry did, as ``model/version`` (or flow run ids for ``resumed``)."""

    started: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class RegistryPoller:
    """Looks at the watched models every ``poll_interval_s``; remembers seen versions in ``<home>/events``.

    The first look at a model records the versions it already has without starting anything: a restart,
    or a newly watched model, must not optimize history.
    """

    def __init__(self, settings: Settings, starter: Starter, *, events: RegistryEvents | None = None) -> None:
        self.settings = settings
        self.events = events or RegistryEvents(settings, starter)
        self.state_file = settings.home / "events" / "registry-poller.json"

    def poll_once(self) -> PollReport:
        """Start optimize on every new version of a watched model, then resume decided promotions."""
        report, seen = PollReport(), self._load()
        for name in self.settings.watch_models:
            try:
                versions = self._versions(name)
            except Exception as exc:  # noqa: BLE001 - one unreadable model must not stop the others
                report.errors.append(f"{name}: {type(exc).__name__}: {exc}")
                continue
            if name not in seen:
                seen[name] = sorted(versions, key=int)
                self._save(seen)
                continue
            for version in sorted(set(versions) - set(seen[name]), key=int):
                try:
                    outcome = self.events.version_created(name, version, tags=versions[version].tags,
                                                          run_id=versions[version].run_id, via="poller")
                except Exception as exc:  # noqa: BLE001 - not marked seen: the next poll tries again
                    report.errors.append(f"{name}/{version}: {type(exc).__name__}: {exc}")
                    break
                (report.started if outcome.status == "started" else report.ignored).append(f"{name}/{version}")
                seen[name].append(version)
                self._save(seen)  # after each: a crash between two starts repeats nothing
        try:
            report.resumed = self.events.resume_decided().flow_runs
        except Exception as exc:  # noqa: BLE001
            report.errors.append(f"resume: {type(exc).__name__}: {exc}")
        for line in report.errors:
            log.warning("registry poll: %s", line)
        return report

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set."""
        log.info("polling %s every %g s", ", ".join(self.settings.watch_models) or "no models (approvals only)",
                 self.settings.poll_interval_s)
        while not stop.is_set():
            report = self.poll_once()
            if report.started or report.resumed:
                log.info("registry poll: started %s, resumed %s", report.started, report.resumed)
            stop.wait(self.settings.poll_interval_s)

    def _versions(self, name: str) -> dict[str, Any]:
        found, token = {}, None
        while True:
            page = self.events.client.search_model_versions(f"name = {quote(name)}", page_token=token)
            found |= {str(v.version): v for v in page}
            token = page.token
            if not token:
                return found

    def _load(self) -> dict[str, list[str]]:
        try:
            return json.loads(self.state_file.read_text())["seen"]
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError) as exc:
            raise ConfigError(f"{self.state_file} is corrupt ({exc}); delete it to start over "
                              "(existing versions are then recorded, not optimized)") from exc

    def _save(self, seen: dict[str, list[str]]) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"seen": seen}, indent=1))
        os.replace(tmp, self.state_file)
