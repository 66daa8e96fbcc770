"""What the driver says about traffic is in the words of the router it drives (tasks/rollout/traffic_checks.py).

The Kiln gateway's split lapses by itself and its admin API resets it; a Kubernetes router's split stays until a
Kiln command reverts it, and is reset with kubectl. Routers over an in-memory object (no API server: the
messages are the subject here; tests/integration/test_k8s_routers.py drives them against the API stand-in).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kiln.tasks.rollout.gateway_client import GatewayRouter
from kiln.tasks.rollout.k8s_routers import HTTPRouteRouter, KServeRouter
from kiln.tasks.rollout.params import RolloutError
from kiln.tasks.rollout.router import RoutedCanary, Split, hint_of
from kiln.tasks.rollout.traffic_checks import check_versions, reset_after_error

ROUTE = {"metadata": {"name": "sentiment", "namespace": "kiln", "resourceVersion": "1"},
         "spec": {"rules": [{"backendRefs": [{"name": "champion", "weight": 50}, {"name": "challenger", "weight": 50}],
                             "filters": [{"type": "RequestMirror",
                                          "requestMirror": {"backendRef": {"name": "challenger"}, "percent": 20}}]}]}}
ISVC = {"metadata": {"name": "sentiment", "namespace": "kiln", "resourceVersion": "1"},
        "spec": {"predictor": {"canaryTrafficPercent": 50}}}


class Obj:
    """An object in memory standing in for CustomObject; ``broken`` refuses every write."""

    def __init__(self, body: dict[str, Any], plural: str, *, broken: bool = False) -> None:
        self.body, self.broken = copy.deepcopy(body), broken
        self.name, self.namespace, self.plural = "sentiment", "kiln", plural
        self.url = f"https://k8s.example/apis/x/v1/namespaces/kiln/{plural}/sentiment"

    def get(self) -> dict[str, Any]:
        return copy.deepcopy(self.body)

    def patch(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.broken:
            raise RolloutError("the Kubernetes API refused to PATCH it (403): forbidden")
        self.body["spec"] = body["spec"]  # enough here: the spec replaced as the router computed it
        return self.get()


class NoVersions:
    def served_versions(self) -> dict[str, str | None]:
        return {"champion": "1", "challenger": None}


def test_a_kubernetes_split_left_behind_is_described_with_kubectl_and_no_gateway_words() -> None:
    router = HTTPRouteRouter(Obj(ROUTE, "httproutes", broken=True), "champion", "challenger")
    said = reset_after_error(router, router.roll_back, 60.0)
    assert said.startswith("traffic could NOT be put back on the champion (the Kubernetes API refused")
    assert "the HTTPRoute sentiment (namespace kiln) reports 50% on the challenger" in said
    assert "nothing reverts the split on the HTTPRoute sentiment (namespace kiln) by itself" in said
    assert "give 'champion' weight 100 and 'challenger' weight 0" in said
    assert "kubectl -n kiln edit httproute sentiment" in said and "kiln rollout status" in said
    assert "gateway" not in said and "/admin/" not in said and "lapses to the champion by itself" not in said


def test_a_kserve_split_is_reset_by_its_canary_traffic_percent() -> None:
    router = KServeRouter(Obj(ISVC, "inferenceservices", broken=True))
    said = reset_after_error(router, router.roll_back, 60.0)
    assert "the InferenceService sentiment (namespace kiln) reports 50% on the challenger" in said
    assert "kubectl -n kiln patch inferenceservice sentiment --type merge" in said
    assert '"canaryTrafficPercent":0' in said and "gateway" not in said


def test_a_confirmed_reset_says_only_that_traffic_is_back() -> None:
    router = HTTPRouteRouter(Obj(ROUTE, "httproutes"), "champion", "challenger")
    assert reset_after_error(router, router.roll_back, 60.0) == "traffic back on the champion"
    assert router.read_split() == Split(0.0, 0.0)


def test_the_gateway_says_its_split_lapses_and_how_its_admin_api_resets_it() -> None:
    gateway = GatewayRouter("http://127.0.0.1:1", "token")
    try:
        hint = gateway.describe()
    finally:
        gateway.close()
    assert (hint.what, hint.lapses) == ("the gateway", True)
    assert hint.reset.startswith('POST /admin/split {"weight": 0, "shadow": 0} to the gateway at http://127.0.0.1:1')


def test_a_routed_canary_describes_its_router_and_an_old_router_gets_a_plain_description() -> None:
    router = KServeRouter(Obj(ISVC, "inferenceservices"))
    assert RoutedCanary(router, NoVersions()).describe() == router.describe()

    class Old:
        url = "test://router"

    assert hint_of(Old()).what == "the router at test://router" and not hint_of(Old()).lapses


def test_version_checks_name_the_router() -> None:
    canary = RoutedCanary(HTTPRouteRouter(Obj(ROUTE, "httproutes"), "champion", "challenger"), NoVersions())
    check_versions(canary, "sentiment", {"champion": "1", "challenger": "2"}, require_known=False)
    with pytest.raises(RolloutError, match=r"the HTTPRoute sentiment \(namespace kiln\) does not say which version "
                                           "its challenger upstream serves"):
        check_versions(canary, "sentiment", {"champion": "1", "challenger": "2"})
    with pytest.raises(RolloutError, match=r"the champion upstream of the HTTPRoute .* serves v1, but @champion "
                                           r"of sentiment is v3; point .* at the right model server "
                                           r"\(sentiment@champion\)"):
        check_versions(canary, "sentiment", {"champion": "3", "challenger": None})
