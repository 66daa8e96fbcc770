"""A rollout driver that dies or fails: traffic goes back to the champion, and what it says is true.

- ``kiln rollout`` killed with SIGKILL at 50 %: its split (set with the lease's TTL, ``KILN_ROLLOUT_LEASE_S``)
  lapses and the gateway's weight returns to 0 within the TTL; ``kiln rollout status`` then says the rollout is
  stale, and a command sent to it is refused (it would only wait for the next rollout to ignore it);
- an error inside the driver: "traffic back on the champion" only when the gateway confirms it; otherwise the
  weight the gateway reports and how to reset it.

Stand-in engines behind a real gateway on loopback, a real MLflow SQLite registry (tests/integration/test_handover.py).
"""

from __future__ import annotations

import time

import pytest
from typer.testing import CliRunner

from kiln.cli.app import app
from kiln.tasks.core import tags as vocab
from kiln.tasks.registry import client as registry
from kiln.tasks.rollout import driver as rollout_driver
from kiln.tasks.rollout.gateway_client import GatewayRouter
from kiln.tasks.rollout.launch import run_rollout
from kiln.tasks.rollout.params import RolloutError, RolloutParams
from tests.chaos import KILN, Proc, kill_when, prefect_env, wait_for
from tests.integration.helpers import champion_and_challenger, registry_state
from tests.integration.test_handover import TOKEN, _Probe, _settings, _spec, _stand_in_stack

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(120)]

TTL_S = 3.0


@pytest.fixture
def stand_ins(settings, empty_store, tmp_path, keys):
    """``tiny`` v1 @champion, v2 @challenger (gate passed, nominated): registry only, the servers are stand-ins."""
    return champion_and_challenger(settings, empty_store, tmp_path / "model")


def test_a_driver_killed_at_50_percent_leaves_traffic_on_the_champion_within_its_ttl(stand_ins, settings, tmp_path,
                                                                                    keys):
    spec = _spec(tmp_path, [{"weight": 50, "analysis_s": 60}, {"weight": 100, "analysis_s": 60}])
    with _stand_in_stack(tmp_path) as gw, _Probe(gw.url, ["some text"]) as probe:
        env = prefect_env() | {"KILN_GATEWAY_TOKEN": TOKEN, "KILN_ROLLOUT_GATEWAYS": f"default={gw.url}",
                               "KILN_ROLLOUT_LEASE_S": str(TTL_S)}
        driver = Proc([*KILN, "rollout", "tiny", "--spec", spec, "--poll", "0.2"], tmp_path / "driver.log", env,
                      cwd=tmp_path)
        kill_when(driver, lambda: gw.routing.weight == 50 and stand_ins.get_model_version("tiny", "2").tags.get(
            vocab.ROLLOUT_STATUS) == "running", "the driver to hold 50 %", timeout_s=90)
        killed_at = time.monotonic()
        wait_for(lambda: gw.routing.weight == 0, "the dead driver's split to lapse", timeout_s=TTL_S + 10)
        lapsed_after = time.monotonic() - killed_at
        wait_for(lambda: len(probe.since(killed_at + lapsed_after + 0.2)) > 20, "traffic after the lapse")
        after = probe.since(killed_at + lapsed_after + 0.2)
    assert lapsed_after <= TTL_S + 1.5, f"the split outlived its {TTL_S} s TTL by {lapsed_after - TTL_S:.1f} s"
    assert {r.upstream for r in after} == {"champion"} and {r.status for r in after} == {200}
    assert registry.aliases_of(stand_ins, "tiny") == {"champion": "1", "challenger": "2"}  # nothing decided

    # The status the dead driver left says "running"; kiln says it is stale, and refuses commands to it.
    wait_for(lambda: _lease_expired(stand_ins), "the dead driver's lease to expire", timeout_s=TTL_S + 10)
    status = CliRunner().invoke(app, ["rollout", "status", "tiny"])
    assert status.exit_code == 0 and "STALE: no driver holds the rollout of tiny v2" in status.output, status.output
    before = registry_state(stand_ins, "tiny")
    sent = CliRunner().invoke(app, ["rollout", "pause", "tiny", "--key", str(keys.key("alice"))])
    assert sent.exit_code == 2 and "no driver holds the rollout of tiny v2" in sent.output, sent.output
    assert "nothing was sent" in sent.output and "Traceback" not in sent.output
    assert registry_state(stand_ins, "tiny") == before  # no command tag left for the next rollout


def _lease_expired(client) -> bool:
    from kiln.tasks.registry.lease_record import read_lease

    lease = read_lease(client, "tiny")
    return lease is None or lease.expired()


