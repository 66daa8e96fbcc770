"""The judge answers Argo Rollouts' web metric and Flagger's webhooks, over HTTP, from a real gateway's windows.

Two Kiln gateways on loopback, each in front of two model servers (the server's own code over a stand-in engine):
one healthy, one whose challenger fails 40 % of its calls. A judge (``kiln.infra.judge_server``) reads each
gateway's analysis windows through the gateway client, as `kiln judge serve` does; the tests send traffic, then
ask the way Argo's web provider (GET, bearer header, ``jsonPath`` from infra/k8s/progressive/) and Flagger
(POST of its payload, the token in ``metadata``) do. A stub source covers what a gateway cannot be made to do
on demand: an unreachable source, and the window at 100 %. Last, the judge over a ``rollout_metrics`` Prometheus
source, against a stub of Prometheus' query API.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from kiln.errors import KilnError
from kiln.infra.background import serving
from kiln.infra.faults import Faults, FaultyPredictor
from kiln.infra.gateway import create_app as gateway_app
from kiln.infra.gateway_proxy import Gateway, Upstream
from kiln.infra.judge_server import Judge, create_app
from kiln.infra.server import create_app as server_app
from kiln.tasks.rollout.gateway_client import GatewayRouter
from kiln.tasks.rollout.judge import load_spec
from tests.fakes import FastFake

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
PROGRESSIVE = ROOT / "infra" / "k8s" / "progressive"
GATEWAY_TOKEN, JUDGE_TOKEN = "gw-admin-token", "judge-token"
AUTH = {"Authorization": f"Bearer {JUDGE_TOKEN}"}
BODY = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["great day"]}]}
# Error rate decides; latency checks are off so that loopback noise on a shared CPU cannot flip a verdict.
SPEC = load_spec({"steps": [{"weight": 50, "analysis_s": 60}], "min_samples": 40,
                  "metrics": {"max_error_rate": 0.05, "max_p95_ratio": None, "max_p99_ratio": None,
                              "latency_test": None}})


@pytest.fixture(scope="module")
def judges() -> dict[str, dict[str, Any]]:
    """{"healthy" | "faulty": {"gateway": URL, "judge": URL}}, all on loopback for the module."""
    with ExitStack() as stack:
        out = {}
        for kind, challenger in (("healthy", FastFake("positive")),
                                 ("faulty", FaultyPredictor(FastFake("positive"), Faults(errors=0.4, seed=1)))):
            champion = stack.enter_context(serving(server_app({"tiny": FastFake("positive")})))
            canary = stack.enter_context(serving(server_app({"tiny": challenger})))
            gateway = Gateway(Upstream(champion.url, "1"), Upstream(canary.url, "2"), GATEWAY_TOKEN, weight=50,
                              timeout_s=10)
            gw = stack.enter_context(serving(gateway_app(gateway)))
            source = GatewayRouter(gw.url, GATEWAY_TOKEN)
            stack.callback(source.close)
            judge = stack.enter_context(serving(create_app(Judge(SPEC, source), JUDGE_TOKEN)))
            out[kind] = {"gateway": gw.url, "judge": judge.url}
        yield out


def send_traffic(gateway: str, n: int = 200) -> None:
    with httpx.Client(base_url=gateway, timeout=10) as client:
        for _ in range(n):
            client.post("/v2/models/tiny/infer", json=BODY)


def flagger(judge: str, hook: str, *, token: str | None = JUDGE_TOKEN, **metadata: str) -> httpx.Response:
    """A POST the way Flagger's CallWebhook sends it: JSON payload, no auth header; the token in metadata."""
    meta = {"token": token, **metadata} if token else metadata
    payload = {"name": "sentiment", "namespace": "kiln", "phase": "Progressing", "checksum": "abc", "metadata": meta}
    return httpx.post(f"{judge}/judge/flagger/{hook}", json=payload, timeout=30)


def json_path(body: dict[str, Any], path: str) -> Any:
    """What Argo's web provider reads with a simple ``{$.a.b}`` jsonPath."""
    value: Any = body
    for key in path.removeprefix("{$").removesuffix("}").strip(".").split("."):
        value = value[key] if key else value
    return value


def argo_metric() -> dict[str, Any]:
    template = yaml.safe_load((PROGRESSIVE / "analysis-template.yaml").read_text())
    (metric,) = template["spec"]["metrics"]
    return metric


# ---- Argo Rollouts: the web metric provider ---------------------------------------------------------------


