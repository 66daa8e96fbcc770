"""The Kubernetes routers — a Gateway API HTTPRoute's weights, a KServe InferenceService's canaryTrafficPercent —
driven by a real rollout against a local stand-in of the Kubernetes API (tests/k8s_api.py) that validates every
body it stores against the real CRD schemas (tests/schemas/README.md).

One spec (10 → 50 → 100 %) drives both routers to promotion and, with a faulty challenger, to a rollback; the
objects the stand-in holds are read at every analysis window. The metrics are a stub MetricsWindows answering
healthy or faulty windows (the routers measure nothing); a real MLflow SQLite registry holds the versions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import SecretStr
from typer.testing import CliRunner

from kiln.cli.app import app
from kiln.errors import ConfigError
from kiln.router_config import GatewayApiRouterConfig, KServeRouterConfig
from kiln.settings import Settings, load_settings
from kiln.tasks.core import tags as vocab
from kiln.tasks.registry import client as registry
from kiln.tasks.rollout.k8s_objects import CustomObject
from kiln.tasks.rollout.k8s_routers import HTTPRouteRouter, KServeRouter, build_router
from kiln.tasks.rollout.launch import preflight, run_rollout
from kiln.tasks.rollout.params import DEFAULT_SPEC, RolloutError, RolloutParams
from kiln.tasks.rollout.router import Split, SplitLapsed
from tests import k8s_api
from tests.integration.helpers import champion_and_challenger
from tests.keys import approve

pytestmark = pytest.mark.timeout(60)

GW = ("gateway.networking.k8s.io", "v1", "httproutes")
KS = ("serving.kserve.io", "v1beta1", "inferenceservices")
NS = "ml"
LENIENT = {"max_error_rate": 0.0, "max_p95_ratio": 20.0, "max_p99_ratio": None, "latency_test": None}
STEPS = [{"weight": 10, "analysis_s": 0.1}, {"weight": 50, "analysis_s": 0.1}, {"weight": 100, "analysis_s": 0.1}]

HTTPROUTE = {
    "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
    "metadata": {"name": "tiny", "namespace": NS},
    "spec": {"parentRefs": [{"name": "kiln-gateway"}], "hostnames": ["tiny.example.com"],
             "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/v2/models/tiny"}}],
                        "backendRefs": [{"name": "tiny-champion", "port": 8000, "weight": 100},
                                        {"name": "tiny-challenger", "port": 8000, "weight": 0}]}]},
}
ISVC = {
    "apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
    "metadata": {"name": "tiny", "namespace": NS, "annotations": {"serving.kserve.io/deploymentMode": "Serverless"}},
    "spec": {"predictor": {"canaryTrafficPercent": 0,  # the challenger's revision, applied with no traffic yet
                           "model": {"modelFormat": {"name": "onnx"}, "storageUri": "s3://models/tiny/2"}}},
}
CONFIGS = {"gateway-api": GatewayApiRouterConfig(kind="gateway-api", namespace=NS, route="tiny", port=8000,
                                                 champion_service="tiny-champion",
                                                 challenger_service="tiny-challenger"),
           "kserve": KServeRouterConfig(kind="kserve", namespace=NS, inference_service="tiny")}


@pytest.fixture(scope="module")
def kube():
    """The stand-in API server (schemas loaded once), emptied before each test by ``seeded``."""
    with k8s_api.serve({GW: k8s_api.httproute_validator(), KS: k8s_api.kserve_validator()}) as api:
        yield api


@pytest.fixture
def seeded(kube):
    """The HTTPRoute and the InferenceService, created through the kubernetes client (so validated too)."""
    return k8s_api.seed(kube, NS, [(GW, HTTPROUTE), (KS, ISVC)])


class Windows:
    """A stub metrics provider: healthy or faulty windows; the champion's side serves whatever @champion is
    (as `kiln serve NAME@champion` does); each window notes the object the router drives at that moment."""

    def __init__(self, client, kube, kind: str | tuple[str, str, str], *, faulty: bool = False) -> None:
        """``kind``: a router kind of this file, or the (group, version, plural) of another router's object."""
        self.client, self.kube, self.faulty = client, kube, faulty
        group, version, plural = {"gateway-api": GW, "kserve": KS}.get(kind, kind)
        self.key = (group, version, NS, plural, "tiny")
        self.seen: list[dict] = []

    def next_window(self) -> dict:
        self.seen.append(self.kube.get(*self.key))
        challenger = {"requests": 200, "errors": 60 if self.faulty else 0, "latency_p95_ms": 11.0}
        return {"window": {"champion": {"requests": 200, "errors": 0, "latency_p95_ms": 10.0},
                           "challenger": challenger}}

    def served_versions(self) -> dict[str, str | None]:
        return {"champion": str(self.client.get_model_version_by_alias("tiny", vocab.CHAMPION).version),
                "challenger": "2"}


