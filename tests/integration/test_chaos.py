"""Chaos: flows killed with SIGKILL at stage boundaries, then run again, as a user would run them.

Each case runs ``kiln ...`` in a subprocess against a fresh project (tiny models, SQLite registry, the session's
Prefect server), kills its process group the moment a boundary is visible from outside (a finished entry in
``KILN_HOME/cache``, a version in the registry), runs the same command again and checks the promise:

- the same end state as an uninterrupted run (versions, aliases, the tags a run sets);
- no finished stage repeated: every cache entry finished before the kill is reused, not rebuilt;
- no duplicate version;
- the killed flow run is not left Running in Prefect.

Stores killed mid-flow (MLflow, S3) are in ``test_chaos_services.py``; a model server killed under load in
``test_chaos_gateway.py``; a rollout driver killed at 50 % in ``test_rollout_driver_faults.py``.
"""

from __future__ import annotations

import pytest

from kiln.tasks.core import tags as vocab
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.onboard import register_folder
from tests.chaos import (
    KILN,
    Proc,
    finished_stages,
    flow_run_states,
    kill_when,
    now,
    prefect_env,
    task_states,
    versions,
)

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]

OPTIMIZE = ["optimize", "--recipes", "onnx-fp32", "--eval-limit", "40"]


def _registered(settings, tiny_models, tiny_spec, name: str):
    client = registry.connect(settings)
    register_folder(client, settings, tiny_models["bert"], name, "sequence-classification", tiny_spec)
    return client


def _end_state(client, name: str) -> tuple:
    """What an optimize run decides, without what differs between any two runs (run ids, timings, digests of
    logged files): each version's recipe, gate and parent, and the aliases."""
    kept = (vocab.RECIPE, vocab.GATE, vocab.PARENT_VERSION)
    found = client.search_model_versions(f"name='{name}'")
    rows = sorted((str(v.version), tuple((k, v.tags.get(k)) for k in kept)) for v in found)
    return tuple(rows), tuple(sorted((a, str(v)) for a, v in (client.get_registered_model(name).aliases or {}).items()))


# The cheapest boundaries that still prove the promise: the first stage's result on disk (everything after it
# must be built, nothing before it rebuilt), and the new version in the registry before its alias is set
# (the rerun must adopt that version, not register a second one).
BOUNDARIES = {
    "after-first-stage": lambda cache, client, name: len(finished_stages(cache)) >= 1,
    "after-register": lambda cache, client, name: len(versions(client, name)) >= 2,
}


@pytest.mark.parametrize("boundary", list(BOUNDARIES))
def test_optimize_killed_at_a_stage_boundary_resumes_to_the_same_end_state(settings, tiny_models, tiny_spec,
                                                                          tmp_path, boundary):
    name = f"chaos-{boundary}"
    client = _registered(settings, tiny_models, tiny_spec, name)
    cache = settings.cache_dir
    argv = [*KILN, *OPTIMIZE, "--model", name]

    since = now()
    first = Proc(argv, tmp_path / "killed.log", prefect_env(), cwd=tmp_path)
    kill_when(first, lambda: BOUNDARIES[boundary](cache, client, name), boundary, timeout_s=180)
    done_before = finished_stages(cache)
    assert done_before, "the kill came before any stage finished"

    again = Proc(argv, tmp_path / "resumed.log", prefect_env(), cwd=tmp_path)
    assert again.wait(180) == 0, again.tail()

    done_after = finished_stages(cache)
    repeated = [k for k, stamp in done_before.items() if done_after.get(k) != stamp]
    assert not repeated, f"finished stages run again after the kill: {repeated}"
    assert versions(client, name) == ["1", "2"]  # no duplicate version
    assert _end_state(client, name) == (
        (("1", ((vocab.RECIPE, "source"), (vocab.GATE, None), (vocab.PARENT_VERSION, None))),
         ("2", ((vocab.RECIPE, "onnx-fp32"), (vocab.GATE, vocab.GATE_PASSED), (vocab.PARENT_VERSION, "1")))),
        (("challenger", "2"), ("champion", "1")))
    states = flow_run_states("optimize", since, model=name)
    assert states[-1] == "COMPLETED" and "RUNNING" not in states, states  # the killed run: Crashed, not Running
    assert states.count("CRASHED") == 1, states


