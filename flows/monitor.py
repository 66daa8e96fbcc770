"""The monitor flow: judge the served @champion on its live traffic, record it, act on a breach once.

    read the window ─► judge (policy) ─► MLflow step ─► breach? notify (webhook + Prefect event) / roll back / retrain

The logic is :mod:`kiln.tasks.monitor`; this wrapper gives it a Prefect run (a typed form, a schedule per model
in the ``kiln-monitor`` deployment, a markdown artifact with the checks) and does what only Prefect can: the
``kiln.monitor.breach`` event (Prefect automations fan it out: Slack, PagerDuty, another deployment) and the
retrain flow as a subflow, the same flow a git push starts.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event

from kiln.flows import crashed
from kiln.settings import Settings, load_settings
from kiln.tasks.core import tags as vocab
from kiln.tasks.lifecycle.retrain import RetrainParams
from kiln.tasks.monitor.params import MonitorParams
from kiln.tasks.monitor.run import MonitorResult, run_monitor

__all__ = ["MonitorParams", "monitor"]


class PrefectActions:
    """The monitor's actions that need Prefect: an event, and the retrain flow run as a subflow."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def event(self, name: str, payload: dict[str, Any]) -> str:
        sent = emit_event(name, resource={"prefect.resource.id": vocab.EVENT_RESOURCE_PREFIX + payload["model"],
                                          "prefect.resource.name": payload["model"],
                                          vocab.EVENT_VERSION_LABEL: str(payload["version"])},
                          payload=payload)
        return f"Prefect event {name} {sent.id}" if sent is not None else f"Prefect event {name} not sent (no API)"

    def retrain(self, params: RetrainParams) -> str:
        from kiln.flows.retrain import retrain

        result = retrain(params)
        how = "found already registered" if result.get("reused") else "retrained and registered"
        return f"{how}: {result['name']} v{result['version']} (commit {str(result.get('sha', ''))[:12]})"


def _markdown(result: MonitorResult) -> str:
    rows = "\n".join(f"| {c.name} | {c.status} | {c.reason[:300]} |" for c in result.verdict.checks)
    acts = "\n".join(f"- **{a['action']}**: {a['outcome']}" for a in result.actions) or "- none"
    return (f"# {result.model} v{result.version}: {result.status}\n\n| check | status | reason |\n|---|---|---|\n"
            f"{rows}\n\n## Actions\n{acts}\n")


@flow(name="monitor", log_prints=True, **crashed.RELEASE_HOOKS)
def monitor(params: MonitorParams) -> dict[str, Any]:
    """Judge NAME@champion on its live traffic against the monitoring policy; on a breach, act once.

    Settings (registry, gateway token ``KILN_GATEWAY_TOKEN``, the gateways and metrics sources the form may
    name, ``monitor_notify_secret``) come from the worker's environment.
    """
    settings = load_settings()
    crashed.claim_run(settings)
    result = run_monitor(params, settings, runner=PrefectActions(settings), echo=print)
    slug = "".join(c if c.isalnum() else "-" for c in params.model.lower())
    create_markdown_artifact(_markdown(result), key=f"monitor-{slug}",
                             description=f"Monitor of {result.model} v{result.version}")
    return result.to_dict()
