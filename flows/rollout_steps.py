"""The rollout driver inside a Prefect flow run: each step a Prefect task, each gate a Prefect pause.

:class:`PrefectRolloutDriver` is :class:`~kiln.tasks.rollout.driver.RolloutDriver` (the loop, the judge, the
lease, the signed commands all stay there) with its moves run as Prefect tasks, so the UI shows them:

    set split ─► analysis window ─► verdict ─► … ─► promote | roll back

and its waits as pauses of the flow run (``gates="prefect"``): the run shows as **Paused** with
:class:`~kiln.flows.rollout_inputs.GateInput` as its form. While paused, a watcher thread keeps the model's
lease and the traffic split alive (the pause holds the split, as a paused rollout always did), and turns what
reaches the registry meanwhile (``kiln rollout resume|promote|abort NAME``, a signed ``kiln approve`` at the
promotion gate) into a resume of the run, so the terminal and the UI are two doors to the same gate. Every
answer, from either door, is verified as a signed statement before it counts. With ``gates="registry"`` the
waits are the driver's own (polling the command tag), as ``kiln rollout NAME`` runs them.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from prefect import task
from prefect.cache_policies import NONE
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run, resume_flow_run
from prefect.runtime import flow_run

from kiln.flows.rollout_inputs import GateInput, GateMode, forwarded, token_kind
from kiln.tasks.lifecycle import promotion
from kiln.tasks.lifecycle.approvals import Signed
from kiln.tasks.rollout.driver import RolloutDriver
from kiln.tasks.rollout.router import Split
from kiln.tasks.rollout.state import Status

log = logging.getLogger(__name__)


# ── steps: no retries, each one moves traffic or the registry exactly once ─────────────────────────────
@task(name="set split", cache_policy=NONE)
def set_split(driver: RolloutDriver, split: Split) -> None:
    RolloutDriver._route(driver, split)


@task(name="analysis window", cache_policy=NONE)
def analysis_window(driver: RolloutDriver, seconds: float) -> str:
    return RolloutDriver._wait(driver, seconds)


@task(name="verdict", cache_policy=NONE)
def verdict(driver: RolloutDriver, window: dict[str, Any]) -> Any:  # noqa: ANN401 - a StepVerdict
    return RolloutDriver._judge(driver, window)


@task(name="promote", cache_policy=NONE)
def promote(driver: RolloutDriver, reason: str, by: str) -> None:
    RolloutDriver._promote(driver, reason, by=by)


@task(name="roll back", cache_policy=NONE)
def roll_back(driver: RolloutDriver, reason: str, by: str, status: Status) -> None:
    RolloutDriver._rollback(driver, reason, by=by, status=status)


class PrefectRolloutDriver(RolloutDriver):
    """A rollout whose steps are Prefect tasks and whose gates pause the flow run (``gates="prefect"``)."""

    def __init__(self, *args: Any, gates: GateMode = "prefect", gate_timeout_s: float = 86_400,  # noqa: ANN401
                 **kwargs: Any) -> None:  # noqa: ANN401 - RolloutDriver's own arguments
        super().__init__(*args, **kwargs)
        self.gates, self.gate_timeout_s = gates, gate_timeout_s

    def _step_name(self) -> str:
        step = self.spec.steps[self.state.step]
        return f"step {self.state.step + 1}/{len(self.spec.steps)} ({step.weight:g}%)"

    def _route(self, split: Split) -> None:
        set_split.with_options(task_run_name=f"set split {split.weight:g}% · shadow {split.shadow:g}")(self, split)

    def _wait(self, seconds: float) -> str:
        return analysis_window.with_options(task_run_name=f"analysis window, {self._step_name()}")(self, seconds)

    def _judge(self, window: dict[str, Any]) -> Any:  # noqa: ANN401 - a StepVerdict
        return verdict.with_options(task_run_name=f"verdict, {self._step_name()}")(self, window)

    def _promote(self, reason: str, *, by: str) -> None:
        promote.with_options(task_run_name=f"promote v{self.state.challenger}")(self, reason, by)

    def _rollback(self, reason: str, *, by: str, status: Status = "rolled_back") -> None:
        roll_back.with_options(task_run_name=f"roll back v{self.state.challenger}")(self, reason, by, status)

    # ── gates ──
    def _paused(self, why: str, *, until: Callable[[], bool] | None = None) -> str:
        """Pause the flow run with the gate's form until a verified answer: resume, promote, abort (or, at the
        promotion gate, a signed decision that makes ``until()`` true: ``decided``). No answer in time: abort."""
        if self.gates != "prefect" or not flow_run.id:
            return super()._paused(why, until=until)
        s = self.state
        s.status = "paused"
        self._save(why)
        self._say(f"PAUSED: {why}; answer this run's form in the Prefect UI, or `kiln rollout resume|promote|abort "
                  f"{s.model}`")
        deadline, note = time.monotonic() + self.gate_timeout_s, ""
        while True:
            if until is not None and until():
                s.status = "running"
                return "decided"
            left = deadline - time.monotonic()
            answer = self._ask(f"{note}**{s.model} v{s.challenger}**: {why}", until, left) if left > 0 else None
            if answer is None:  # the gate's time ran out: the safe side
                self._last_command = {"by": "kiln-canary", "reason": f"no answer at the gate within "
                                                                     f"{self.gate_timeout_s:g} s"}
                return "abort"
            if until is not None and until():
                continue
            command, refused, recorded = self._verify(answer, promotion_gate=until is not None)
            if command is None:
                if refused:
                    self._note(refused)
                note = f"**Refused:** {refused}\n\n" if refused else f"**Recorded; not decided yet:** {recorded}\n\n"
                continue
            self._audit_command(command)
            if command["command"] == "resume":
                s.status = "running"
                self._save(f"resumed by {command['by']}")
                self._say(f"resumed by {command['by']}")
                return "resume"
            return self._as_outcome(command)

    def _ask(self, description: str, until: Callable[[], bool] | None, timeout_s: float) -> GateInput | None:
        """One pause of the flow run with the form, a watcher keeping the rollout alive meanwhile; the answer,
        or None when the time ran out.

        The watcher ends the gate's time itself, resuming the run, so the run is Running again (not a Paused
        run whose pause lapsed) when it rolls back; Prefect's own pause timeout is a backstop a minute later."""
        watcher = _Watcher(self, str(flow_run.id), until, time.monotonic() + timeout_s)
        watcher.start()
        try:
            answer = pause_flow_run(wait_for_input=GateInput.with_initial_data(description=description),
                                    timeout=int(timeout_s) + 60, poll_interval=max(int(self.poll_s), 1))
        except FlowPauseTimeout:
            answer = None
        finally:
            watcher.stop.set()
            watcher.join()
        if watcher.error is not None:  # lease lost, split lapsed: the rollout stops (traffic to the champion)
            raise watcher.error
        return None if watcher.timed_out else answer

    def _verify(self, answer: GateInput, *, promotion_gate: bool) -> tuple[dict[str, str] | None, str, str]:
        """``(command, "", "")`` for an answer that verifies as a command; ``(None, why it does not count, "")``;
        at the promotion gate, a signed decision is recorded: ``(None, "", where the decisions stand)`` (a decision
        that suffices then decides through ``until``)."""
        s = self.state
        if not answer.token.strip():
            return None, (f"the form carries no signed token: paste the line `kiln rollout {answer.decision} "
                          f"{s.model} --reason \"...\" --print-token` prints (the form alone decides nothing)"), ""
        kind = token_kind(answer.token)
        if kind == "decision" and promotion_gate:
            try:
                state = promotion.record_decision(self.client, Signed.from_token(answer.token), settings=self.settings,
                                                  model=s.model, version=s.challenger)
            except promotion.ApprovalRefused as exc:
                return None, f"refused a decision token: {exc}", ""
            self._say(f"recorded a signed decision: {state.explain()}")
            return None, "", state.explain()
        if kind != "rollout-command":
            return None, ("the token is not a signed rollout command (`kiln rollout resume|promote|abort NAME "
                          "--print-token` prints one)" + ("; or a `kiln approve --print-token` decision" if
                                                           promotion_gate else "")), ""
        try:
            command, ignored = self.commands.check(Signed.from_token(answer.token).tag())
        except promotion.ApprovalRefused as exc:
            return None, f"ignored a rollout command: {exc}", ""
        if command is None:
            return None, ignored or "", ""
        if command["command"] != answer.decision:
            return None, (f"the form says {answer.decision} but {command['by']}'s signed token says "
                          f"{command['command']}; choose the decision you signed"), ""
        if command["command"] == "promote" and (refusal := self._decision()[1]) is not None:
            return None, f"ignored {command['by']}'s promote: {refusal}", ""
        return command, "", ""


