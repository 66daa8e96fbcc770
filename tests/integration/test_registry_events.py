"""Registry events end to end: a real `mlflow server` signs and delivers webhooks to Kiln's receiver on
loopback, which starts the optimize deployment (seen through the Prefect API) or resumes a paused promote
run; and the poller does the same for a SQLite registry that sends no webhooks.
"""

from __future__ import annotations

import contextvars
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient
from prefect import flow
from prefect.flow_runs import pause_flow_run
from prefect.runtime import flow_run

from kiln.flows.promote import ApprovalInput, PromoteParams
from kiln.infra.background import serving
from kiln.infra.mlflow_webhook import create_app, register_mlflow_webhook
from kiln.infra.registry_actions import PROMOTE_RUN_TAG
from kiln.infra.registry_events import main
from kiln.infra.registry_poller import RegistryPoller
from kiln.infra.starter import DeploymentStarter
from kiln.settings import Settings, load_settings
from kiln.tasks.lifecycle import promotion
from kiln.tasks.lifecycle.approvals import Signed
from kiln.tasks.registry import aliases
from tests.keys import DIGEST, Keyring

SECRET = "integration-secret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, check, timeout_s: float = 30.0, every_s: float = 0.2):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if found := check():
            return found
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> str:
    """``mlflow server`` on a free loopback port, SQLite store, allowed to call webhooks on loopback over http."""
    from cryptography.fernet import Fernet

    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    env = os.environ | {
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        # One key for every worker and restart; without it each process encrypts secrets with its own.
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode(),
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no job consumers: this machine's CPUs are shared
    }
    log = (root / "server.log").open("wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def healthy():
        if proc.poll() is not None:
            tail = (root / "server.log").read_text()[-3000:]
            raise AssertionError(f"mlflow server exited {proc.returncode}:\n{tail}")
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        _wait("mlflow server", healthy, timeout_s=120, every_s=0.5)
        yield url
    finally:
        with_group = os.getpgid(proc.pid) == proc.pid  # start_new_session: the server and its uvicorn children
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if proc.poll() is not None:
                break
            os.killpg(proc.pid, sig) if with_group else proc.send_signal(sig)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                continue
        log.close()


@pytest.fixture(scope="module")
def optimize_deployment() -> str:
    """The optimize deployment in the session's Prefect test server (created, never executed here)."""
    from kiln.flows.optimize import optimize

    return str(optimize.to_deployment(name="kiln-optimize").apply())


def _runs(deployment_id: str, model: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id])))
    return [r for r in runs if r.parameters["params"]["model"].startswith(f"{model}/")]


def _new_version(client: MlflowClient, name: str, tags: dict | None = None) -> str:
    """A version whose artifact is one small file: the test is about events, not models."""
    experiment = client.get_experiment_by_name("events") or client.get_experiment(client.create_experiment("events"))
    run = client.create_run(experiment.experiment_id)
    client.log_text(run.info.run_id, "not a model", "model/README.txt")
    client.set_terminated(run.info.run_id)
    return str(client.create_model_version(name, f"{run.info.artifact_uri}/model", run.info.run_id, tags=tags).version)


@pytest.fixture(scope="module")
def receiver(mlflow_server, tmp_path_factory):
    """Kiln's receiver on loopback, registered as the MLflow server's webhook."""
    from prefect.settings import PREFECT_API_URL

    settings = Settings(home=tmp_path_factory.mktemp("kiln"), tracking_uri=mlflow_server, watch_models=["wh"],
                        mlflow_webhook_secret=SECRET)
    # The receiver's threads do not see the test harness's Prefect context: name its API explicitly.
    starter = DeploymentStarter(PREFECT_API_URL.value())
    with serving(create_app(settings, starter)) as server:
        hook = register_mlflow_webhook(settings, f"{server.url}/hooks/mlflow", SECRET)
        assert register_mlflow_webhook(settings, f"{server.url}/hooks/mlflow", SECRET).webhook_id == hook.webhook_id
        yield settings, starter


