"""MLflow alias events wake a model server's followers (:mod:`kiln.infra.follow_events`), on a real ``mlflow
server`` (SQLite store, webhooks allowed on loopback) holding ``tiny`` v1 and v2, two tiny BERTs.

The in-process tests post deliveries signed as MLflow signs them to ``POST /hooks/mlflow`` of a server whose
follower's timer is an hour away, so that only a wake-up can make it look at the registry. The ``kiln serve
--webhook-url`` test lets MLflow itself deliver: the alias moves, and the server answers from the new version
long before its 300 s poll.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import httpx
import pytest
from mlflow.tracking import MlflowClient
from starlette.applications import Starlette
from starlette.testclient import TestClient
from typer.testing import CliRunner

from kiln.cli.app import app as cli
from kiln.infra.background import serving
from kiln.infra.follow import follow_refs
from kiln.infra.follow_events import ALIAS_EVENTS, AliasEvents, AliasWebhook, follow_events, webhook_name
from kiln.infra.server import create_app, load_registered
from kiln.settings import Settings
from kiln.tasks.engines import EngineOptions
from kiln.tasks.registry import aliases
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.onboard import register_folder
from tests.integration.test_registry_events import _free_port, mlflow_server  # noqa: F401 - a fixture
from tests.tiny import save_tiny
from tests.unit.test_registry_events import SECRET, deliver  # deliver: signed as MLflow signs, with SECRET

ALIAS = "live"  # not one of Kiln's decisions, so the test may point it (kiln.tasks.registry.aliases.point)
TEXT = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["great day"]}]}


@pytest.fixture(scope="module", autouse=True)
def _webhook_lists_not_cached():
    """MLflow caches each event's webhooks for MLFLOW_WEBHOOK_CACHE_TTL (60 s): the alias set while registering
    would hide a webhook registered later for a minute. (Set before ``mlflow_server`` starts.)"""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_WEBHOOK_CACHE_TTL", "1")
        yield


@pytest.fixture(scope="module")
def world(mlflow_server, tmp_path_factory, tiny_models, tiny_splits, tiny_spec):  # noqa: F811 - the fixture
    """``tiny`` v1 @live and v2 in the MLflow server's registry."""
    root = tmp_path_factory.mktemp("follow-webhook")
    settings = Settings(home=root / ".kiln", tracking_uri=mlflow_server, mlflow_webhook_secret=SECRET)
    client = registry.connect(settings)
    register_folder(client, settings, tiny_models["bert"], "tiny", "sequence-classification", tiny_spec, alias=ALIAS)
    other = save_tiny("bert", tiny_splits.train["text"].tolist(), root / "seed1", labels=tiny_splits.labels, seed=1)
    register_folder(client, settings, other, "tiny", "sequence-classification", tiny_spec, alias=None)
    return SimpleNamespace(settings=settings, client=client, url=mlflow_server)


def _point(world, version: str) -> None:
    aliases.point(world.client, "tiny", ALIAS, version, home=world.settings.home)


def _wait(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.05)


def _status(http: httpx.Client) -> dict:
    return http.get("/v2/models/tiny").json()["parameters"]


def _answer_version(http: httpx.Client) -> str:
    answer = http.post("/v2/models/tiny/infer", json=TEXT)
    assert answer.status_code == 200, answer.text
    return answer.json()["model_version"]


@contextmanager
def model_server(world) -> Iterator[SimpleNamespace]:
    """A server on tiny@live, wired as ``kiln serve`` wires it, whose follower would poll in an hour."""
    options = EngineOptions(threads=1)
    served = load_registered([f"tiny@{ALIAS}"], world.settings, options)
    app = create_app(served)
    followers = follow_refs(app.state.server.pool, [f"tiny@{ALIAS}"], served, world.settings, options,
                            interval_s=3600)
    assert follow_events(app, followers, world.settings) is None  # no --webhook-url: the route only
    events = next(s for s in app.state.server.pool.services if isinstance(s, AliasEvents))
    with serving(app) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        yield SimpleNamespace(http=http, waker=events.wakers[("tiny", ALIAS)])


