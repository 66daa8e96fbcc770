"""Canary rollouts end to end on loopback: real model servers, the real gateway, the load generator,
the judge, and a real MLflow SQLite registry whose aliases the rollout moves (or must not move).

The engines behind the two model servers are tiny deterministic stand-ins (answers in microseconds), so
what is measured is the rollout machinery; faults are injected with the model server's own
:class:`infra.faults.FaultyPredictor`, exactly as ``python -m kiln.infra.server --fault-*`` does.
"""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pandas as pd
import pytest
import typer
from pydantic import AnyHttpUrl, SecretStr
from typer.testing import CliRunner

from kiln.cli.rollout import register_commands
from kiln.errors import ConfigError
from kiln.infra.background import serving
from kiln.infra.faults import Faults, FaultyPredictor
from kiln.infra.gateway import create_app as gateway_app
from kiln.infra.gateway_proxy import Gateway, Upstream
from kiln.infra.loadgen import LoadPlan, generate_load
from kiln.infra.runtime import ServedModel
from kiln.infra.server import create_app as server_app
from kiln.settings import Settings
from kiln.tasks.registry import audit
from kiln.tasks.registry import client as registry
from kiln.tasks.rollout.commands import send_command
from kiln.tasks.rollout.launch import run_rollout
from kiln.tasks.rollout.params import RolloutError, RolloutParams
from kiln.tasks.rollout.state import RolloutStore
from tests.integration.helpers import champion_and_challenger
from tests.keys import approve

TOKEN = "rollout-test-token"
LABELS = ["negative", "positive"]
# Shuffled: each analysis window sees a contiguous run of the replay, and the texts' lengths grow with i, so
# an ordered replay would be (correctly) judged as input drift against the whole set.
TEXTS = random.Random(0).sample([f"message number {i} " + "word " * (i % 7) for i in range(200)], 200)


def truth(text: str) -> str:
    return LABELS[len(text) % 2]


TRUTH = [truth(t) for t in TEXTS]


class _Oracle:
    """A stand-in engine that always answers the true label at once."""

    meta = SimpleNamespace(task="sequence-classification", labels=LABELS)

    def predict(self, texts):
        labels = [truth(t) for t in texts]
        return pd.DataFrame({"label": labels, "score": [0.9] * len(texts),
                             "scores": [[0.9, 0.1] if lab == LABELS[0] else [0.1, 0.9] for lab in labels]})


@pytest.fixture
def tiny(settings, tmp_path, empty_store, keys):
    """``tiny``: v1 @champion, v2 @challenger with a passed gate, pinned and nominated (registry only: the servers
    hold the engines). Every key in ``keys`` may decide (no approvers setting); nothing is approved yet."""
    return champion_and_challenger(settings, empty_store, tmp_path / "model")


@pytest.fixture
def approved(tiny, keys):
    """``tiny`` with v2 approved by alice (signed): its canary promotes it at the end."""
    approve(tiny, "tiny", "2", keys, "alice", "ship it if the canary passes")
    return tiny


@pytest.fixture
def rollout_settings(settings) -> Settings:
    # The stand-in servers here never follow an alias, so a promotion's hand-over cannot happen: wait 1 s for it,
    # not 2 minutes (tests/integration/test_handover.py hands over to servers that follow).
    return settings.model_copy(update={"gateway_token": SecretStr(TOKEN), "handover_timeout_s": 1.0})


def _allow(settings: Settings, url: str) -> Settings:
    """``settings`` whose rollout_gateways allow-list names the test's gateway (a random port) ``default``."""
    return settings.model_copy(update={"rollout_gateways": {"default": AnyHttpUrl(url)}})


