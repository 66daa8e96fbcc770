"""The gateway's control state on its own: the split's TTL, the versions seen, the state file."""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest

from kiln.infra.gateway_state import RoutingConflict, RoutingState, StateFile, Upstream, version_named
from kiln.infra.upstream import Answer

CHAMPION_URL, CHALLENGER_URL = "http://127.0.0.1:8001", "http://127.0.0.1:8002"


def _state(path=None, **kwargs) -> RoutingState:
    return RoutingState(Upstream(CHAMPION_URL), Upstream(CHALLENGER_URL), state_file=path, **kwargs)


def _answer(version: str | None = None, body: dict | None = None) -> Answer:
    headers = {"x-kiln-model-version": version} if version else {}
    return Answer(200, headers, json.dumps(body or {}).encode())


def test_a_restarted_gateway_routes_as_before(tmp_path):
    path = tmp_path / "gateway" / "state.json"
    before = _state(path, model="tiny")
    before.set(weight=25, shadow=0.5, ttl_s=60)
    before.observe("champion", _answer("1"), sent=1.0)
    before.observe("challenger", _answer("2"), sent=1.0)
    after = _state(path, weight=0.0)  # --weight's default must not win over what was routed
    assert after.routing == before.routing
    assert (after.routing.weight, after.routing.shadow) == (25.0, 0.5) and after.routing.expires_at is not None
    assert after.model == "tiny"
    assert {r: u.version for r, u in after.upstreams.items()} == {"champion": "1", "challenger": "2"}
    assert sorted(os.listdir(path.parent)) == ["state.json"]  # written by rename: no temporary file left behind


def test_every_change_is_saved_at_once(tmp_path):
    path = tmp_path / "state.json"
    state = _state(path)
    for weight in (10, 50, 100):
        state.set(weight=weight)
        assert json.loads(path.read_text())["weight"] == weight
    state.set(weight=30, ttl_s=5)
    expires = json.loads(path.read_text())["expires_at"]
    time.sleep(0.01)
    state.renew(5)
    assert json.loads(path.read_text())["expires_at"] > expires


def test_a_split_with_a_ttl_lapses_back_to_the_champion_and_cannot_be_renewed_after(tmp_path):
    state = _state(tmp_path / "state.json")
    routing = state.set(weight=50, shadow=1.0, ttl_s=30)
    assert not state.lapse_if_due(now=routing.expires_at - 1)
    assert state.renew(30).generation == routing.generation  # renewing is not a change of split
    assert state.lapse_if_due(now=state.routing.expires_at + 0.1)
    assert (state.routing.weight, state.routing.shadow, state.routing.expires_at) == (0.0, 0.0, None)
    assert state.lapsed["weight"] == 50 and state.routing.generation == routing.generation + 1
    with pytest.raises(RoutingConflict, match=r"split \(weight 50%, shadow 1\) lapsed at .* set the split again"):
        state.renew(30)
    assert _state(tmp_path / "state.json").lapsed["weight"] == 50  # a restarted gateway still says why


def test_a_split_set_by_hand_never_lapses_and_has_nothing_to_renew():
    state = _state()
    state.set(weight=20)
    assert state.routing.expires_at is None and not state.lapse_if_due(now=time.time() + 10**9)
    with pytest.raises(RoutingConflict, match="set without ttl_s"):
        state.renew(60)


def test_a_split_that_lapsed_while_the_gateway_was_down_is_reverted_at_start(tmp_path):
    path = tmp_path / "state.json"
    _state(path).set(weight=40, ttl_s=0.05)
    time.sleep(0.1)
    restarted = _state(path)
    assert restarted.routing.weight == 0 and restarted.lapsed["weight"] == 40
    assert json.loads(path.read_text())["weight"] == 0


def test_a_state_file_of_other_upstreams_is_not_loaded(tmp_path):
    path = tmp_path / "state.json"
    _state(path, model="tiny").set(weight=60)
    other = RoutingState(Upstream("http://127.0.0.1:9001"), Upstream(CHALLENGER_URL), state_file=path, weight=5)
    assert other.routing.weight == 5 and other.model is None


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", "not valid JSON"),
    ('{"format": 99}', "not a format-1 Kiln gateway state"),
    ('{"format": 1, "weight": 500, "shadow": 0, "upstreams": {"champion": {"url": "http://127.0.0.1:8001"}, '
     '"challenger": {"url": "http://127.0.0.1:8002"}}}', "holds no valid split"),
])
def test_an_unreadable_state_file_stops_the_start_with_what_to_do(tmp_path, text, message):
    path = tmp_path / "state.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as caught:
        _state(path)
    assert "delete it" in str(caught.value)


