"""The canary rollout driver: set the gateway's traffic, wait, judge, then go forward, pause or roll back.

    step 0: weight/shadow ─► analysis interval ─► judge (thresholds, rank test, drift) ─► next_action
      advance → next step · repeat → analyse again · pause → wait for `kiln rollout resume`
      promote (after the last step) → aliases moved by tasks.promotion · rollback → weight 0, version tagged

Where its state lives, and why:
- the full state (every verdict with its reasons) in ``<KILN_HOME>/rollouts/<model>.json``, rewritten
  atomically after each change, so ``kiln rollout status`` can show the whole story;
- a summary on the challenger version's tags (``kiln.rollout.status``, ``.step``, ``.weight``,
  ``.message``), so the MLflow UI and any machine sharing the registry sees where a rollout stands;
- commands (pause, resume, promote, abort) as the tag ``kiln.rollout.command`` on the challenger: the
  driver polls it, so ``kiln rollout pause`` works from any machine that reaches the registry, and
  someone with only the MLflow UI can stop a rollout too;
- each verdict's figures as metrics of one MLflow run per rollout (step = analysis number).

The gateway is driven through its admin API (:class:`GatewayAdmin`); analysis windows come from
``POST /admin/reset`` (the closed window's counts and latency samples), so intervals never overlap.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import httpx
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import BaseModel, Field

from kiln.errors import ConfigError, KilnError
from kiln.settings import Settings
from kiln.tasks.presets import PRESETS
from kiln.tasks.registry import audit
from kiln.tasks.registry import client as registry
from kiln.tasks.rollout.judge import (
    CHALLENGER,
    CHAMPION,
    Check,
    RolloutSpec,
    StepVerdict,
    judge_step,
    load_spec,
    next_action,
    stats_from_state,
    with_checks,
)

log = logging.getLogger(__name__)

Status = Literal["running", "paused", "promoted", "rolled_back", "aborted"]
Command = Literal["pause", "resume", "promote", "abort"]
FINAL: set[str] = {"promoted", "rolled_back", "aborted"}
COMMAND_TAG, STATUS_TAG = "kiln.rollout.command", "kiln.rollout.status"
DEFAULT_SPEC = PRESETS / "rollout-default.yaml"
CANARY_ROLLED_BACK, CANARY_PROMOTED = "canary_rolled_back", "canary_promoted"


class RolloutError(KilnError):
    """The rollout cannot start or go on (gateway unreachable, wrong versions, no challenger...)."""


class RolloutParams(BaseModel):
    """What `kiln rollout NAME` and the kiln-rollout deployment take."""

    model: str = Field(..., min_length=1, description="Registered model: its @challenger is rolled out against "
                       "its @champion.")
    spec: str | None = Field(None, description="Rollout spec YAML file (default: Kiln's preset "
                             "tasks/presets/rollout-default.yaml).")
    gateway: str = Field("http://127.0.0.1:8080", description="Base URL of the Kiln gateway in front of both.")
    poll_s: float = Field(1.0, gt=0, le=60, description="How often commands (pause, abort...) are checked.")
    actor: str | None = Field(None, description="Who runs the rollout (default: $KILN_USER or the login name).")


# ── state ─────────────────────────────────────────────────────────────────────────────────────────────
class Verdict(BaseModel):
    """One analysis interval's judgement, as stored and shown."""

    analysis: int
    step: int
    weight: float
    shadow: float
    outcome: str
    action: str
    reasons: list[str]
    figures: dict[str, float | None] = Field(default_factory=dict)
    at: str = Field(default_factory=audit.now_iso)


class RolloutState(BaseModel):
    """Where one model's rollout stands."""

    model: str
    challenger: str
    champion: str | None
    gateway: str
    status: Status = "running"
    step: int = 0
    steps: int = 1
    weight: float = 0.0
    shadow: float = 0.0
    message: str = ""
    actor: str = ""
    run_id: str | None = None
    plot: str | None = None
    started_at: str = Field(default_factory=audit.now_iso)
    updated_at: str = Field(default_factory=audit.now_iso)
    verdicts: list[Verdict] = Field(default_factory=list)


