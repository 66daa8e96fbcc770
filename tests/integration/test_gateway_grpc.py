"""The gateway's gRPC front on 127.0.0.1: ``tritonclient.grpc`` with its defaults, through the gateway.

Two real model servers (the tiny BERT package as ``tiny`` v3 and v4, HTTP and gRPC each) behind one gateway with a
gRPC port: the split set over the admin API routes gRPC calls as it routes HTTP, ``/admin/state`` counts them per
role, and a challenger nobody listens on falls back to the champion. With a shadow share, champion-answered calls are
mirrored to the challenger's gRPC API and scored as the HTTP proxy's mirrors are, never failing the client's call.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from contextlib import ExitStack, contextmanager
from types import SimpleNamespace

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc
from typer.testing import CliRunner

from kiln.cli.app import app as cli
from kiln.infra.background import serving
from kiln.infra.gateway import create_app as gateway_app
from kiln.infra.gateway_grpc import GatewayService
from kiln.infra.gateway_grpc import add_grpc as add_gateway_grpc
from kiln.infra.gateway_proxy import Gateway, Upstream
from kiln.infra.grpc_server import add_grpc
from kiln.infra.runtime import ServedModel
from kiln.infra.server import create_app
from kiln.tasks.engines import EngineOptions
from kiln.tasks.models.predictor import Predictor

TOKEN = "grpc-gateway-token"
TEXTS = ["great day", "awful traffic"]


@pytest.fixture(scope="module")
def folder(tiny_package):
    return tiny_package


@pytest.fixture(scope="module")
def servers(folder):
    """``tiny`` v3 (the champion's) and v4 (the challenger's) servers: {role: (http url, grpc address)}."""
    with ExitStack() as stack:
        out = {}
        for role, version in (("champion", "3"), ("challenger", "4")):
            app = create_app([ServedModel("tiny", version, Predictor(folder, EngineOptions(threads=1)))])
            endpoint = add_grpc(app, port=0)
            out[role] = SimpleNamespace(http=stack.enter_context(serving(app)).url, grpc=endpoint.address)
        yield out


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def _gateway(servers, challenger_grpc=None, **options):
    gateway = Gateway(Upstream(servers["champion"].http), Upstream(servers["challenger"].http), TOKEN,
                      poll_s=5.0, **options)
    app = gateway_app(gateway)
    front = add_gateway_grpc(app, champion=servers["champion"].grpc,
                             challenger=challenger_grpc or servers["challenger"].grpc, port=0)
    with serving(app) as http:
        client = triton.InferenceServerClient(front.address)
        try:
            yield SimpleNamespace(url=http.url, client=client, gateway=gateway, address=front.address)
        finally:
            client.close()


def _admin(gw, method, path, **body):
    answer = httpx.request(method, gw.url + path, json=body or None, headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 200, answer.text
    return answer.json()


def _infer(client, texts=TEXTS, model="tiny", **kwargs):
    tensor = triton.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
    return client.infer(model, [tensor], **kwargs)


def test_infer_health_and_metadata_through_the_gateway_follow_the_split(servers):
    with _gateway(servers) as gw:
        c = gw.client
        assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("tiny")
        assert list(c.get_model_metadata("tiny").versions) == ["3"]  # metadata comes from the champion
        result = _infer(c, request_id="r-1")
        response = result.get_response()
        assert (response.model_name, response.model_version, response.id) == ("tiny", "3", "r-1")
        labels = [b.decode() for b in result.as_numpy("label")]
        direct = httpx.post(servers["champion"].http + "/v2/models/tiny/infer",
                            json={"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": TEXTS}]})
        assert labels == next(o["data"] for o in direct.json()["outputs"] if o["name"] == "label")
        auth = {"Authorization": f"Bearer {TOKEN}"}
        forged = httpx.post(gw.url + "/feedback", json={"request_id": "r-1", "labels": labels}, headers=auth)
        assert forged.status_code == 404  # a client's id is never the key: the gateway's own is
        scored = httpx.post(gw.url + "/feedback", json={"request_id": _gateway_id(gw, "r-2"), "labels": labels},
                            headers=auth)
        assert scored.json()["scored"] == {"champion/live": 1.0}  # the gRPC answer was recorded under its id

        _admin(gw, "POST", "/admin/split", weight=100)
        assert {_infer(c).get_response().model_version for _ in range(4)} == {"4"}
        _admin(gw, "POST", "/admin/split", weight=50)
        answered = {_infer(c, headers={"x-kiln-sticky": "user-7"}).get_response().model_version for _ in range(6)}
        assert len(answered) == 1  # a sticky key stays on one side while the weight holds

        state = _admin(gw, "GET", "/admin/state")
        window = state["window"]
        assert window["champion"]["requests"] >= 1 and window["challenger"]["requests"] >= 4
        assert window["champion"]["requests"] + window["challenger"]["requests"] == 12
        assert window["champion"]["errors"] == window["challenger"]["errors"] == 0
        assert sum(window["challenger"]["labels"].values()) >= 8  # two rows per answer, by the label output
        assert state["upstreams"]["challenger"]["version"] == "4"  # learnt from the answers' model_version
        metrics = httpx.get(gw.url + "/metrics").text
        assert 'kiln_gateway_requests_total{code="200",role="challenger",version="4"}' in metrics


def _gateway_id(gw, client_id: str) -> str:
    """Send one infer call with the raw stub and return the request id the gateway sent back in its metadata."""
    request = service_pb2.ModelInferRequest(model_name="tiny", id=client_id)
    tensor = request.inputs.add(name="text", datatype="BYTES", shape=[len(TEXTS)])
    tensor.contents.bytes_contents.extend(t.encode() for t in TEXTS)
    with grpc.insecure_channel(gw.address) as channel:
        response, call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer.with_call(request, timeout=30)
    assert response.id == client_id  # the protocol's id is echoed; the bookkeeping key is another
    return dict(call.initial_metadata())["x-kiln-request-id"]


def test_an_upstream_error_passes_through_and_is_counted(servers):
    with _gateway(servers) as gw:
        with pytest.raises(triton.InferenceServerException) as err:
            _infer(gw.client, model="nope")
        assert "StatusCode.NOT_FOUND" in str(err.value.status())
        assert _admin(gw, "GET", "/admin/state")["window"]["champion"]["codes"] == {"404": 1}


def test_an_unreachable_challenger_falls_back_to_the_champion(servers):
    with _gateway(servers, challenger_grpc=f"127.0.0.1:{_free_port()}") as gw:
        _admin(gw, "POST", "/admin/split", weight=100)
        versions = [_infer(gw.client).get_response().model_version for _ in range(3)]
        assert versions == ["3", "3", "3"]
        window = _admin(gw, "GET", "/admin/state")["window"]
        assert window["champion"]["requests"] == 3 and window["challenger"]["codes"] == {"502": 3}
        assert "kiln_gateway_fallbacks_total 3.0" in httpx.get(gw.url + "/metrics").text


def test_kiln_gateway_refuses_incomplete_grpc_options(monkeypatch):
    monkeypatch.setenv("KILN_GATEWAY_TOKEN", TOKEN)
    base = ["gateway", "--champion", "http://127.0.0.1:1", "--challenger", "http://127.0.0.1:2", "--no-state-file"]
    result = CliRunner().invoke(cli, [*base, "--grpc-port", "0", "--champion-grpc", "127.0.0.1:3"])
    assert result.exit_code == 2 and "--challenger-grpc" in result.output
    result = CliRunner().invoke(cli, [*base, "--grpc-port", "0", "--champion-grpc", "http://x:3",
                                      "--challenger-grpc", "127.0.0.1:4"])
    assert result.exit_code == 2 and "HOST:PORT" in result.output


def _mirrored(gw, calls: int) -> dict:
    """The analysis window once ``calls`` mirrors have been answered (they run after the client's answer)."""
    deadline = time.monotonic() + 20
    while True:
        state = _admin(gw, "GET", "/admin/state")
        if sum(state["window"]["shadow"]["codes"].values()) >= calls and not state["shadow_in_flight"]:
            return state["window"]
        assert time.monotonic() < deadline, f"the mirrors never finished: {state['window']['shadow']}"
        time.sleep(0.02)


def test_shadow_mirrors_grpc_calls_to_the_challenger_and_scores_both_answers(servers):
    with _gateway(servers) as gw:
        _admin(gw, "POST", "/admin/split", shadow=1.0)
        results = [_infer(gw.client) for _ in range(3)]
        assert {r.get_response().model_version for r in results} == {"3"}  # the client sees the champion's answer
        labels = [b.decode() for b in results[0].as_numpy("label")]
        request_id = _gateway_id(gw, "r-1")  # a fourth call, with the id the gateway keys its bookkeeping by
        window = _mirrored(gw, 4)
        shadow = window["shadow"]
        assert (shadow["requests"], shadow["errors"], shadow["dropped"]) == (4, 0, 0)
        assert shadow["compared"] == shadow["agreed"] == 8  # the same package on both sides: every row agrees
        assert sum(shadow["labels"].values()) == 8 and shadow["input_rows"] == 8
        assert window["champion"]["requests"] == 4 and window["challenger"]["requests"] == 0
        assert window["champion"]["input_rows"] == 8  # input lengths are noted for gRPC calls too

        auth = {"Authorization": f"Bearer {TOKEN}"}
        scored = httpx.post(gw.url + "/feedback", json={"request_id": request_id, "labels": labels}, headers=auth)
        assert scored.json()["scored"] == {"champion/live": 1.0, "challenger/shadow": 1.0}, scored.text
        metrics = httpx.get(gw.url + "/metrics").text
        assert 'kiln_gateway_shadow_requests_total{code="200",version="4"} 4.0' in metrics
        assert 'kiln_gateway_shadow_comparisons_total{result="agree",version="4"} 8.0' in metrics
        assert 'kiln_gateway_feedback_total{result="correct",role="challenger",source="shadow",version="4"} 2.0' \
            in metrics


def test_a_slow_mirror_never_delays_the_call_and_stopping_waits_for_it(servers, monkeypatch):
    send, release = GatewayService._send_shadow, threading.Event()

    async def slow(self, request, metadata):  # a challenger that answers only once the test says so
        deadline = time.monotonic() + 10
        while not release.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return await send(self, request, metadata)

    monkeypatch.setattr(GatewayService, "_send_shadow", slow)
    with _gateway(servers) as gw:
        _admin(gw, "POST", "/admin/split", shadow=1.0)
        assert [_infer(gw.client).get_response().model_version for _ in range(2)] == ["3", "3"]
        assert gw.gateway.window.shadow.codes == {}  # both calls answered while their mirrors wait
        release.set()
    assert gw.gateway.window.shadow.codes == {"200": 2}  # stopping let both mirrors finish over open channels


def test_an_unreachable_challenger_fails_the_mirror_never_the_call(servers):
    with _gateway(servers, challenger_grpc=f"127.0.0.1:{_free_port()}") as gw:
        _admin(gw, "POST", "/admin/split", shadow=1.0)
        assert [_infer(gw.client).get_response().model_version for _ in range(3)] == ["3", "3", "3"]
        shadow = _mirrored(gw, 3)["shadow"]
        assert shadow["codes"] == {"502": 3} and shadow["errors"] == 3 and shadow["compared"] == 0
        metrics = httpx.get(gw.url + "/metrics").text  # the version label: "unknown" until the HTTP poll learns it
        assert re.search(r'kiln_gateway_shadow_requests_total\{code="502",version="[^"]+"\} 3\.0', metrics)


def test_mirrors_past_the_in_flight_bound_are_dropped_and_counted(servers):
    with _gateway(servers, max_shadow_inflight=0) as gw:
        _admin(gw, "POST", "/admin/split", shadow=1.0)
        assert _infer(gw.client).get_response().model_version == "3"
        window = _admin(gw, "GET", "/admin/state")["window"]
        assert window["shadow"]["dropped"] == 1 and window["shadow"]["codes"] == {}
        assert "kiln_gateway_shadow_dropped_total 1.0" in httpx.get(gw.url + "/metrics").text
