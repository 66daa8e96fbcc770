"""Promotion hands traffic over; the gateway's routing survives a restart; a dead driver's split lapses.

Real components on 127.0.0.1 and a real MLflow SQLite registry:

- the hand-over: model servers that follow their aliases (:func:`kiln.infra.follow.follow_refs`, as ``kiln serve
  NAME@ALIAS`` attaches them) serving two registered tiny BERTs, the gateway in front, a rollout that promotes,
  then ``kiln rollback``'s code moving @champion back; probes note which upstream and version answered each request;
- the restart: the gateway as its own process (``python -m kiln.infra.gateway --state-file ...``), killed with
  SIGKILL while a rollout holds its split, and started again on the same state file;
- the lapse: a split set with a short ``ttl_s`` that nobody renews, and a rollout whose driver stops renewing.

The last two use stand-in engines (:class:`tests.fakes.FastFake`): they test routing, not inference.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest
from pydantic import AnyHttpUrl, SecretStr

from kiln.infra.background import serving
from kiln.infra.follow import follow_refs
from kiln.infra.gateway import create_app as gateway_app
from kiln.infra.gateway_proxy import Gateway, Upstream
from kiln.infra.runtime import ServedModel
from kiln.infra.server import create_app as server_app
from kiln.infra.server import load_registered
from kiln.settings import Settings
from kiln.tasks.core import tags as vocab
from kiln.tasks.engines import EngineOptions
from kiln.tasks.lifecycle import promotion
from kiln.tasks.registry import aliases
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.lease import ModelLease
from kiln.tasks.registry.onboard import register_folder
from kiln.tasks.rollout import driver as rollout_driver
from kiln.tasks.rollout.commands import send_command
from kiln.tasks.rollout.launch import run_rollout
from kiln.tasks.rollout.params import RolloutError, RolloutParams
from tests.fakes import FastFake
from tests.integration.helpers import champion_and_challenger
from tests.keys import approve
from tests.tiny import save_tiny

TOKEN = "handover-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LENIENT = {"max_error_rate": 0.0, "max_p95_ratio": 20.0, "max_p99_ratio": None, "latency_test": None}


def _spec(tmp_path: Path, steps: list[dict]) -> str:
    path = tmp_path / "rollout.yaml"
    path.write_text(json.dumps({"steps": steps, "metrics": LENIENT, "failure_limit": 0, "min_samples": 20}))
    return str(path)


def _settings(settings: Settings, gateway_url: str, **more) -> Settings:
    return settings.model_copy(update={"gateway_token": SecretStr(TOKEN), "handover_timeout_s": 60.0,
                                       "rollout_gateways": {"default": AnyHttpUrl(gateway_url)}} | more)


def _wait(condition: Callable[[], object], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _admin(url: str, method: str, path: str, body: dict | None = None) -> httpx.Response:
    return httpx.request(method, url + path, json=body, headers=AUTH, timeout=10)


class Reply(NamedTuple):
    at: float  # monotonic time the answer arrived
    status: int  # 0: no answer at all
    upstream: str | None
    version: str | None


class _Probe:
    """Requests through the gateway from a few threads until stopped, each answer noted."""

    def __init__(self, url: str, texts: list[str], threads: int = 2, pause_s: float = 0.01) -> None:
        self.url, self.texts, self.pause_s = url, texts, pause_s
        self.replies: list[Reply] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, offset: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            i = offset
            while not self.stop.is_set():
                text = self.texts[i % len(self.texts)]
                i += len(self.threads)
                body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]}
                try:
                    r = http.post("/v2/models/tiny/infer", json=body)
                    self.replies.append(Reply(time.monotonic(), r.status_code, r.headers.get("x-kiln-upstream"),
                                              r.headers.get("x-kiln-model-version")))
                except httpx.HTTPError:
                    self.replies.append(Reply(time.monotonic(), 0, None, None))
                time.sleep(self.pause_s)

    def since(self, t: float) -> list[Reply]:
        return [r for r in list(self.replies) if r.at >= t]

    def __enter__(self) -> _Probe:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


# ---- the hand-over, with servers that follow their aliases --------------------------------------------------


@pytest.fixture(scope="module")
def second_bert(tmp_path_factory, tiny_splits) -> Path:
    """Another tiny BERT (other seed, same labels): v2, a different package from v1."""
    return save_tiny("bert", tiny_splits.train["text"].tolist(), tmp_path_factory.mktemp("handover") / "bert",
                     labels=tiny_splits.labels, seed=1)


@pytest.fixture
def registered(settings, empty_store, tiny_models, second_bert, tiny_spec, keys):
    """``tiny`` v1 @champion and v2 @challenger (gate passed, approved by alice): real packages to serve and follow."""
    shutil.copy(empty_store, settings.home / "mlflow.db")
    client = registry.connect(settings)
    register_folder(client, settings, tiny_models["bert"], "tiny", "sequence-classification", tiny_spec)
    v2 = register_folder(client, settings, second_bert, "tiny", "sequence-classification", tiny_spec, alias=None,
                         extra_tags={vocab.GATE: vocab.GATE_PASSED})
    assert str(v2.version) == "2"
    aliases.nominate(client, "tiny", "2", home=settings.home)
    approve(client, "tiny", "2", keys, "alice", "ship it if the canary passes")
    return client


@contextmanager
def _following_stack(settings: Settings, state_file: Path) -> Iterator[Gateway]:
    """Model servers on tiny@champion and tiny@challenger that follow their aliases (every 0.3 s), and the gateway."""
    options = EngineOptions(threads=1)
    with ExitStack() as stack:
        urls = []
        for ref in ("tiny@champion", "tiny@challenger"):
            served = load_registered([ref], settings, options)
            app = server_app(served)
            follow_refs(app.state.server.pool, [ref], served, settings, options, interval_s=0.3)
            urls.append(stack.enter_context(serving(app)).url)
        gateway = Gateway(Upstream(urls[0]), Upstream(urls[1]), TOKEN, state_file=state_file, poll_s=0.3)
        gateway.url = stack.enter_context(serving(gateway_app(gateway))).url
        yield gateway


def test_a_promotion_hands_traffic_to_the_champion_server_that_follows_the_alias_with_no_request_failing(
        registered, settings, tiny_splits, tmp_path):
    client, texts = registered, tiny_splits.test["text"].tolist()
    spec = _spec(tmp_path, [{"weight": 50, "analysis_s": 2}, {"weight": 100, "analysis_s": 2}])
    with _following_stack(settings, tmp_path / "gateway.json") as gw, _Probe(gw.url, texts) as probe:
        state = run_rollout(RolloutParams(model="tiny", spec=spec, poll_s=0.2), _settings(settings, gw.url))
        after_promotion = _admin(gw.url, "GET", "/admin/state").json()
        saved = json.loads((tmp_path / "gateway.json").read_text())
        _wait(lambda: len(probe.since(time.monotonic() - 1)) > 20, "traffic on the new champion")
        # `kiln rollback`: @champion back to v1; the champion's server follows it back, still with no failure.
        rolled_back_at = time.monotonic()
        promotion.rollback(client, "tiny", actor="bob", reason="back to v1", home=settings.home)
        _wait(lambda: gw.upstreams["champion"].version == "1", "the champion server to follow @champion back")
        _wait(lambda: [r for r in probe.since(rolled_back_at) if r.version == "1"], "answers from v1 again")
    assert state.status == "promoted", state.message
    assert "all traffic on the champion, v2" in state.message, state.message
    assert registry.aliases_of(client, "tiny") == {"champion": "1"}  # after the rollback
    # The gateway ends at weight 0, shadow 0, for good, with its champion upstream serving the new champion.
    assert (after_promotion["weight"], after_promotion["shadow"], after_promotion["expires_at"]) == (0, 0, None)
    assert after_promotion["upstreams"]["champion"]["version"] == "2"
    assert after_promotion["upstreams"]["challenger"]["version"] == "2"  # @challenger is gone; it serves on
    assert (saved["weight"], saved["upstreams"]["champion"]["version"]) == (0, "2")  # and so says its state file
    replies = list(probe.replies)
    assert replies and [r for r in replies if r.status != 200] == [], "requests failed during the hand-over"
    # From the first answer of the champion's server on v2 until the rollback, v1 answered nothing: the traffic
    # never went back to the old version.
    handed = min(r.at for r in replies if r.upstream == "champion" and r.version == "2")
    assert [r for r in replies if handed <= r.at < rolled_back_at and r.version == "1"] == []
    assert len([r for r in replies if handed <= r.at < rolled_back_at and r.upstream == "champion"]) > 20


# ---- the gateway restarted mid-rollout ------------------------------------------------------------------------


@pytest.fixture
def stand_ins(settings, empty_store, tmp_path, keys):
    """``tiny`` v1 @champion, v2 @challenger (gate passed, nominated): registry only, the servers are stand-ins."""
    return champion_and_challenger(settings, empty_store, tmp_path / "model")


@contextmanager
def _stand_in_servers() -> Iterator[tuple[str, str]]:
    with serving(server_app([ServedModel("tiny", "1", FastFake("negative"))])) as champion, \
            serving(server_app([ServedModel("tiny", "2", FastFake("positive"))])) as challenger:
        yield champion.url, challenger.url


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gateway_process(champion: str, challenger: str, port: int, state_file: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "kiln.infra.gateway", "--champion", champion, "--challenger", challenger,
            "--port", str(port), "--state-file", str(state_file), "--model-name", "tiny", "--poll-interval", "0.5"]
    proc = subprocess.Popen(argv, env=os.environ | {"KILN_GATEWAY_TOKEN": TOKEN}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    def up() -> bool:
        assert proc.poll() is None, f"the gateway exited with {proc.returncode}"
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    _wait(up, "the gateway process to answer")
    return proc


def test_a_gateway_killed_mid_rollout_and_started_again_on_its_state_file_keeps_the_split(
        stand_ins, settings, tmp_path, keys):
    spec = _spec(tmp_path, [{"weight": 50, "analysis_s": 1}, {"weight": 100, "analysis_s": 1, "manual_gate": True}])
    port, state_file = _free_port(), tmp_path / "gateway-state.json"
    url = f"http://127.0.0.1:{port}"
    result: dict = {}
    with _stand_in_servers() as (champion, challenger):
        gateway = _gateway_process(champion, challenger, port, state_file)
        try:
            with _Probe(url, ["a text", "another text"]) as probe:
                runner = threading.Thread(target=lambda: result.update(state=run_rollout(
                    RolloutParams(model="tiny", spec=spec, poll_s=0.2), _settings(settings, url))), daemon=True)
                runner.start()
                _wait(lambda: stand_ins.get_model_version("tiny", "2").tags.get(vocab.ROLLOUT_STATUS) == "paused",
                      "the rollout to hold its split at the manual gate")
                before = _admin(url, "GET", "/admin/state").json()
                gateway.send_signal(signal.SIGKILL)  # no chance to save anything on the way out
                gateway.wait(10)
                gateway = _gateway_process(champion, challenger, port, state_file)
                restarted_at = time.monotonic()
                after = _admin(url, "GET", "/admin/state").json()
                _wait(lambda: len([r for r in probe.since(restarted_at) if r.status == 200]) >= 200,
                      "traffic through the restarted gateway")
                aborted_at = time.monotonic()
                send_command(stand_ins, "tiny", "abort", settings=settings, key=keys.key("alice"),
                             reason="restart drill over")
                runner.join(30)
                ended = _admin(url, "GET", "/admin/state").json()
        finally:
            gateway.kill()
            gateway.wait(10)
    assert before["weight"] == 50 and before["expires_at"] is not None
    for key in ("weight", "shadow", "generation", "expires_at", "model"):
        assert after[key] == before[key], key  # routed as before the kill, not from --weight's default 0
    assert {r: u["version"] for r, u in after["upstreams"].items()} == {"champion": "1", "challenger": "2"}
    answered = [r.upstream for r in probe.since(restarted_at) if r.status == 200 and r.at < aborted_at]
    assert 0.4 < answered.count("challenger") / len(answered) < 0.6, answered.count("challenger")
    # The driver went on against the restarted gateway: its abort put every request back on the champion.
    assert result["state"].status == "aborted" and "restart drill over" in result["state"].message
    assert (ended["weight"], ended["shadow"], ended["expires_at"]) == (0, 0, None)


# ---- splits that lapse ----------------------------------------------------------------------------------------


@contextmanager
def _stand_in_stack(tmp_path: Path) -> Iterator[Gateway]:
    with _stand_in_servers() as (champion, challenger):
        gateway = Gateway(Upstream(champion), Upstream(challenger), TOKEN, state_file=tmp_path / "gw.json",
                          poll_s=0.5)
        with serving(gateway_app(gateway)) as server:
            gateway.url = server.url
            yield gateway


def test_a_split_with_a_short_ttl_reverts_to_the_champion_when_nobody_renews_it(tmp_path):
    with _stand_in_stack(tmp_path) as gw, _Probe(gw.url, ["some text"]) as probe:
        bad = _admin(gw.url, "POST", "/admin/split", {"weight": 100, "ttl_s": 0})
        assert bad.status_code == 400 and "ttl_s must be" in bad.json()["error"]
        manual = _admin(gw.url, "POST", "/admin/split", {"weight": 30})
        assert manual.json()["expires_at"] is None
        refused = _admin(gw.url, "POST", "/admin/renew", {"ttl_s": 5})
        assert refused.status_code == 409 and "set without ttl_s" in refused.json()["error"]
        split = _admin(gw.url, "POST", "/admin/split", {"weight": 100, "ttl_s": 1.5}).json()
        assert split["expires_at"] is not None
        assert _admin(gw.url, "POST", "/admin/renew", {"ttl_s": 1.5}).status_code == 200
        set_at = time.monotonic()
        _wait(lambda: gw.routing.weight == 0, "the split to lapse", timeout_s=10)
        lapsed_after = time.monotonic() - set_at
        lapsed_at = time.monotonic()
        state = _admin(gw.url, "GET", "/admin/state").json()
        renew = _admin(gw.url, "POST", "/admin/renew", {"ttl_s": 5})
        _wait(lambda: len(probe.since(lapsed_at + 0.2)) > 20, "traffic after the lapse")
    assert 1.0 < lapsed_after < 4.0, lapsed_after
    assert (state["weight"], state["shadow"], state["expires_at"]) == (0, 0, None)
    assert state["lapsed"]["weight"] == 100
    assert renew.status_code == 409 and "lapsed" in renew.json()["error"]
    assert {r.upstream for r in probe.since(lapsed_at + 0.2)} == {"champion"}
    assert json.loads((tmp_path / "gw.json").read_text())["lapsed"]["weight"] == 100


@pytest.fixture
def short_lease(monkeypatch):
    """Rollouts take a 3 s lease, so their split's TTL is 3 s too (renewed every second)."""
    monkeypatch.setattr(rollout_driver, "ModelLease", functools.partial(ModelLease, ttl_s=3.0))


