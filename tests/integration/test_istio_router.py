"""The Istio router — a VirtualService's destination weights and mirror — against the Kubernetes API stand-in
(tests/k8s_api.py), which validates every body it stores against Istio's real VirtualService CRD (istio 1.30.3,
tests/schemas/README.md).

The same spec as tests/integration/test_k8s_routers.py (10 → 50 → 100 %) drives a VirtualService whose route
names one host's two subsets to promotion and, with a faulty challenger, to a rollback; the object is read at
every analysis window. The metrics are the same stub windows; a real MLflow SQLite registry holds the versions.
"""

from __future__ import annotations

import pytest

from kiln.router_config import IstioRouterConfig
from kiln.tasks.core import tags as vocab
from kiln.tasks.registry import client as registry
from kiln.tasks.rollout.k8s_objects import CustomObject
from kiln.tasks.rollout.k8s_routers import VirtualServiceRouter
from kiln.tasks.rollout.launch import run_rollout
from kiln.tasks.rollout.params import RolloutError, RolloutParams
from kiln.tasks.rollout.router import Split, SplitLapsed
from tests import k8s_api
from tests.integration.test_k8s_routers import NS, STEPS, Windows, _spec, versions  # noqa: F401 - versions is a fixture

pytestmark = pytest.mark.timeout(60)

VS = ("networking.istio.io", "v1", "virtualservices")
VIRTUAL_SERVICE = {
    "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
    "metadata": {"name": "tiny", "namespace": NS},
    "spec": {"hosts": ["tiny.ml.svc.cluster.local"],
             "http": [{"match": [{"uri": {"prefix": "/v2/models/tiny"}}],
                       "route": [{"destination": {"host": "tiny", "subset": "champion", "port": {"number": 8000}},
                                  "weight": 100},
                                 {"destination": {"host": "tiny", "subset": "challenger", "port": {"number": 8000}},
                                  "weight": 0}]}]},
}
CONFIG = IstioRouterConfig(kind="istio", namespace=NS, virtual_service="tiny", champion_host="tiny",
                           champion_subset="champion", challenger_host="tiny", challenger_subset="challenger",
                           port=8000)


@pytest.fixture(scope="module")
def istio_api():
    with k8s_api.serve({VS: k8s_api.virtualservice_validator()}) as api:
        yield api


@pytest.fixture
def vs(istio_api):
    """The VirtualService, created through the kubernetes client (so validated too)."""
    return k8s_api.seed(istio_api, NS, [(VS, VIRTUAL_SERVICE)])


def _router(api, **kw) -> VirtualServiceRouter:
    obj = CustomObject(k8s_api.api_client(api.url), *VS[:2], VS[2], NS, "tiny")
    return VirtualServiceRouter(obj, ("tiny", "champion"), ("tiny", "challenger"), 8000, **kw)


def _weights(obj: dict) -> dict[str, int]:
    return {d["destination"]["subset"]: d["weight"] for d in obj["spec"]["http"][0]["route"]}


def _settings(settings, api):
    config = CONFIG.model_copy(update={"api_url": api.url})
    return settings.model_copy(update={"rollout_routers": {"istio": config}, "handover_timeout_s": 5.0})


@pytest.mark.parametrize("faulty", [False, True], ids=["healthy", "faulty"])
def test_one_spec_drives_the_virtual_service_to_promotion_or_rollback(faulty, versions, vs, settings, tmp_path):  # noqa: F811
    windows = Windows(versions, vs, VS, faulty=faulty)
    state = run_rollout(RolloutParams(model="tiny", spec=_spec(tmp_path, STEPS), gateway="istio", poll_s=0.05),
                        _settings(settings, vs), windows=windows)
    seen = [_weights(obj) for obj in windows.seen]
    assert all(vocab.SPLIT_EXPIRES_AT in obj["metadata"]["annotations"] for obj in windows.seen)
    final = vs.get(*VS[:2], NS, VS[2], "tiny")
    assert _weights(final) == {"champion": 100, "challenger": 0}, state.message
    assert vocab.SPLIT_EXPIRES_AT not in final["metadata"].get("annotations", {})
    if faulty:
        assert state.status == "rolled_back", state.message
        assert seen == [{"champion": 90, "challenger": 10}] * 2  # judged at step 1
        assert registry.aliases_of(versions, "tiny") == {vocab.CHAMPION: "1"}
    else:
        assert state.status == "promoted", state.message
        assert seen == [{"champion": 100 - w, "challenger": w} for w in (10, 50, 100) for _ in (0, 1)]
        assert registry.aliases_of(versions, "tiny")[vocab.CHAMPION] == "2"
    assert vs.refused == []


def test_a_shadow_share_is_a_mirror_with_mirror_percentage_and_goes_with_the_rollback(vs):
    router = _router(vs)
    router.set_split(Split(0, 0.25), ttl_s=60)
    route = vs.get(*VS[:2], NS, VS[2], "tiny")["spec"]["http"][0]
    assert route["mirror"] == {"host": "tiny", "subset": "challenger", "port": {"number": 8000}}
    assert route["mirrorPercentage"] == {"value": 25.0}
    assert router.read_split() == Split(0, 0.25)
    router.roll_back()
    route = vs.get(*VS[:2], NS, VS[2], "tiny")["spec"]["http"][0]
    assert "mirror" not in route and "mirrorPercentage" not in route and router.read_split() == Split(0, 0)
    assert vs.refused == []


def test_the_crd_refuses_what_istio_would_and_the_router_says_what_to_fix(vs):
    router = _router(vs)
    with pytest.raises(RolloutError, match="the Kubernetes API refused"):  # a misspelt field: strict validation
        router.obj.patch({"spec": {"http": [{"route": [{"destination": {"host": "tiny"}, "wieght": 1}]}]}})
    other = VirtualServiceRouter(router.obj, ("tiny", "champion"), ("tiny", "canary"), 8000)
    with pytest.raises(RolloutError, match="no http route of the VirtualService .* sends traffic to both "
                                           r"'tiny \(subset champion\)' and 'tiny \(subset canary\)'"):
        other.set_split(Split(10))
    with pytest.raises(ValueError, match="same destination"):
        IstioRouterConfig(kind="istio", virtual_service="tiny", champion_host="tiny", challenger_host="tiny")
    assert "kubectl -n ml edit virtualservice tiny" in router.describe().reset and not router.describe().lapses


def test_a_split_lapses_when_not_renewed(vs):
    now = [1_000_000.0]
    router = _router(vs, clock=lambda: now[0])
    router.set_split(Split(25), ttl_s=30)
    now[0] += 31
    with pytest.raises(SplitLapsed, match="lapsed at .*traffic is back on the champion"):
        router.renew(30)
    assert _weights(vs.get(*VS[:2], NS, VS[2], "tiny")) == {"champion": 100, "challenger": 0}