@pytest.fixture
def versions(settings, empty_store, tmp_path, keys):
    """``tiny`` v1 @champion, v2 @challenger (gate passed, approved by alice)."""
    client = champion_and_challenger(settings, empty_store, tmp_path / "model")
    approve(client, "tiny", "2", keys, "alice", "ship it if the canary passes")
    return client


def _settings(settings: Settings, kube, **more) -> Settings:
    routers = {name: config.model_copy(update={"api_url": kube.url}) for name, config in CONFIGS.items()}
    return settings.model_copy(update={"rollout_routers": routers, "handover_timeout_s": 5.0} | more)


def _spec(tmp_path: Path, steps: list[dict]) -> str:
    path = tmp_path / "rollout.yaml"
    path.write_text(json.dumps({"steps": steps, "metrics": LENIENT, "failure_limit": 0, "min_samples": 20}))
    return str(path)


def _weights(route: dict) -> dict[str, int]:
    return {ref["name"]: ref["weight"] for ref in route["spec"]["rules"][0]["backendRefs"]}


def _split_of(kind: str, obj: dict):
    if kind == "gateway-api":
        return _weights(obj)
    return obj["spec"]["predictor"].get("canaryTrafficPercent")


EXPECTED_STEPS = {"gateway-api": [{"tiny-champion": 90, "tiny-challenger": 10},
                                  {"tiny-champion": 50, "tiny-challenger": 50},
                                  {"tiny-champion": 0, "tiny-challenger": 100}],
                  "kserve": [10, 50, 100]}
ALL_ON_CHAMPION = {"gateway-api": {"tiny-champion": 100, "tiny-challenger": 0}, "kserve": 0}


@pytest.mark.parametrize("kind", ["gateway-api", "kserve"])
def test_one_spec_drives_each_router_through_its_steps_to_promotion(kind, versions, seeded, settings, tmp_path):
    windows = Windows(versions, seeded, kind)
    state = run_rollout(RolloutParams(model="tiny", spec=_spec(tmp_path, STEPS), gateway=kind, poll_s=0.05),
                        _settings(settings, seeded), windows=windows)
    assert state.status == "promoted", state.message
    # Two windows per step (opened, closed), each seeing the step's split with its lease annotation.
    seen = [_split_of(kind, obj) for obj in windows.seen]
    assert seen == [split for split in EXPECTED_STEPS[kind] for _ in (0, 1)]
    assert all(vocab.SPLIT_EXPIRES_AT in obj["metadata"]["annotations"] for obj in windows.seen)
    final = seeded.get(*windows.key)
    if kind == "gateway-api":  # all on the champion's Service, which now serves v2
        assert _weights(final) == ALL_ON_CHAMPION[kind], state.message
        assert "filters" not in final["spec"]["rules"][0]
    else:  # the canary is the default: KServe's promotion removes canaryTrafficPercent
        assert "canaryTrafficPercent" not in final["spec"]["predictor"]
    assert vocab.SPLIT_EXPIRES_AT not in final["metadata"].get("annotations", {})
    assert registry.aliases_of(versions, "tiny")[vocab.CHAMPION] == "2"
    assert seeded.refused == []
    assert state.gateway == f"{seeded.url}/apis/{windows.key[0]}/{windows.key[1]}/namespaces/ml/{windows.key[3]}/tiny"


