"""The model server and the gateway as independent v2 clients see them, over real HTTP on 127.0.0.1.

NVIDIA's ``tritonclient.http`` with its default settings (binary tensor data both ways) and raw JSON over httpx,
against a tiny BERT package served by the model server and through the gateway in front of it. Every answer
names the version that answered in ``model_version``; every limit a client can break is a 4xx saying which.
"""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from kiln.infra.background import serving
from kiln.infra.gateway import create_app as gateway_app
from kiln.infra.gateway_proxy import Gateway, Upstream
from kiln.infra.oip_binary import HEADER_LENGTH
from kiln.infra.runtime import ServedModel
from kiln.infra.server import create_app as server_app
from kiln.tasks.core.stages import Artifact
from kiln.tasks.engines import EngineOptions
from kiln.tasks.models.predictor import PackageMeta, Predictor, package
from kiln.tasks.registry.onboard import inspect_folder

TEXTS = ["great day at the beach", "awful traffic again", "meh"]
SEQ_LEN, MAX_ROWS, MAX_BODY = 32, 64, 256 * 1024
TOKEN = "s3cret-admin-token"


@pytest.fixture(scope="module")
def model(tiny_models, tmp_path_factory):
    """Version 4 of ``tiny``: the tiny BERT as a Kiln package, served from its PyTorch weights."""
    folder = tiny_models["bert"]
    labels = inspect_folder(folder, "sequence-classification")
    pkg = package(Artifact("hf", folder), folder, tmp_path_factory.mktemp("oip") / "pkg",
                  PackageMeta(format="hf", task="sequence-classification", labels=labels, seq_len=SEQ_LEN))
    return ServedModel("tiny", "4", Predictor(pkg, EngineOptions(threads=1)), ("champion",))


@pytest.fixture(scope="module")
def urls(model):
    """The model server, and a gateway in front of it (both roles on the same server: weight is not tested)."""
    with serving(server_app([model], max_rows=MAX_ROWS, max_body_bytes=MAX_BODY)) as server:
        gateway = Gateway(Upstream(server.url), Upstream(server.url), TOKEN)
        with serving(gateway_app(gateway)) as front:
            yield {"server": server.url, "gateway": front.url, "gateway_object": gateway}


BASES = ["server", "gateway"]


def _client(url: str) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url.removeprefix("http://"))


