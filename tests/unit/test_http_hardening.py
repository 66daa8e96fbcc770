"""Hostile input at the HTTP edge: strict JSON (kiln.infra.oip_binary.loads), the gateway's evidence windows, and a
model answering NaN (kiln.infra.runtime) — refused or failed before anything is counted as a success."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pandas as pd
import pytest
from starlette.testclient import TestClient

from kiln.infra.gateway_stats import TrafficWindow
from kiln.infra.oip import InferError, text_request
from kiln.infra.oip_binary import loads
from kiln.infra.runtime import ServedModel
from kiln.infra.server import create_app


@pytest.mark.parametrize(("raw", "names"), [
    (b'{"id": NaN}', "the JSON holds NaN; numbers must be finite"),
    (b'{"inputs": [Infinity]}', "the JSON holds Infinity"),
    (b'[-Infinity]', "the JSON holds -Infinity"),
    (b'{"id": "\\ud800"}', "id holds a lone UTF-16 surrogate"),
    (b'{"inputs": [{"data": ["ok", "x\\uDC00"]}]}', "inputs[0].data[1] holds a lone"),
    (b'{"\\ud800": 1}', "the body: a key holds a lone"),
    (b'"\\udfff"', "the request body holds a lone"),
    (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
    (b'{"id": "caf\xe9"}', "not valid JSON (UnicodeDecodeError"),
])
def test_strict_json_refuses_what_cannot_be_answered(raw, names):
    with pytest.raises(InferError) as caught:
        loads(raw)
    assert caught.value.status == 400 and names in str(caught.value)


def test_strict_json_keeps_paired_surrogates_and_ordinary_escapes():
    assert loads(b'{"text": "smile \\ud83d\\ude00", "n": 1.5e3, "u": "\\u00e9"}') == \
        {"text": "smile \U0001F600", "n": 1500.0, "u": "\u00e9"}


def test_a_client_mistake_is_refused_not_traffic_and_never_an_error():
    window = TrafficWindow(max_samples=10)
    for code in (200, 400, 404, 413, 500, 502):
        window.record(code, 0.01)
    summary = window.to_dict(samples=True)
    assert (summary["requests"], summary["errors"], summary["refused"]) == (3, 2, 3)
    assert summary["codes"] == {"200": 1, "400": 1, "404": 1, "413": 1, "500": 1, "502": 1}
    assert summary["samples"] == 1  # only the 200's latency: a refusal or a failure says nothing of the model's speed


class _NaNEngine:
    meta = SimpleNamespace(task="sequence-classification", labels=["neg", "pos"], seq_len=16)

    def predict(self, texts):
        return pd.DataFrame({"label": ["pos"] * len(texts), "score": [float("nan")] * len(texts),
                             "scores": [[0.5, 0.5]] * len(texts)})


def test_a_nan_answer_is_the_models_500_and_counted_as_one():
    with TestClient(create_app([ServedModel("m", "1", _NaNEngine())])) as client:
        answer = client.post("/v2/models/m/infer", json=text_request(["hi"]))
        assert answer.status_code == 500 and "score output holds NaN" in answer.json()["error"]
        refused = client.post("/v2/models/m/infer", content=json.dumps(text_request(["hi"], request_id="\ud800")))
        assert refused.status_code == 400 and "id holds a lone" in refused.json()["error"]
        metrics = client.get("/metrics").text
    assert 'code="500",model="m",version="1"} 1.0' in metrics
    assert 'code="200"' not in metrics and 'code="400"' not in metrics  # refused at the door: never counted
