"""The generate extension on real loopback HTTP: a tiny Llama exported with its KV cache, a classifier beside it,
and a gateway in front (``/generate``, ``/generate_stream``, budgets, streams relayed and abandoned)."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from kiln.infra.background import serving
from kiln.infra.gateway import create_app as gateway_app
from kiln.infra.gateway_proxy import Gateway, Upstream
from kiln.infra.oip import LLMLimits
from kiln.infra.runtime import ServedModel
from kiln.infra.server import create_app as server_app
from kiln.tasks.core.stages import Artifact
from kiln.tasks.engines import EngineOptions
from kiln.tasks.models.predictor import PackageMeta, Predictor, package

PROMPT = "the movie was"
LIMITS = LLMLimits(max_new_tokens=32, max_prompt_tokens=12, max_batch_tokens=64)


@pytest.fixture(scope="module")
def lm_package(tiny_models, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from kiln.tasks.models.decoder_export import export_decoder_with_past

    root = tmp_path_factory.mktemp("llm-serving")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_models["llama"])).eval()
    graph = export_decoder_with_past(model, root / "kv" / "model.onnx")
    return package(Artifact(kind="onnx", path=graph), tiny_models["llama"], root / "pkg",
                   PackageMeta(format="onnx", task="causal-lm"))


class Steps:
    """Counts decoding runs of an engine (``stream`` is what ``generate`` and the server's streams both use)."""

    def __init__(self, engine) -> None:
        self.calls, self._stream = 0, engine.stream
        engine.stream = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._stream(*args, **kwargs)


@pytest.fixture(scope="module")
def stack(lm_package, tiny_package):
    lm = Predictor(lm_package, EngineOptions(threads=1))
    steps = Steps(lm.engine)
    champion = server_app([ServedModel("lm", "1", lm), ServedModel("clf", "1", Predictor(tiny_package))],
                          llm_limits=LIMITS)
    challenger = server_app([ServedModel("lm", "2", Predictor(lm_package, EngineOptions(threads=1)))],
                            llm_limits=LIMITS)
    with serving(champion) as one, serving(challenger) as two:
        gateway = Gateway(Upstream(one.url), Upstream(two.url), "admin-token", model_name="lm")
        with serving(gateway_app(gateway)) as gw:
            yield {"lm": lm, "steps": steps, "server": one.url, "gateway": gw.url, "gw": gateway,
                   "champion": champion, "challenger": challenger}


def _events(url: str, body: dict, **kwargs) -> tuple[httpx.Headers, list[dict]]:
    with httpx.stream("POST", url, json=body, timeout=30, **kwargs) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return r.headers, [json.loads(line.removeprefix("data: ")) for line in r.iter_lines() if line]


def test_generate_answers_what_the_predictor_and_infer_answer(stack):
    url = f"{stack['server']}/v2/models/lm"
    want = stack["lm"].predict([PROMPT], max_new_tokens=6)["generated_text"][0]
    r = httpx.post(f"{url}/generate", json={"text_input": PROMPT, "parameters": {"max_new_tokens": 6}})
    assert r.status_code == 200 and r.json() == {"model_name": "lm", "model_version": "1", "text_output": want}
    infer = httpx.post(f"{url}/infer", json={"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                                                         "data": [PROMPT]}], "parameters": {"max_new_tokens": 6}})
    assert infer.json()["outputs"][0]["data"] == [want]
    only_new = httpx.post(f"{url}/generate", json={"text_input": PROMPT, "parameters": {
        "max_new_tokens": 6, "exclude_input_in_output": True}}).json()["text_output"]
    assert want.endswith(only_new) and only_new.strip()


@pytest.mark.parametrize("params", [{"max_new_tokens": 6}, {"max_new_tokens": 6, "do_sample": True,
                                                             "temperature": 0.9, "top_p": 0.9, "seed": 3}],
                         ids=["greedy", "seeded-sampling"])
def test_stream_events_concatenate_to_the_generated_text(stack, params):
    url = f"{stack['server']}/v2/models/lm"
    whole = httpx.post(f"{url}/generate", json={"text_input": PROMPT, "parameters": params | {
        "exclude_input_in_output": True}}).json()["text_output"]
    headers, events = _events(f"{url}/generate_stream", {"text_input": PROMPT, "parameters": params})
    assert "".join(e["text_output"] for e in events) == whole
    assert len(events) >= 2 and all(e["model_version"] == "1" for e in events)
    assert events[-1]["finish_reason"] in ("stop", "length") and 1 <= events[-1]["output_tokens"] <= 6


@pytest.mark.parametrize(("endpoint", "body", "status", "says"), [
    ("generate", {"text_input": PROMPT, "parameters": {"max_new_tokens": 33}}, 400, "at most 32"),
    ("generate_stream", {"text_input": "the movie " * 20}, 400, "at most 12"),
    ("generate", {"text_input": PROMPT, "parameters": {"top_k": 5}}, 400, "not supported"),
    ("generate", {"text_input": PROMPT, "parameters": {"temperature": 0}}, 400, "temperature"),
    ("generate_stream", {"prompt": PROMPT}, 400, "text_input"),
    ("infer", {"inputs": [{"name": "text", "shape": [5], "datatype": "BYTES", "data": [PROMPT] * 5}],
               "parameters": {"max_new_tokens": 16}}, 413, "5 rows x 16 new tokens"),
], ids=["new-tokens", "prompt-tokens", "unknown-parameter", "bad-temperature", "no-text-input", "rows-x-tokens"])
def test_budgets_are_refused_with_one_line_before_any_decoding(stack, endpoint, body, status, says):
    before = stack["steps"].calls
    r = httpx.post(f"{stack['server']}/v2/models/lm/{endpoint}", json=body)
    assert r.status_code == status and r.headers["content-type"] == "application/json"
    assert says in r.json()["error"] and "\n" not in r.json()["error"]
    assert stack["steps"].calls == before  # refused at the door: the engine never decoded a step


def test_a_classifier_refuses_generate_in_one_line(stack):
    for endpoint in ("generate", "generate_stream"):
        r = httpx.post(f"{stack['server']}/v2/models/clf/{endpoint}", json={"text_input": PROMPT})
        assert r.status_code == 400 and "causal LMs only" in r.json()["error"] and "/infer" in r.json()["error"]


def _metric(url: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        head, _, value = line.rpartition(" ")
        if head.startswith(name + "{") and all(f'{k}="{v}"' in head for k, v in labels.items()) or head == name \
                and not want:
            total += float(value)
    return total


def test_streams_go_through_the_gateway_by_weight_and_are_counted(stack):
    gw, admin = stack["gateway"], {"Authorization": "Bearer admin-token"}
    body = {"text_input": PROMPT, "parameters": {"max_new_tokens": 5}}
    assert httpx.post(f"{gw}/admin/split", json={"weight": 100}, headers=admin).status_code == 200
    try:
        headers, events = _events(f"{gw}/v2/models/lm/generate_stream", body)
        assert headers["x-kiln-upstream"] == "challenger" and events[-1]["model_version"] == "2"
        answer = httpx.post(f"{gw}/v2/models/lm/generate", json=body)
        assert answer.headers["x-kiln-upstream"] == "challenger" and answer.json()["model_version"] == "2"
        refused = httpx.post(f"{gw}/v2/models/lm/generate_stream", json={"text_input": PROMPT, "parameters": {
            "max_new_tokens": 99}})
        assert refused.status_code == 400 and "at most 32" in refused.json()["error"]
    finally:
        httpx.post(f"{gw}/admin/split", json={"weight": 0}, headers=admin)
    assert _metric(gw, "kiln_gateway_stream_ttft_seconds_count", role="challenger") >= 1
    assert _metric(gw, "kiln_gateway_stream_tokens_total", role="challenger") == events[-1]["output_tokens"]
    assert _metric(gw, "kiln_gateway_requests_total", role="challenger", code="200") >= 2  # stream + generate
    window = httpx.get(f"{gw}/admin/state", headers=admin).json()["window"]["challenger"]
    assert window["requests"] >= 2 and window["refused"] >= 1


def test_a_client_leaving_mid_stream_frees_the_upstream(stack):
    runtime = stack["champion"].state.server.pool.find("lm", None)
    before = _metric(stack["server"], "kiln_server_requests_total", model="lm", code="499")
    with httpx.stream("POST", f"{stack['gateway']}/v2/models/lm/generate_stream", timeout=30,
                      json={"text_input": PROMPT, "parameters": {"max_new_tokens": 32, "do_sample": True,
                                                                 "seed": 1}}) as r:
        assert r.headers["x-kiln-upstream"] == "champion"
        next(r.iter_lines())  # the first token arrived; now leave
    deadline = time.monotonic() + 10
    while _metric(stack["server"], "kiln_server_requests_total", model="lm", code="499") == before:
        assert time.monotonic() < deadline, "the model server never saw the client go"
        time.sleep(0.05)
    assert runtime.inflight == 0
    assert _metric(stack["gateway"], "kiln_gateway_requests_total", role="champion", code="499") >= 1