@pytest.mark.parametrize("kind", ["gateway-api", "kserve"])
def test_a_faulty_challenger_is_rolled_back_to_all_on_the_champion(kind, versions, seeded, settings, tmp_path):
    windows = Windows(versions, seeded, kind, faulty=True)
    state = run_rollout(RolloutParams(model="tiny", spec=_spec(tmp_path, STEPS), gateway=kind, poll_s=0.05),
                        _settings(settings, seeded), windows=windows)
    assert state.status == "rolled_back", state.message
    assert [_split_of(kind, obj) for obj in windows.seen] == [EXPECTED_STEPS[kind][0]] * 2  # judged at step 1
    final = seeded.get(*windows.key)
    assert _split_of(kind, final) == ALL_ON_CHAMPION[kind]
    assert vocab.SPLIT_EXPIRES_AT not in final["metadata"].get("annotations", {})
    assert registry.aliases_of(versions, "tiny") == {vocab.CHAMPION: "1"}


def test_the_default_presets_shadow_step_is_a_request_mirror_on_the_httproute(versions, seeded, settings, tmp_path):
    preset = yaml.safe_load(DEFAULT_SPEC.read_text())
    steps = [step | {"analysis_s": 0.1} for step in preset["steps"]]  # the preset's steps, quickly
    windows = Windows(versions, seeded, "gateway-api")
    state = run_rollout(RolloutParams(model="tiny", spec=_spec(tmp_path, steps), gateway="gateway-api", poll_s=0.05),
                        _settings(settings, seeded), windows=windows)
    assert state.status == "promoted", state.message
    shadow = windows.seen[0]["spec"]["rules"][0]
    assert _weights(windows.seen[0]) == {"tiny-champion": 100, "tiny-challenger": 0}
    assert shadow["filters"] == [{"type": "RequestMirror", "requestMirror": {
        "backendRef": {"name": "tiny-challenger", "port": 8000}, "percent": 50}}]
    assert "filters" not in windows.seen[2]["spec"]["rules"][0]  # the 10 % step mirrors nothing
    assert seeded.refused == []


def test_kserve_refuses_a_shadow_step_before_traffic_moves(versions, seeded, settings, tmp_path):
    before = seeded.get(*KS[:2], NS, KS[2], "tiny")
    windows = Windows(versions, seeded, "kserve")
    with pytest.raises(RolloutError, match=r"step 1 mirrors traffic \(shadow 0.5\), which KServe cannot do"):
        run_rollout(RolloutParams(model="tiny", gateway="kserve"), _settings(settings, seeded), windows=windows)
    assert seeded.get(*KS[:2], NS, KS[2], "tiny") == before and windows.seen == []
    router = build_router(CONFIGS["kserve"], windows, api_client=k8s_api.api_client(seeded.url))
    with pytest.raises(RolloutError, match="KServe cannot mirror traffic"):
        router.set_split(Split(0, 0.5))
    router.router.obj.patch({"metadata": {"annotations": {"serving.kserve.io/deploymentMode": "Standard"}}})
    with pytest.raises(RolloutError, match="runs in KServe's Standard mode, where canaryTrafficPercent does nothing"):
        run_rollout(RolloutParams(model="tiny", spec=_spec(tmp_path, STEPS), gateway="kserve"),
                    _settings(settings, seeded), windows=windows)
    assert windows.seen == []


def test_a_body_the_schema_refuses_is_a_clear_rollout_error_and_changes_nothing(seeded):
    router = HTTPRouteRouter(_object(seeded, GW), "tiny-champion", "tiny-challenger", 8000)
    before = seeded.get(*GW[:2], NS, GW[2], "tiny")
    with pytest.raises(RolloutError) as refused:
        router.set_split(Split(150.0))  # a champion weight of -50: the CRD's minimum is 0
    message = str(refused.value)
    assert "refused to PATCH httproutes/tiny in namespace ml (422)" in message
    assert "spec.rules.0.backendRefs.0.weight: Invalid value: -50 is less than the minimum of 0" in message
    assert "\n" not in message and seeded.get(*GW[:2], NS, GW[2], "tiny") == before
    typo = CustomObject(k8s_api.api_client(seeded.url), *KS[:2], KS[2], NS, "tiny")  # a field KServe lacks
    with pytest.raises(RolloutError, match=r"\(400\): strict decoding error: .*'canaryTraficPercent' was unexpected"):
        typo.patch({"spec": {"predictor": {"canaryTraficPercent": 5}}})
    kserve = KServeRouter(_object(seeded, KS, name="missing"))
    with pytest.raises(RolloutError, match=r"inferenceservices/missing in namespace ml does not exist .*rollout_rout"):
        kserve.read_split()


