"""The Prefect-native rollout: real flow runs on the session's Prefect test server, real model servers and gateway
on loopback, a real MLflow SQLite registry, real SSH signatures.

A gate pauses the flow run (state PAUSED in Prefect's API, the form's schema stored with it); an answer
through ``resume_flow_run(run_input=...)`` counts only with a signed token that verifies; the steps show as task
runs; an abort, a ``kiln rollout abort`` from the terminal and a gate left unanswered all end on the safe side.
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
import typer
from typer.testing import CliRunner

from kiln.cli.promote import register_commands as promote_commands
from kiln.cli.rollout import register_commands as rollout_commands
from kiln.flows.rollout import rollout
from kiln.tasks.registry import audit
from kiln.tasks.registry import client as registry
from kiln.tasks.rollout.params import RolloutParams
from tests.integration.helpers import champion_and_challenger
from tests.integration.test_rollout import TOKEN, _spec, _stack, _Traffic

runner = CliRunner()


@pytest.fixture
def tiny(settings, tmp_path, empty_store, keys, monkeypatch):
    """``tiny`` v1 @champion, v2 @challenger (gated, nothing approved); the flow's settings come from ``KILN_*``."""
    monkeypatch.setenv("KILN_GATEWAY_TOKEN", TOKEN)
    monkeypatch.setenv("KILN_HANDOVER_TIMEOUT_S", "1")  # the stand-in servers never follow @champion
    return champion_and_challenger(settings, empty_store, tmp_path / "model")


@pytest.fixture
def cli():
    app = typer.Typer()
    rollout_commands(app)
    promote_commands(app)
    return app


class _Run:
    """The rollout flow in a thread, under a unique run name, with ``gates="prefect"``."""

    def __init__(self, spec: str, monkeypatch, url: str, gate_timeout_s: float = 60) -> None:
        monkeypatch.setenv("KILN_ROLLOUT_GATEWAYS", json.dumps({"default": url}))
        self.name = f"rollout-{uuid.uuid4().hex[:8]}"
        self.result: dict = {}
        flow = rollout.with_options(flow_run_name=self.name)
        params = RolloutParams(model="tiny", spec=spec, poll_s=0.2)
        self.thread = threading.Thread(target=lambda: self.result.update(
            flow(params, gates="prefect", gate_timeout_s=gate_timeout_s)), daemon=True)
        self.thread.start()

    def flow_run(self, *, paused: bool = True, deadline_s: float = 20.0):
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

        end = time.monotonic() + deadline_s
        with get_client(sync_client=True) as client:
            while time.monotonic() < end:
                runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[self.name])))
                if runs and (not paused or runs[0].state.is_paused()):
                    return runs[0]
                time.sleep(0.1)
        raise AssertionError(f"flow run {self.name} never {'paused' if paused else 'appeared'}")

    def answer(self, run_input: dict) -> None:
        """Resume the paused run through Prefect's API with ``run_input`` (what the UI's form submits)."""
        from prefect.flow_runs import resume_flow_run

        run_id = self.flow_run().id
        end = time.monotonic() + 20
        while True:  # the form's schema is saved just after the pause is accepted
            try:
                return resume_flow_run(run_id, run_input=run_input)
            except Exception:  # noqa: BLE001 - retried until the deadline, then raised
                if time.monotonic() > end:
                    raise
                time.sleep(0.2)

    def wait_repaused(self, previous_state_id, deadline_s: float = 20.0):
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            run = self.flow_run()
            # Paused *again*: a new PAUSED state (or the end). The RUNNING state in between also has a new id, and
            # returning on it raced the flow's own note about the refused answer (seen on a loaded CI machine).
            if run.state.id != previous_state_id and (run.state.is_paused() or run.state.is_final()):
                return run
            time.sleep(0.1)
        raise AssertionError("the run did not pause again")

    def join(self, timeout: float = 60) -> dict:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the rollout flow did not end"
        return self.result


def _token(cli, *args: str) -> str:
    result = runner.invoke(cli, [*args, "--print-token"])
    assert result.exit_code == 0, result.output
    return result.output.strip()


def _events(settings) -> list[str]:
    return [e.event for e in audit.AuditLog.under(settings.home).read("tiny")]