def test_a_state_file_that_cannot_be_written_is_reported_and_routing_goes_on(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    state = _state(blocker / "state.json")
    assert state.save_error is not None
    assert state.set(weight=10).weight == 10 and state.save_error is not None


def test_the_answer_to_the_request_sent_last_names_the_version():
    state = _state(model="tiny")
    state.observe("champion", _answer("1"), sent=1.0)
    state.observe("champion", _answer("2"), sent=3.0)  # the server swapped
    state.observe("champion", _answer("1"), sent=2.0)  # a late answer the old version gave before the swap
    assert state.upstreams["champion"].version == "2"
    state.observe("champion", _answer(body={"name": "tiny", "versions": ["3"]}), sent=4.0)
    assert state.upstreams["champion"].version == "3"


@pytest.mark.parametrize(("answer", "version"), [
    (_answer("7"), "7"),
    (_answer(body={"name": "tiny", "versions": ["4"], "platform": "onnxruntime_onnx"}), "4"),
    (_answer(body={"model_name": "tiny", "model_version": "5", "outputs": []}), "5"),
    (_answer(body={"name": "tiny", "versions": ["1", "2"]}), None),  # which one answers is not said
    (_answer(body={"name": "tiny"}), None),
    (Answer(200, {}, b"\x00binary"), None),
])
def test_version_named(answer, version):
    assert version_named(answer) == version


def test_the_model_name_is_learnt_from_the_first_v2_request():
    state = _state()
    state.learn_model("/v2/health/ready")
    assert state.model is None
    state.learn_model("/v2/models/tiny/infer")
    state.learn_model("/v2/models/other/infer")
    assert state.model == "tiny"


@pytest.mark.parametrize("ttl", [0, -1, True, "60", 10**9])
def test_bad_ttls_are_refused(ttl):
    with pytest.raises(ValueError, match="ttl_s must be a number of seconds"):
        _state().set(weight=10, ttl_s=ttl)


def test_state_file_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    store = StateFile(path)
    store.save({"format": 1, "weight": 1})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        store.save({"format": 1, "weight": 2})
    assert json.loads(path.read_text())["weight"] == 1 and os.listdir(tmp_path) == ["state.json"]


class _Upstreams:
    """A stand-in for the gateway's HTTP client: each URL answers what ``answers`` says."""

    def __init__(self, answers: dict[str, Answer]) -> None:
        self.answers, self.asked = answers, []

    async def request(self, method: str, url: str, **kwargs) -> Answer:
        self.asked.append((method, url))
        return self.answers[url.split("/v2/")[0]]


def test_polls_ask_each_upstream_for_its_version_and_a_name_learnt_from_a_typo_is_learnt_again():
    state = _state()
    state.learn_model("/v2/models/tiny/infer")
    client = _Upstreams({CHAMPION_URL: _answer(body={"name": "tiny", "versions": ["2"]}),
                         CHALLENGER_URL: _answer("3")})
    asyncio.run(state.poll(client, timeout_s=1))
    assert sorted(client.asked) == [("GET", f"{url}/v2/models/tiny") for url in (CHAMPION_URL, CHALLENGER_URL)]
    assert {r: u.version for r, u in state.upstreams.items()} == {"champion": "2", "challenger": "3"}
    typo = _state()
    typo.learn_model("/v2/models/tinny/infer")
    missing = Answer(404, {}, b'{"error": "no model"}')
    asyncio.run(typo.poll(_Upstreams({CHAMPION_URL: missing, CHALLENGER_URL: missing}), timeout_s=1))
    assert typo.model is None and "404" in typo.upstreams["champion"].error
    given = _state(model="tinny")
    asyncio.run(given.poll(_Upstreams({CHAMPION_URL: missing, CHALLENGER_URL: missing}), timeout_s=1))
    assert given.model == "tinny"  # --model-name is the operator's word: kept