def test_only_a_verified_event_for_the_followed_alias_wakes_the_follower_which_reads_the_registry(world):
    _point(world, "1")
    with model_server(world) as server:
        http = server.http
        _point(world, "2")  # no webhook is registered: only a delivery posted here can wake the follower
        created = {"name": "tiny", "alias": ALIAS, "version": "2"}
        for change, status in [({"X-MLflow-Signature": None}, 400), ({"X-MLflow-Signature": "v1,Zm9yZ2Vk"}, 401)]:
            assert deliver(http, ALIAS_EVENTS[0], created, headers=change).status_code == status
        assert deliver(http, ALIAS_EVENTS[0], created, secret="not-the-secret").status_code == 401
        assert deliver(http, ALIAS_EVENTS[0], created, skew_s=-3600).status_code == 401  # a replay
        for bad in ({"name": "tiny", "alias": 7}, {"name": "tiny\ud800", "alias": ALIAS}):
            assert deliver(http, ALIAS_EVENTS[0], bad).status_code == 400
        assert deliver(http, "model_version_alias.x\ud800", created).json()["status"] == "ignored"
        for event, data in [(ALIAS_EVENTS[0], {"name": "other", "alias": ALIAS, "version": "1"}),
                            (ALIAS_EVENTS[1], {"name": "tiny", "alias": "champion"}),
                            ("model_version.created", {"name": "tiny", "version": "2", "tags": {}})]:
            answer = deliver(http, event, data)
            assert answer.status_code == 200 and answer.json()["status"] == "ignored", answer.text
        time.sleep(0.2)
        assert server.waker.task is None  # nothing was woken: nothing read the registry, nothing changed
        assert (_status(http)["served_version"], _status(http)["alias_version"]) == ("1", "1")
        assert _answer_version(http) == "1"

        # Even a signed event only wakes: what is served comes from the registry, not from the payload's "7".
        answer = deliver(http, ALIAS_EVENTS[0], created | {"version": "7"}, delivery_id="d-1")
        assert answer.status_code == 202, answer.text
        assert answer.json() == {"status": "checking", "following": f"tiny@{ALIAS}", "delivery": "d-1"}
        _wait(lambda: _status(http)["served_version"] == "2", 60, "the woken follower to swap to v2")
        assert _answer_version(http) == "2"
        assert deliver(http, ALIAS_EVENTS[0], created, delivery_id="d-1").json()["status"] == "duplicate"


def test_without_the_secret_the_route_says_how_to_turn_it_on(tmp_path):
    app = Starlette(routes=[AliasEvents([], Settings(home=tmp_path)).route()])
    answer = deliver(TestClient(app), ALIAS_EVENTS[0], {"name": "tiny", "alias": ALIAS, "version": "1"})
    assert answer.status_code == 503 and "set KILN_MLFLOW_WEBHOOK_SECRET" in answer.json()["error"]


@pytest.mark.parametrize(("args", "env", "expected"), [
    ([f"tiny@{ALIAS}"], {}, "--webhook-url needs KILN_MLFLOW_WEBHOOK_SECRET"),
    ([f"tiny@{ALIAS}", "--no-follow"], {"KILN_MLFLOW_WEBHOOK_SECRET": SECRET}, "this one follows none"),
    (["tiny/1"], {"KILN_MLFLOW_WEBHOOK_SECRET": SECRET}, "this one follows none"),
    ([f"tiny@{ALIAS}"], {"KILN_MLFLOW_WEBHOOK_SECRET": SECRET, "KILN_TRACKING_URI": "sqlite:///x.db"},
     "needs an MLflow server (KILN_TRACKING_URI=http://...)"),
])
def test_kiln_serve_refuses_a_webhook_url_that_cannot_work_before_loading_anything(tmp_path, monkeypatch, args, env,
                                                                                    expected):
    for key in [k for k in os.environ if k.startswith("KILN_")]:
        monkeypatch.delenv(key)
    env = {"KILN_HOME": str(tmp_path), "KILN_TRACKING_URI": "http://127.0.0.1:1"} | env
    result = CliRunner(env=env).invoke(cli, ["serve", *args, "--webhook-url", "http://127.0.0.1:1/hooks/mlflow",
                                             "--no-grpc", "--port", "0"])
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output, result.output


