"""Bad-input catalogue, MLflow registry webhooks (``POST /hooks/mlflow``): every forged, malformed or hostile
delivery gets a clear JSON error with the right status (never a 500, never a 503 that MLflow would retry for
ever), and nothing changes — no flow run started, no registry write, no file under KILN_HOME touched
(:mod:`tests.integration.catalogue`).

One receiver for the module, served by uvicorn on loopback over a SQLite registry that holds a watched model
with a version (a good delivery would start optimize on it); a recorder stands in for the Prefect API.
"""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest
from mlflow.tracking import MlflowClient

from kiln.infra.background import serving
from kiln.infra.mlflow_signature import sign
from kiln.infra.mlflow_webhook import create_app
from kiln.infra.registry_actions import RegistryEvents
from kiln.infra.starter import Started
from kiln.settings import load_settings
from tests.integration.catalogue import snapshot, unchanged

pytestmark = pytest.mark.catalogue

SECRET = "mlflow-hook-secret"
MODEL = "watched"
LIMIT = 16384  # KILN_WEBHOOK_MAX_BODY for this receiver


class RecordingStarter:
    """Records start requests; one run per idempotency key, as Prefect answers."""

    api_url = None

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []
        self.runs: dict[str | None, str] = {}

    def start_sync(self, deployment, parameters, *, idempotency_key=None, tags=None) -> Started:
        self.calls.append((parameters["params"]["model"], idempotency_key))
        run_id = self.runs.setdefault(idempotency_key, f"run-{len(self.runs) + 1}")
        return Started(run_id, f"name-{run_id}", deployment)


class NoPromotions:
    def paused(self, model=None):
        return []

    def resume(self, flow_run_id, answer):
        raise AssertionError("nothing may be resumed by a refused delivery")


