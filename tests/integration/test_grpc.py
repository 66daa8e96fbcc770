"""The model server's gRPC API (OIP v2 ``GRPCInferenceService``) on 127.0.0.1, through independent clients.

``tritonclient.grpc`` with its defaults (tensors in ``raw_input_contents``) checks health, metadata and
inference against what the HTTP API answers for the same input; a bare grpcio stub sends what tritonclient
cannot (typed ``contents``, malformed tensors). The model is a tiny BERT in a Kiln package, no registry.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from kiln.infra.background import serving
from kiln.infra.grpc_server import add_grpc
from kiln.infra.runtime import ServedModel
from kiln.infra.server import create_app, parse_args
from kiln.tasks.engines import EngineOptions
from kiln.tasks.models.predictor import Predictor
from tests.fakes import FastFake

TEXTS = ["great day", "awful traffic"]


class _Broken(FastFake):
    """An engine that fails every call."""

    def predict(self, texts):
        raise RuntimeError("the engine fell over")


class _Recording:
    """Delegates to a predictor and records the rows of each engine call."""

    def __init__(self, predictor) -> None:
        self.inner, self.meta, self.calls = predictor, predictor.meta, []

    def predict(self, texts, **kwargs):
        self.calls.append(len(texts))
        return self.inner.predict(texts, **kwargs)


@pytest.fixture(scope="module")
def folder(tiny_package):
    return tiny_package


@pytest.fixture(scope="module")
def predictor(folder):
    return Predictor(folder, EngineOptions(threads=1))


@pytest.fixture(scope="module")
def server(predictor):
    """One app serving ``tiny`` v3 (alias champion) and a broken model, over HTTP and gRPC, with small limits."""
    app = create_app([ServedModel("tiny", "3", predictor, ("champion",)), ServedModel("broken", "1", _Broken("x"))],
                     max_rows=64, max_body_bytes=1 << 20)
    endpoint = add_grpc(app, port=0)
    with serving(app) as http:
        client = triton.InferenceServerClient(endpoint.address)
        channel = grpc.insecure_channel(endpoint.address)
        yield SimpleNamespace(http=http.url, grpc=endpoint.address, client=client, app=app,
                              stub=service_pb2_grpc.GRPCInferenceServiceStub(channel))
        client.close()
        channel.close()


def _text_input(texts, name="text"):
    tensor = triton.InferInput(name, [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
    return tensor


def _int_input(name, array):
    tensor = triton.InferInput(name, list(array.shape), "INT64")
    tensor.set_data_from_numpy(array.astype(np.int64))
    return tensor


def _http_outputs(base, inputs):
    answer = httpx.post(f"{base}/v2/models/tiny/infer", json={"inputs": inputs})
    assert answer.status_code == 200, answer.text
    return {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in answer.json()["outputs"]}


def test_health_metadata_config_and_repository(server):
    c = server.client
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("tiny") and c.is_model_ready("tiny", "3") and c.is_model_ready("tiny", "champion")
    assert c.get_server_metadata().name == "kiln"
    meta = c.get_model_metadata("tiny", "champion")
    assert (meta.name, list(meta.versions), meta.platform) == ("tiny", ["3"], "pytorch")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("text", "BYTES", [-1]), ("input_ids", "INT64", [-1, -1]), ("attention_mask", "INT64", [-1, -1])]
    labels = len(server.app.state.server.pool.find("tiny", None).model.predictor.meta.labels)
    assert {t.name: list(t.shape) for t in meta.outputs}["scores"] == [-1, labels]
    config = c.get_model_config("tiny", as_json=True)["config"]
    assert config["name"] == "tiny" and [i["data_type"] for i in config["input"]][0] == "TYPE_STRING"
    index = c.get_model_repository_index(as_json=True)["models"]
    assert {(m["name"], m["version"], m["state"]) for m in index} == {("tiny", "3", "READY"), ("broken", "1", "READY")}


def test_text_infer_matches_the_http_api(server):
    result = server.client.infer("tiny", [_text_input(TEXTS)], request_id="req-1")
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("tiny", "3", "req-1")
    assert [o.name for o in response.outputs] == ["label", "score", "scores"]
    http = _http_outputs(server.http, [{"name": "text", "shape": [2], "datatype": "BYTES", "data": TEXTS}])
    assert [b.decode() for b in result.as_numpy("label")] == http["label"].tolist()
    assert result.as_numpy("score").dtype == np.float32
    np.testing.assert_allclose(result.as_numpy("score"), http["score"], rtol=1e-6)
    np.testing.assert_allclose(result.as_numpy("scores"), http["scores"], rtol=1e-6)
    # only the outputs asked for, by version number
    only = server.client.infer("tiny", [_text_input(TEXTS)], model_version="3",
                               outputs=[triton.InferRequestedOutput("scores")])
    assert [o.name for o in only.get_response().outputs] == ["scores"]
    metrics = httpx.get(server.http + "/metrics").text
    assert 'kiln_server_requests_total{code="200",model="tiny",version="3"}' in metrics  # one set of metrics


def test_token_ids_infer_matches_the_http_api(server, predictor):
    ids, mask = predictor.encode(["great day", "awful traffic on the way"])
    result = server.client.infer("tiny", [_int_input("input_ids", ids), _int_input("attention_mask", mask)])
    assert result.get_response().model_version == "3"
    http = _http_outputs(server.http, [
        {"name": "input_ids", "shape": list(ids.shape), "datatype": "INT64", "data": ids.tolist()},
        {"name": "attention_mask", "shape": list(mask.shape), "datatype": "INT64", "data": mask.tolist()}])
    logits = result.as_numpy("logits")
    assert logits.shape == http["logits"].shape == (2, len(predictor.meta.labels))
    np.testing.assert_allclose(logits, http["logits"], rtol=1e-6)
    np.testing.assert_allclose(logits, predictor.run(ids, mask), atol=1e-5)


def test_typed_contents_are_read_like_raw_contents(server, predictor):
    text = pb.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[2])
    text.contents.bytes_contents.extend(t.encode() for t in TEXTS)
    typed = server.stub.ModelInfer(pb.ModelInferRequest(model_name="tiny", inputs=[text]))
    raw = server.client.infer("tiny", [_text_input(TEXTS)]).get_response()
    assert typed.model_version == "3" and typed.raw_output_contents == raw.raw_output_contents

    ids, mask = predictor.encode(TEXTS)
    tensors = []
    for name, array in (("input_ids", ids), ("attention_mask", mask)):
        tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype="INT64", shape=list(array.shape))
        tensor.contents.int64_contents.extend(array.ravel().tolist())
        tensors.append(tensor)
    typed = server.stub.ModelInfer(pb.ModelInferRequest(model_name="tiny", model_version="champion", inputs=tensors))
    logits = np.frombuffer(typed.raw_output_contents[0], "<f4").reshape(list(typed.outputs[0].shape))
    np.testing.assert_allclose(logits, predictor.run(ids, mask), atol=1e-5)


def _tensor(name, datatype, shape, **contents):
    tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
    for field, values in contents.items():
        getattr(tensor.contents, field).extend(values)
    return tensor


def _raw_bytes(*items: bytes) -> bytes:
    return b"".join(len(i).to_bytes(4, "little") + i for i in items)


def _ids(ids, mask=None):
    ids = np.asarray(ids, np.int64)
    mask = np.ones_like(ids) if mask is None else np.asarray(mask, np.int64)
    return {"inputs": [_tensor("input_ids", "INT64", list(ids.shape)), _tensor("attention_mask", "INT64", list(
        mask.shape))], "raw_input_contents": [ids.tobytes(), mask.tobytes()]}


BAD = grpc.StatusCode.INVALID_ARGUMENT
TEXT = _tensor("text", "BYTES", [1])


@pytest.mark.parametrize(("request_fields", "code", "message"), [
    ({"model_name": "nope", "inputs": [TEXT], "raw_input_contents": [_raw_bytes(b"a")]}, grpc.StatusCode.NOT_FOUND,
     "not served here"),
    ({"model_version": "7", "inputs": [TEXT], "raw_input_contents": [_raw_bytes(b"a")]}, grpc.StatusCode.NOT_FOUND,
     "no served version '7'"),
    ({"inputs": []}, BAD, "non-empty list"),
    ({"inputs": [_tensor("text", "BYTES", [3])], "raw_input_contents": [_raw_bytes(b"a")]}, BAD, "holds 3 elements"),
    ({"inputs": [TEXT], "raw_input_contents": [b"\x09\x00\x00\x00abc"]}, BAD, "claims 9 bytes"),
    ({"inputs": [TEXT], "raw_input_contents": [_raw_bytes(b"\xff\xfe")]}, BAD, "UTF-8"),
    ({"inputs": [TEXT, TEXT], "raw_input_contents": [_raw_bytes(b"a")]}, BAD, "every input or for none"),
    ({"inputs": [_tensor("text", "BYTES", [1], bytes_contents=[b"a"])], "raw_input_contents": [_raw_bytes(b"a")]},
     BAD, "not both"),
    ({"inputs": [_tensor("input_ids", "INT64", [1, 2], int_contents=[1, 2])]}, BAD, "int64_contents"),
    ({"inputs": [_tensor("input_ids", "FP32", [1, 2], fp32_contents=[1.0, 2.0])]}, BAD, "INT64"),
    ({"inputs": [_tensor("input_ids", "INT64", [1, 2])], "raw_input_contents": [b"\x01" * 12]}, BAD,
     "needs 16 bytes but raw_input_contents[0] has 12"),
    ({"inputs": [_tensor("text", "BYTES", [1], bytes_contents=[b"a"])], "outputs": [
        pb.ModelInferRequest.InferRequestedOutputTensor(name="nope")]}, BAD, "unknown output"),
    ({"inputs": [_tensor("text", "FOO", [1], bytes_contents=[b"a"])]}, BAD, "unknown datatype 'FOO'"),
    ({"inputs": [_tensor("text", "BYTES", [-1], bytes_contents=[b"a"])]}, BAD, "non-negative"),
    # the HTTP API's limits: rows and message size (set small by the fixture), the model's vocabulary,
    # sequence length and mask values
    ({"inputs": [_tensor("text", "BYTES", [65], bytes_contents=[b"a"] * 65)]}, BAD, "at most 64 per request"),
    ({"inputs": [TEXT], "raw_input_contents": [_raw_bytes(b"x" * (1 << 20))]}, grpc.StatusCode.RESOURCE_EXHAUSTED,
     "larger than max"),
    (_ids([[2, 100_000]]), BAD, "vocabulary"),
    (_ids([[2, 3]], [[1, 2]]), BAD, "attention_mask holds 2"),
    (_ids([[2] * 1000]), BAD, "truncate"),
])
def test_client_mistakes_get_their_status_code_and_a_clear_message(server, request_fields, code, message):
    request = pb.ModelInferRequest(**({"model_name": "tiny"} | request_fields))
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.ModelInfer(request)
    assert caught.value.code() == code and message in caught.value.details(), caught.value.details()


def test_unknown_models_engine_failures_and_unready_servers(server):
    c = server.client
    for call in (lambda: c.get_model_metadata("nope"), lambda: c.is_model_ready("tiny", "7"),
                 lambda: c.get_model_config("nope")):
        with pytest.raises(InferenceServerException) as caught:
            call()
        assert caught.value.status() == "StatusCode.NOT_FOUND" and "served" in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        c.infer("broken", [_text_input(TEXTS)])
    assert caught.value.status() == "StatusCode.INTERNAL" and "the engine fell over" in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        c.get_inference_statistics("tiny")
    assert caught.value.status() == "StatusCode.UNIMPLEMENTED" and "/metrics" in caught.value.message()

    pool = server.app.state.server.pool
    pool.ready = False  # as while starting or shutting down
    try:
        assert not c.is_server_ready() and not c.is_model_ready("tiny")
        with pytest.raises(InferenceServerException) as caught:
            c.infer("tiny", [_text_input(TEXTS)])
        assert caught.value.status() == "StatusCode.UNAVAILABLE" and "retry" in caught.value.message()
    finally:
        pool.ready = True
    assert c.infer("tiny", [_text_input(TEXTS)]).get_response().model_version == "3"


def test_a_grpc_and_an_http_request_share_one_engine_call(predictor):
    recording = _Recording(predictor)
    # A batch runs when 5 rows have queued or after 10 s: 2 rows over HTTP and 3 over gRPC fill it at once.
    app = create_app([ServedModel("tiny", "1", recording)], max_batch_size=5, max_wait_ms=10_000)
    endpoint = add_grpc(app, port=0)
    http_texts, grpc_texts = ["so so", "lovely"], ["meh", "terrible", "fine"]
    with serving(app) as http, ThreadPoolExecutor(2) as pool:
        client = triton.InferenceServerClient(endpoint.address)
        started = time.monotonic()
        over_http = pool.submit(httpx.post, f"{http.url}/v2/models/tiny/infer", timeout=30, json={
            "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": http_texts}]})
        over_grpc = pool.submit(client.infer, "tiny", [_text_input(grpc_texts)])
        http_labels = over_http.result().json()["outputs"][0]["data"]
        grpc_labels = [b.decode() for b in over_grpc.result().as_numpy("label")]
        elapsed = time.monotonic() - started
        client.close()
    assert recording.calls == [5] and elapsed < 10
    assert http_labels + grpc_labels == predictor.predict(http_texts + grpc_texts)["label"].tolist()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_module_entry_point_serves_grpc_beside_http(folder, settings, tmp_path):
    http_port, grpc_port = _free_port(), _free_port()
    command = [sys.executable, "-m", "kiln.infra.server", "--package", str(folder), "--name", "tiny", "--threads", "1",
               "--port", str(http_port), "--grpc-port", str(grpc_port)]
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(command, cwd=tmp_path, env=os.environ.copy(), stdout=log, stderr=subprocess.STDOUT)
    try:
        client = triton.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if client.is_server_ready():
                    break
            except InferenceServerException:
                pass
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.2)
        result = client.infer("tiny", [_text_input(TEXTS)])
        http = _http_outputs(f"http://127.0.0.1:{http_port}",
                             [{"name": "text", "shape": [2], "datatype": "BYTES", "data": TEXTS}])
        assert [b.decode() for b in result.as_numpy("label")] == http["label"].tolist()
        assert result.get_response().model_version == "1"
        client.close()

        # a second server on the same gRPC port is refused before it loads anything, in one line
        taken = subprocess.run([*command[:-3], str(_free_port()), "--grpc-port", str(grpc_port)], cwd=tmp_path,
                               env=os.environ.copy(), capture_output=True, text=True, timeout=120)
        assert taken.returncode == 1 and "Traceback" not in taken.stderr
        assert taken.stderr.strip().splitlines()[-1] == (
            f"error: cannot serve gRPC on 127.0.0.1:{grpc_port} (Address already in use); choose another --grpc-port")
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


@pytest.mark.parametrize("argv", [["--grpc-port", "8000"], ["--grpc-port", "0"], ["--grpc-port", "70000"]])
def test_grpc_port_must_be_a_port_other_than_the_http_one(argv, capsys):
    with pytest.raises(SystemExit) as caught:
        parse_args(["--package", "pkg", *argv])
    assert caught.value.code == 2 and "--grpc-port must be a port" in capsys.readouterr().err
    assert parse_args(["--package", "pkg"]).grpc_port is None  # off unless asked for
    assert parse_args(["--package", "pkg", "--grpc-port", "8001"]).grpc_port == 8001
