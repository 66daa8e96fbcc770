"""Schemathesis against the model server, the gateway and the webhook receiver, each on loopback.

Each app publishes its OpenAPI description at ``GET /openapi.json`` (:mod:`kiln.infra.openapi`); schemathesis
reads it from the running server and sends, for every operation, a bounded set of requests that fit the
description (positive) and that break it (negative: wrong types, missing fields, bad headers). Every answer
must be no 5xx, a status the description lists, and the content type and body it documents there.
Examples are derandomized, so CI sends the same requests every run, and the whole file is bounded in time.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from kiln.infra.background import serving
from kiln.infra.gateway import create_app as gateway_app
from kiln.infra.gateway_proxy import Gateway, Upstream
from kiln.infra.mlflow_signature import sign as mlflow_sign
from kiln.infra.server import create_app as server_app
from kiln.infra.starter import Started
from kiln.infra.webhooks import create_app as webhooks_app
from kiln.settings import Settings
from tests.fakes import FastFake

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
TOKEN, FEEDBACK_TOKEN, SECRET, GITLAB_TOKEN = "admin-token", "feedback-token", "hook-secret", "gitlab-token"
MLFLOW_SECRET = "mlflow-secret"
EXAMPLES = 12  # per operation and mode: ~35 operations x 2 modes x 12 = ~850 requests in all (~25 s on 2 cores)
BUDGET_S = 12.0  # per app: fuzzing stops (passing) once this is spent, so a loaded machine cannot blow CI's budget

Prepare = Callable[[schemathesis.Case], dict[str, Any]]


def fuzz(base_url: str, *, prepare: Prepare | None = None) -> list[str]:
    """Run every operation of the app at ``base_url`` in both modes; returns the failures (route, input, why)."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    failures: list[str] = []
    deadline = time.monotonic() + BUDGET_S
    with httpx.Client(base_url=base_url, timeout=10) as client:
        for result in schema.get_all_operations():
            for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
                if time.monotonic() > deadline:
                    break
                with contextlib.suppress(Unsatisfiable):  # nothing to break: an operation without inputs
                    _fuzz_operation(result.ok(), mode, client, prepare, deadline, failures)
    return failures


def _fuzz_operation(operation, mode, client: httpx.Client, prepare: Prepare | None, deadline: float,  # noqa: ANN001
                    failures: list[str]) -> None:
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        if time.monotonic() > deadline:
            return
        extra = prepare(case) if prepare else {}  # may also steer case.body and case.headers
        kwargs = _as_httpx(case.as_transport_kwargs(base_url=str(client.base_url)), extra)
        response = client.request(**kwargs)
        try:
            case.validate_response(response, checks=CHECKS)
        except (AssertionError, BaseExceptionGroup) as exc:  # a failed check (several: a FailureGroup); collected
            checks = exc.exceptions if isinstance(exc, BaseExceptionGroup) else [exc]
            why = "; ".join(str(e).strip().splitlines()[0][:100] for e in checks)
            failures.append(f"{case.method} {case.formatted_path} [{mode.value}] -> {response.status_code} "
                            f"{response.text[:160]!r}; sent {kwargs.get('content', b'')[:200]!r}: {why}")

    run()


def _as_httpx(kwargs: dict, extra: dict) -> dict:
    """Schemathesis' requests-style kwargs as one ``httpx.Client.request`` call, with the body as exact bytes
    (so that a signature can be computed over them) and ``extra`` headers on top."""
    out = {"method": kwargs["method"], "url": kwargs["url"], "params": kwargs.get("params"),
           "headers": {k: v if isinstance(v, bytes) else str(v).encode("utf-8", "surrogatepass")  # sent as generated
                       for k, v in (kwargs.get("headers") or {}).items()}}
    if "json" in kwargs:
        out["content"] = json.dumps(kwargs["json"]).encode()
    elif isinstance(kwargs.get("data"), dict):
        out["content"] = str(httpx.QueryParams(kwargs["data"])).encode()
    elif kwargs.get("data") is not None:
        data = kwargs["data"]
        out["content"] = data if isinstance(data, bytes) else str(data).encode()
    sign = extra.pop("sign", None)
    out["headers"] |= extra
    if sign:
        out["headers"] |= sign(out.get("content", b""))
    return out