PROMOTE_BOUNDARIES = {
    # the flow run has just started (Prefect shows it Running): the earliest a kill can come
    "flow-started": lambda since: flow_run_states("promote", since, model="tiny")[-1:] == ["RUNNING"],
    # the review is done and the flow waits for a decision: the longest stretch a kill can hit
    "waiting-for-decision": lambda since: task_states("promote", since, model="tiny").get("review") == "COMPLETED",
}


@pytest.mark.parametrize("boundary", list(PROMOTE_BOUNDARIES))
def test_promote_killed_before_a_decision_moves_nothing_and_the_next_run_promotes_once(
        settings, empty_store, tmp_path, keys, monkeypatch, boundary):
    """``kiln promote`` killed before any decision: no alias moved. The approval arrives meanwhile; ``kiln
    promote`` run again promotes exactly once (one demotion, one promotion in the audit trail)."""
    from kiln.tasks.registry import audit
    from tests.integration.helpers import champion_and_challenger
    from tests.keys import approve

    monkeypatch.setenv("KILN_APPROVERS", "alice,bob")
    client = champion_and_challenger(settings, empty_store, tmp_path / "model")
    argv = [*KILN, "promote", "tiny", "--timeout", "60", "--poll", "0.2"]

    since = now()
    waiting = Proc(argv, tmp_path / "killed.log", prefect_env(), cwd=tmp_path)
    kill_when(waiting, lambda: PROMOTE_BOUNDARIES[boundary](since), boundary, timeout_s=180, every_s=0.2)
    assert registry.aliases_of(client, "tiny") == {"champion": "1", "challenger": "2"}
    approve(client, "tiny", "2", keys, "alice", "ok")

    again = Proc(argv, tmp_path / "again.log", prefect_env(), cwd=tmp_path)
    assert again.wait(180) == 0, again.tail()
    assert registry.aliases_of(client, "tiny") == {"champion": "2", "previous": "1"}
    events = [(e.version, e.event) for e in audit.AuditLog.under(settings.home).read("tiny")]
    assert [e for e in events if e[1] in ("demoted", "promoted")] == [("1", "demoted"), ("2", "promoted")], events
    states = flow_run_states("promote", since, model="tiny")
    assert states[-1] == "COMPLETED" and "RUNNING" not in states, states  # the killed run: Crashed, not Running
    assert states.count("CRASHED") == 1, states


RETRAIN_BOUNDARIES = {
    # the fine-tune's result on disk, nothing registered yet: the rerun must reuse it, not train again
    "after-finetune": lambda cache, client: len(finished_stages(cache)) >= 1,
    # the new version registered: the rerun must find it (by commit), not register a second one
    "after-register": lambda cache, client: len(versions(client, "tiny")) >= 2,
}


@pytest.mark.parametrize("boundary", list(RETRAIN_BOUNDARIES))
def test_retrain_killed_at_a_stage_boundary_resumes_and_registers_the_commit_once(settings, tiny_models, tmp_path,
                                                                                 monkeypatch, boundary):
    from kiln.tasks.data.datasets import DatasetSpec
    from tests.integration.test_retrain import _git, _write_repo

    client = registry.connect(settings)
    register_folder(client, settings, tiny_models["bert"], "tiny", "sequence-classification", DatasetSpec(limit=50))
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    _write_repo(repo, "tiny")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "data and config")
    sha = _git(repo, "rev-parse", "HEAD")
    monkeypatch.setenv("KILN_REPO", str(repo))
    argv = [*KILN, "trigger", "retrain", "--sha", sha, "--repo", str(repo), "--branch", "main", "--local",
            "--no-optimize"]
    cache = settings.cache_dir

    since = now()
    first = Proc(argv, tmp_path / "killed.log", prefect_env(), cwd=tmp_path)
    kill_when(first, lambda: RETRAIN_BOUNDARIES[boundary](cache, client), boundary, timeout_s=180)
    done_before = finished_stages(cache)

    again = Proc(argv, tmp_path / "resumed.log", prefect_env(), cwd=tmp_path)
    assert again.wait(180) == 0, again.tail()
    repeated = [k for k, stamp in done_before.items() if finished_stages(cache).get(k) != stamp]
    assert not repeated, f"finished stages run again after the kill: {repeated}"
    assert versions(client, "tiny") == ["1", "2"]  # the commit registered once
    assert client.get_model_version("tiny", "2").tags[vocab.GIT_SHA] == sha
    assert registry.aliases_of(client, "tiny") == {"champion": "1"}  # a retrained version is not promoted
    states = flow_run_states("retrain", since, sha=sha)
    assert states[-1] == "COMPLETED" and "RUNNING" not in states, states  # the killed run: Crashed, not Running
