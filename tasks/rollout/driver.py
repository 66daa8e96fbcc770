"""The canary rollout driver: set the router's split, wait, judge, then go forward, pause or roll back.

    step 0: weight/shadow ─► analysis interval ─► judge (thresholds, rank test, drift) ─► next_action
      advance → next step · repeat → analyse again · pause → wait for `kiln rollout resume`
      promote (after the last step) → lifecycle.promotion (aliases moved by registry.aliases)
      rollback → weight 0, @challenger withdrawn, version tagged

Where its state lives, and why:
- the full state (every verdict with its reasons) in ``<KILN_HOME>/rollouts/<model>.json``
  (:mod:`~kiln.tasks.rollout.state`), so ``kiln rollout status`` can show the whole story;
- a summary on the challenger version's tags (:mod:`~kiln.tasks.rollout.status`), so the MLflow UI and
  any machine sharing the registry sees where a rollout stands;
- commands (pause, resume, promote, abort) as a tag on the challenger (:mod:`~kiln.tasks.rollout.commands`);
- each verdict's figures as metrics of one MLflow run per rollout (:mod:`~kiln.tasks.rollout.tracking`).

Traffic moves through a :class:`~kiln.tasks.rollout.router.CanaryRouter` (the Kiln gateway today); its
analysis windows never overlap, each one is closed and returned by ``next_window()``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from mlflow.tracking import MlflowClient

from kiln.settings import Settings
from kiln.tasks.core import tags as vocab
from kiln.tasks.lifecycle import promotion
from kiln.tasks.registry import aliases, audit
from kiln.tasks.registry import client as registry
from kiln.tasks.rollout import tracking
from kiln.tasks.rollout.commands import take_command
from kiln.tasks.rollout.judge import (
    CHALLENGER,
    CHAMPION,
    Check,
    RolloutSpec,
    StepVerdict,
    judge_step,
    next_action,
    stats_from_state,
    with_checks,
)
from kiln.tasks.rollout.params import RolloutError
from kiln.tasks.rollout.router import ALL_ON_CHAMPION, CanaryRouter, Split
from kiln.tasks.rollout.state import FINAL, RolloutLock, RolloutState, RolloutStore, Status, Verdict
from kiln.tasks.rollout.status import summary_tags

log = logging.getLogger(__name__)

DriftJudge = Callable[[dict[str, Any]], list[Check]]


class RolloutDriver:
    """Runs one rollout to an end (promoted, rolled back or aborted) and returns its final state."""

    def __init__(self, settings: Settings, client: MlflowClient, router: CanaryRouter, spec: RolloutSpec, model: str,
                 *, actor: str, poll_s: float = 1.0, drift: DriftJudge | None = None,
                 echo: Callable[[str], None] | None = None) -> None:
        self.settings, self.client, self.router, self.spec = settings, client, router, spec
        self.poll_s, self.drift, self.actor = poll_s, drift, actor
        self._last_command: dict[str, str] = {"by": actor, "reason": ""}  # the command that ended a wait
        self.echo = echo or log.info
        self.store = RolloutStore(settings.home)
        now = registry.existing_aliases(client, model)
        challenger = now.get(vocab.CHALLENGER)
        if challenger is None:
            raise RolloutError(f"{model!r} has no @challenger to roll out (aliases: {now}); run "
                               "`kiln optimize` first")
        mv = client.get_model_version(model, challenger)
        if not vocab.gate_passed(mv.tags):
            raise RolloutError(f"{model} v{challenger} did not pass its gate ({vocab.GATE}="
                               f"{mv.tags.get(vocab.GATE, 'missing')}); only a gated challenger is rolled out")
        self.state = RolloutState(model=model, challenger=challenger, champion=now.get(vocab.CHAMPION),
                                  gateway=router.url, steps=len(spec.steps), actor=actor)

    # -- bookkeeping --
    def _save(self, message: str | None = None, **tags: str) -> None:
        if message is not None:
            self.state.message = message
        self.store.save(self.state)
        s = self.state
        for key, value in (summary_tags(s) | tags).items():
            self.client.set_model_version_tag(s.model, s.challenger, key, value)

    def _say(self, message: str) -> None:
        self.echo(f"[{self.state.model} v{self.state.challenger}] {message}")

    def _route(self, split: Split) -> None:
        self.router.set_split(split)
        self.state.weight, self.state.shadow = split.weight, split.shadow

    def _all_on_champion(self) -> None:
        self.router.roll_back()
        self.state.weight, self.state.shadow = ALL_ON_CHAMPION.weight, ALL_ON_CHAMPION.shadow

    # -- the run --
    def run(self) -> RolloutState:
        """Drive the rollout to its end under the per-machine rollout lock; returns the final state."""
        with RolloutLock(self.settings.home, self.state.model):
            tracking.open_run(self.client, self.settings, self.state, self.spec)
            try:
                self._loop()
            except BaseException as exc:
                if self.state.status not in FINAL:  # an error must not leave live traffic on an unjudged model
                    with contextlib.suppress(Exception):
                        self._all_on_champion()
                    self.state.status = "aborted"
                    with contextlib.suppress(Exception):
                        self._save(f"stopped by an error, traffic back on the champion: {exc}"[:500])
                raise
            finally:
                tracking.close_run(self.client, self.state, self.store)
        return self.state

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
            self._route(Split(step.weight, step.shadow))
            self.router.next_window()  # traffic before this point belongs to no analysis
            self._save(f"step {s.step + 1}/{len(spec.steps)}: weight {step.weight:g}%, shadow {step.shadow:g}; "
                       f"analysing for {step.analysis_s:g}s")
            self._say(s.message)
            outcome = self._wait(step.analysis_s)
            if outcome == "restart":
                continue
            if outcome != "done":
                return self._finish(outcome)
            window = self.router.next_window()
            verdict = self._judge(window)
            history.append(verdict)
            action = next_action(spec, s.step, history)
            record = Verdict(analysis=len(s.verdicts), step=s.step, weight=step.weight, shadow=step.shadow,
                             outcome=verdict.outcome, action=action.kind, reasons=verdict.reasons,
                             figures=_figures(window, verdict))
            s.verdicts.append(record)
            tracking.log_verdict(self.client, s, record)
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
        """The router must send traffic to the versions this rollout judges, or its evidence is about another model."""
        served = self.router.served_versions()
        expected = {CHALLENGER: self.state.challenger, CHAMPION: self.state.champion}
        for role, version in expected.items():
            serving = served.get(role)
            if serving and version and str(serving) != str(version):
                raise RolloutError(f"the gateway's {role} upstream serves v{serving}, but @{role} of "
                                   f"{self.state.model} is v{version}; point the gateway at the right model server")

    def _wait(self, seconds: float) -> str:
        """Sleep through an analysis interval, acting on commands; returns done, restart, abort or promote."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(self.poll_s, left))
            command = take_command(self.client, self.state.model, self.state.challenger)
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
            command = take_command(self.client, self.state.model, self.state.challenger)
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
            self.state.model, self.state.challenger, vocab.rollout_command_event(command["command"]), command["by"],
            command.get("reason", "")))

    def _finish(self, outcome: str) -> None:
        command = self._last_command
        reason = command.get("reason") or "no reason given"
        if outcome == "promote":
            return self._promote(f"promoted by hand during the canary: {reason}", by=command["by"])
        return self._rollback(f"aborted by {command['by']}: {reason}", by=command["by"], status="aborted")

    def _promote(self, reason: str, *, by: str) -> None:
        """Promotion checks and records; the aliases move under the model's lock in registry.aliases."""
        s = self.state
        promotion.promote(self.client, s.model, approver=by, reason=reason, home=self.settings.home,
                          expected_challenger=s.challenger, require_approval=False)
        s.status = "promoted"
        note = self.router.promote(s.challenger)
        self._save(f"promoted: {reason}" + (f". {note}" if note else ""))
        audit.AuditLog.under(self.settings.home).append(
            audit.AuditEvent(s.model, s.challenger, vocab.EVENT_CANARY_PROMOTED, by, reason,
                             details={"verdicts": len(s.verdicts), "replaced": s.champion}))
        self._say(f"PROMOTED v{s.challenger} to @champion ({reason})")

    def _rollback(self, reason: str, *, by: str, status: Status = "rolled_back") -> None:
        """Traffic back on the champion first, then the record: the champion's alias is never touched."""
        s = self.state
        self._all_on_champion()
        s.status = status
        self._save(f"{status.replace('_', ' ')}: {reason}", **{vocab.ROLLOUT_REASON: reason[:500],
                                                                vocab.ROLLOUT_ENDED_AT: audit.now_iso()})
        # A challenger that failed its canary must not be promoted by accident later.
        aliases.withdraw(self.client, s.model, s.challenger, home=self.settings.home)
        audit.AuditLog.under(self.settings.home).append(
            audit.AuditEvent(s.model, s.challenger, vocab.EVENT_CANARY_ROLLED_BACK, by, reason,
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
