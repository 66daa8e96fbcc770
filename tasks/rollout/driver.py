"""The canary rollout driver: set the router's split, wait, judge, then go forward, pause or roll back.

    step 0: weight/shadow ─► analysis interval ─► judge (thresholds, rank test, drift) ─► next_action
      advance → next step · repeat → analyse again · pause → wait for `kiln rollout resume`
      promote (after the last step) → lifecycle.promotion (aliases moved by registry.aliases)
      rollback → weight 0, @challenger withdrawn, version tagged

The rollout holds the model's lease (:class:`~kiln.tasks.registry.lease.ModelLease`, purpose ``rollout``)
from its first step to its end, and promotes or withdraws under that same lease: no publish, promotion
or rollback of the model overtakes it meanwhile. A lease lost on the way (not renewed, broken) stops the
rollout with traffic back on the champion.

Where its state lives, and why:
- the full state (every verdict with its reasons) in ``<KILN_HOME>/rollouts/<model>.json``
  (:mod:`~kiln.tasks.rollout.state`), so ``kiln rollout status`` can show the whole story;
- a summary on the challenger version's tags (:mod:`~kiln.tasks.rollout.status`), so the MLflow UI and
  any machine sharing the registry sees where a rollout stands;
- commands (pause, resume, promote, abort) as a signed statement in a tag on the challenger, bound to this
  rollout's id (:mod:`~kiln.tasks.rollout.commands`); unsigned or foreign ones are ignored with a note;
- each verdict's figures as metrics of one MLflow run per rollout (:mod:`~kiln.tasks.rollout.tracking`).

Traffic moves through a :class:`~kiln.tasks.rollout.router.CanaryRouter` (the Kiln gateway, or a Kubernetes
router paired with a metrics provider); its analysis windows never overlap, each one is closed and returned by
``next_window()``; what the driver says about traffic is in the router's words (:mod:`.traffic_checks`).
Each step's split is set with a TTL (the lease's) and renewed from the driver's own loop at the lease's rhythm,
so a driver that dies leaves a split that lapses back to the champion (on Kubernetes, reverted by the next Kiln
command that finds its lease lapsed); a promotion hands the traffic over (``router.promote``) once
the champion's server follows the moved alias.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from mlflow.tracking import MlflowClient

from kiln.settings import Settings
from kiln.tasks.core import tags as vocab
from kiln.tasks.lifecycle import promotion
from kiln.tasks.lifecycle.approvals import DecisionState, Trust
from kiln.tasks.registry import aliases, audit
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.lease import ModelLease
from kiln.tasks.registry.nominations import close_nomination
from kiln.tasks.rollout import tracking
from kiln.tasks.rollout.commands import CommandReader
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
from kiln.tasks.rollout.router import ALL_ON_CHAMPION, CanaryRouter, Split, SplitLapsed
from kiln.tasks.rollout.state import FINAL, RolloutLock, RolloutState, RolloutStore, Status, Verdict
from kiln.tasks.rollout.status import summary_tags, verdict_figures
from kiln.tasks.rollout.traffic_checks import check_versions, reset_after_error

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
        self.lease: ModelLease | None = None  # held while run() runs
        self._split_ttl: float | None = None  # the TTL of the split this rollout set (None: it holds none)
        self._split_renewed = 0.0  # monotonic time the split was last set or renewed
        self.commands: CommandReader | None = None  # bound to this rollout's id once run() starts
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
        for key, value in (tags | summary_tags(s)).items():  # the status tag last (see summary_tags)
            self.client.set_model_version_tag(s.model, s.challenger, key, value)

    def _say(self, message: str) -> None:
        self.echo(f"[{self.state.model} v{self.state.challenger}] {message}")

    def _route(self, split: Split) -> None:
        # The lease's TTL, so traffic returns to the champion when the lease of a dead driver lapses; at least three
        # polls, so a slow poll interval cannot let a live driver's split lapse.
        ttl = max(self.lease.ttl_s, 3 * self.poll_s)
        self.router.set_split(split, ttl_s=ttl)
        self._split_ttl, self._split_renewed = ttl, time.monotonic()
        self.state.weight, self.state.shadow = split.weight, split.shadow

    def _renew_split(self) -> None:
        """Renew the split's TTL every third of it (the lease's rhythm), from this loop: only a live driver renews.
        A lapsed split stops the rollout (traffic is on the champion); an unreachable router is retried each poll
        until the split would have lapsed (a gateway restarting keeps its split in its state file)."""
        since = time.monotonic() - self._split_renewed
        if self._split_ttl is None or since < self._split_ttl / 3:
            return
        try:
            self.router.renew(self._split_ttl)
        except SplitLapsed:
            raise
        except RolloutError as exc:
            if since >= self._split_ttl:
                raise
            log.warning("could not renew the traffic split (%s); retrying", exc)
            return
        self._split_renewed = time.monotonic()

    def _all_on_champion(self) -> None:
        self._split_ttl = None
        self.router.roll_back()
        self.state.weight, self.state.shadow = ALL_ON_CHAMPION.weight, ALL_ON_CHAMPION.shadow

    def _reset_after_error(self) -> str:
        """All traffic back on the champion after an error, and where traffic truly stands (see traffic_checks)."""
        return reset_after_error(self.router, self._all_on_champion, self._split_ttl)

    # -- the run --
    def run(self) -> RolloutState:
        """Drive the rollout to its end under the per-machine rollout lock and the model's lease; returns the
        final state."""
        s = self.state
        ttl = {"ttl_s": self.settings.rollout_lease_s} if self.settings.rollout_lease_s else {}  # else the default
        with RolloutLock(self.settings.home, s.model), ModelLease(self.client, s.model, self.settings.home,
                                                                  purpose="rollout", version=s.challenger,
                                                                  **ttl) as lease:
            self.lease = lease
            tracking.open_run(self.client, self.settings, self.state, self.spec)
            self.commands = CommandReader(self.client, Trust.from_settings(self.settings), s.model, s.challenger,
                                          s.run_id or uuid.uuid4().hex)
            try:
                self._loop()
            except BaseException as exc:
                if self.state.status not in FINAL:  # an error must not leave live traffic on an unjudged model
                    traffic = self._reset_after_error()
                    self.state.status = "aborted"
                    with contextlib.suppress(Exception):
                        self._save(f"stopped by an error, {traffic}: {exc}"[:500])
                    with contextlib.suppress(Exception):
                        self._say(f"STOPPED by an error, {traffic}")
                raise
            finally:
                tracking.close_run(self.client, self.state, self.store)
        return self.state

    def _loop(self) -> None:
        spec, s = self.spec, self.state
        history: list[StepVerdict] = []
        self._check_versions(require_known=False)  # a gateway in front of other versions: refuse before traffic moves
        self._say(f"rolling out v{s.challenger} against champion v{s.champion} in {len(spec.steps)} steps")
        self._save("starting", **{vocab.ROLLOUT_ID: self.commands.rollout})
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
                             figures=verdict_figures(window, verdict))
            s.verdicts.append(record)
            tracking.log_verdict(self.client, s, record)
            self._say(f"analysis {record.analysis + 1}: {verdict.outcome.upper()} → {action.kind}")
            for reason in verdict.reasons:
                self._say(f"  {reason}")
            if action.kind == "rollback":
                failed = [c.reason for c in verdict.checks if c.status == "failed"]
                return self._rollback("; ".join([action.reasons[0], *failed]), by="kiln-canary")
            if action.kind == "promote":
                return self._promote_when_approved(f"canary passed all {len(spec.steps)} steps")
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
        self.lease.ensure()  # a rollout that lost its lease stops (traffic back on the champion)
        self._renew_split()
        self._check_versions()
        stats = stats_from_state(window)
        step = self.spec.steps[self.state.step]
        champion = None if step.weight >= 100 else stats[CHAMPION]
        verdict = judge_step(self.spec, champion, stats[CHALLENGER])
        if self.drift is not None:
            verdict = with_checks(verdict, self.drift(window))
        return verdict

    def _check_versions(self, *, require_known: bool = True) -> None:
        """The router must send traffic to the versions this rollout judges (fails closed once a window was judged:
        ``require_known``); see :func:`~kiln.tasks.rollout.traffic_checks.check_versions`."""
        s = self.state
        check_versions(self.router, s.model, {CHALLENGER: s.challenger, CHAMPION: s.champion},
                       require_known=require_known)

    def _wait(self, seconds: float) -> str:
        """Sleep through an analysis interval, acting on commands; returns done, restart, abort or promote."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(self.poll_s, left))
            command = self._take_command()
            if command is None or command["command"] == "resume":
                continue
            self._audit_command(command)
            if command["command"] == "pause":
                outcome = self._paused(f"paused by {command['by']}: {command['reason'] or 'no reason given'}")
                return "restart" if outcome == "resume" else outcome
            return self._as_outcome(command)
        return "done"

    def _paused(self, why: str, *, until: Callable[[], bool] | None = None) -> str:
        """Hold the current traffic split until someone resumes, promotes or aborts (or ``until()`` says
        "decided", which returns ``decided``)."""
        self.state.status = "paused"
        self._save(why)
        self._say(f"PAUSED: {why}; `kiln rollout resume|promote|abort {self.state.model}`")
        while True:
            time.sleep(self.poll_s)
            if until is not None and until():
                self.state.status = "running"
                return "decided"
            command = self._take_command()
            if command is None or command["command"] == "pause":
                continue
            self._audit_command(command)
            if command["command"] == "resume":
                self.state.status = "running"
                self._save(f"resumed by {command['by']}")
                self._say(f"resumed by {command['by']}")
                return "resume"
            return self._as_outcome(command)

    def _take_command(self) -> dict[str, str] | None:
        """The next verified command for this rollout; ignored ones leave a note. A ``promote`` counts only
        when the challenger's signed decisions already say approved: the command skips steps, never approval."""
        self.lease.ensure()  # every poll: a rollout that lost its lease stops, even while paused
        self._renew_split()
        command, ignored = self.commands.take()
        if ignored is None and command is not None and command["command"] == "promote":
            refusal = self._decision()[1]
            if refusal is not None:
                command, ignored = None, f"ignored {command['by']}'s promote: {refusal}"
        if ignored is not None:
            self._note(ignored)
        return command

    def _note(self, note: str) -> None:
        """Say why a command was ignored: in the status (state, tags), the audit log and the output."""
        s = self.state
        s.notes.append(f"{audit.now_iso()} {note}")
        self._save(None, **{vocab.ROLLOUT_NOTE: note[:500]})
        audit.AuditLog.under(self.settings.home).append(audit.AuditEvent(
            s.model, s.challenger, vocab.EVENT_ROLLOUT_COMMAND_IGNORED, "kiln-canary", note))
        self._say(f"NOTE: {note}")

    def _decision(self) -> tuple[DecisionState, str | None]:
        """Where the challenger's signed decisions stand, and why it may not be promoted now (None: it may)."""
        s = self.state
        state = promotion.decision_on(self.client, s.model, s.challenger, self.settings)
        return state, promotion.refusal(state, self.client.get_model_version(s.model, s.challenger))

    def _promote_when_approved(self, reason: str) -> None:
        """The canary passed: promote once the signed decisions say approved; roll back if they say rejected."""
        def decided() -> bool:
            state, refusal = self._decision()
            return refusal is None or state.outcome == vocab.REJECTED

        while True:
            state, refusal = self._decision()
            if refusal is None:
                return self._promote(reason, by=self.actor)
            if state.outcome == vocab.REJECTED:
                return self._rollback(f"{reason}, but {refusal}", by=state.deciders)
            outcome = self._paused(f"{reason}; waiting for a signed approval: {refusal} (then it promotes)",
                                   until=decided)
            if outcome not in ("decided", "resume", "promote"):
                return self._finish(outcome)

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
        """Promotion checks and records; the aliases move under the rollout's lease in registry.aliases."""
        s = self.state
        promotion.promote(self.client, s.model, approver=by, reason=reason, home=self.settings.home,
                          expected_challenger=s.challenger, lease=self.lease, settings=self.settings)
        s.status = "promoted"
        note = self.router.promote(s.challenger)  # waits (bounded) for the champion's server to follow the alias
        self._split_ttl = None
        if not note:
            s.weight, s.shadow = ALL_ON_CHAMPION.weight, ALL_ON_CHAMPION.shadow
        self._save(f"promoted: {reason}" + (f". {note}" if note else f"; all traffic on the champion, v{s.challenger}"))
        audit.AuditLog.under(self.settings.home).append(
            audit.AuditEvent(s.model, s.challenger, vocab.EVENT_CANARY_PROMOTED, by, reason,
                             details={"verdicts": len(s.verdicts), "replaced": s.champion}))
        self._say(f"PROMOTED v{s.challenger} to @champion ({reason})")
        self._say(f"NOTE: {note}" if note else f"traffic: all on the champion, now serving v{s.challenger} "
                  f"({self.router.url})")

    def _rollback(self, reason: str, *, by: str, status: Status = "rolled_back") -> None:
        """Traffic back on the champion first, then the record: the champion's alias is never touched."""
        s = self.state
        self._all_on_champion()
        s.status = status
        self._save(f"{status.replace('_', ' ')}: {reason}", **{vocab.ROLLOUT_REASON: reason[:500],
                                                                vocab.ROLLOUT_ENDED_AT: audit.now_iso()})
        # A challenger that failed its canary must not be promoted by accident later.
        aliases.withdraw(self.client, s.model, s.challenger, home=self.settings.home, lease=self.lease)
        close_nomination(self.client, s.model, s.challenger)  # its decisions never count again
        audit.AuditLog.under(self.settings.home).append(
            audit.AuditEvent(s.model, s.challenger, vocab.EVENT_CANARY_ROLLED_BACK, by, reason,
                             details={"status": status, "verdicts": len(s.verdicts), "champion": s.champion}))
        self._say(f"{status.upper().replace('_', ' ')}: weight 0, @champion v{s.champion} untouched, "
                  f"@challenger removed ({reason})")