class RolloutStore:
    """``<home>/rollouts/<model>.json``: the last rollout of each model (a new rollout replaces it)."""

    def __init__(self, home: Path) -> None:
        self.folder = home / "rollouts"

    def path(self, model: str) -> Path:
        return self.folder / (re.sub(r"[^\w.-]", "_", model) + ".json")

    def load(self, model: str) -> RolloutState | None:
        path = self.path(model)
        return RolloutState.model_validate_json(path.read_text()) if path.is_file() else None

    def save(self, state: RolloutState) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        state.updated_at = audit.now_iso()
        tmp = self.path(state.model).with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(state.model_dump_json(indent=2))
        tmp.replace(self.path(state.model))  # readers never see half a file


# ── the gateway's admin API ───────────────────────────────────────────────────────────────────────────
class GatewayAdmin:
    """Thin client of the gateway's authenticated admin endpoints; errors say what to fix."""

    def __init__(self, url: str, token: str, timeout_s: float = 10.0) -> None:
        if not token:
            raise ConfigError("the gateway's admin API needs a token: set KILN_GATEWAY_TOKEN (the same value the "
                              "gateway was started with)")
        self.url = url.rstrip("/")
        self._client = httpx.Client(base_url=self.url, timeout=timeout_s,
                                    headers={"Authorization": f"Bearer {token}"})

    def close(self) -> None:
        self._client.close()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            response = self._client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise RolloutError(f"cannot reach the gateway at {self.url} ({exc.__class__.__name__}); start it "
                               "with `python -m kiln.infra.gateway --champion URL --challenger URL` or pass --gateway"
                               ) from exc
        if response.status_code in (401, 403):
            raise RolloutError(f"the gateway at {self.url} refused the admin token; set KILN_GATEWAY_TOKEN to the "
                               "token it was started with")
        if response.status_code >= 400:
            raise RolloutError(f"gateway {method} {path} answered {response.status_code}: {response.text[:200]}")
        return response.json()

    def route(self, weight: float, shadow: float) -> None:
        self._call("POST", "/admin/shadow", {"fraction": shadow})
        self._call("POST", "/admin/weight", {"weight": weight})

    def state(self) -> dict[str, Any]:
        return self._call("GET", "/admin/state")

    def reset(self) -> dict[str, Any]:
        """Close the current analysis window (returned, with latency samples) and open a new one."""
        return self._call("POST", "/admin/reset")


# ── commands ──────────────────────────────────────────────────────────────────────────────────────────
def send_command(client: MlflowClient, model: str, command: Command, *, actor: str, reason: str = "") -> str:
    """Ask the running rollout of ``model`` to pause, resume, promote or abort; returns the challenger version.

    The command is a tag on the challenger version; the driver acts on it within ``poll_s`` seconds.
    """
    aliases = registry.existing_aliases(client, model)
    version = aliases.get(registry.CHALLENGER)
    if version is None:
        raise RolloutError(f"{model!r} has no @challenger, so no rollout can be running (aliases: {aliases})")
    status = client.get_model_version(model, version).tags.get(STATUS_TAG)
    if status not in ("running", "paused"):
        raise RolloutError(f"no rollout of {model} v{version} is running (kiln.rollout.status={status or 'none'}); "
                           f"start one with `kiln rollout {model}`")
    payload = {"command": command, "by": actor, "reason": reason, "id": uuid.uuid4().hex, "at": audit.now_iso()}
    client.set_model_version_tag(model, version, COMMAND_TAG, json.dumps(payload))
    return version


def _take_command(client: MlflowClient, model: str, version: str) -> dict[str, str] | None:
    raw = client.get_model_version(model, version).tags.get(COMMAND_TAG)
    if not raw:
        return None
    with contextlib.suppress(MlflowException):
        client.delete_model_version_tag(model, version, COMMAND_TAG)  # consumed: acted on exactly once
    try:
        command = json.loads(raw)
    except json.JSONDecodeError:
        command = {"command": raw.strip()}  # typed by hand in the MLflow UI: "pause"
    if command.get("command") not in ("pause", "resume", "promote", "abort"):
        log.warning("ignoring unknown rollout command %r on %s v%s", raw[:80], model, version)
        return None
    command.setdefault("by", "mlflow-ui")
    command.setdefault("reason", "")
    return command


# ── the driver ────────────────────────────────────────────────────────────────────────────────────────
DriftJudge = Callable[[dict[str, Any]], list[Check]]


