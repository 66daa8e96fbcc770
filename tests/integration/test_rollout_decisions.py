"""Canary rollouts and signed decisions, end to end on loopback (real servers, gateway, SQLite registry):
a canary promotes only an approved challenger, never a rejected one, and takes only signed commands meant
for it. Each attack leaves the aliases as they were, and says why.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import typer
from pydantic import SecretStr
from typer.testing import CliRunner

from kiln.cli.rollout import register_commands
from kiln.tasks.core import tags as vocab
from kiln.tasks.lifecycle import approvals
from kiln.tasks.lifecycle.approvals import CommandStatement
from kiln.tasks.lifecycle.approvers import ApprovalRefused
from kiln.tasks.registry import audit
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.lease_record import PromotionError
from kiln.tasks.rollout.commands import send_command
from kiln.tasks.rollout.launch import run_rollout
from kiln.tasks.rollout.params import RolloutParams
from kiln.tasks.rollout.state import RolloutStore
from tests.integration.helpers import champion_and_challenger
from tests.integration.test_rollout import TOKEN, _spec, _stack, _Traffic, _wait_for_tag
from tests.keys import approve, reject


@pytest.fixture
def tiny(settings, tmp_path, empty_store, keys):
    """As in test_rollout.py: v1 @champion, v2 @challenger (gate passed, pinned, nominated), nothing decided."""
    return champion_and_challenger(settings, empty_store, tmp_path / "model")


@pytest.fixture
def rollout_settings(settings):
    # Stand-in servers never follow @champion: a promotion's hand-over gives up after 1 s (see test_handover.py).
    return settings.model_copy(update={"gateway_token": SecretStr(TOKEN), "handover_timeout_s": 1.0})


def _start(stack, settings, spec: str) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run():
        try:
            result["state"] = run_rollout(RolloutParams(model="tiny", spec=spec, poll_s=0.2), stack.allow(settings))
        except Exception as exc:  # noqa: BLE001 - handed to the test
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def _wait_for(what: str, check, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _events(settings) -> list[str]:
    return [e.event for e in audit.AuditLog.under(settings.home).read("tiny")]


def test_a_challenger_rejected_during_its_canary_is_rolled_back_at_the_end(tiny, rollout_settings, tmp_path, keys):
    approve(tiny, "tiny", "2", keys, "alice", "ship it if the canary passes")
    spec = _spec(tmp_path, [{"weight": 50, "analysis_s": 1.5}, {"weight": 100, "analysis_s": 1.5}])
    with _stack() as stack, _Traffic(stack.url):
        thread, result = _start(stack, rollout_settings, spec)
        _wait_for_tag(tiny, "kiln.rollout.status", "running")
        reject(tiny, "tiny", "2", keys, "bob", "the new tokenizer mangles emoji")
        thread.join(60)
    state = result["state"]
    assert [v.outcome for v in state.verdicts] == ["pass", "pass"]  # the canary itself passed
    assert state.status == "rolled_back" and "rejected by bob: the new tokenizer mangles emoji" in state.message
    assert registry.aliases_of(tiny, "tiny") == {"champion": "1"}
    tags = tiny.get_model_version("tiny", "2").tags
    assert tags["kiln.rollout.status"] == "rolled_back" and "kiln.promoted_at" not in tags
    assert "kiln.nomination" not in tags  # withdrawn: alice's approval never counts again


def test_a_rejected_challenger_does_not_start_a_rollout(tiny, rollout_settings, tmp_path, keys):
    reject(tiny, "tiny", "2", keys, "bob", "no")
    before = registry.aliases_of(tiny, "tiny")
    with _stack() as stack:
        with pytest.raises(PromotionError, match=r"tiny v2 was rejected \(rejected by bob: no\); a rejected version "
                                                 "is never rolled out or promoted"):
            run_rollout(RolloutParams(model="tiny", spec=_spec(tmp_path, [{"weight": 50}])),
                        stack.allow(rollout_settings))
        assert stack.gw.routing.weight == 0 and stack.gw.routing.generation == 0  # no admin call changed it
    assert registry.aliases_of(tiny, "tiny") == before


def test_a_passed_canary_waits_for_a_signed_approval_and_forged_tags_do_not_end_the_wait(tiny, rollout_settings,
                                                                                          tmp_path, keys):
    spec = _spec(tmp_path, [{"weight": 50, "analysis_s": 1.5}])
    with _stack() as stack, _Traffic(stack.url):
        thread, result = _start(stack, rollout_settings, spec)
        _wait_for_tag(tiny, "kiln.rollout.status", "paused")
        message = tiny.get_model_version("tiny", "2").tags["kiln.rollout.message"]
        assert "canary passed all 1 steps; waiting for a signed approval" in message
        # Typed into the MLflow UI: no signature, so the rollout keeps waiting with the traffic split held.
        for key, value in {"kiln.approver": "alice", "kiln.approval_reason": "ok", "kiln.approval": "approved"}.items():
            tiny.set_model_version_tag("tiny", "2", key, value)
        time.sleep(1.5)
        assert thread.is_alive() and registry.aliases_of(tiny, "tiny") == {"champion": "1", "challenger": "2"}
        assert stack.gw.routing.weight == 50
        approve(tiny, "tiny", "2", keys, "alice", "the canary convinced me")
        thread.join(60)
    assert result["state"].status == "promoted", result
    assert registry.aliases_of(tiny, "tiny") == {"champion": "2", "previous": "1"}


def test_unsigned_foreign_replayed_and_unapproved_commands_are_ignored_with_a_note(tiny, rollout_settings, tmp_path,
                                                                                   keys):
    spec = _spec(tmp_path, [{"weight": 50, "analysis_s": 30, "manual_gate": True}])
    app = typer.Typer()
    register_commands(app)

    def note_after(write) -> str:
        """Write a command tag, then the note the driver leaves when it ignores it."""
        before = tiny.get_model_version("tiny", "2").tags.get(vocab.ROLLOUT_NOTE)
        write()
        return _wait_for("the driver's note", lambda: (n := tiny.get_model_version("tiny", "2").tags.get(
            vocab.ROLLOUT_NOTE)) != before and n)

    def raw(value: str):
        return lambda: tiny.set_model_version_tag("tiny", "2", vocab.ROLLOUT_COMMAND, value)

    def signed(who: str, key_of: str | None = None, **changes) -> str:
        rollout = tiny.get_model_version("tiny", "2").tags[vocab.ROLLOUT_ID]
        statement = CommandStatement(model="tiny", version="2", rollout=rollout, command="promote", reason="now",
                                     at=audit.now_iso(), id="c" * 32, signer=who).model_copy(update=changes)
        return approvals.sign(statement, keys.key(key_of or who)).tag()

    with _stack() as stack, _Traffic(stack.url):
        thread, result = _start(stack, rollout_settings, spec)
        _wait_for_tag(tiny, "kiln.rollout.status", "paused")  # the manual gate of step 1
        # What anyone with MLflow access can write: the old command format, any "by".
        assert "ignored an unsigned rollout command" in note_after(raw(json.dumps({"command": "promote",
                                                                                    "by": "alice"})))
        assert "ignored a rollout command: the signature does not verify for 'alice'" in note_after(
            raw(signed("alice", key_of="mallory")))
        assert "it is for rollout ffffffff… of tiny v2, not this one" in note_after(raw(signed("alice",
                                                                                              rollout="f" * 32)))
        pause = signed("alice", command="pause", id="d" * 32)
        tiny.set_model_version_tag("tiny", "2", vocab.ROLLOUT_COMMAND, pause)
        _wait_for("the pause to be taken", lambda: vocab.ROLLOUT_COMMAND not in tiny.get_model_version(
            "tiny", "2").tags)
        assert "ignored a replay of alice's pause" in note_after(raw(pause))
        # A real, signed `kiln rollout promote`, but nobody approved v2: skipping steps never skips approval.
        cli = ["rollout", "promote", "tiny", "--reason", "looks fine", "--key", str(keys.key("alice"))]
        assert "ignored alice's promote: tiny v2 is not approved" in note_after(
            lambda: CliRunner().invoke(app, cli))
        status = CliRunner().invoke(app, ["rollout", "status", "tiny"])
        assert status.output.count("note: ") == 5 and "PAUSED" in status.output, status.output
        assert registry.aliases_of(tiny, "tiny") == {"champion": "1", "challenger": "2"}
        approve(tiny, "tiny", "2", keys, "bob", "approved")
        sent = CliRunner().invoke(app, cli)
        assert sent.exit_code == 0, sent.output
        thread.join(60)
    state = result["state"]
    assert state.status == "promoted" and "promoted by hand during the canary: looks fine" in state.message
    assert registry.aliases_of(tiny, "tiny") == {"champion": "2", "previous": "1"}
    assert _events(rollout_settings).count("rollout_command_ignored") == 5
    assert len(RolloutStore(rollout_settings.home).load("tiny").notes) == 5


def test_commands_are_signed_by_an_approver(tiny, settings, keys, monkeypatch):
    tiny.set_model_version_tag("tiny", "2", vocab.ROLLOUT_STATUS, "running")
    tiny.set_model_version_tag("tiny", "2", vocab.ROLLOUT_ID, "r" * 32)
    with pytest.raises(ApprovalRefused, match="is not in"):
        send_command(tiny, "tiny", "abort", settings=settings, key=keys.key("mallory"))
    monkeypatch.setenv("KILN_APPROVERS", "alice")
    from kiln.settings import load_settings

    with pytest.raises(ApprovalRefused, match="'bob' may not approve"):
        send_command(tiny, "tiny", "abort", settings=load_settings(), key=keys.key("bob"))
    assert vocab.ROLLOUT_COMMAND not in tiny.get_model_version("tiny", "2").tags
    send_command(tiny, "tiny", "abort", settings=load_settings(), key=keys.key("alice"), reason="enough")
    statement = json.loads(json.loads(tiny.get_model_version("tiny", "2").tags[vocab.ROLLOUT_COMMAND])["statement"])
    assert (statement["signer"], statement["rollout"], statement["command"]) == ("alice", "r" * 32, "abort")