def _versionless(app):
    """``app`` with the model version removed from its answers (header, and the ``versions`` / ``model_version``
    of its JSON bodies, which the gateway's version polls read): a server that does not say."""
    async def asgi(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        held: dict = {}

        async def strip(message):
            if message["type"] == "http.response.start":
                held["start"], held["body"] = message, b""
                return
            held["body"] += message.get("body", b"")
            if message.get("more_body"):
                return
            body = held["body"]
            try:
                doc = json.loads(body)
                if isinstance(doc, dict):
                    doc.pop("versions", None)
                    doc.pop("model_version", None)
                    body = json.dumps(doc).encode()
            except ValueError:
                pass
            start = held["start"]
            start["headers"] = [(k, v) for k, v in start["headers"] if k.lower() not in (b"x-kiln-model-version",
                                                                                          b"content-length")]
            start["headers"].append((b"content-length", str(len(body)).encode()))
            await send(start)
            await send({"type": "http.response.body", "body": body})

        await app(scope, receive, strip)

    return asgi


def _stack(challenger_faults: Faults | None = None, challenger_version: str = "2", *, versionless: bool = False):
    """Champion and challenger model servers and the gateway, all on 127.0.0.1; yields the gateway."""
    challenger = _Oracle() if challenger_faults is None else FaultyPredictor(_Oracle(), challenger_faults)
    champion_app = server_app([ServedModel("tiny", "1", _Oracle())])
    challenger_app = server_app([ServedModel("tiny", challenger_version, challenger)])
    if versionless:
        champion_app, challenger_app = _versionless(champion_app), _versionless(challenger_app)

    class Stack:
        def __enter__(self):
            self.champion = serving(champion_app)
            self.challenger = serving(challenger_app)
            c1, c2 = self.champion.__enter__(), self.challenger.__enter__()
            self.gw = Gateway(Upstream(c1.url), Upstream(c2.url), TOKEN)
            self.gateway = serving(gateway_app(self.gw))
            self.url = self.gateway.__enter__().url
            return self

        def __exit__(self, *exc):
            for ctx in (self.gateway, self.challenger, self.champion):
                ctx.__exit__(None, None, None)

        def allow(self, settings: Settings) -> Settings:
            return _allow(settings, self.url)

    return Stack()


class _Traffic:
    """Steady, labelled traffic through the gateway in a thread, until stopped."""

    def __init__(self, url: str, rate: float = 150.0) -> None:
        self.stop = threading.Event()
        self.plan = LoadPlan(url=url, model="tiny", texts=TEXTS, labels=TRUTH, requests=100_000, seconds=120,
                             concurrency=4, feedback=True, feedback_token=TOKEN, rate_per_s=rate, stop=self.stop)
        self.summary = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.summary = generate_load(self.plan)

    def __enter__(self) -> _Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(30)


def _spec(tmp_path: Path, steps: list[dict], **overrides) -> str:
    metrics = {"max_error_rate": 0.02, "max_p95_ratio": 4.0, "max_p99_ratio": None,
               "latency_test": {"alpha": 0.01, "tolerance": 1.0}, "max_accuracy_drop": 0.1, "min_feedback": 20}
    spec = {"steps": steps, "metrics": metrics | overrides.pop("metrics", {}), "failure_limit": 1,
            "min_samples": 30} | overrides
    path = tmp_path / "rollout.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    return str(path)


def _events(settings: Settings) -> list[str]:
    return [e.event for e in audit.AuditLog.under(settings.home).read("tiny")]


def _reference(tmp_path: Path, texts: list[str]) -> str:
    path = tmp_path / "reference.csv"
    pd.DataFrame({"text": texts, "label": [truth(t) for t in texts]}).to_csv(path, index=False)
    return str(path)


def test_healthy_challenger_is_promoted_through_every_step(approved, rollout_settings, tmp_path):
    tiny = approved
    spec = _spec(tmp_path, [{"weight": 0, "shadow": 1.0, "analysis_s": 1.5}, {"weight": 50, "analysis_s": 1.5},
                            {"weight": 100, "analysis_s": 1.5}],
                 # Lenient: ~120 rows of a handful of distinct lengths give KL up to ~0.25 by chance alone.
                 drift={"reference": _reference(tmp_path, TEXTS), "min_rows": 50, "max_input_kl": 0.6})
    with _stack() as stack, _Traffic(stack.url) as traffic:
        state = run_rollout(RolloutParams(model="tiny", spec=spec, poll_s=0.2), stack.allow(rollout_settings))
        routing = stack.gw.routing
    assert state.status == "promoted", state.message
    assert [v.outcome for v in state.verdicts] == ["pass", "pass", "pass"], " | ".join(state.verdicts[0].reasons)
    assert registry.aliases_of(tiny, "tiny") == {"champion": "2", "previous": "1"}
    # The champion's stand-in server cannot follow @champion to v2: the split stays on v2, for good (no TTL to
    # lapse onto v1), and the operator is told what to do.
    assert routing.weight == 100 and routing.expires_at is None
    assert "champion upstream" in state.message and "still serves v1" in state.message, state.message
    assert "kiln serve tiny@champion" in state.message and "weight to 0" in state.message
    assert traffic.summary.failed == 0 and traffic.summary.sent > 300
    tags = tiny.get_model_version("tiny", "2").tags
    assert tags["kiln.rollout.status"] == "promoted" and tags["kiln.promoted_by"]
    assert "canary_promoted" in _events(rollout_settings)
    run = tiny.get_run(state.run_id)
    assert run.data.metrics["passed"] == 1.0 and run.data.metrics["challenger_requests"] >= 30
    assert [m.step for m in tiny.get_metric_history(state.run_id, "weight")] == [0, 1, 2]
    saved = RolloutStore(rollout_settings.home).load("tiny")
    assert saved.status == "promoted" and len(saved.verdicts) == 3
    assert Path(saved.plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [a.path for a in tiny.list_artifacts(state.run_id) if a.path.endswith(".png")] == [Path(saved.plot).name]
    drift = [r for r in saved.verdicts[1].reasons if r.startswith(("input_drift", "class_drift"))]
    assert len(drift) == 2 and all(r.endswith(": ok") for r in drift), drift


@pytest.mark.parametrize(("faults", "evidence"), [
    (Faults(errors=0.5), "error_rate"),
    (Faults(latency_ms=40), "p95"),
    (Faults(wrong=1.0), "accuracy"),
], ids=["errors", "latency", "wrong-answers"])
def test_faulty_challenger_is_rolled_back_within_interval_times_failure_limit(tiny, rollout_settings, tmp_path,
                                                                               faults, evidence):
    analysis_s, failure_limit = 1.5, 1
    spec = _spec(tmp_path, [{"weight": 50, "analysis_s": analysis_s}, {"weight": 100, "analysis_s": analysis_s}],
                 failure_limit=failure_limit)
    with _stack(faults) as stack, _Traffic(stack.url):
        started = time.monotonic()
        state = run_rollout(RolloutParams(model="tiny", spec=spec, poll_s=0.2), stack.allow(rollout_settings))
        elapsed = time.monotonic() - started
        routing = stack.gw.routing
    assert state.status == "rolled_back", state.message
    assert [v.outcome for v in state.verdicts] == ["fail"] * (failure_limit + 1)
    # Rolled back at the (failure_limit + 1)-th failed analysis (the verdicts above say which), not intervals later
    # or after a hang: bookkeeping on top is ~1 s alone and was 7 s on two cores shared with three busy processes.
    assert elapsed < (failure_limit + 1) * analysis_s + 12
    assert routing.weight == 0 and routing.shadow == 0
    assert evidence in " ".join(state.verdicts[-1].reasons)
    aliases = registry.aliases_of(tiny, "tiny")
    assert aliases == {"champion": "1"}  # champion untouched, the failed challenger no longer a candidate
    tags = tiny.get_model_version("tiny", "2").tags
    assert tags["kiln.rollout.status"] == "rolled_back" and evidence in tags["kiln.rollout.reason"]
    assert "canary_rolled_back" in _events(rollout_settings)


def test_input_drift_against_the_reference_rolls_back(tiny, rollout_settings, tmp_path):
    spec = _spec(tmp_path, [{"weight": 50, "analysis_s": 1.5}], failure_limit=0,
                 drift={"reference": _reference(tmp_path, ["ok", "no", "yes", "hm"] * 50), "max_class_kl": None})
    with _stack() as stack, _Traffic(stack.url):
        state = run_rollout(RolloutParams(model="tiny", spec=spec, poll_s=0.2), stack.allow(rollout_settings))
    assert state.status == "rolled_back"
    assert "input_drift" in tiny.get_model_version("tiny", "2").tags["kiln.rollout.reason"]
    assert registry.aliases_of(tiny, "tiny") == {"champion": "1"}


def test_too_little_traffic_is_inconclusive_then_pauses_and_abort_rolls_back(tiny, rollout_settings, tmp_path, keys):
    spec = _spec(tmp_path, [{"weight": 50, "analysis_s": 1.0}], min_samples=500, inconclusive_limit=1)
    result = {}
    with _stack() as stack, _Traffic(stack.url, rate=20):
        runner = threading.Thread(target=lambda: result.update(state=run_rollout(
            RolloutParams(model="tiny", spec=spec, poll_s=0.2), stack.allow(rollout_settings))))
        runner.start()
        _wait_for_tag(tiny, "kiln.rollout.status", "paused")
        send_command(tiny, "tiny", "abort", settings=rollout_settings, key=keys.key("alice"),
                     reason="not enough traffic today")
        runner.join(30)
        weight = stack.gw.routing.weight
    state = result["state"]
    assert {v.outcome for v in state.verdicts} == {"inconclusive"}
    assert state.status == "aborted" and "alice" in state.message and weight == 0
    assert "samples" in " ".join(state.verdicts[0].reasons)
    assert registry.aliases_of(tiny, "tiny")["champion"] == "1"
    assert "rollout_abort" in _events(rollout_settings)


def test_manual_gate_waits_for_resume_from_the_cli(approved, rollout_settings, tmp_path, monkeypatch, keys):
    tiny = approved
    spec = _spec(tmp_path, [{"weight": 50, "analysis_s": 1.0}, {"weight": 100, "analysis_s": 1.0,
                                                                 "manual_gate": True}])
    app = typer.Typer()
    register_commands(app)
    result = {}
    with _stack() as stack, _Traffic(stack.url):
        runner = threading.Thread(target=lambda: result.update(state=run_rollout(
            RolloutParams(model="tiny", spec=spec, poll_s=0.2), stack.allow(rollout_settings))))
        runner.start()
        _wait_for_tag(tiny, "kiln.rollout.status", "paused")
        assert stack.gw.routing.weight == 50  # a pause holds the split
        status = CliRunner().invoke(app, ["rollout", "status", "tiny"])
        assert "PAUSED" in status.output and "manual gate" in status.output
        resumed = CliRunner().invoke(app, ["rollout", "resume", "tiny", "--key", str(keys.key("bob"))])
        assert resumed.exit_code == 0, resumed.output
        runner.join(30)
    assert result["state"].status == "promoted"
    assert registry.aliases_of(tiny, "tiny")["champion"] == "2"


def test_commands_without_a_running_rollout_are_refused(tiny, settings, keys):
    with pytest.raises(RolloutError, match="no rollout of tiny v2 is running"):
        send_command(tiny, "tiny", "pause", settings=settings, key=keys.key("alice"))


def test_bad_token_unreachable_gateway_and_bad_spec_change_nothing(tiny, rollout_settings, tmp_path):
    good = _spec(tmp_path, [{"weight": 50, "analysis_s": 1.0}])
    with _stack() as stack:
        wrong = rollout_settings.model_copy(update={"gateway_token": SecretStr("not-the-token")})
        with pytest.raises(RolloutError, match="refused the admin token"):
            run_rollout(RolloutParams(model="tiny", spec=good), stack.allow(wrong))
        bad = tmp_path / "bad.yaml"
        bad.write_text("steps:\n  - {weight: 150}\n")
        with pytest.raises(ConfigError, match=r"steps\.0\.weight"):
            run_rollout(RolloutParams(model="tiny", spec=str(bad)), stack.allow(rollout_settings))
        assert stack.gw.routing.weight == 0
    with pytest.raises(RolloutError, match="cannot reach the gateway"):
        run_rollout(RolloutParams(model="tiny", spec=good), _allow(rollout_settings, "http://127.0.0.1:9"))
    assert registry.aliases_of(tiny, "tiny") == {"champion": "1", "challenger": "2"}


def test_gateway_serving_another_version_stops_the_rollout(tiny, rollout_settings, tmp_path):
    spec = _spec(tmp_path, [{"weight": 50, "analysis_s": 1.0}])
    with _stack(challenger_version="7") as stack, _Traffic(stack.url):
        with pytest.raises(RolloutError, match="serves v7"):
            run_rollout(RolloutParams(model="tiny", spec=spec, poll_s=0.2), stack.allow(rollout_settings))
        assert stack.gw.routing.weight == 0
    assert registry.aliases_of(tiny, "tiny") == {"champion": "1", "challenger": "2"}
    assert tiny.get_model_version("tiny", "2").tags["kiln.rollout.status"] == "aborted"


def _wait_for_tag(client, key: str, value: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.get_model_version("tiny", "2").tags.get(key) == value:
            return
        time.sleep(0.1)
    raise AssertionError(f"{key} never became {value!r}")


def test_served_versions_answer_through_the_gateway(tiny):
    with _stack() as stack:
        answer = httpx.post(f"{stack.url}/v2/models/tiny/infer", json={"inputs": [
            {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hello"]}]})
    assert answer.status_code == 200 and answer.json()["outputs"][0]["data"] == [truth("hello")]


def test_cli_rollout_name_starts_a_rollout_and_bad_input_exits_2(tiny, tmp_path, monkeypatch):
    app = typer.Typer()
    register_commands(app)
    monkeypatch.delenv("KILN_GATEWAY_TOKEN", raising=False)
    monkeypatch.setenv("KILN_ROLLOUT_GATEWAYS", json.dumps({"down": "http://127.0.0.1:9"}))
    no_token = CliRunner().invoke(app, ["rollout", "tiny", "--gateway", "down"])
    assert no_token.exit_code == 2 and "KILN_GATEWAY_TOKEN" in no_token.output
    monkeypatch.setenv("KILN_GATEWAY_TOKEN", TOKEN)
    bad_spec = tmp_path / "bad.yaml"
    bad_spec.write_text("steps: []\n")
    result = CliRunner().invoke(app, ["rollout", "tiny", "--spec", str(bad_spec), "--gateway", "down"])
    assert result.exit_code == 2 and "steps" in result.output
    unreachable = CliRunner().invoke(app, ["rollout", "start", "tiny", "--gateway", "down"])
    assert unreachable.exit_code == 2 and "cannot reach the gateway" in unreachable.output
    assert registry.aliases_of(tiny, "tiny") == {"champion": "1", "challenger": "2"}


def test_cli_rollout_takes_a_gateway_name_from_settings_never_a_url(tiny, monkeypatch):
    app = typer.Typer()
    register_commands(app)
    monkeypatch.setenv("KILN_GATEWAY_TOKEN", TOKEN)
    monkeypatch.setenv("KILN_ROLLOUT_GATEWAYS", json.dumps({"prod": "http://127.0.0.1:9"}))
    unknown = CliRunner().invoke(app, ["rollout", "tiny", "--gateway", "staging"])
    assert unknown.exit_code == 2, unknown.output
    assert "unknown gateway 'staging'" in unknown.output and "rollout_gateways setting: prod" in unknown.output
    default = CliRunner().invoke(app, ["rollout", "tiny"])  # 'default' is not configured here either
    assert default.exit_code == 2 and "unknown gateway 'default'" in default.output, default.output
    url = CliRunner().invoke(app, ["rollout", "tiny", "--gateway", "http://attacker.example:8080"])
    assert url.exit_code == 2 and "looks like a URL" in url.output, url.output
    assert "Traceback" not in unknown.output + default.output + url.output
    assert registry.aliases_of(tiny, "tiny") == {"champion": "1", "challenger": "2"}


def test_unknown_gateway_name_is_refused_before_any_request(tiny, rollout_settings, tmp_path):
    with _stack() as stack:
        with pytest.raises(ConfigError, match=r"unknown gateway 'other'.*: default \("):
            run_rollout(RolloutParams(model="tiny", spec=_spec(tmp_path, [{"weight": 50}]), gateway="other"),
                        stack.allow(rollout_settings))
        assert stack.gw.routing.generation == 0  # no admin call reached it
    with pytest.raises(ValueError, match="looks like a URL"):
        RolloutParams(model="tiny", gateway=stack.url)


def test_gateway_that_does_not_say_which_versions_it_serves_fails_closed(tiny, rollout_settings, tmp_path):
    spec = _spec(tmp_path, [{"weight": 50, "analysis_s": 1.0}, {"weight": 100, "analysis_s": 1.0}])
    with _stack(versionless=True) as stack, _Traffic(stack.url):
        with pytest.raises(RolloutError, match="does not say which version its (challenger|champion) upstream"):
            run_rollout(RolloutParams(model="tiny", spec=spec, poll_s=0.2), stack.allow(rollout_settings))
        routing = stack.gw.routing
    assert routing.weight == 0 and routing.shadow == 0  # stopped with every request back on the champion
    assert registry.aliases_of(tiny, "tiny") == {"champion": "1", "challenger": "2"}
    tags = tiny.get_model_version("tiny", "2").tags
    assert tags["kiln.rollout.status"] == "aborted" and "promoted_by" not in " ".join(tags)


def test_gateway_reporting_no_upstreams_is_refused_before_traffic_moves(tiny, rollout_settings, tmp_path):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    calls = []

    async def state(request):
        calls.append(request.method)
        return JSONResponse({"weight": 0.0, "shadow": 0.0})  # a gateway that says nothing about upstreams

    silent = Starlette(routes=[Route("/admin/state", state), Route("/admin/{what}", state, methods=["POST"])])
    with serving(silent) as server:
        with pytest.raises(RolloutError, match="reports no upstreams"):
            run_rollout(RolloutParams(model="tiny", spec=_spec(tmp_path, [{"weight": 50}])),
                        _allow(rollout_settings, server.url))
    assert calls and set(calls) == {"GET"}  # read only: the split was never set
    assert registry.aliases_of(tiny, "tiny") == {"champion": "1", "challenger": "2"}