class RolloutDriver:
    """Runs one rollout to an end (promoted, rolled back or aborted) and returns its final state."""

    def __init__(self, settings: Settings, client: MlflowClient, gateway: GatewayAdmin, spec: RolloutSpec, model: str,
                 *, actor: str, poll_s: float = 1.0, drift: DriftJudge | None = None,
                 echo: Callable[[str], None] | None = None) -> None:
        self.settings, self.client, self.gateway, self.spec = settings, client, gateway, spec
        self.poll_s, self.drift, self.actor = poll_s, drift, actor
        self._last_command: dict[str, str] = {"by": actor, "reason": ""}  # the command that ended a wait
        self.echo = echo or log.info
        self.store = RolloutStore(settings.home)
        aliases = registry.existing_aliases(client, model)
        challenger = aliases.get(registry.CHALLENGER)
        if challenger is None:
            raise RolloutError(f"{model!r} has no @challenger to roll out (aliases: {aliases}); run "
                               "`kiln optimize` first")
        mv = client.get_model_version(model, challenger)
        if mv.tags.get("kiln.gate") != "passed":
            raise RolloutError(f"{model} v{challenger} did not pass its gate (kiln.gate="
                               f"{mv.tags.get('kiln.gate', 'missing')}); only a gated challenger is rolled out")
        self.state = RolloutState(model=model, challenger=challenger, champion=aliases.get(registry.CHAMPION),
                                  gateway=gateway.url, steps=len(spec.steps), actor=actor)

    # -- bookkeeping --
    def _save(self, message: str | None = None, **tags: str) -> None:
        if message is not None:
            self.state.message = message
        self.store.save(self.state)
        s = self.state
        summary = {STATUS_TAG: s.status, "kiln.rollout.step": f"{s.step + 1}/{s.steps}",
                   "kiln.rollout.weight": f"{s.weight:g}", "kiln.rollout.message": s.message[:500]} | tags
        for key, value in summary.items():
            self.client.set_model_version_tag(s.model, s.challenger, key, value)

    def _say(self, message: str) -> None:
        self.echo(f"[{self.state.model} v{self.state.challenger}] {message}")

    def _route(self, weight: float, shadow: float) -> None:
        self.gateway.route(weight, shadow)
        self.state.weight, self.state.shadow = weight, shadow

    def _log_verdict(self, verdict: Verdict) -> None:
        if self.state.run_id is None:
            return
        figures = {k: v for k, v in verdict.figures.items() if v is not None}
        stamp = int(time.time() * 1000)
        for key, value in {**figures, "weight": verdict.weight}.items():
            self.client.log_metric(self.state.run_id, key, float(value), stamp, verdict.analysis)

    # -- the run --
    def run(self) -> RolloutState:
        lock = _RolloutLock(self.settings.home, self.state.model)
        with lock:
            self._open_run()
            try:
                self._loop()
            except BaseException as exc:
                if self.state.status not in FINAL:  # an error must not leave live traffic on an unjudged model
                    with contextlib.suppress(Exception):
                        self._route(0.0, 0.0)
                    self.state.status = "aborted"
                    with contextlib.suppress(Exception):
                        self._save(f"stopped by an error, traffic back on the champion: {exc}"[:500])
                raise
            finally:
                self._close_run()
        return self.state

    def _open_run(self) -> None:
        try:
            experiment = registry.ensure_experiment(self.client, self.settings)
            run = self.client.create_run(experiment, run_name=f"rollout {self.state.model} v{self.state.challenger}",
                                         tags={"kiln.kind": "rollout", "kiln.model": self.state.model,
                                               "kiln.challenger": self.state.challenger,
                                               "kiln.champion": self.state.champion or ""})
            self.state.run_id = run.info.run_id
            self.client.log_dict(run.info.run_id, self.spec.model_dump(mode="json"), "rollout-spec.json")
        except MlflowException as exc:  # the rollout's safety does not depend on its report
            log.warning("could not open an MLflow run for the rollout: %s", exc)

    def _plot(self) -> None:
        """``<home>/rollouts/<model>-v<challenger>.png``: every analysis at a glance (logged to the run too)."""
        if not self.state.verdicts:
            return
        from kiln.tasks.reports.plots import rollout_png

        s = self.state
        path = self.store.folder / (self.store.path(s.model).stem + f"-v{s.challenger}.png")
        try:
            rollout_png([v.model_dump() for v in s.verdicts], f"Rollout of {s.model} v{s.challenger} vs champion "
                        f"v{s.champion}: {s.status.replace('_', ' ')}", path)
        except Exception as exc:  # noqa: BLE001 - a report must never change how a rollout ended
            log.warning("could not draw the rollout plot: %s", exc)
            return
        s.plot = str(path)
        self.store.save(s)
        if s.run_id is not None:
            with contextlib.suppress(MlflowException, OSError):
                self.client.log_artifact(s.run_id, str(path))

    def _close_run(self) -> None:
        self._plot()
        if self.state.run_id is None:
            return
        with contextlib.suppress(MlflowException):
            self.client.log_dict(self.state.run_id, self.state.model_dump(mode="json"), "rollout-state.json")
            end = {"promoted": "FINISHED", "rolled_back": "FAILED"}.get(self.state.status, "KILLED")
            self.client.set_terminated(self.state.run_id, end)

    def _loop(self) -> None:
        spec, s = self.spec, self.state
        history: list[StepVerdict] = []
        self._say(f"rolling out v{s.challenger} against champion v{s.champion} in {len(spec.steps)} steps")
        self._save("starting")
        if spec.steps[0].manual_gate:
            outcome = self._paused("step 1 has a manual gate: waiting for `kiln rollout resume`")
            if outcome != "resume":
                return self._finish(outcome)
        while True:
            step = spec.steps[s.step]
            self._route(step.weight, step.shadow)
            self.gateway.reset()  # traffic before this point belongs to no analysis
            self._save(f"step {s.step + 1}/{len(spec.steps)}: weight {step.weight:g}%, shadow {step.shadow:g}; "
                       f"analysing for {step.analysis_s:g}s")
            self._say(s.message)
            outcome = self._wait(step.analysis_s)
            if outcome == "restart":
                continue
            if outcome != "done":
                return self._finish(outcome)
            window = self.gateway.reset()
            verdict = self._judge(window)
            history.append(verdict)
            action = next_action(spec, s.step, history)
            record = Verdict(analysis=len(s.verdicts), step=s.step, weight=step.weight, shadow=step.shadow,
                             outcome=verdict.outcome, action=action.kind, reasons=verdict.reasons,
                             figures=_figures(window, verdict))
            s.verdicts.append(record)
            self._log_verdict(record)
            self._say(f"analysis {record.analysis + 1}: {verdict.outcome.upper()} → {action.kind}")
            for reason in verdict.reasons:
                self._say(f"  {reason}")
            if action.kind == "rollback":
                failed = [c.reason for c in verdict.checks if c.status == "failed"]
                return self._rollback("; ".join([action.reasons[0], *failed]), by="kiln-canary")
            if action.kind == "promote":
                return self._promote(f"canary passed all {len(spec.steps)} steps", by=self.actor)
            if action.kind == "pause":
                s.step = action.step
                outcome = self._paused(action.reasons[0])
                if outcome != "resume":
                    return self._finish(outcome)
                # A person looked: forget the inconclusive streak that paused us (failures still count).
                history = [v for v in history if v.outcome != "inconclusive"]
                continue
            s.step = action.step

    def _judge(self, window: dict[str, Any]) -> StepVerdict:
        self._check_versions()
        stats = stats_from_state(window)
        step = self.spec.steps[self.state.step]
        champion = None if step.weight >= 100 else stats[CHAMPION]
        verdict = judge_step(self.spec, champion, stats[CHALLENGER])
        if self.drift is not None:
            verdict = with_checks(verdict, self.drift(window))
        return verdict

    def _check_versions(self) -> None:
        """The gateway must be routing to the versions this rollout judges, or its evidence is about another model."""
        upstreams = self.gateway.state().get("upstreams", {})
        expected = {CHALLENGER: self.state.challenger, CHAMPION: self.state.champion}
        for role, version in expected.items():
            served = (upstreams.get(role) or {}).get("version")
            if served and version and str(served) != str(version):
                raise RolloutError(f"the gateway's {role} upstream serves v{served}, but @{role} of "
                                   f"{self.state.model} is v{version}; point the gateway at the right model server")

    def _wait(self, seconds: float) -> str:
        """Sleep through an analysis interval, acting on commands; returns done, restart, abort or promote."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(self.poll_s, left))
            command = _take_command(self.client, self.state.model, self.state.challenger)
            if command is None or command["command"] == "resume":
                continue
            self._audit_command(command)
            if command["command"] == "pause":
                outcome = self._paused(f"paused by {command['by']}: {command['reason'] or 'no reason given'}")
                return "restart" if outcome == "resume" else outcome
            return self._as_outcome(command)
        return "done"

    def _paused(self, why: str) -> str:
        """Hold the current traffic split until someone resumes, promotes or aborts."""
        self.state.status = "paused"
        self._save(why)
        self._say(f"PAUSED: {why}; `kiln rollout resume|promote|abort {self.state.model}`")
        while True:
            time.sleep(self.poll_s)
            command = _take_command(self.client, self.state.model, self.state.challenger)
            if command is None or command["command"] == "pause":
                continue
            self._audit_command(command)
            if command["command"] == "resume":
                self.state.status = "running"
                self._save(f"resumed by {command['by']}")
                self._say(f"resumed by {command['by']}")
                return "resume"
            return self._as_outcome(command)

    def _as_outcome(self, command: dict[str, str]) -> str:
        self._last_command = command
        return command["command"]

    def _audit_command(self, command: dict[str, str]) -> None:
        audit.AuditLog.under(self.settings.home).append(audit.AuditEvent(
            self.state.model, self.state.challenger, f"rollout_{command['command']}", command["by"],
            command.get("reason", "")))

    def _finish(self, outcome: str) -> None:
        command = self._last_command
        reason = command.get("reason") or "no reason given"
        if outcome == "promote":
            return self._promote(f"promoted by hand during the canary: {reason}", by=command["by"])
        return self._rollback(f"aborted by {command['by']}: {reason}", by=command["by"], status="aborted")

    def _promote(self, reason: str, *, by: str) -> None:
        from kiln.tasks.lifecycle import promotion  # the one place aliases move

        s = self.state
        promotion.promote(self.client, s.model, approver=by, reason=reason, home=self.settings.home,
                          expected_challenger=s.challenger, require_approval=False)
        s.status = "promoted"
        self._save(f"promoted: {reason}. The gateway still sends {s.weight:g}% to v{s.challenger}; it is now "
                   "@champion, so repoint the gateway's champion upstream at it and set the weight to 0")
        audit.AuditLog.under(self.settings.home).append(
            audit.AuditEvent(s.model, s.challenger, CANARY_PROMOTED, by, reason,
                             details={"verdicts": len(s.verdicts), "replaced": s.champion}))
        self._say(f"PROMOTED v{s.challenger} to @champion ({reason})")

    def _rollback(self, reason: str, *, by: str, status: Status = "rolled_back") -> None:
        """Traffic back on the champion first, then the record: the champion's alias is never touched."""
        from kiln.tasks.lifecycle.promotion import ModelLock

        s = self.state
        self._route(0.0, 0.0)
        s.status = status
        self._save(f"{status.replace('_', ' ')}: {reason}", **{"kiln.rollout.reason": reason[:500],
                                                                "kiln.rollout.ended_at": audit.now_iso()})
        with ModelLock(self.client, s.model, self.settings.home):
            if registry.aliases_of(self.client, s.model).get(registry.CHALLENGER) == s.challenger:
                # A challenger that failed its canary must not be promoted by accident later.
                self.client.delete_registered_model_alias(s.model, registry.CHALLENGER)
        audit.AuditLog.under(self.settings.home).append(
            audit.AuditEvent(s.model, s.challenger, CANARY_ROLLED_BACK, by, reason,
                             details={"status": status, "verdicts": len(s.verdicts), "champion": s.champion}))
        self._say(f"{status.upper().replace('_', ' ')}: weight 0, @champion v{s.champion} untouched, "
                  f"@challenger removed ({reason})")


