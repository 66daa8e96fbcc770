"""A flow run whose process was killed is marked Crashed (not left Running) by the next run of that flow
(flows/crashed.py): the optimize flow SIGKILLed in a subprocess, then the leases' rules one by one."""

from __future__ import annotations

import json
import os
import uuid

import pytest

from kiln.errors import KilnError
from kiln.flows import crashed
from kiln.flows.optimize import OptimizeParams, optimize
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.onboard import register_folder
from tests.chaos import KILN, Proc, kill_when, prefect_env

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(120)]


def _state(run_id: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id).state


def test_a_killed_optimize_run_is_marked_crashed_naming_its_pid_when_the_next_run_starts(settings, tiny_models,
                                                                                         tiny_spec, tmp_path):
    register_folder(registry.connect(settings), settings, tiny_models["bert"], "crash", "sequence-classification",
                    tiny_spec)
    leases = settings.home / "runs" / "optimize"
    first = Proc([*KILN, "optimize", "--model", "crash", "--recipes", "onnx-fp32", "--eval-limit", "40"],
                 tmp_path / "killed.log", prefect_env(), cwd=tmp_path)
    lease = kill_when(first, lambda: next(iter(leases.glob("*.json")), None), "the flow run's lease", timeout_s=90)
    killed_run = lease.stem
    assert _state(killed_run).type.value == "RUNNING"  # what Prefect shows for a SIGKILLed run on its own

    with pytest.raises(KilnError):  # the next run of the flow (it fails fast: no such model); it sweeps first
        optimize(OptimizeParams(model="no-such-model"))

    state = _state(killed_run)
    assert state.type.value == "CRASHED", state
    assert f"process {first.pid} on " in state.message and "run the flow again" in state.message, state.message
    assert not lease.exists()  # swept
    assert not list(leases.glob("*.json"))  # and the failed run removed its own lease when it ended


def _running_run(flow_name: str) -> str:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    @flow(name=flow_name)
    def stand_in() -> None:
        pass

    with get_client(sync_client=True) as client:
        run = client.create_flow_run(stand_in)
        client.set_flow_run_state(run.id, Running(), force=True)
    return str(run.id)


def _lease(folder, run_id: str, **claim) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{run_id}.json").write_text(json.dumps({"flow_run": run_id, "flow": "stand-in", **claim}))


def test_a_sweep_crashes_only_runs_whose_process_is_gone_and_tidies_ended_ones(tmp_path):
    import socket

    import psutil

    folder, host = tmp_path / "runs" / "stand-in", socket.gethostname()
    me = {"host": host, "pid": os.getpid(), "started": psutil.Process().create_time()}
    alive, reused, elsewhere = (_running_run(f"stand-in-{uuid.uuid4().hex[:6]}") for _ in range(3))
    _lease(folder, alive, **me)  # this very process: still running it
    _lease(folder, reused, **(me | {"started": me["started"] - 3600}))  # the pid now belongs to someone else
    _lease(folder, elsewhere, **(me | {"host": "another-host"}))  # another machine's: not ours to judge
    (folder / "garbage.json").write_text("{not json")

    assert crashed.sweep(folder, current=None) == [reused]
    assert _state(reused).type.value == "CRASHED" and f"process {os.getpid()} on {host}" in _state(reused).message
    assert {_state(alive).type.value, _state(elsewhere).type.value} == {"RUNNING"}
    assert sorted(p.stem for p in folder.glob("*.json")) == sorted([alive, elsewhere, "garbage"])

    from prefect.client.orchestration import get_client
    from prefect.states import Completed

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(alive, Completed(), force=True)
    assert crashed.sweep(folder) == []  # an ended run's lease goes, whoever holds the pid
    assert sorted(p.stem for p in folder.glob("*.json")) == sorted([elsewhere, "garbage"])


def test_outside_a_flow_run_claiming_does_nothing(settings):
    crashed.claim_run(settings)
    assert not (settings.home / "runs").exists()