@pytest.fixture(scope="module")
def hook(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-hooks")
    home = root / ".kiln"
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("events", artifact_location=(root / "artifacts").as_uri())
    client.create_registered_model(MODEL)
    run = client.create_run(experiment)
    version = str(client.create_model_version(MODEL, f"{run.info.artifact_uri}/model", run.info.run_id).version)
    settings = load_settings(home=home, tracking_uri=uri, watch_models=[MODEL], mlflow_webhook_secret=SECRET,
                             webhook_max_body=LIMIT)
    settings.ensure_dirs()
    starter = RecordingStarter()
    events = RegistryEvents(settings, starter, promotions=NoPromotions(), client=client)
    with serving(create_app(settings, starter, events=events)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        yield http, starter, home, client, version


def envelope(data: dict, event: str = "model_version.created") -> dict:
    entity, action = event.split(".")
    return {"entity": entity, "action": action, "timestamp": "2026-11-26T00:00:00+00:00", "data": data}


def created(version: object = "1", **changes) -> dict:
    return envelope({"name": MODEL, "version": version, "source": "models:/m-1", "run_id": None, "tags": {},
                     "description": None} | changes)


def signed(body: bytes | dict, *, delivery_id: str | None = None, timestamp: str | None = None,
           **headers: str | bytes | None) -> tuple[bytes, dict]:
    """``body`` (a payload is JSON-encoded) with MLflow's headers, signed with the receiver's secret; ``headers``
    (``X_MLflow_Signature=...``) replace or, with None, drop one."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    delivery_id = delivery_id or str(uuid.uuid4())
    timestamp = timestamp or str(int(time.time()))
    sent: dict = {"Content-Type": "application/json", "X-MLflow-Delivery-Id": delivery_id,
                  "X-MLflow-Timestamp": timestamp, "X-MLflow-Signature": sign(SECRET, delivery_id, timestamp, raw)}
    for name, value in headers.items():
        sent[name.replace("_", "-")] = value
    return raw, {k: v for k, v in sent.items() if v is not None}


def _nested(depth: int) -> bytes:
    return b'{"entity": "model_version", "action": "created", "data": ' + b"[" * depth + b"]" * depth + b"}"


def _resigned_timestamp(stamp: str) -> tuple[bytes, dict]:
    raw = json.dumps(created()).encode()
    return raw, {"X-MLflow-Delivery-Id": "d-ts", "X-MLflow-Timestamp": stamp,
                 "X-MLflow-Signature": sign(SECRET, "d-ts", stamp, raw), "Content-Type": "application/json"}


CASES = {
    # -- the signature and its headers
    "signature-non-ascii": (lambda: signed(created(), X_MLflow_Signature="v1,sïgnature✓".encode()), 401,
                            "X-MLflow-Signature does not match"),
    "signature-latin1-bytes": (lambda: signed(created(), X_MLflow_Signature=b"v1,\xff\xfe\xe9"), 401,
                               "X-MLflow-Signature does not match"),
    "signature-wrong-scheme": (lambda: signed(created(), X_MLflow_Signature="sha256=" + "0" * 64), 401,
                               "does not match"),
    "signature-several-none-valid": (lambda: signed(created(), X_MLflow_Signature="v1,AAAA v1,BBBB v2,CCCC"), 401,
                                     "does not match"),
    "signature-missing": (lambda: signed(created(), X_MLflow_Signature=None), 400,
                          "missing header(s) X-MLflow-Signature"),
    "delivery-id-non-ascii": (lambda: signed(created(), X_MLflow_Delivery_Id="dé-1".encode()), 401,
                              "does not match"),  # signed over another id
    "timestamp-not-a-number": (lambda: _resigned_timestamp("yesterday"), 400, "X-MLflow-Timestamp"),
    "timestamp-stale": (lambda: _resigned_timestamp(str(int(time.time()) - 3600)), 401, "s old"),
    # -- the body
    "body-not-json": (lambda: signed(b"entity=model_version&action=created"), 400, "not JSON"),
    "body-not-utf8": (lambda: signed(b'{"entity": "\xff\xfe"}'), 400, "not JSON"),
    "body-nan": (lambda: signed(json.dumps(created(version=float("nan"))).encode()), 400, "NaN"),
    "body-nested-deeply": (lambda: signed(_nested(5000)), 400, "nested too deeply"),
    "body-a-list": (lambda: signed(b"[1, 2, 3]"), 400, "not a JSON object"),
    "body-over-the-limit": (lambda: signed(created(description="x" * (2 * LIMIT))), 413, "KILN_WEBHOOK_MAX_BODY"),
    # -- the event's fields
    "entity-not-a-string": (lambda: signed(created() | {"entity": ["model_version"]}), 400, "entity"),
    "data-not-an-object": (lambda: signed(envelope([MODEL, "1"])), 400, "data must be an object"),
    "name-a-number": (lambda: signed(created(name=42)), 400, "data.name"),
    "name-empty": (lambda: signed(created(name=" ")), 400, "data.name"),
    "name-huge": (lambda: signed(created(name="m" * 5000)), 400, "data.name"),
    "version-an-object": (lambda: signed(created(version={"$gt": 0})), 400, "data.version"),
    "version-negative": (lambda: signed(created(version=-1)), 400, "data.version"),
    "version-a-boolean": (lambda: signed(created(version=True)), 400, "data.version"),
    "version-a-float": (lambda: signed(created(version=1.5)), 400, "data.version"),
    "version-injection": (lambda: signed(created(version="1' or name != '")), 400, "data.version"),
    "version-huge": (lambda: signed(created(version=10**30)), 400, "data.version"),
    "tags-a-list": (lambda: signed(created(tags=["kiln.candidate_key"])), 400, "data.tags"),
    "run-id-a-number": (lambda: signed(created(run_id=7)), 400, "data.run_id"),
    "tag-key-a-list": (lambda: signed(envelope({"name": MODEL, "version": "1", "key": ["kiln.approval"],
                                                "value": "approved"}, "model_version_tag.set")), 400, "data.key"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_a_bad_mlflow_delivery_is_refused_clearly_and_changes_nothing(hook, case):
    http, starter, home, client, _ = hook
    make, status, says = CASES[case]
    body, headers = make()
    before, calls = snapshot(home, client), list(starter.calls)
    response = http.post("/hooks/mlflow", content=body, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert says in error and "\n" not in error and "Traceback" not in error, error
    assert starter.calls == calls
    unchanged(before, home, client)


@pytest.mark.parametrize("fresh_id", [False, True], ids=["same-delivery", "fresh-delivery-id"])
def test_a_redelivered_event_starts_no_second_run(hook, fresh_id):
    """MLflow's retry (same id), a redelivery or a replay with a fresh id: one optimize run per model version."""
    http, starter, home, client, version = hook
    first = http.post("/hooks/mlflow", content=(sent := signed(created(version), delivery_id=f"first-{fresh_id}"))[0],
                      headers=sent[1])
    assert first.status_code == 200 and first.json()["status"] == "started", first.text
    before = snapshot(home, client)
    again = signed(created(version), delivery_id=str(uuid.uuid4()) if fresh_id else f"first-{fresh_id}")
    second = http.post("/hooks/mlflow", content=again[0], headers=again[1])
    assert second.status_code == 200, second.text
    assert second.json().get("flow_runs", first.json()["flow_runs"]) == first.json()["flow_runs"]
    assert {key for _, key in starter.calls} == {f"mlflow:{MODEL}:{version}:optimize"}
    assert len(starter.runs) == 1
    unchanged(before, home, client)