def _figures(window: dict[str, Any], verdict: StepVerdict) -> dict[str, float | None]:
    stats = stats_from_state(window)
    ch, cp = stats[CHALLENGER], stats[CHAMPION]
    p95c, p95p = ch.quantile_ms(0.95), cp.quantile_ms(0.95)
    return {"challenger_requests": float(ch.requests), "champion_requests": float(cp.requests),
            "challenger_error_rate": ch.error_rate, "champion_error_rate": cp.error_rate,
            "challenger_p95_ms": p95c, "champion_p95_ms": p95p,
            "p95_ratio": p95c / p95p if p95c and p95p else None,
            "agreement": ch.agreement, "challenger_accuracy": ch.accuracy, "champion_accuracy": cp.accuracy,
            "passed": 1.0 if verdict.outcome == "pass" else 0.0}


class _RolloutLock:
    """One rollout per model per machine: a second `kiln rollout NAME` fails fast instead of fighting."""

    def __init__(self, home: Path, model: str) -> None:
        self.path = home / "locks" / ("rollout-" + re.sub(r"[^\w.-]", "_", model) + ".lock")
        self.model = model
        self._fd: int | None = None

    def __enter__(self) -> _RolloutLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise RolloutError(f"a rollout of {self.model!r} is already running on this machine; "
                               f"see `kiln rollout status {self.model}`") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# ── entry point for the flow and the CLI ──────────────────────────────────────────────────────────────
