"""Labelled feedback becomes data: a gateway on 127.0.0.1 in front of two stub model servers (HTTP and gRPC) takes
predictions and feedback, its sink writes the live answers' rows as Parquet, and `kiln feedback show --json` reads
them back; a retrain with feedback_days trains on them (train split only) and records their lineage."""

from __future__ import annotations

import json
import shutil
import time
from contextlib import ExitStack
from datetime import UTC, datetime

import grpc
import httpx
import pandas as pd
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc
from typer.testing import CliRunner

from kiln.cli.app import app as cli
from kiln.errors import DataError
from kiln.infra.background import serving
from kiln.infra.feedback_sink import FeedbackSink
from kiln.infra.gateway import create_app as gateway_app
from kiln.infra.gateway_grpc import add_grpc as add_gateway_grpc
from kiln.infra.gateway_proxy import Gateway, Upstream
from kiln.infra.grpc_server import add_grpc
from kiln.infra.server import create_app as server_app
from kiln.tasks.core import tags as vocab
from kiln.tasks.data.feedback import read_feedback, write_part
from tests.fakes import FastFake

TOKEN = "feedback-store-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _infer_http(url: str, texts: list[str]) -> str:
    body = {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}
    answer = httpx.post(f"{url}/v2/models/tiny/infer", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.headers["X-Kiln-Request-Id"]


def _infer_grpc(address: str, texts: list[str]) -> str:
    request = service_pb2.ModelInferRequest(model_name="tiny")
    tensor = request.inputs.add(name="text", datatype="BYTES", shape=[len(texts)])
    tensor.contents.bytes_contents.extend(t.encode() for t in texts)
    with grpc.insecure_channel(address) as channel:
        _, call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer.with_call(request, timeout=30)
    return dict(call.initial_metadata())["x-kiln-request-id"]


def _feedback(url: str, request_id: str, labels: list[str]) -> dict:
    answer = httpx.post(f"{url}/feedback", json={"request_id": request_id, "labels": labels}, headers=AUTH, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()["scored"]


def test_scored_feedback_lands_as_parquet_and_kiln_feedback_shows_it(settings, monkeypatch):
    store = settings.home / "feedback"  # the default feedback_store
    sink = FeedbackSink(str(store), flush_rows=1000, flush_s=60)  # only the stop flushes: no timing in the test
    with ExitStack() as stack:
        upstreams = {}
        for role, label in (("champion", "negative"), ("challenger", "positive")):
            app = server_app({"tiny": FastFake(label)})
            grpc_endpoint = add_grpc(app, port=0)
            upstreams[role] = (stack.enter_context(serving(app)).url, grpc_endpoint.address)
        gateway = Gateway(Upstream(upstreams["champion"][0]), Upstream(upstreams["challenger"][0]), TOKEN,
                          shadow=1.0, feedback_sink=sink)
        app = gateway_app(gateway)
        front = add_gateway_grpc(app, champion=upstreams["champion"][1], challenger=upstreams["challenger"][1],
                                 port=0)
        with serving(app) as server:
            http_id = _infer_http(server.url, ["what a lovely day", "awful traffic again"])
            grpc_id = _infer_grpc(front.address, ["the best film this year"])
            unlabelled = _infer_http(server.url, ["nobody labels this one"])
            for _ in range(100):  # every request is mirrored (shadow 1.0); wait until both mirrors are scored
                if gateway.state()["window"]["shadow"]["compared"] >= 4:
                    break
                time.sleep(0.05)
            scored = _feedback(server.url, http_id, ["positive", "negative"])
            assert scored == {"champion/live": 0.5, "challenger/shadow": 0.5}
            assert _feedback(server.url, grpc_id, ["positive"])["champion/live"] == 0.0
            assert sink.written == 0  # buffered only: nothing is written on the request path
            metrics = httpx.get(f"{server.url}/metrics").text
        assert unlabelled  # predicted, never labelled: no row
    assert "kiln_gateway_feedback_rows_written_total" in metrics
    assert sink.written == 3 and len(sink.files) == 1  # the stop flushed them, as one new part file

    rows = read_feedback(store, "tiny")  # the model name the gateway learnt from the request path
    assert sorted(rows["text"]) == ["awful traffic again", "the best film this year", "what a lovely day"]
    by_text = rows.set_index("text")
    assert by_text.loc["what a lovely day", ["label", "predicted", "role", "source", "request_id"]].tolist() == \
        ["positive", "negative", "champion", "live", http_id]  # the live answer only, not the shadow's
    assert by_text.loc["awful traffic again", "row"] == 1 and by_text.loc["the best film this year", "row"] == 0
    assert set(rows["version"]) == {gateway.upstreams["champion"].label}
    day = datetime.now(UTC).date().isoformat()
    assert all(f"tiny/date={day}/part-" in f for f in sink.files)

    shown = CliRunner().invoke(cli, ["feedback", "show", "tiny", "--json", "--days", "7"])
    assert shown.exit_code == 0, shown.output
    summary = json.loads(shown.output)
    assert summary["rows"] == 3 and summary["requests"] == 2 and summary["labels"] == {"negative": 1, "positive": 2}
    assert summary["accuracy"] == pytest.approx(1 / 3, abs=1e-3) and summary["store"] == str(store)
    pruned = CliRunner().invoke(cli, ["feedback", "prune", "tiny"])
    assert pruned.exit_code == 0 and "deleted 0 feedback day partition(s) older than 90 days" in pruned.output
    monkeypatch.setenv("KILN_FEEDBACK_STORE", "off")
    off = CliRunner().invoke(cli, ["feedback", "show", "tiny"])
    assert off.exit_code == 2 and "feedback_store is 'off'" in off.output


def test_a_retrain_with_feedback_days_adds_the_rows_to_train_and_records_them(settings, tiny_models, tmp_path):
    from kiln.tasks.data.datasets import DatasetSpec, load_splits
    from kiln.tasks.lifecycle import retrain as steps
    from kiln.tasks.lifecycle.checkout import Checkout
    from kiln.tasks.registry import client as registry
    from kiln.tasks.registry.onboard import register_folder
    from tests.integration.test_retrain import _write_repo

    client = registry.connect(settings)
    register_folder(client, settings, tiny_models["bert"], "tiny", "sequence-classification", DatasetSpec(limit=50))
    _write_repo(tmp_path / "repo", "tiny")
    with (tmp_path / "repo" / "kiln-train.yaml").open("a") as config:
        config.write("data_checks: null\n")  # the splits' suite has its own tests; the feedback rows are still checked
    tree = Checkout(path=tmp_path / "repo", sha="a" * 40, repo=str(tmp_path / "repo"))
    params = steps.RetrainParams(sha="a" * 40, chain_optimize=False, feedback_days=7)
    with pytest.raises(DataError, match=r"found 0 labelled feedback row\(s\) of tiny in the last 7 days"):
        steps.plan(params, tree, settings, client)

    now = datetime.now(UTC).isoformat()
    texts = ["an unseen lovely evening", "an unseen dreadful morning"]
    write_part(settings.home / "feedback", "tiny", pd.DataFrame(
        {"text": texts, "label": ["positive", "negative"], "predicted": ["negative", "negative"],
         "version": ["1", "1"], "role": ["champion"] * 2, "source": ["live"] * 2, "request_id": ["r1", "r1"],
         "row": [0, 1], "time": [now, now]}))
    planned = steps.plan(params, tree, settings, client)
    assert planned.tags[vocab.FEEDBACK_ROWS] == "2" and planned.tags[vocab.FEEDBACK_DAYS] == "7"
    assert planned.identity[vocab.FEEDBACK_DIGEST] == planned.feedback.digest  # another version than without
    splits, plain = steps.load_data(planned), load_splits(planned.data)
    assert len(splits.train) == len(plain.train) + 2 and set(texts) <= set(splits.train["text"])
    assert splits.test.equals(plain.test) and splits.validation.equals(plain.validation)
    assert splits.digest != plain.digest

    # What fine-tuning would produce, without its seconds: the base folder with a changed config is a new version.
    folder = shutil.copytree(tiny_models["bert"], tmp_path / "trained")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"kiln_test_retrained": True}))
    version = steps.register_trained(planned, steps.Trained(folder, {"validation_accuracy": 0.5}, "tiny/1"), settings,
                                     client)
    assert str(version.version) == "2"
    tags = client.get_model_version("tiny", version.version).tags
    assert tags[vocab.FEEDBACK_ROWS] == "2" and tags[vocab.FEEDBACK_DIGEST] == planned.feedback.digest
    assert tags[vocab.FEEDBACK_STORE] == str(settings.home / "feedback")