class _Watcher(threading.Thread):
    """While the flow run is paused: the lease checked and the split renewed (only a live rollout holds traffic),
    and the registry's doors to the gate watched; anything that arrives resumes the run with it as the answer."""

    def __init__(self, driver: PrefectRolloutDriver, run_id: str, until: Callable[[], bool] | None,
                 deadline: float) -> None:
        super().__init__(name=f"rollout-gate-{driver.state.model}", daemon=True)
        self.driver, self.run_id, self.until, self.deadline = driver, run_id, until, deadline
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.timed_out = False

    def run(self) -> None:
        d = self.driver
        while not self.stop.wait(d.poll_s):
            if time.monotonic() >= self.deadline:
                self.timed_out = True
                return self._resume({"decision": "abort", "reason": "the gate's time ran out", "token": ""})
            try:
                d.lease.ensure()
                d._renew_split()
                raw = d.commands.take_raw()
                answer = forwarded(raw) if raw else None
                if answer is None and self.until is not None and self.until():
                    answer = {"decision": "resume", "reason": "decided in the registry", "token": ""}
            except BaseException as exc:  # noqa: BLE001 - handed to the flow's thread, which raises it
                self.error = exc
                answer = {"decision": "abort", "reason": f"stopped: {exc}"[:500], "token": ""}
            if answer is not None:
                return self._resume(answer)

    def _resume(self, answer: dict[str, str]) -> None:
        """Resume the paused run with ``answer``; retried while the pause is still being set up (its form's schema
        is saved just after the state changes)."""
        while not self.stop.is_set():
            try:
                resume_flow_run(self.run_id, run_input=answer)
                return
            except Exception as exc:  # noqa: BLE001 - not paused yet, or the schema not saved yet: retried
                log.debug("resume of %s not accepted yet: %s", self.run_id, exc)
                with contextlib.suppress(Exception):
                    self.stop.wait(0.2)