def test_kiln_serve_help_explains_the_webhook():
    result = CliRunner(env={"COLUMNS": "300"}).invoke(cli, ["serve", "--help"])
    assert result.exit_code == 0, result.output
    for words in ("--webhook-url", "/hooks/mlflow", "KILN_MLFLOW_WEBHOOK_SECRET", "follow_webhook_interval_s"):
        assert words in result.output, words


def test_the_server_module_refuses_it_too(tmp_path, monkeypatch):
    from kiln.infra.server import main

    for key in [k for k in os.environ if k.startswith("KILN_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    with pytest.raises(SystemExit, match="error: --webhook-url needs KILN_MLFLOW_WEBHOOK_SECRET"):
        main(["--model", f"tiny@{ALIAS}", "--webhook-url", "http://127.0.0.1:1/hooks/mlflow"])
    monkeypatch.setenv("KILN_MLFLOW_WEBHOOK_SECRET", SECRET)
    with pytest.raises(SystemExit, match="error: --webhook-url needs an MLflow server"):
        main(["--model", f"tiny@{ALIAS}", "--webhook-url", "http://127.0.0.1:1/hooks/mlflow"])


def _hooks(client: MlflowClient, name: str) -> list:
    return [w for w in client.list_webhooks(max_results=100) if w.name == name]


def test_kiln_serve_registers_its_webhook_follows_the_alias_at_once_and_deletes_the_webhook_on_ctrl_c(
        world, tmp_path):
    _point(world, "1")
    client, port = MlflowClient(world.url), _free_port()
    url = f"http://127.0.0.1:{port}/hooks/mlflow"
    name = webhook_name(url)
    # What a server that crashed on this address left behind: the new one takes it over rather than adding one.
    stale = AliasWebhook(world.settings, "http://127.0.0.1:9/hooks/mlflow")
    stale.name = name
    stale_id = stale.register().webhook_id
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")} | {
        "KILN_HOME": str(world.settings.home), "KILN_TRACKING_URI": world.url, "KILN_THREADS": "1",
        "KILN_MLFLOW_WEBHOOK_SECRET": SECRET}
    command = [sys.executable, "-m", "kiln", "serve", f"tiny@{ALIAS}", "--no-grpc", "--port", str(port),
               "--follow-interval", "300", "--webhook-url", url]
    log = tmp_path / "serve.log"  # a file, not a pipe: a server blocked on a full pipe would fail the test
    with log.open("w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            def ready() -> bool:
                assert process.poll() is None, log.read_text()[-3000:]
                try:
                    return http.get("/v2/health/ready").status_code == 200
                except httpx.TransportError:
                    return False

            _wait(ready, 120, "kiln serve to be ready")
            [hook] = _hooks(client, name)
            assert (hook.webhook_id, hook.url) == (stale_id, url)
            assert sorted(f"{e.entity.value}.{e.action.value}" for e in hook.events) == sorted(ALIAS_EVENTS)
            assert _answer_version(http) == "1"
            _point(world, "2")
            _wait(lambda: _answer_version(http) == "2", 10, "MLflow's alias event to swap the server to v2")
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C
        process.wait(timeout=60)
    output = log.read_text()
    assert process.returncode == 0, output[-3000:]
    assert f"tiny@{ALIAS}: MLflow says the alias was created" in output, output[-3000:]
    assert _hooks(client, name) == [], "the webhook outlived the server"
