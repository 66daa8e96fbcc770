"""The monitor against live servers on loopback: a real model server and gateway, real traffic and feedback, the
real registry the champion is registered in (its package's tokenizer reads the content), a real webhook receiver.

Healthy traffic (the champion's own test split) stays healthy; a content shift at equal lengths (texts from
another domain, word for word as long) and a quality drop (labelled feedback the model gets wrong) each raise
their configured action exactly once, however many evaluations see the same breach.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pandas as pd
import pytest
from pydantic import AnyHttpUrl, SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from typer.testing import CliRunner

from kiln.cli.app import app
from kiln.infra.background import serving
from kiln.infra.gateway import create_app as gateway_app
from kiln.infra.gateway_proxy import Gateway, Upstream
from kiln.infra.loadgen import LoadPlan, generate_load
from kiln.infra.runtime import ServedModel
from kiln.infra.server import create_app as server_app
from kiln.tasks.core import tags as vocab
from kiln.tasks.data.planted import another_domain
from kiln.tasks.monitor.params import MonitorParams
from kiln.tasks.monitor.run import run_monitor
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.onboard import register_folder
from tests.integration.helpers import prefect_console_follows_stdout

pytestmark = pytest.mark.integration
TOKEN, SECRET = "monitor-test-token", "monitor-hook-secret"


class _Oracle:
    """Answers each test text's recorded label (so the predicted-class mix is the reference's); others by hash."""

    def __init__(self, truth: dict[str, str], labels: list[str]) -> None:
        self.truth, self.meta = truth, SimpleNamespace(task="sequence-classification", labels=labels)

    def predict(self, texts):
        labels = [self.truth.get(t) or self.meta.labels[len(t) % len(self.meta.labels)] for t in texts]
        return pd.DataFrame({"label": labels, "score": [0.9] * len(texts),
                             "scores": [[0.9] + [0.1] * (len(self.meta.labels) - 1)] * len(texts)})


class _Hook:
    """A webhook receiver that keeps what it is sent and whether each signature verified."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    async def receive(self, request: Request) -> JSONResponse:
        body = await request.body()
        want = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        self.calls.append({"body": json.loads(body), "signed": request.headers.get("x-kiln-signature") == want})
        return JSONResponse({"ok": True})


@pytest.fixture
def live(settings, empty_store, tiny_models, tiny_spec, tiny_splits, tmp_path):
    """``tiny`` v1 (the tiny BERT package, its dataset recorded) @champion, served by a model server behind the
    gateway (a stand-in engine that answers the recorded labels), a webhook receiver, and the test's policy."""
    import shutil

    shutil.copy(empty_store, settings.home / "mlflow.db")
    client = registry.connect(settings)
    register_folder(client, settings, tiny_models["bert"], "tiny", "sequence-classification", tiny_spec)
    test = tiny_splits.test
    oracle = _Oracle(dict(zip(test["text"], test["label"], strict=True)), list(tiny_splits.labels))
    hook = _Hook()
    with serving(server_app([ServedModel("tiny", "1", oracle)])) as model_server, \
            serving(Starlette(routes=[Route("/hook", hook.receive, methods=["POST"])])) as receiver:
        gw = Gateway(Upstream(model_server.url), Upstream(model_server.url), TOKEN)
        with serving(gateway_app(gw)) as gateway:
            policy = tmp_path / "policy.yaml"
            policy.write_text(json.dumps({
                "min_requests": 100, "slo": {"max_error_rate": 0.05}, "input_drift": None,
                "prediction_drift": None, "content_drift": {"min_tokens": 500}, "embedding_drift": {},
                "quality": {"min_accuracy": 0.6, "min_feedback": 60},
                "actions": {"content_drift": ["notify"], "embedding_drift": ["notify"],
                            "quality": ["notify", "rollback"]},
                "notify_url": f"{receiver.url}/hook"}))
            configured = settings.model_copy(update={
                "gateway_token": SecretStr(TOKEN), "rollout_gateways": {"default": AnyHttpUrl(gateway.url)},
                "monitor_notify_secret": SecretStr(SECRET)})
            yield SimpleNamespace(settings=configured, client=client, gateway=gateway.url, hook=hook, test=test,
                                  policy=str(policy), labels=list(tiny_splits.labels))


