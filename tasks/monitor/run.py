"""One monitor evaluation of a served champion, for the flow and the CLI.

    read the live window ─► judge it (policy) ─► record it (MLflow: a run per model and day, a step per look)
                         ─► on a breach: act once (notify / roll back / retrain), never twice for one incident

The live statistics come from the gateway's window (``POST /admin/reset`` closes it, as a rollout's analysis
does) or from a Prometheus source of ``rollout_metrics``; a model whose lease is held (a rollout, a promotion)
is not read: its windows belong to the rollout, and the evaluation says "inconclusive". Acting goes through
:class:`~kiln.tasks.monitor.actions.ActionGuard`: one incident per model is open at a time; it closes when an
evaluation comes back healthy, when the champion changes (a rollback, a promotion) or when it goes stale
(the policy's ``action_timeout_s``), so a breach that persists over many evaluations acts exactly once.
What needs Prefect (an event for automations, the retrain flow) is the caller's :class:`ActionRunner`.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from kiln.errors import ConfigError, KilnError
from kiln.settings import Settings
from kiln.tasks.core import tags as vocab
from kiln.tasks.lifecycle.retrain import CONFIG_FILE, RetrainParams
from kiln.tasks.monitor import actions as acting
from kiln.tasks.monitor.evaluate import MonitorVerdict, evaluate
from kiln.tasks.monitor.params import MonitorParams
from kiln.tasks.monitor.policy import MonitorPolicy, load_policy
from kiln.tasks.monitor.signals import content_checks, drift_reference
from kiln.tasks.monitor.snapshot import LiveSnapshot, snapshot_from_gateway, snapshot_from_prometheus
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.lease_record import LeaseHeld, refuse_if_held
from kiln.tasks.rollout.stats import Check

log = logging.getLogger(__name__)
STATUS_CODE = {"healthy": 0, "inconclusive": 1, "breach": 2}  # the status as a metric, plottable over the day


class ActionRunner(Protocol):
    """What only the caller can do: tell Prefect (an event automations can fan out) and start the retrain flow."""

    def event(self, name: str, payload: dict[str, Any]) -> str: ...

    def retrain(self, params: RetrainParams) -> str: ...


@dataclass
class MonitorResult:
    """One evaluation: the verdict, where it was recorded, and what was done about it."""

    model: str
    version: str | None
    verdict: MonitorVerdict
    run_id: str | None = None
    step: int | None = None
    actions: list[dict[str, str]] = field(default_factory=list)

    @property
    def status(self) -> str:
        return self.verdict.status

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, **self.verdict.to_dict(), "run_id": self.run_id,
                "step": self.step, "actions_taken": self.actions}


def run_monitor(params: MonitorParams, settings: Settings, *, runner: ActionRunner | None = None,
                echo: Callable[[str], None] = print) -> MonitorResult:
    """Judge ``params.model``'s @champion on its live traffic, record the evaluation, act on a breach once."""
    policy = load_policy(Path(params.policy) if params.policy else None)
    client = registry.connect(settings)
    champion = registry.existing_aliases(client, params.model).get(vocab.CHAMPION)
    if champion is None:
        raise ConfigError(f"{params.model!r} has no @champion to monitor; promote a version first "
                          "(`kiln promote` or a rollout)")
    try:
        refuse_if_held(client, params.model)
    except LeaseHeld as exc:  # a rollout owns the windows now; reading them would steal its evidence
        verdict = _inconclusive(policy, f"not read: {exc}")
        return _finish(client, settings, params, policy, champion, verdict, runner, echo, act=False)
    snapshot, served = _read_snapshot(params, settings)
    if served is not None and str(served) != str(champion):
        verdict = _inconclusive(policy, f"the champion upstream served v{served} in this window while @champion is "
                                        f"v{champion} (a handover in progress?); judged nothing")
        return _finish(client, settings, params, policy, champion, verdict, runner, echo, act=False)
    reference = drift_reference(client, params.model, champion, policy) if _needs_reference(policy) else None
    extra = content_checks(client, settings, params.model, champion, policy, snapshot)
    verdict = evaluate(policy, snapshot, reference, extra_checks=extra)
    return _finish(client, settings, params, policy, champion, verdict, runner, echo, act=params.act)


def _needs_reference(policy: MonitorPolicy) -> bool:
    return policy.input_drift is not None or policy.prediction_drift is not None