def _input(name: str, datatype: str, values: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput(name, list(values.shape), datatype)
    tensor.set_data_from_numpy(values)  # binary_data=True: tritonclient's default
    return tensor


@pytest.mark.parametrize("base", BASES)
def test_tritonclient_http_defaults_classify_texts(urls, model, base):
    client = _client(urls[base])
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    assert client.get_model_metadata("tiny")["versions"] == ["4"]
    result = client.infer("tiny", [_input("text", "BYTES", np.array(TEXTS, dtype=object))], request_id="r-7")
    answer = result.get_response()
    assert (answer["model_name"], answer["model_version"], answer["id"]) == ("tiny", "4", "r-7")
    expected = model.predictor.predict(TEXTS)
    assert [b.decode() for b in result.as_numpy("label")] == expected["label"].tolist()
    np.testing.assert_allclose(result.as_numpy("score"), expected["score"], rtol=1e-5)
    np.testing.assert_allclose(result.as_numpy("scores"), np.array(expected["scores"].tolist()), rtol=1e-5)
    assert result.as_numpy("scores").shape == (3, len(model.predictor.meta.labels))
    one = client.infer("tiny", [_input("text", "BYTES", np.array([[TEXTS[0]]], dtype=object))],  # [n, 1] too
                       outputs=[triton.InferRequestedOutput("label")], model_version="champion")
    assert one.as_numpy("label").tolist() == [expected["label"][0].encode()] and one.as_numpy("score") is None


@pytest.mark.parametrize("base", BASES)
def test_tritonclient_http_defaults_run_token_tensors(urls, model, base):
    ids, mask = model.predictor.encode(TEXTS)
    result = _client(urls[base]).infer("tiny", [_input("input_ids", "INT64", ids),
                                                _input("attention_mask", "INT64", mask)])
    assert result.get_response()["model_version"] == "4"
    np.testing.assert_allclose(result.as_numpy("logits"), model.predictor.run(ids, mask), atol=1e-5)


@pytest.mark.parametrize("base", BASES)
def test_raw_json_keeps_json_and_may_ask_for_binary(urls, model, base):
    ids, mask = model.predictor.encode(TEXTS[:2])
    body = {"id": "j-1", "inputs": [
        {"name": "input_ids", "shape": list(ids.shape), "datatype": "INT64", "data": ids.tolist()},
        {"name": "attention_mask", "shape": list(mask.shape), "datatype": "INT64", "data": mask.tolist()}]}
    with httpx.Client(base_url=urls[base]) as c:
        answer = c.post("/v2/models/tiny/infer", json=body)
        assert answer.headers["content-type"] == "application/json" and HEADER_LENGTH.lower() not in answer.headers
        data = answer.json()
        assert (data["model_version"], data["id"]) == ("4", "j-1")
        assert answer.headers["x-kiln-model-version"] == "4"  # the gateway's copy of the same fact
        logits = np.array(data["outputs"][0]["data"], np.float32).reshape(data["outputs"][0]["shape"])
        np.testing.assert_allclose(logits, model.predictor.run(ids, mask), atol=1e-5)
        binary = c.post("/v2/models/tiny/infer", json=body | {"parameters": {"binary_data_output": True}})
    assert binary.headers["content-type"] == "application/octet-stream"
    result = triton.InferResult.from_response_body(binary.content,
                                                   header_length=int(binary.headers[HEADER_LENGTH.lower()]))
    assert result.get_response()["model_version"] == "4"
    np.testing.assert_array_equal(result.as_numpy("logits"), logits)


def test_the_gateway_counts_labels_and_inputs_of_binary_traffic(urls):
    gateway = urls["gateway_object"]
    window = gateway.window.live["champion"]
    labels_before, rows_before = sum(window.labels.values()), window.input_rows
    body, json_size = triton.InferenceServerClient.generate_request_body(
        [_input("text", "BYTES", np.array(TEXTS, dtype=object))])
    answer = httpx.post(urls["gateway"] + "/v2/models/tiny/infer", content=body,
                        headers={HEADER_LENGTH: str(json_size), "X-Kiln-Request-Id": "forged-1"})
    request_id = answer.headers["x-kiln-request-id"]
    assert request_id != "forged-1"  # the gateway's own id, never the client's
    result = triton.InferResult.from_response_body(answer.content,
                                                   header_length=int(answer.headers[HEADER_LENGTH.lower()]))
    labels = [b.decode() for b in result.as_numpy("label")]
    assert sum(window.labels.values()) == labels_before + 3
    for _ in range(50):  # inputs are recorded after the answer has gone out
        if window.input_rows == rows_before + 3:
            break
        time.sleep(0.02)
    assert window.input_rows == rows_before + 3
    scored = httpx.post(urls["gateway"] + "/feedback", json={"request_id": request_id, "labels": labels},
                        headers={"Authorization": f"Bearer {TOKEN}"})
    assert scored.status_code == 200 and scored.json()["scored"]["champion/live"] == 1.0


def _tensor_body(ids, mask=None) -> dict:
    inputs = [{"name": "input_ids", "shape": list(np.shape(ids)), "datatype": "INT64",
               "data": np.asarray(ids).ravel().tolist()}]
    if mask is not None:
        inputs.append({"name": "attention_mask", "shape": list(np.shape(mask)), "datatype": "INT64",
                       "data": np.asarray(mask).ravel().tolist()})
    return {"inputs": inputs}


def _limit_cases(vocab: int) -> list[tuple[str, dict | bytes, int, str]]:
    long_texts = ["word " * 1000] * 60  # 60 rows of 5 kB: under the row limit, over the body limit
    return [
        ("rows", {"inputs": [{"name": "text", "shape": [MAX_ROWS + 1], "datatype": "BYTES",
                              "data": ["x"] * (MAX_ROWS + 1)}]}, 413, f"takes at most {MAX_ROWS} per request"),
        ("body", {"inputs": [{"name": "text", "shape": [60], "datatype": "BYTES", "data": long_texts}]}, 413,
         f"takes at most {MAX_BODY}"),
        ("seq_len", _tensor_body(np.ones((1, SEQ_LEN + 1), np.int64)), 400,
         f"{SEQ_LEN + 1} tokens per row; this model takes at most {SEQ_LEN}"),
        ("vocab", _tensor_body([[1, vocab]]), 400, f"token id {vocab}; this model's vocabulary has {vocab} tokens"),
        ("mask", _tensor_body([[1, 2]], [[1, 3]]), 400, "attention_mask holds 3; its values must be 0"),
        ("negative", _tensor_body([[1, -2]]), 400, "token id -2"),
        ("shape", {"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": ["a"]}]}, 400,
         "holds 3 elements but data has 1"),
        ("datatype", {"inputs": [{"name": "text", "shape": [1], "datatype": "TEXT", "data": ["a"]}]}, 400,
         "unknown datatype 'TEXT'"),
        ("header", b'{"inputs": []}', 400, HEADER_LENGTH),
    ]