def _report(name: str, failures: list[str]) -> None:
    assert not failures, f"{len(failures)} {name} answer(s) broke the contract:\n" + "\n".join(failures[:20])


def test_model_server_keeps_its_openapi_contract():
    with serving(server_app({"tiny": FastFake("negative")})) as server:
        _report("model server", fuzz(server.url))


@pytest.fixture(scope="module")
def upstreams():
    with serving(server_app({"tiny": FastFake("negative")})) as champion, \
            serving(server_app({"tiny": FastFake("positive")})) as challenger:
        yield SimpleNamespace(champion=champion.url, challenger=challenger.url)


def test_gateway_keeps_its_openapi_contract(upstreams):
    gateway = Gateway(Upstream(upstreams.champion), Upstream(upstreams.challenger), TOKEN, weight=50,
                      feedback_token=FEEDBACK_TOKEN, model_name="tiny")
    with serving(gateway_app(gateway)) as server:
        _report("gateway", fuzz(server.url, prepare=lambda case: {"Authorization": f"Bearer {TOKEN}"}))
        _report("gateway", _unauthenticated(server.url))


def _unauthenticated(base_url: str) -> list[str]:
    """Every operation the description marks with a bearer token, sent without one and with a wrong one (and the
    admin API with the feedback token): each must be a JSON 401, whatever the body."""
    document = httpx.get(f"{base_url}/openapi.json").json()
    failures = []
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            if not operation.get("security"):
                continue
            wrong = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                     {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": "Bearer \u00e9"}]
            if path.startswith("/admin"):
                wrong.append({"Authorization": f"Bearer {FEEDBACK_TOKEN}"})
            for headers in wrong:
                answer = httpx.request(method, f"{base_url}{path}", json={"weight": 100, "request_id": "x"},
                                       headers={k: v.encode() for k, v in headers.items()})
                if answer.status_code != 401 or "error" not in answer.json():
                    failures.append(f"{method.upper()} {path} with {headers}: {answer.status_code} {answer.text[:120]}")
    return failures


class _Starter:
    async def start(self, deployment, parameters, *, idempotency_key=None, tags=None) -> Started:
        return Started("run-1", "name-1", deployment)


def _hmac(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _webhook_prepare(case: schemathesis.Case) -> dict:
    """Authenticate every request (else each one stops at 401), and point half the pushes at the watched
    repository and branch, so that the start, duplicate (409) and ignore paths are all reached."""
    body = case.body if isinstance(case.body, dict) else {}
    steer = len(json.dumps(body, default=str)) % 2 == 1
    if case.path == "/hooks/github":
        extra: dict[str, Any] = {"sign": lambda raw: {"X-Hub-Signature-256": "sha256=" + _hmac(SECRET, raw)}}
        if steer and isinstance(body.get("repository"), dict):
            body["repository"]["full_name"], body["ref"] = "acme/models", "refs/heads/main"
            extra["X-GitHub-Event"] = "push"
        return extra
    if case.path == "/hooks/gitlab":
        extra = {"X-Gitlab-Token": GITLAB_TOKEN}
        if steer and isinstance(body.get("project"), dict):
            body["project"]["path_with_namespace"], body["ref"] = "acme/models", "refs/heads/main"
            extra["X-Gitlab-Event"] = "Push Hook"
        return extra
    if case.path == "/hooks/mlflow":
        delivery, now = (case.headers or {}).get("X-MLflow-Delivery-Id") or "d-1", str(int(time.time()))
        return {"sign": lambda raw: {"X-MLflow-Delivery-Id": delivery, "X-MLflow-Timestamp": now,
                                     "X-MLflow-Signature": mlflow_sign(MLFLOW_SECRET, delivery, now, raw)}}
    return {}


def test_webhook_receiver_keeps_its_openapi_contract(tmp_path):
    settings_ = Settings(home=tmp_path / ".kiln", webhook_secret=SECRET, gitlab_token=GITLAB_TOKEN,
                         mlflow_webhook_secret=MLFLOW_SECRET, webhook_repository="acme/models",
                         repo="/srv/git/models.git", webhook_max_body=4096)

    with serving(webhooks_app(settings_, _Starter())) as server:
        _report("webhook receiver", fuzz(server.url, prepare=_webhook_prepare))