def _inconclusive(policy: MonitorPolicy, reason: str) -> MonitorVerdict:
    """A verdict with nothing judged: an empty snapshot under min_requests is inconclusive by the policy's rules."""
    verdict = evaluate(policy, LiveSnapshot(version=None, seconds=0.0), None, extra_checks=())
    verdict.checks.insert(0, Check("window", "inconclusive", reason))
    return verdict


def _read_snapshot(params: MonitorParams, settings: Settings) -> tuple[LiveSnapshot, str | None]:
    """The champion's window and the version its upstream says it serves (None when it does not say).

    The gateway's window is closed (``POST /admin/reset``), so the next evaluation sees only what came after;
    Prometheus is asked for the last ``monitor_interval_s`` (the schedule's period).
    """
    from kiln.tasks.rollout import prometheus
    from kiln.tasks.rollout.gateway_client import GatewayRouter
    from kiln.tasks.rollout.params import load_rollout_spec

    if params.metrics != "gateway":
        windows, _ = prometheus.windows_for(params.metrics, settings, load_rollout_spec(None))
        if windows is None:
            raise ConfigError(f"metrics source {params.metrics!r} is not in the rollout_metrics setting; use "
                              "'gateway' or one of: " + ", ".join(sorted(settings.rollout_metrics)))
        try:
            snap = snapshot_from_prometheus(windows, params.model, seconds=settings.monitor_interval_s)
            return snap, snap.version
        finally:
            windows.close()
    token = settings.gateway_token.get_secret_value() if settings.gateway_token else ""
    router = GatewayRouter(settings.gateway_url(params.gateway), token)
    try:
        served = router.served_versions().get(vocab.CHAMPION)  # asked first: a handover in the window shows
        return snapshot_from_gateway(router.next_window(), vocab.CHAMPION), served
    finally:
        router.close()


# ── recording ─────────────────────────────────────────────────────────────────────────────────────────────
def _finish(client: MlflowClient, settings: Settings, params: MonitorParams, policy: MonitorPolicy, champion: str,
            verdict: MonitorVerdict, runner: ActionRunner | None, echo: Callable[[str], None], *,
            act: bool) -> MonitorResult:
    result = MonitorResult(params.model, champion, verdict)
    guard = acting.ActionGuard(client, params.model)
    _close_resolved(guard, verdict, champion)
    if act and verdict.status == "breach" and verdict.actions:
        result.actions = _act(client, guard, settings, params, policy, champion, verdict, runner)
    result.run_id, result.step = _record(client, settings, result)
    for line in describe(result):
        echo(line)
    return result


def _record(client: MlflowClient, settings: Settings, result: MonitorResult) -> tuple[str | None, int | None]:
    """Log the evaluation as one step (seconds since UTC midnight) of the model's run for today."""
    now = dt.datetime.now(dt.UTC)
    day, step = now.strftime("%Y-%m-%d"), now.hour * 3600 + now.minute * 60 + now.second
    try:
        run_id = _day_run(client, settings, result.model, day)
        stamp = int(now.timestamp() * 1000)
        metrics = {**result.verdict.metrics, "status_code": STATUS_CODE[result.verdict.status]}
        for key, value in metrics.items():
            if value is not None:
                client.log_metric(run_id, key, float(value), stamp, step)
        client.set_tag(run_id, vocab.RUN_VERSION, result.version or "")
        client.log_dict(run_id, result.to_dict(), f"evaluations/{now.strftime('%H%M%S')}-{result.status}.json")
        return run_id, step
    except MlflowException as exc:  # what was observed still printed and acted on; the record is best effort
        log.warning("could not record the monitor evaluation in MLflow: %s", exc)
        return None, None


def _day_run(client: MlflowClient, settings: Settings, model: str, day: str) -> str:
    experiment = registry.ensure_experiment(client, settings)
    found = client.search_runs([experiment], max_results=1, filter_string=(
        f"tags.`{vocab.RUN_KIND}` = 'monitor' and tags.`{vocab.RUN_MODEL}` = '{model}' and "
        f"tags.`{vocab.RUN_DAY}` = '{day}'"))
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment, run_name=f"monitor {model} {day}",
                            tags={vocab.RUN_KIND: "monitor", vocab.RUN_MODEL: model, vocab.RUN_DAY: day})
    return run.info.run_id