def test_a_driver_that_renews_keeps_its_split_past_the_ttl(stand_ins, settings, tmp_path, keys, monkeypatch):
    approve(stand_ins, "tiny", "2", keys, "alice", "ok")
    # A 5 s lease (renewed every 1.7 s: a 3 s one lapsed once on a loaded 2-core CI machine, where a renewal's
    # SQLite write waited behind others). Analyses longer than the TTL, renewed all along: it promotes (no server
    # follows here, so the hand-over gives up after 1 s, saying so) and the split never lapsed.
    monkeypatch.setattr(rollout_driver, "ModelLease", functools.partial(ModelLease, ttl_s=5.0))
    spec = _spec(tmp_path, [{"weight": 50, "analysis_s": 6}, {"weight": 100, "analysis_s": 6}])
    with _stand_in_stack(tmp_path) as gw, _Probe(gw.url, ["some text"]):
        state = run_rollout(RolloutParams(model="tiny", spec=spec, poll_s=0.2),
                            _settings(settings, gw.url, handover_timeout_s=1.0))
        routing, lapsed = gw.routing, gw.control.lapsed
    assert state.status == "promoted", state.message
    assert [v.weight for v in state.verdicts] == [50, 100]
    assert lapsed is None and routing.weight == 100 and routing.expires_at is None  # kept on v2, for good