@pytest.mark.parametrize(("kind", "verdict"), [("healthy", "pass"), ("faulty", "fail")])
def test_argo_web_metric_reads_the_verdict_the_template_expects(judges, kind: str, verdict: str) -> None:
    urls, metric = judges[kind], argo_metric()
    httpx.post(f"{urls['judge']}/judge/argo", headers=AUTH, timeout=30)  # a fresh window: earlier tests' traffic out
    send_traffic(urls["gateway"])
    answer = httpx.get(f"{urls['judge']}/judge/argo", headers=AUTH, timeout=30)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    # What the AnalysisTemplate's jsonPath reads, and what its conditions compare it with.
    result = json_path(body, metric["provider"]["web"]["jsonPath"])
    assert result == verdict
    assert metric["successCondition"] == 'result == "pass"' and metric["failureCondition"] == 'result == "fail"'
    assert body["ok"] is (verdict == "pass")
    assert [c["name"] for c in body["checks"]] == ["samples", "error_rate"]
    assert body["figures"]["challenger_requests"] >= 40 and body["reasons"]
    if verdict == "fail":
        assert body["failed"] == ["error_rate"] and "FAILED" in body["reasons"][1]
    else:
        assert body["failed"] == [] and body["figures"]["challenger_error_rate"] == 0


def test_argo_with_too_little_traffic_is_inconclusive_not_a_pass(judges) -> None:
    urls = judges["healthy"]
    httpx.post(f"{urls['judge']}/judge/argo", headers=AUTH, timeout=30)
    send_traffic(urls["gateway"], 10)
    body = httpx.get(f"{urls['judge']}/judge/argo", headers=AUTH, timeout=30).json()
    assert body["verdict"] == "inconclusive" and body["ok"] is False
    assert "too little traffic" in body["reasons"][0]


# ---- Flagger: webhooks ------------------------------------------------------------------------------------


def test_flagger_webhooks_pass_a_healthy_canary(judges) -> None:
    urls = judges["healthy"]
    ready = flagger(urls["judge"], "confirm-rollout")
    versions = ready.json()["versions"]  # given at the gateway's start, then what the servers say (1)
    assert ready.status_code == 200 and versions["champion"] and versions["challenger"]
    assert flagger(urls["judge"], "pre-rollout").status_code == 200  # opens the first window
    send_traffic(urls["gateway"])
    rollout = flagger(urls["judge"], "rollout")
    assert rollout.status_code == 200, rollout.text
    assert rollout.json()["verdict"] == "pass"
    promotion = flagger(urls["judge"], "confirm-promotion")  # reads the last verdict; judges no new window
    assert promotion.status_code == 200 and promotion.json()["verdict"] == "pass"


def test_flagger_webhooks_fail_a_faulty_canary_with_reasons(judges) -> None:
    urls = judges["faulty"]
    assert flagger(urls["judge"], "pre-rollout").status_code == 200
    send_traffic(urls["gateway"])
    rollout = flagger(urls["judge"], "rollout")
    assert rollout.status_code == 412  # Flagger: any status above 202 fails the hook
    assert rollout.json()["failed"] == ["error_rate"]
    assert any("error_rate" in r and "FAILED" in r for r in rollout.json()["reasons"])
    assert flagger(urls["judge"], "confirm-promotion").status_code == 412


def test_flagger_confirm_promotion_before_any_analysis_holds(judges) -> None:
    answer = httpx.post(f"{judges['healthy']['judge']}/judge/flagger/confirm-promotion", headers=AUTH, timeout=30,
                        json={"name": "other", "namespace": "kiln", "phase": "Promoting"})
    assert answer.status_code == 425 and answer.json()["verdict"] == "inconclusive"


# ---- authentication ---------------------------------------------------------------------------------------


def test_every_route_but_health_needs_the_token(judges) -> None:
    judge = judges["healthy"]["judge"]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {JUDGE_TOKEN}"}):
        answer = httpx.get(f"{judge}/judge/argo", headers=headers, timeout=30)
        assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
    assert flagger(judge, "rollout", token=None).status_code == 401
    assert flagger(judge, "rollout", token="wrong").status_code == 401
    assert httpx.post(f"{judge}/judge/flagger/rollout", content=b"not json", timeout=30).status_code == 401
    assert httpx.get(f"{judge}/health", timeout=30).status_code == 200


# ---- what a gateway cannot be made to do on demand: a stub source ------------------------------------------


class StubWindows:
    """A MetricsWindows that hands out the windows it was given, or fails like an unreachable gateway."""

    def __init__(self, *windows: dict[str, Any], down: bool = False) -> None:
        self.windows, self.down = list(windows), down

    def next_window(self) -> dict[str, Any]:
        if self.down:
            raise KilnError("the gateway at http://gw:8080 is unreachable")
        return self.windows.pop(0)

    def served_versions(self) -> dict[str, str | None]:
        if self.down:
            raise KilnError("the gateway at http://gw:8080 is unreachable")
        return {"champion": "1", "challenger": None}