def load_rollout_spec(path: str | None) -> RolloutSpec:
    return load_spec(Path(path) if path else DEFAULT_SPEC)


def preflight(params: RolloutParams, settings: Settings) -> tuple[RolloutSpec, GatewayAdmin]:
    """Everything that can be wrong before traffic moves: the spec, the token, the gateway. Raises KilnError."""
    spec = load_rollout_spec(params.spec)
    token = settings.gateway_token.get_secret_value() if settings.gateway_token else ""
    gateway = GatewayAdmin(params.gateway, token)
    try:
        gateway.state()  # reachable, and the token works
    except BaseException:
        gateway.close()
        raise
    return spec, gateway


def run_rollout(params: RolloutParams, settings: Settings, *, drift: DriftJudge | None = None,
                echo: Callable[[str], None] | None = None) -> RolloutState:
    """Validate everything, then drive the rollout to its end; raises :class:`KilnError` on bad input."""
    spec, gateway = preflight(params, settings)
    try:
        client = registry.connect(settings)
        judge = drift if drift is not None else default_drift(spec, client, params.model, settings)
        driver = RolloutDriver(settings, client, gateway, spec, params.model,
                               actor=params.actor or audit.current_user(), poll_s=params.poll_s, drift=judge,
                               echo=echo)
        return driver.run()
    finally:
        gateway.close()