def test_a_write_computed_from_a_stale_read_is_refused_and_retried_on_a_fresh_one(seeded):
    router = HTTPRouteRouter(_object(seeded, GW), "tiny-champion", "tiny-challenger", 8000)
    stale = seeded.get(*GW[:2], NS, GW[2], "tiny")
    router.set_split(Split(10))  # someone else's write since that read
    reads = iter([stale])
    fresh = router.obj.get
    router.obj.get = lambda: next(reads, None) or fresh()
    router.set_split(Split(30))
    assert [code for code, _ in seeded.refused] == [409]  # the stale write, refused: nothing overwritten blindly
    assert _weights(seeded.get(*GW[:2], NS, GW[2], "tiny")) == {"tiny-champion": 70, "tiny-challenger": 30}


def test_a_route_without_both_services_is_refused_with_what_to_fix(seeded):
    router = HTTPRouteRouter(_object(seeded, GW), "tiny-champion", "tiny-canary", 8000)
    with pytest.raises(RolloutError, match="no rule of the HTTPRoute .* sends traffic to both Services 'tiny-champion'"
                                           " and 'tiny-canary' \\(port 8000\\); add both"):
        router.set_split(Split(10))


def test_a_split_lapses_when_not_renewed_and_the_next_rollout_reverts_it(versions, seeded, settings):
    now = [1_000_000.0]
    router = HTTPRouteRouter(_object(seeded, GW), "tiny-champion", "tiny-challenger", 8000, clock=lambda: now[0])
    router.set_split(Split(25, 0.1), ttl_s=30)
    now[0] += 20
    router.renew(30)  # in time: 30 s more from now
    now[0] += 29
    assert router.read_split() == Split(25, 0.1) and not router.revert_if_lapsed()
    now[0] += 2
    with pytest.raises(SplitLapsed, match="lapsed at .*traffic is back on the champion"):
        router.renew(30)
    assert router.read_split() == Split(0, 0)
    with pytest.raises(SplitLapsed, match="holds no split with a lease"):
        router.renew(30)

    # A driver that died holding a split: the next `kiln rollout` reverts it in its preflight.
    router.set_split(Split(50), ttl_s=30)  # its clock says 1970: by the real clock that split lapsed long ago
    windows = Windows(versions, seeded, "gateway-api")
    _, canary = preflight(RolloutParams(model="tiny", gateway="gateway-api"), _settings(settings, seeded),
                          windows=windows)
    canary.close()
    route = seeded.get(*GW[:2], NS, GW[2], "tiny")
    assert _weights(route) == ALL_ON_CHAMPION["gateway-api"]
    assert vocab.SPLIT_EXPIRES_AT not in route["metadata"].get("annotations", {})


def test_rollout_status_of_a_dead_drivers_rollout_reverts_its_lapsed_split(versions, seeded, settings, monkeypatch):
    from kiln.tasks.rollout.state import RolloutState, RolloutStore

    router = HTTPRouteRouter(_object(seeded, GW), "tiny-champion", "tiny-challenger", 8000, clock=lambda: 1e6)
    router.set_split(Split(50), ttl_s=30)  # set in 1970 by its clock: lapsed long ago, and nobody reverted it
    RolloutStore(settings.home).save(RolloutState(model="tiny", challenger="2", champion="1", gateway=router.url,
                                                  steps=3, weight=50, status="running"))  # no lease: driver gone
    routers = {name: config.model_dump(mode="json") | {"api_url": seeded.url} for name, config in CONFIGS.items()}
    monkeypatch.setenv("KILN_ROLLOUT_ROUTERS", json.dumps(routers))
    result = CliRunner().invoke(app, ["rollout", "status", "tiny"])
    assert result.exit_code == 0, result.output
    assert "STALE: no driver holds the rollout of tiny v2" in result.output
    assert f"its split on {router.url} had lapsed: put back on the champion" in result.output
    assert _weights(seeded.get(*GW[:2], NS, GW[2], "tiny")) == ALL_ON_CHAMPION["gateway-api"]
    again = CliRunner().invoke(app, ["rollout", "status", "tiny"])
    assert again.exit_code == 0 and "had lapsed" not in again.output  # nothing left to revert