def _traffic(live, texts: list[str], truth: list[str] | None = None, requests: int = 150) -> None:
    summary = generate_load(LoadPlan(url=live.gateway, model="tiny", texts=texts, labels=truth, requests=requests,
                                     seconds=30, concurrency=4, feedback=truth is not None, feedback_token=TOKEN))
    assert summary.failed == 0 and summary.ok == requests and summary.feedback_failed == 0, summary.to_dict()


def _monitor(live, **kw):
    return run_monitor(MonitorParams(model="tiny", policy=live.policy, **kw), live.settings, echo=lambda _: None)


def test_healthy_traffic_stays_healthy_and_is_recorded_as_a_step_of_the_day(live) -> None:
    texts, labels = live.test["text"].tolist(), live.test["label"].tolist()
    _traffic(live, texts, labels)
    result = _monitor(live)
    assert result.status == "healthy", result.verdict.checks
    assert result.actions == [] and live.hook.calls == []
    run = mlflow.MlflowClient(live.settings.effective_tracking_uri).get_run(result.run_id)
    assert run.data.tags[vocab.RUN_DAY] == run.info.run_name.split()[-1]
    assert run.data.tags[vocab.RUN_KIND] == "monitor" and run.data.tags[vocab.RUN_VERSION] == "1"
    assert run.data.metrics["status_code"] == 0

    # Nothing since: too little traffic is inconclusive, never healthy; same day, same run, a later step.
    quiet = _monitor(live)
    assert quiet.status == "inconclusive"
    client = mlflow.MlflowClient(live.settings.effective_tracking_uri)
    days = [client.get_run(r.run_id).data.tags[vocab.RUN_DAY] for r in (result, quiet)]
    if days[0] == days[1]:  # (unless UTC midnight fell between them)
        assert quiet.run_id == result.run_id and quiet.step >= result.step


def test_a_content_shift_at_equal_lengths_is_seen_in_tokens_and_embeddings_and_notifies_once(live) -> None:
    shifted = another_domain(live.test["text"].tolist())
    for _ in range(2):  # the same breach seen twice: one incident, one notification
        _traffic(live, shifted)
        result = _monitor(live)
        assert result.status == "breach" and result.verdict.breaches == ["content_drift", "embedding_drift"]
    assert len(live.hook.calls) == 1 and live.hook.calls[0]["signed"]
    assert live.hook.calls[0]["body"]["breaches"] == ["content_drift", "embedding_drift"]
    assert result.actions[0]["outcome"].startswith("skipped: incident")

    texts, labels = live.test["text"].tolist(), live.test["label"].tolist()
    _traffic(live, texts, labels)
    assert _monitor(live).status == "healthy"  # and the incident is closed: a new shift notifies again
    _traffic(live, shifted)
    _monitor(live)
    assert len(live.hook.calls) == 2


def test_a_quality_drop_rolls_back_once_through_the_promotion_path(live) -> None:
    client = live.client
    client.create_model_version("tiny", client.get_model_version("tiny", "1").source,
                                tags=client.get_model_version("tiny", "1").tags)
    client.set_registered_model_alias("tiny", vocab.PREVIOUS, "2")  # an earlier champion to go back to
    texts = live.test["text"].tolist()
    wrong = [next(x for x in live.labels if x != label) for label in live.test["label"]]  # all feedback says "wrong"
    _traffic(live, texts, wrong)
    result = _monitor(live)
    assert result.status == "breach" and result.verdict.breaches == ["quality"]
    assert [a["action"] for a in result.actions] == ["notify", "rollback"]
    assert registry.aliases_of(client, "tiny")[vocab.CHAMPION] == "2"
    history = client.get_model_version("tiny", "1").tags
    assert history[vocab.ROLLED_BACK_BY] == "kiln-monitor"

    _traffic(live, texts, wrong)  # the gateway still serves v1 (a server that does not follow the alias)
    again = _monitor(live)
    assert again.status == "inconclusive" and again.actions == []  # judged nothing: no second rollback
    assert len(live.hook.calls) == 1