def test_mlflow_delivers_a_signed_event_and_optimize_starts_once_with_the_poller_as_backstop(
        receiver, mlflow_server, optimize_deployment):
    settings, starter = receiver
    client = MlflowClient(mlflow_server)
    poller = RegistryPoller(settings, starter)
    assert poller.poll_once().started == []  # "wh" does not exist yet: nothing is history, nothing starts
    client.create_registered_model("wh")
    candidate = _new_version(client, "wh", tags={"kiln.candidate_key": "k1"})
    version = _new_version(client, "wh")

    run = _wait("the optimize flow run", lambda: _runs(optimize_deployment, "wh"))[0]
    assert run.parameters == {"params": {"model": f"wh/{version}"}}
    assert run.idempotency_key == f"mlflow:wh:{version}:optimize"
    assert "trigger:mlflow-webhook" in run.tags
    # The poller, looking later, finds the same version and gets the same run back from Prefect.
    report = poller.poll_once()
    assert report.started == [f"wh/{version}"] and report.ignored == [f"wh/{candidate}"], report
    assert [r.id for r in _runs(optimize_deployment, "wh")] == [run.id]


@flow(name="promote")
def paused_promote(params: PromoteParams) -> dict:
    """flows/promote.py's `approval="ui"` wait, reduced to the link to the version and the pause."""
    client = MlflowClient(load_settings().tracking_uri)
    challenger = client.get_model_version_by_alias(params.model, "challenger")
    client.set_model_version_tag(params.model, challenger.version, PROMOTE_RUN_TAG, flow_run.id)
    answer = pause_flow_run(wait_for_input=ApprovalInput, timeout=60, poll_interval=1)
    return {"token": answer.token}


def test_a_signed_decision_resumes_a_paused_promote_run_and_plain_tags_do_not(receiver, mlflow_server, monkeypatch,
                                                                              tmp_path):
    settings, _ = receiver
    keys = Keyring(tmp_path / "keys", settings.signers_file())  # the approvers' list the receiver reads
    monkeypatch.setenv("KILN_TRACKING_URI", mlflow_server)
    client = MlflowClient(mlflow_server)
    client.create_registered_model("approve-me")
    version = _new_version(client, "approve-me", tags={"kiln.gate": "passed", "kiln.package_digest": DIGEST})
    aliases.nominate(client, "approve-me", version, home=settings.home)

    outcome: dict = {}
    context = contextvars.copy_context()  # the Prefect test server's settings, in the flow's thread
    worker = threading.Thread(target=context.run, args=(lambda: outcome.update(
        paused_promote(PromoteParams(model="approve-me", approval="ui"))),), daemon=True)
    worker.start()
    _wait("the promote run to link itself to the version",
          lambda: client.get_model_version("approve-me", version).tags.get(PROMOTE_RUN_TAG))
    # What the old `kiln approve` wrote, typed by hand: delivered by the webhook, and ignored.
    for key, value in {"kiln.approver": "alice", "kiln.approval_reason": "fast",
                       "kiln.approval_at": "2026-11-26T00:00:00Z", "kiln.approval": "approved"}.items():
        client.set_model_version_tag("approve-me", version, key, value)
    time.sleep(3)
    assert worker.is_alive() and outcome == {}
    # `kiln approve` on another machine: the signed statement, then kiln.approval last; the webhook resumes the run.
    promotion.decide(client, "approve-me", version, decision="approved", reason="fast", key=keys.key("alice"),
                     settings=settings)
    worker.join(60)
    statement = json.loads(Signed.from_token(outcome["token"]).statement)
    assert (statement["signer"], statement["decision"], statement["reason"]) == ("alice", "approved", "fast")


def test_without_webhooks_each_poll_starts_exactly_one_run_per_new_version(tmp_path, monkeypatch, capsys,
                                                                          optimize_deployment):
    for key in [k for k in os.environ if k.startswith("KILN_")]:
        monkeypatch.delenv(key)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "kiln"))
    monkeypatch.setenv("KILN_TRACKING_URI", uri)
    monkeypatch.setenv("KILN_WATCH_MODELS", '["polled"]')
    client = MlflowClient(uri)
    client.create_registered_model("polled")
    old = _new_version(client, "polled")

    def poll() -> dict:
        assert main(["--once"]) == 0
        return json.loads(capsys.readouterr().out)

    assert poll()["started"] == []  # v1 existed before the poller: history
    new = [_new_version(client, "polled"), _new_version(client, "polled")]
    assert poll()["started"] == [f"polled/{v}" for v in new]
    assert poll()["started"] == []
    runs = _runs(optimize_deployment, "polled")
    assert sorted(r.parameters["params"]["model"] for r in runs) == [f"polled/{v}" for v in new]
    assert {r.idempotency_key for r in runs} == {f"mlflow:polled:{v}:optimize" for v in new}
    assert old not in new