# ── acting once ───────────────────────────────────────────────────────────────────────────────────────────
def _close_resolved(guard: acting.ActionGuard, verdict: MonitorVerdict, champion: str) -> None:
    """The open incident ends when the champion it was about is healthy again or no longer the champion."""
    open_ = guard.in_flight()
    if not open_:
        return
    about = str(open_.get("detail", {}).get("version"))
    if about != str(champion):
        guard.finish(open_["id"], f"closed: @champion is now v{champion}, not v{about}")
    elif verdict.status == "healthy":
        guard.finish(open_["id"], "resolved: healthy again")


def _act(client: MlflowClient, guard: acting.ActionGuard, settings: Settings, params: MonitorParams,
         policy: MonitorPolicy, champion: str, verdict: MonitorVerdict,
         runner: ActionRunner | None) -> list[dict[str, str]]:
    detail = {"version": champion, "breaches": list(verdict.breaches), "actions": list(verdict.actions)}
    incident = guard.begin("+".join(verdict.actions), detail, policy.action_timeout_s)
    if incident is None:
        open_ = guard.in_flight() or {}
        return [{"action": a, "outcome": f"skipped: incident {open_.get('id', '?')} "
                 f"({open_.get('action', '?')}, since {open_.get('started_at', '?')}) is still open"}
                for a in verdict.actions]
    payload = {"model": params.model, "version": champion, "incident": incident, **verdict.to_dict()}
    done = [{"action": a, "outcome": _one(client, a, settings, params, policy, champion, payload, runner)}
            for a in verdict.actions]
    if "rollback" in verdict.actions and any(d["outcome"].startswith("rolled back") for d in done):
        guard.finish(incident, "; ".join(f"{d['action']}: {d['outcome']}" for d in done))  # a new champion now
    return done


def _one(client: MlflowClient, action: str, settings: Settings, params: MonitorParams, policy: MonitorPolicy,
         champion: str, payload: dict[str, Any], runner: ActionRunner | None) -> str:
    """Run one action; its failure is an outcome to record, never an exception that leaves the incident open."""
    try:
        if action == "notify":
            return _notify(settings, policy, payload, runner)
        if action == "rollback":
            return acting.rollback_champion(client, settings, params.model,
                                            f"monitor: {', '.join(payload['breaches'])} on v{champion}")
        if action == "retrain":
            return _retrain(client, params, policy, champion, payload, runner)
        return f"unknown action {action!r}"
    except KilnError as exc:
        return f"failed: {exc}"


def _notify(settings: Settings, policy: MonitorPolicy, payload: dict[str, Any], runner: ActionRunner | None) -> str:
    said = []
    if runner is not None:
        said.append(runner.event(vocab.MONITOR_BREACH_EVENT, payload))
    if policy.notify_url:
        secret = settings.monitor_notify_secret.get_secret_value() if settings.monitor_notify_secret else None
        said.append(acting.notify(str(policy.notify_url), payload, secret, timeout_s=policy.notify_timeout_s))
    return "; ".join(said) or "nothing to notify: no notify_url in the policy and no Prefect event bus"


def _retrain(client: MlflowClient, params: MonitorParams, policy: MonitorPolicy, champion: str,
             payload: dict[str, Any], runner: ActionRunner | None) -> str:
    if runner is None:
        return "not started: retraining runs as the retrain flow (run the monitor as a flow: `kiln monitor` does)"
    tags = client.get_model_version(params.model, champion).tags
    sha = tags.get(vocab.GIT_SHA)
    if not sha:
        return (f"not started: v{champion} records no commit ({vocab.GIT_SHA}); the monitor retrains what a push "
                "trained, at the same commit and config, with the recent feedback added")
    retrain = RetrainParams(sha=sha, repo=tags.get(vocab.GIT_REPO),
                            config_path=tags.get(vocab.CONFIG_PATH) or CONFIG_FILE, model=None,
                            feedback_days=max(1, math.ceil(policy.retrain_feedback_days)),
                            triggered_by=f"monitor:{payload['incident']}")
    return runner.retrain(retrain)


# ── words ─────────────────────────────────────────────────────────────────────────────────────────────────
def describe(result: MonitorResult) -> list[str]:
    """What an operator reads: the verdict, every check with its reason, and what was done."""
    lines = [f"{result.model} v{result.version}: {result.status.upper()}"]
    lines += [f"  {c.status:<12} {c.name}: {c.reason}" for c in result.verdict.checks]
    lines += [f"  action {a['action']}: {a['outcome']}" for a in result.actions]
    if result.run_id:
        lines.append(f"  recorded: MLflow run {result.run_id}, step {result.step}")
    return lines