def default_drift(spec: RolloutSpec, client: MlflowClient, model: str, settings: Settings) -> DriftJudge | None:
    """Drift checks for each analysis window, when the spec asks for them; the reference is profiled once."""
    cfg = spec.drift
    if cfg is None:
        return None
    from kiln.tasks.rollout import drift

    reference = drift.load_reference(cfg.reference) if cfg.reference else _recorded_reference(client, model)

    def judge(window: dict[str, Any]) -> list[Check]:
        return drift.drift_checks(cfg, reference, *drift.observed_from_state(window))

    return judge


def _recorded_reference(client: MlflowClient, model: str):  # noqa: ANN202 - tasks.drift is imported lazily
    """The test split of the dataset recorded on the champion (what its quality was measured on)."""
    from kiln.tasks.data.datasets import DatasetSpec, load_splits
    from kiln.tasks.rollout import drift

    aliases = registry.existing_aliases(client, model)
    champion = aliases.get(registry.CHAMPION) or aliases.get(registry.CHALLENGER)
    raw = client.get_model_version(model, champion).tags.get("kiln.dataset") if champion else None
    if not raw:
        raise ConfigError(f"drift checks need a reference: {model} v{champion} records no dataset (kiln.dataset); "
                          "set drift.reference in the rollout spec to a CSV/Parquet/JSONL file with a text column")
    test = load_splits(DatasetSpec(**json.loads(raw))).test
    return drift.reference_profile(test["text"].tolist(), test["label"].tolist() if "label" in test else None)


def describe(state: RolloutState) -> list[str]:
    """Lines for `kiln rollout status`."""
    out = [f"{state.model}: v{state.challenger} vs champion v{state.champion} — {state.status.upper()} "
           f"at step {state.step + 1}/{state.steps}, weight {state.weight:g}%, shadow {state.shadow:g}",
           f"  {state.message}", f"  gateway {state.gateway}; started {state.started_at} by {state.actor}; "
           f"updated {state.updated_at}"]
    for v in state.verdicts:
        out.append(f"  #{v.analysis + 1} step {v.step + 1} ({v.weight:g}%): {v.outcome} → {v.action}")
        out.extend(f"      {r}" for r in v.reasons)
    if state.plot:
        out.append(f"  plot: {state.plot}")
    return out