def test_kiln_monitor_cli_runs_the_flow_and_speaks_json(live, monkeypatch) -> None:
    for key, value in {"KILN_GATEWAY_TOKEN": TOKEN, "KILN_ROLLOUT_GATEWAYS": json.dumps({"default": live.gateway}),
                       "KILN_MONITOR_NOTIFY_SECRET": SECRET}.items():
        monkeypatch.setenv(key, value)
    texts, labels = live.test["text"].tolist(), live.test["label"].tolist()
    _traffic(live, texts, labels)
    out = CliRunner().invoke(app, ["monitor", "tiny", "--policy", live.policy, "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["status"] == "healthy" and doc["version"] == "1" and doc["run_id"]

    shifted = another_domain(texts)
    _traffic(live, shifted)  # a breach: exit 3, and the flow's notify also emits a Prefect event for automations
    prefect_console_follows_stdout(monkeypatch)
    out = CliRunner().invoke(app, ["monitor", "tiny", "--policy", live.policy, "--json"])
    assert out.exit_code == 3, out.output
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["status"] == "breach" and doc["breaches"] == ["content_drift", "embedding_drift"]
    assert re.search(r"Prefect event kiln\.monitor\.breach [0-9a-f-]{36}", doc["actions_taken"][0]["outcome"])
    assert len(live.hook.calls) == 1
    prefect_console_follows_stdout(monkeypatch)
    bad = CliRunner().invoke(app, ["monitor", "tiny", "--gateway", "nowhere"])
    assert bad.exit_code == 2 and "unknown gateway 'nowhere'" in bad.output


class _Runner:
    """The flow's side of the actions, recorded: what a Prefect event and the retrain flow would have been given."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.retrains: list = []

    def event(self, name, payload) -> str:
        self.events.append(name)
        return f"event {name}"

    def retrain(self, params) -> str:
        self.retrains.append(params)
        return "retrained: tiny v9"


def test_a_quality_drop_retrains_once_at_the_champions_commit_with_recent_feedback(live, tmp_path) -> None:
    live.client.set_model_version_tag("tiny", "1", vocab.GIT_SHA, "ab" * 20)  # as a retrain from a push records
    live.client.set_model_version_tag("tiny", "1", vocab.GIT_REPO, "https://git.example/ml/tiny.git")
    policy = json.loads(Path(live.policy).read_text()) | {"actions": {"quality": ["retrain"]},
                                                          "retrain_feedback_days": 3}
    (tmp_path / "retrain.yaml").write_text(json.dumps(policy))
    texts = live.test["text"].tolist()
    wrong = [next(x for x in live.labels if x != label) for label in live.test["label"]]
    runner = _Runner()
    for _ in range(2):
        _traffic(live, texts, wrong)
        result = run_monitor(MonitorParams(model="tiny", policy=str(tmp_path / "retrain.yaml")), live.settings,
                             runner=runner, echo=lambda _: None)
        assert result.status == "breach" and result.verdict.breaches == ["quality"]
    assert len(runner.retrains) == 1 and runner.events == []
    asked = runner.retrains[0]
    assert (asked.sha, asked.repo, asked.feedback_days) == ("ab" * 20, "https://git.example/ml/tiny.git", 3)
    assert asked.triggered_by.startswith("monitor:")
    assert result.actions == [{"action": "retrain", "outcome": result.actions[0]["outcome"]}]
    assert result.actions[0]["outcome"].startswith("skipped: incident")