@pytest.mark.parametrize("base", BASES)
def test_every_limit_is_a_4xx_that_names_it_and_the_version(urls, model, base):
    for case, body, status, message in _limit_cases(len(model.predictor.tokenizer)):
        if isinstance(body, bytes):
            answer = httpx.post(f"{urls[base]}/v2/models/tiny/infer", content=body, headers={HEADER_LENGTH: "99"})
        else:
            answer = httpx.post(f"{urls[base]}/v2/models/tiny/infer", content=json.dumps(body).encode())
        assert answer.status_code == status, (case, answer.text)
        error = answer.json()
        assert message in error["error"], (case, error)
        assert error["model_version"] == "4" and answer.headers["x-kiln-model-version"] == "4", case


@pytest.mark.parametrize("base", BASES)
def test_tritonclient_sees_the_limits_as_client_errors(urls, model, base):
    client = _client(urls[base])
    too_many = _input("text", "BYTES", np.array(["x"] * (MAX_ROWS + 1), dtype=object))
    too_long = _input("input_ids", "INT64", np.ones((2, SEQ_LEN + 1), np.int64))
    vocab = len(model.predictor.tokenizer)
    past_vocab = _input("input_ids", "INT64", np.array([[1, vocab + 5]], np.int64))
    bad_mask = [_input("input_ids", "INT64", np.array([[1, 2]], np.int64)),
                _input("attention_mask", "INT64", np.array([[1, 7]], np.int64))]
    huge = _input("text", "BYTES", np.array(["word " * 2000] * 40, dtype=object))
    for inputs, status, message in [([too_many], "413", "rows"), ([huge], "413", "--max-body-bytes"),
                                    ([too_long], "400", "seq_len"), ([past_vocab], "400", "vocabulary"),
                                    (bad_mask, "400", "attention_mask holds 7")]:
        with pytest.raises(InferenceServerException) as caught:
            client.infer("tiny", inputs)
        assert caught.value.status() == status and message in caught.value.message(), caught.value
    assert client.infer("tiny", [_input("text", "BYTES", np.array(["still fine"], dtype=object))]).as_numpy("label")


def test_tritonclient_reads_the_repository_index_and_load_unload_are_refused_with_the_reason(urls, model):
    client = _client(urls["server"])
    assert "model_repository" in client.get_server_metadata()["extensions"]
    assert client.get_model_repository_index() == [{"name": "tiny", "version": "4", "state": "READY"}]
    ready_only = httpx.post(f"{urls['server']}/v2/repository/index", json={"ready": True})
    assert ready_only.json() == [{"name": "tiny", "version": "4", "state": "READY"}]
    for action in ("load_model", "unload_model"):
        with pytest.raises(InferenceServerException, match="serves the version its registry alias names"):
            getattr(client, action)("tiny")
    bad = httpx.post(f"{urls['server']}/v2/repository/index", json={"ready": "yes"})
    assert bad.status_code == 400 and "ready" in bad.json()["error"]