def test_manual_gate_pauses_the_run_with_a_form_and_signed_answers_promote(tiny, settings, cli, keys, tmp_path,
                                                                            monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.objects import StateType

    spec = _spec(tmp_path, [{"weight": 100, "analysis_s": 1.0, "manual_gate": True}])
    with _stack() as stack, _Traffic(stack.url):
        run = _Run(spec, monkeypatch, stack.url)
        paused = run.flow_run()
        assert paused.state.type == StateType.PAUSED
        keyset = paused.state.state_details.run_input_keyset
        with get_client(sync_client=True) as client:
            schema = json.loads(client.read_flow_run_input(paused.id, keyset["schema"]))
        assert schema["properties"]["decision"]["enum"] == ["resume", "promote", "abort"]
        assert {"reason", "token"} <= set(schema["properties"])
        assert tiny.get_model_version("tiny", "2").tags["kiln.rollout.status"] == "paused"
        assert stack.gw.routing.weight == 0  # a gate before step 1: no traffic on the challenger yet

        # The form alone decides nothing: no token, then a token signing another decision; each refused, paused again.
        run.answer({"decision": "resume", "reason": "looks fine"})
        paused = run.wait_repaused(paused.state.id)
        forged = _token(cli, "rollout", "resume", "tiny", "--key", str(keys.key("alice")))
        run.answer({"decision": "abort", "reason": "", "token": forged})  # alice signed resume, not abort
        paused = run.wait_repaused(paused.state.id)
        assert stack.gw.routing.weight == 0 and run.thread.is_alive()
        notes = tiny.get_model_version("tiny", "2").tags["kiln.rollout.note"]
        assert "says resume" in notes, notes

        # bob's signed resume: step 1 runs (100 %), passes, then the promotion gate pauses the run again.
        run.answer({"decision": "resume", "reason": "go", "token": _token(
            cli, "rollout", "resume", "tiny", "--key", str(keys.key("bob")), "--reason", "go")})
        paused = run.wait_repaused(paused.state.id, deadline_s=30)
        assert "waiting for a signed approval" in tiny.get_model_version("tiny", "2").tags["kiln.rollout.message"]
        assert stack.gw.routing.weight == 100  # the gate holds the split

        # alice's signed approval, pasted into the form: recorded, verified, promoted.
        approval = _token(cli, "approve", "tiny", "2", "--key", str(keys.key("alice")), "--reason", "canary passed")
        run.answer({"decision": "resume", "token": approval})
        result = run.join()
    assert result["status"] == "promoted", result
    assert registry.aliases_of(tiny, "tiny") == {"champion": "2", "previous": "1"}
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[paused.id])))[0]
        tasks = [t.name for t in client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[paused.id])))]
    assert flow_run.state.type == StateType.COMPLETED
    assert {"set split 100% · shadow 0", "analysis window, step 1/1 (100%)", "verdict, step 1/1 (100%)",
            "promote v2"} <= set(tasks), tasks
    assert {"rollout_resume", "approved", "canary_promoted"} <= set(_events(settings))


def test_abort_in_the_form_rolls_back(tiny, settings, cli, keys, tmp_path, monkeypatch):
    spec = _spec(tmp_path, [{"weight": 50, "analysis_s": 1.0}, {"weight": 100, "analysis_s": 1.0,
                                                                 "manual_gate": True}])
    with _stack() as stack, _Traffic(stack.url):
        run = _Run(spec, monkeypatch, stack.url)
        run.flow_run(deadline_s=30)
        assert stack.gw.routing.weight == 50  # paused before step 2: the split of step 1 holds
        run.answer({"decision": "abort", "reason": "not today", "token": _token(
            cli, "rollout", "abort", "tiny", "--key", str(keys.key("bob")), "--reason", "not today")})
        result = run.join()
        routing = stack.gw.routing
    assert result["status"] == "aborted" and "bob" in result["message"] and "not today" in result["message"]
    assert routing.weight == 0 and routing.shadow == 0
    assert registry.aliases_of(tiny, "tiny") == {"champion": "1"}
    assert {"rollout_abort", "canary_rolled_back"} <= set(_events(settings))


@pytest.mark.parametrize("door", ["terminal", "timeout"])
def test_terminal_pause_and_abort_and_an_unanswered_gate_end_on_the_champion(tiny, settings, cli, keys, tmp_path,
                                                                             monkeypatch, door):
    step = {"weight": 50, "analysis_s": 60} if door == "terminal" else {"weight": 50, "manual_gate": True}
    spec = _spec(tmp_path, [step])
    with _stack() as stack:
        run = _Run(spec, monkeypatch, stack.url, gate_timeout_s=60 if door == "terminal" else 2)
        if door == "terminal":  # `kiln rollout pause` mid-analysis pauses the run (from inside its analysis task)
            deadline = time.monotonic() + 20
            while stack.gw.routing.weight != 50 and time.monotonic() < deadline:
                time.sleep(0.1)
            paused = runner.invoke(cli, ["rollout", "pause", "tiny", "--key", str(keys.key("bob")), "--reason", "look"])
            assert paused.exit_code == 0, paused.output
            run.flow_run()
            assert stack.gw.routing.weight == 50  # a pause holds the split
            # `kiln rollout abort` writes the signed command; the paused run resumes itself with it, verified
            sent = runner.invoke(cli, ["rollout", "abort", "tiny", "--key", str(keys.key("alice")), "--reason", "no"])
            assert sent.exit_code == 0, sent.output
        result = run.join()
        assert stack.gw.routing.weight == 0
    assert result["status"] == "aborted", result
    why = "alice" if door == "terminal" else "no answer at the gate within 2 s"
    assert why in result["message"], result["message"]
    assert run.flow_run(paused=False).state.is_completed()
    assert registry.aliases_of(tiny, "tiny") == {"champion": "1"}
    if door == "terminal":
        assert {"rollout_pause", "rollout_abort", "canary_rolled_back"} <= set(_events(settings))