def window(champion: int, challenger: int, errors: int = 0) -> dict[str, Any]:
    return {"window": {"champion": {"requests": champion}, "challenger": {"requests": challenger, "errors": errors}}}


def test_a_weight_of_100_judges_without_the_champion_and_bad_input_is_400() -> None:
    app = create_app(Judge(SPEC, StubWindows(window(0, 100), window(0, 100))), JUDGE_TOKEN)
    with TestClient(app) as client:
        assert client.get("/judge/argo", headers=AUTH).json()["verdict"] == "inconclusive"  # champion: 0 requests
        assert client.get("/judge/argo?weight=100", headers=AUTH).json()["verdict"] == "pass"
        bad = client.get("/judge/argo?weight=150", headers=AUTH)
        assert bad.status_code == 400 and "0-100" in bad.json()["error"]
        assert client.post("/judge/flagger/rollout", headers=AUTH, json={"name": "x"}).status_code == 400


def test_an_unreachable_source_is_an_error_not_a_verdict() -> None:
    with TestClient(create_app(Judge(SPEC, StubWindows(down=True)), JUDGE_TOKEN)) as client:
        argo = client.get("/judge/argo", headers=AUTH)
        assert argo.status_code == 502 and "unreachable" in argo.json()["error"]  # Argo: an Error measurement
        hook = client.post("/judge/flagger/rollout", headers=AUTH, json={"name": "s", "namespace": "kiln"})
        assert hook.status_code == 503
    with TestClient(create_app(Judge(SPEC, StubWindows()), JUDGE_TOKEN)) as client:
        ready = client.post("/judge/flagger/confirm-rollout", headers=AUTH, json={"name": "s", "namespace": "kiln"})
        assert ready.status_code == 503 and "challenger" in ready.json()["reason"]


def test_the_judge_refuses_to_start_without_a_token() -> None:
    with pytest.raises(ValueError, match="KILN_JUDGE_TOKEN"):
        create_app(Judge(SPEC, StubWindows()), "")


# ---- the same judge over Prometheus (`--metrics NAME`): a stub of its query API ---------------------------


def prometheus_stub(challenger_errors: int) -> Starlette:
    """Answers /api/v1/query as Prometheus would for Kiln's gateway metrics (the `kiln` preset): 200 requests a
    role, ``challenger_errors`` 5xx on the challenger, 8 ms p95/p99, version 1 and 2, nothing mirrored."""
    async def query(request: Request) -> JSONResponse:
        q = request.query_params["query"]
        challenger = 'role="challenger"' in q
        if "by (version)" in q:
            result = [{"metric": {"version": "2" if challenger else "1"}, "value": [0, "200"]}]
        else:
            value = (0 if 'version!=""' in q or "feedback" in q else 8 if "histogram_quantile" in q
                     else (challenger_errors if challenger else 0) if '=~"5.."' in q else 200)
            result = [{"metric": {}, "value": [0, str(value)]}]
        return JSONResponse({"status": "success", "data": {"resultType": "vector", "result": result}})

    return Starlette(routes=[Route("/api/v1/query", query, methods=["GET", "POST"])])


@pytest.mark.parametrize(("errors", "verdict"), [(0, "pass"), (30, "fail")])
def test_the_judge_reads_prometheus_through_a_rollout_metrics_source(tmp_path, errors: int, verdict: str) -> None:
    from kiln.infra.judge_server import build_judge
    from kiln.settings import Settings

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC.model_dump(mode="json") | {"metrics": SPEC.metrics.model_dump(
        mode="json", exclude={"latency_test"}) | {"max_p95_ratio": 1.25}}))
    with serving(prometheus_stub(errors)) as prometheus:
        settings = Settings(home=tmp_path, rollout_metrics={"prom": {"kind": "prometheus", "url": prometheus.url}})
        judge, source = build_judge(str(spec), "default", None, settings, metrics="prom")
        try:
            with TestClient(create_app(judge, JUDGE_TOKEN)) as client:
                body = client.get("/judge/argo", headers=AUTH).json()
        finally:
            source.close()
    assert body["verdict"] == verdict, body["reasons"]
    assert [c["name"] for c in body["checks"]] == ["samples", "error_rate", "latency_p95"]
    assert body["figures"]["challenger_requests"] == 200 and body["figures"]["p95_ratio"] == 1
