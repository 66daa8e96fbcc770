"""Model server and gateway over real HTTP on 127.0.0.1: two registered tiny versions, a gateway in front.

The champion is a registered tiny BERT (PyTorch weights); the challenger is its ONNX export registered
as a second version. The split-accuracy test uses stub upstreams (a fake engine behind the same model
server code) because it only counts where 2,000 requests went.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import mlflow
import numpy as np
import pytest

from kiln.infra.background import serving
from kiln.infra.gateway import create_app as gateway_app
from kiln.infra.gateway_proxy import Gateway, Upstream
from kiln.infra.loadgen import LoadPlan, check_loopback, generate_load
from kiln.infra.server import create_app as server_app
from kiln.infra.server import load_registered
from kiln.settings import Settings
from kiln.tasks.core import tags as vocab
from kiln.tasks.core.stages import Artifact
from kiln.tasks.engines import EngineOptions
from kiln.tasks.models.predictor import PackageMeta, package
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.onboard import inspect_folder, register_folder
from kiln.tasks.registry.pins import package_digest
from kiln.tasks.registry.pyfunc import log_package
from kiln.tasks.rollout.judge import RolloutSpec, judge_step, stats_from_state
from tests.fakes import FastFake

TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TEXT = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["great day", "awful traffic"]}]}


def _register_onnx_challenger(client, settings: Settings, hf_folder: Path, labels: list[str]) -> None:
    from kiln.tasks.models.export import export_onnx
    from kiln.tasks.models.hf import load_model

    with tempfile.TemporaryDirectory() as tmp:
        onnx = export_onnx(load_model(hf_folder, "sequence-classification"), Path(tmp) / "model.onnx")
        folder = package(Artifact("onnx", onnx), hf_folder, Path(tmp) / "pkg",
                         PackageMeta(format="onnx", task="sequence-classification", labels=labels,
                                     recipe="onnx-fp32"))
        with mlflow.start_run(experiment_id=registry.ensure_experiment(client, settings)):
            info = log_package(folder, "onnx-fp32", Path(tmp))
        version = mlflow.register_model(f"models:/{info.model_id}", "tiny",
                                        tags={vocab.PACKAGE_DIGEST: package_digest(folder)})  # loaders require it
    client.set_registered_model_alias("tiny", vocab.CHALLENGER, version.version)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_models, tiny_spec):
    """The registered champion (v1, PyTorch) and challenger (v2, ONNX), loaded as the server CLI loads them."""
    settings = Settings(home=tmp_path_factory.mktemp("serving") / ".kiln")
    client = registry.connect(settings)
    register_folder(client, settings, tiny_models["bert"], "tiny", "sequence-classification", tiny_spec)
    labels = inspect_folder(tiny_models["bert"], "sequence-classification")
    _register_onnx_challenger(client, settings, tiny_models["bert"], labels)
    options = EngineOptions(threads=1)
    return {"champion": load_registered(["tiny@champion"], settings, options),
            "challenger": load_registered(["tiny@challenger"], settings, options), "labels": labels}


@pytest.fixture(scope="module")
def model_servers(served):
    with serving(server_app(served["champion"])) as champion, \
            serving(server_app(served["challenger"])) as challenger:
        yield {"champion": champion, "challenger": challenger}


def _gateway(upstreams, **kwargs):
    gateway = Gateway(Upstream(upstreams["champion"].url), Upstream(upstreams["challenger"].url), TOKEN, **kwargs)
    return gateway, serving(gateway_app(gateway))


@pytest.fixture
def gateway(model_servers):
    gw, context = _gateway(model_servers)
    with context as server:
        yield SimpleNamespace(url=server.url, gateway=gw)


@pytest.fixture(scope="module")
def stub_servers():
    with serving(server_app({"tiny": FastFake("negative")})) as champion, \
            serving(server_app({"tiny": FastFake("positive")})) as challenger:
        yield {"champion": champion, "challenger": challenger}


# ---- the model server ---------------------------------------------------------------------------------------


def test_model_server_serves_registered_versions_over_v2(model_servers, served):
    with httpx.Client(base_url=model_servers["challenger"].url) as c:
        assert c.get("/v2/health/live").json() == {"live": True}
        assert c.get("/v2/health/ready").status_code == 200
        meta = c.get("/v2/models/tiny").json()
        assert (meta["name"], meta["versions"], meta["platform"]) == ("tiny", ["2"], "onnxruntime_onnx")
        assert {i["name"] for i in meta["inputs"]} == {"text", "input_ids", "attention_mask"}
        assert c.get("/v2/models/tiny/versions/challenger/ready").json()["ready"] is True
        answer = c.post("/v2/models/tiny/versions/2/infer", json=TEXT | {"id": "req-1"})
        assert answer.status_code == 200 and answer.headers["x-kiln-model-version"] == "2"
        body = answer.json()
        outputs = {o["name"]: o for o in body["outputs"]}
        assert body["id"] == "req-1" and set(outputs["label"]["data"]) <= set(served["labels"])
        assert outputs["scores"]["shape"] == [2, 3] and outputs["score"]["datatype"] == "FP32"
        ids, mask = served["challenger"][0].predictor.encode(["great day", "awful"])
        raw = c.post("/v2/models/tiny/infer", json={"inputs": [
            {"name": "input_ids", "shape": list(ids.shape), "datatype": "INT64", "data": ids.tolist()},
            {"name": "attention_mask", "shape": list(mask.shape), "datatype": "INT64", "data": mask.tolist()}]})
        logits = np.array(raw.json()["outputs"][0]["data"]).reshape(raw.json()["outputs"][0]["shape"])
        np.testing.assert_allclose(logits, served["challenger"][0].predictor.run(ids, mask), atol=1e-5)
    with httpx.Client(base_url=model_servers["champion"].url) as c:
        assert c.get("/v2/models/tiny/versions/champion").json()["platform"] == "pytorch"
        torch_labels = c.post("/v2/models/tiny/infer", json=TEXT).json()["outputs"][0]["data"]
        assert torch_labels == outputs["label"]["data"]  # same weights, two engines, same answers


@pytest.mark.parametrize(("body", "message"), [
    (b"{not json", "not valid JSON"),
    ({"inputs": []}, "non-empty list"),
    ({"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": ["a"]}]}, "holds 3 elements"),
    ({"inputs": [{"name": "text", "datatype": "BYTES", "data": ["a"]}]}, "lacks shape"),
    ({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [7]}]}, "must be a string"),
    ({"inputs": [{"name": "input_ids", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}]}, "INT64"),
    ({"inputs": TEXT["inputs"], "outputs": [{"name": "nope"}]}, "unknown output"),
])
def test_malformed_requests_get_400_with_a_json_error(model_servers, gateway, body, message):
    for base in (model_servers["challenger"].url, gateway.url):  # directly, and passed through the gateway
        kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
        answer = httpx.post(f"{base}/v2/models/tiny/infer", **kwargs)
        assert answer.status_code == 400 and message in answer.json()["error"]


def test_unknown_models_and_versions_are_404_json(model_servers):
    base = model_servers["champion"].url
    for path in ("/v2/models/nope", "/v2/models/tiny/versions/7", "/v2/models/nope/infer", "/elsewhere"):
        answer = httpx.post(base + path, json=TEXT) if path.endswith("infer") else httpx.get(base + path)
        assert answer.status_code == 404 and answer.json()["error"]


def test_server_batches_concurrent_requests(model_servers, served):
    predictor = served["challenger"][0].predictor
    calls = []
    original = predictor.run
    predictor.run = lambda ids, mask: (calls.append(len(ids)), original(ids, mask))[1]
    try:
        async def burst():
            async with httpx.AsyncClient(base_url=model_servers["challenger"].url) as c:
                one = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["so so"]}]}
                return await asyncio.gather(*(c.post("/v2/models/tiny/infer", json=one) for _ in range(48)))

        answers = asyncio.run(burst())
    finally:
        predictor.run = original
    assert all(a.status_code == 200 for a in answers)
    assert sum(calls) == 48 and len(calls) < 48 / 2, calls  # rows merged into far fewer engine calls
    metrics = httpx.get(model_servers["challenger"].url + "/metrics").text
    assert 'kiln_server_batch_rows_count{model="tiny",version="2"}' in metrics


# ---- the gateway --------------------------------------------------------------------------------------------


def test_split_follows_the_weight_within_three_points(stub_servers):
    gw, context = _gateway(stub_servers, weight=25)
    with context as server:
        summary = generate_load(LoadPlan(server.url, "tiny", ["a text"], requests=2000, concurrency=16,
                                         seconds=60))
        metrics = httpx.get(server.url + "/metrics").text
    assert summary.ok == 2000 and summary.failed == 0
    share = summary.by_upstream["challenger"] / 2000 * 100
    assert abs(share - 25) <= 3
    assert "kiln_gateway_challenger_weight 25.0" in metrics
    assert 'kiln_gateway_requests_total{code="200",role="challenger",version="1"}' in metrics
    assert 'kiln_gateway_predictions_total{label="positive",role="challenger",version="1"}' in metrics
    assert "kiln_gateway_request_duration_seconds_bucket" in metrics


def test_sticky_header_keeps_a_user_on_one_upstream(stub_servers):
    gw, context = _gateway(stub_servers, weight=50)
    with context as server, httpx.Client(base_url=server.url) as c:
        seen: dict[str, set[str]] = {}
        for user in range(40):
            for _ in range(4):
                answer = c.post("/v2/models/tiny/infer", json=TEXT, headers={"X-Kiln-Sticky": f"user-{user}"})
                seen.setdefault(f"user-{user}", set()).add(answer.headers["x-kiln-upstream"])
    assert all(len(sides) == 1 for sides in seen.values())
    assert {next(iter(s)) for s in seen.values()} == {"champion", "challenger"}


def test_admin_api_refuses_requests_without_its_token(gateway):
    with httpx.Client(base_url=gateway.url) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            assert c.post("/admin/weight", json={"weight": 50}, headers=headers).status_code == 401
            assert c.get("/admin/state", headers=headers).status_code == 401
            assert c.post("/admin/shadow", json={"fraction": 1}, headers=headers).status_code == 401
        assert c.get("/admin/state", headers=AUTH).json()["weight"] == 0
        assert c.post("/admin/weight", json={"weight": 140}, headers=AUTH).status_code == 400
        assert "weight" in c.post("/admin/weight", content=b"x", headers=AUTH).json()["error"]
        assert c.post("/admin/weight", json={"weight": 30}, headers=AUTH).json()["weight"] == 30


def test_shadow_answers_with_the_champion_and_records_agreement(gateway):
    with httpx.Client(base_url=gateway.url) as c:
        c.post("/admin/shadow", json={"fraction": 1.0}, headers=AUTH)
        sides = {c.post("/v2/models/tiny/infer", json=TEXT).headers["x-kiln-upstream"] for _ in range(30)}
        assert sides == {"champion"}
        deadline = time.monotonic() + 10
        while (state := c.get("/admin/state", headers=AUTH).json())["window"]["shadow"]["compared"] < 60:
            assert time.monotonic() < deadline, state
            time.sleep(0.05)
        metrics = c.get("/metrics").text
    shadow = state["window"]["shadow"]
    assert shadow["requests"] == 30 and shadow["errors"] == 0
    assert shadow["agreement"] == 1.0  # the ONNX export predicts what the PyTorch weights predict
    assert state["window"]["challenger"]["requests"] == 0
    assert 'kiln_gateway_shadow_comparisons_total{result="agree",version="2"} 60.0' in metrics


def test_no_request_fails_while_weights_change_under_load(gateway, tiny_splits):
    stop = threading.Event()
    flips = []

    def flipper():
        with httpx.Client(base_url=gateway.url, headers=AUTH) as c:
            while not stop.is_set():
                weight = [0, 25, 50, 75, 100][len(flips) % 5]
                flips.append(c.post("/admin/weight", json={"weight": weight}).status_code)
                time.sleep(0.005)

    thread = threading.Thread(target=flipper)
    thread.start()
    try:
        summary = generate_load(LoadPlan(gateway.url, "tiny", tiny_splits.test["text"].tolist(), requests=500,
                                         concurrency=8, seconds=50))
    finally:
        stop.set()
        thread.join()
    assert summary.sent == 500 and summary.ok == 500 and summary.failed == 0, summary
    assert summary.by_status == {"200": 500}
    assert set(summary.by_upstream) == {"champion", "challenger"}
    assert len(flips) > 10 and set(flips) == {200}
    assert gateway.gateway.routing.generation == len(flips)


def test_feedback_scores_each_upstream_and_feeds_the_canary_judge(gateway, tiny_splits):
    httpx.post(gateway.url + "/admin/weight", json={"weight": 50}, headers=AUTH)
    test = tiny_splits.test
    summary = generate_load(LoadPlan(gateway.url, "tiny", test["text"].tolist(), test["label"].tolist(),
                                     requests=120, concurrency=4, feedback=True, seconds=50, feedback_token=TOKEN))
    assert summary.feedback_sent == 120 and summary.feedback_failed == 0
    state = httpx.get(gateway.url + "/admin/state", params={"samples": 1}, headers=AUTH).json()
    window = state["window"]
    assert window["champion"]["feedback"] + window["challenger"]["feedback"] == 120
    assert 0 <= window["challenger"]["accuracy"] <= 1 and len(window["champion"]["latency_ms"]) == 60
    missing = httpx.post(gateway.url + "/feedback", json={"request_id": "nope", "label": "positive"}, headers=AUTH)
    assert missing.status_code == 404 and "nope" in missing.json()["error"]

    stats = stats_from_state(state)
    # The two halves of traffic are different texts, so their accuracies differ by chance: a loose bound.
    spec = RolloutSpec(steps=[{"weight": 50}], min_samples=50, metrics={
        "max_p95_ratio": None, "max_p99_ratio": None, "latency_test": None, "max_accuracy_drop": 0.5})
    verdict = judge_step(spec, stats["champion"], stats["challenger"])
    assert verdict.outcome == "pass", verdict.reasons  # same weights: same accuracy, no errors
    closed = httpx.post(gateway.url + "/admin/reset", headers=AUTH).json()
    assert closed["champion"]["requests"] == 60
    assert httpx.get(gateway.url + "/admin/state", headers=AUTH).json()["window"]["champion"]["requests"] == 0


def test_unreachable_challenger_falls_back_to_the_champion(model_servers):
    dead = SimpleNamespace(url="http://127.0.0.1:9")  # discard port: nothing listens
    gw, context = _gateway({"champion": model_servers["champion"], "challenger": dead}, weight=100)
    with context as server:
        answer = httpx.post(server.url + "/v2/models/tiny/infer", json=TEXT)
        state = httpx.get(server.url + "/admin/state", headers=AUTH).json()
    assert answer.status_code == 200 and answer.headers["x-kiln-upstream"] == "champion"
    assert state["window"]["challenger"]["errors"] == 1  # counted against the challenger all the same


def test_load_generator_refuses_non_loopback_targets():
    assert check_loopback("http://localhost:8080/") == "http://localhost:8080"
    assert check_loopback("http://[::1]:80") == "http://[::1]:80"
    for url in ("http://10.1.2.3:8080", "http://example.com", "ftp://127.0.0.1"):
        with pytest.raises(ValueError):
            check_loopback(url)