def _fail_in_analysis(monkeypatch) -> None:
    def broken(self, seconds: float) -> str:
        raise RuntimeError("the analysis broke")

    monkeypatch.setattr(rollout_driver.RolloutDriver, "_wait", broken)


def test_an_error_says_traffic_is_back_on_the_champion_only_when_the_gateway_confirms_it(stand_ins, settings,
                                                                                       tmp_path, monkeypatch):
    _fail_in_analysis(monkeypatch)
    spec = _spec(tmp_path, [{"weight": 50, "analysis_s": 5}])
    with _stand_in_stack(tmp_path) as gw:
        with pytest.raises(RuntimeError, match="the analysis broke"):
            run_rollout(RolloutParams(model="tiny", spec=spec, poll_s=0.2), _settings(settings, gw.url))
        weight = gw.routing.weight
    tags = stand_ins.get_model_version("tiny", "2").tags
    assert weight == 0 and tags[vocab.ROLLOUT_STATUS] == "aborted"
    assert tags[vocab.ROLLOUT_MESSAGE].startswith("stopped by an error, traffic back on the champion: the analysis")


def test_an_error_whose_reset_fails_says_what_the_weight_is_and_how_to_fix_it(stand_ins, settings, tmp_path,
                                                                            monkeypatch):
    _fail_in_analysis(monkeypatch)

    def unreachable(self) -> None:
        raise RolloutError(f"cannot reach the gateway at {self.url} (ConnectError)")

    monkeypatch.setattr(GatewayRouter, "roll_back", unreachable)
    spec = _spec(tmp_path, [{"weight": 50, "analysis_s": 5}])
    said: list[str] = []
    with _stand_in_stack(tmp_path) as gw:
        with pytest.raises(RuntimeError, match="the analysis broke"):
            run_rollout(RolloutParams(model="tiny", spec=spec, poll_s=0.2), _settings(settings, gw.url),
                        echo=said.append)
        weight = gw.routing.weight
    message = stand_ins.get_model_version("tiny", "2").tags[vocab.ROLLOUT_MESSAGE]
    assert weight == 50  # the reset really failed: the split lapses only with its TTL
    assert "traffic back on the champion" not in message and "traffic back on the champion" not in " ".join(said)
    assert "traffic could NOT be put back on the champion (cannot reach the gateway" in message
    assert "the gateway reports 50% on the challenger" in message
    assert "lapses to the champion by itself within 60 s" in message and "POST /admin/split" in message
    assert any("STOPPED by an error, traffic could NOT be put back" in line for line in said), said


def test_a_command_left_over_from_an_earlier_rollout_is_ignored_and_said_so(stand_ins, settings, tmp_path, keys):
    import threading

    from kiln.tasks.lifecycle import approvals
    from kiln.tasks.lifecycle.approvals import CommandStatement
    from kiln.tasks.registry import audit
    from kiln.tasks.rollout.commands import send_command

    # A signed, valid abort for the rollout before this one (its driver died before reading it).
    old = CommandStatement(model="tiny", version="2", rollout="0" * 32, command="abort", reason="old news",
                           at=audit.now_iso(), id="e" * 32, signer="alice")
    stand_ins.set_model_version_tag("tiny", "2", vocab.ROLLOUT_COMMAND, approvals.sign(old, keys.key("alice")).tag())
    spec = _spec(tmp_path, [{"weight": 50, "analysis_s": 30, "manual_gate": True}])
    result: dict = {}
    with _stand_in_stack(tmp_path) as gw:
        runner = threading.Thread(target=lambda: result.update(state=run_rollout(
            RolloutParams(model="tiny", spec=spec, poll_s=0.2), _settings(settings, gw.url))), daemon=True)
        runner.start()
        note = wait_for(lambda: stand_ins.get_model_version("tiny", "2").tags.get(vocab.ROLLOUT_NOTE),
                        "the driver's note on the leftover command", timeout_s=30)
        tags = stand_ins.get_model_version("tiny", "2").tags
        assert "ignored alice's abort: it is for rollout 00000000… of tiny v2, not this one" in note
        assert tags[vocab.ROLLOUT_STATUS] == "paused" and vocab.ROLLOUT_COMMAND not in tags  # taken, not obeyed
        send_command(stand_ins, "tiny", "abort", settings=settings, key=keys.key("alice"), reason="this one")
        runner.join(30)
    state = result["state"]
    assert state.status == "aborted" and "this one" in state.message and "old news" not in state.message
    assert len(state.notes) == 1