def test_a_driver_that_stops_renewing_loses_its_split_to_the_champion(stand_ins, settings, tmp_path, short_lease,
                                                                     monkeypatch):
    stuck, release = threading.Event(), threading.Event()

    def stuck_in_analysis(self, seconds: float) -> str:  # as good as dead: its loop renews nothing
        stuck.set()
        release.wait(60)
        return "done"

    monkeypatch.setattr(rollout_driver.RolloutDriver, "_wait", stuck_in_analysis)
    spec = _spec(tmp_path, [{"weight": 50, "analysis_s": 4}])
    outcome: dict = {}

    def run() -> None:
        try:
            run_rollout(RolloutParams(model="tiny", spec=spec, poll_s=0.2), _settings(settings, gw.url))
        except RolloutError as exc:
            outcome["error"] = exc

    with _stand_in_stack(tmp_path) as gw, _Probe(gw.url, ["some text"]) as probe:
        runner = threading.Thread(target=run, daemon=True)
        runner.start()
        _wait(stuck.is_set, "the driver to start its first analysis")
        assert gw.routing.weight == 50
        _wait(lambda: gw.routing.weight == 0, "the split of the stuck driver to lapse", timeout_s=15)
        lapsed_at, lapsed = time.monotonic(), gw.control.lapsed
        _wait(lambda: len(probe.since(lapsed_at + 0.2)) > 20, "traffic after the lapse")
        release.set()
        runner.join(30)
    assert lapsed["weight"] == 50
    assert {r.upstream for r in probe.since(lapsed_at + 0.2)} == {"champion"}
    # Woken up, the driver finds its split gone and stops: nothing promoted, the champion untouched.
    assert "lapsed" in str(outcome["error"]), outcome
    assert registry.aliases_of(stand_ins, "tiny") == {"champion": "1", "challenger": "2"}
    assert stand_ins.get_model_version("tiny", "2").tags[vocab.ROLLOUT_STATUS] == "aborted"