def test_promotion_waits_for_the_champions_service_to_serve_the_new_version(seeded):
    answers = iter(["1", "1", "2"])  # the champion's server follows the alias after a while
    router = HTTPRouteRouter(_object(seeded, GW), "tiny-champion", "tiny-challenger", 8000,
                             served_versions=lambda: {"champion": next(answers)}, handover_poll_s=0.01)
    router.set_split(Split(100), ttl_s=30)
    assert router.promote("2") == ""
    assert _weights(seeded.get(*GW[:2], NS, GW[2], "tiny")) == ALL_ON_CHAMPION["gateway-api"]

    stuck = HTTPRouteRouter(_object(seeded, GW), "tiny-champion", "tiny-challenger", 8000,
                            served_versions=lambda: {"champion": "1"}, handover_timeout_s=0.05, handover_poll_s=0.01)
    stuck.set_split(Split(100), ttl_s=30)
    note = stuck.promote("2")
    assert "'tiny-champion' still serves v1" in note and "keeps 100% on 'tiny-challenger' (v2" in note
    route = seeded.get(*GW[:2], NS, GW[2], "tiny")
    assert _weights(route) == {"tiny-champion": 0, "tiny-challenger": 100}  # not reverted onto v1 ...
    assert vocab.SPLIT_EXPIRES_AT not in route["metadata"].get("annotations", {})  # ... and it cannot lapse there


def test_routers_are_named_in_settings_and_need_a_metrics_provider(monkeypatch, settings, seeded):
    monkeypatch.setenv("KILN_ROLLOUT_ROUTERS", json.dumps({"prod": {"kind": "kserve", "inference_service": "tiny"}}))
    assert load_settings().rollout_routers["prod"] == KServeRouterConfig(kind="kserve", inference_service="tiny")
    monkeypatch.setenv("KILN_ROLLOUT_ROUTERS", json.dumps({"prod": {"kind": "istio", "name": "tiny"}}))
    with pytest.raises(ConfigError, match="rollout_routers"):
        load_settings()
    monkeypatch.setenv("KILN_ROLLOUT_GATEWAYS", "prod=http://127.0.0.1:8080")
    monkeypatch.setenv("KILN_ROLLOUT_ROUTERS", json.dumps({"prod": {"kind": "kserve", "inference_service": "tiny"}}))
    with pytest.raises(ConfigError, match="prod named in both rollout_gateways and rollout_routers"):
        load_settings()
    with pytest.raises(ConfigError, match="router 'kserve' \\(kserve\\) moves traffic but measures nothing"):
        preflight(RolloutParams(model="tiny", gateway="kserve"),
                  _settings(settings, seeded, gateway_token=SecretStr("t")))


def test_kiln_rollout_through_a_router_with_no_metrics_source_exits_2_before_traffic_moves(monkeypatch, seeded,
                                                                                          settings):
    routers = {name: config.model_dump(mode="json") | {"api_url": seeded.url} for name, config in CONFIGS.items()}
    monkeypatch.setenv("KILN_ROLLOUT_ROUTERS", json.dumps(routers))
    writes = len(seeded.requests)
    result = CliRunner().invoke(app, ["rollout", "tiny", "--gateway", "gateway-api"])
    assert result.exit_code == 2, result.output
    assert "router 'gateway-api' (gateway-api) moves traffic but measures nothing" in result.output
    assert "Traceback" not in result.output and len(seeded.requests) == writes  # the cluster was not even asked


def _object(kube, kind: tuple[str, str, str], name: str = "tiny") -> CustomObject:
    return CustomObject(k8s_api.api_client(kube.url), kind[0], kind[1], kind[2], NS, name)
