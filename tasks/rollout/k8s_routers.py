"""Traffic routers on Kubernetes, through the official ``kubernetes`` client (CustomObjectsApi, merge patches).

    HTTPRouteRouter  a Gateway API HTTPRoute (gateway.networking.k8s.io/v1): the rule(s) whose backendRefs name
                     the champion's and the challenger's Services get weights (100-w, w); a shadow share is a
                     ``RequestMirror`` filter (``percent``) toward the challenger's Service
    VirtualServiceRouter  an Istio VirtualService (networking.istio.io/v1): the http route(s) whose destinations
                     are the champion's and the challenger's (two hosts, or two subsets of one) get weights
                     (100-w, w); a shadow share is the route's ``mirror`` with ``mirrorPercentage``
    KServeRouter     a KServe InferenceService (serving.kserve.io/v1beta1) in serverless mode: the split is
                     ``spec.predictor.canaryTrafficPercent`` (the challenger is the predictor's latest revision,
                     the champion the last rolled-out one); promotion removes the field, as KServe documents, so
                     the canary becomes the default; KServe cannot mirror, so a shadow step is refused

**A split's lease.** Kubernetes has no TTL on a weight, so the router writes the split's expiry in the
annotation ``kiln.dev/split-expires-at`` (:data:`~kiln.tasks.core.tags.SPLIT_EXPIRES_AT`); ``renew`` moves it
on and raises :class:`SplitLapsed` once it passed (reverting the split first). Nothing on the cluster reverts
a split by itself: when the driver dies, the split stays until the next Kiln command that looks at the object
puts it back on the champion: ``kiln rollout`` starting again (:meth:`revert_if_lapsed` in its preflight), or
``kiln rollout status`` of a rollout no driver holds (:func:`revert_lapsed_split`). Every write is a merge
patch carrying the ``resourceVersion`` it was computed from (a concurrent writer makes it retry) and
``fieldValidation=Strict`` (a field the API does not know is an error, not dropped).

A router here measures nothing: :func:`build_router` pairs it with a
:class:`~kiln.tasks.rollout.router.MetricsWindows` (Prometheus, ...) as a
:class:`~kiln.tasks.rollout.router.RoutedCanary`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

from kiln.errors import ConfigError
from kiln.router_config import GatewayApiRouterConfig, IstioRouterConfig, KServeRouterConfig, RouterConfig
from kiln.tasks.rollout.judge import RolloutSpec
from kiln.tasks.rollout.k8s_objects import CustomObject, K8sRouter, api_client_for, whole_percent
from kiln.tasks.rollout.params import RolloutError
from kiln.tasks.rollout.router import ALL_ON_CHAMPION, MetricsWindows, RoutedCanary, RouterHint, Split

DEPLOYMENT_MODE = "serving.kserve.io/deploymentMode"  # KServe's annotation: Knative (was Serverless) or Standard
NO_CANARY_MODES = ("Standard", "RawDeployment", "ModelMesh")  # canary rollouts are Knative-mode only
DEFAULT_HANDOVER_S = 120.0  # as the Kiln gateway's: 2 × a following server's poll, plus loading the engine


class KServeRouter(K8sRouter):
    """``spec.predictor.canaryTrafficPercent`` of a serverless InferenceService.

    Before the rollout, the predictor's latest revision must be the challenger's, applied with
    ``canaryTrafficPercent: 0`` (without the field KServe sends it all traffic at once); the champion is the
    revision KServe last rolled out. Promotion removes the field (KServe's documented promotion: the canary
    becomes the rolled-out default); a rollback sets it to 0 (KServe pins traffic to the rolled-out revision).
    """

    supports_shadow = False

    def check_spec(self, spec: RolloutSpec) -> None:
        """Refuse, before traffic moves, an InferenceService whose deployment mode ignores the canary split, and a
        spec KServe cannot follow: a shadow step or a fractional weight."""
        annotations = (self.obj.get().get("metadata") or {}).get("annotations") or {}
        mode = annotations.get(DEPLOYMENT_MODE, "")
        if mode in NO_CANARY_MODES:  # absent: the cluster's default mode, which the router cannot see
            raise RolloutError(f"{self.url} runs in KServe's {mode} mode, where canaryTrafficPercent does nothing; "
                               f"set {DEPLOYMENT_MODE}: Knative (serverless) on it, or roll out through a gateway-api "
                               "router or the Kiln gateway")
        for n, step in enumerate(spec.steps, 1):
            if step.shadow > 0:
                raise RolloutError(f"step {n} mirrors traffic (shadow {step.shadow:g}), which KServe cannot do; "
                                   "drop its shadow (or the step) from the spec, or roll out through a gateway-api "
                                   "router or the Kiln gateway")
            if not _whole(step.weight):
                raise RolloutError(f"step {n} sends {step.weight:g}% to the challenger; KServe's "
                                   "canaryTrafficPercent takes whole percents")

    def _spec_patch(self, obj: dict[str, Any], split: Split | None) -> dict[str, Any]:
        if split is not None and split.shadow > 0:
            raise RolloutError(f"KServe cannot mirror traffic (asked for shadow {split.shadow:g} on {self.url}); use "
                               "a gateway-api router or the Kiln gateway for shadow steps")
        return {"spec": {"predictor": {"canaryTrafficPercent": None if split is None else whole_percent(split.weight)}}}

    def _split_of(self, obj: dict[str, Any]) -> Split:
        percent = ((obj.get("spec") or {}).get("predictor") or {}).get("canaryTrafficPercent")
        return Split(100.0 if percent is None else float(percent), 0.0)  # no field: the latest revision takes all

    def promote(self, version: str) -> str:
        """Make the canary (the challenger's revision, now @champion) the default: ``canaryTrafficPercent``
        removed. KServe switches by itself, so there is nothing to wait for."""
        self._write(None, None)
        self._split, self._ttl_s = ALL_ON_CHAMPION, None
        return ""

    def describe(self) -> RouterHint:
        """Nothing on the cluster reverts a split: by hand, canaryTrafficPercent 0 (all on the rolled-out one)."""
        name, ns = self.obj.name, self.obj.namespace
        patch = '{"spec":{"predictor":{"canaryTrafficPercent":0}}}'
        return RouterHint(f"the InferenceService {name} (namespace {ns})", "set its spec.predictor."
                          f"canaryTrafficPercent to 0 (`kubectl -n {ns} patch inferenceservice {name} --type merge "
                          f"-p '{patch}'`), or once its lease lapsed run `kiln rollout status` of the model",
                          lapses=False)


class HTTPRouteRouter(K8sRouter):
    """Backend weights of an HTTPRoute whose rule names two Services: the champion's (``kiln serve
    NAME@champion``, which follows the alias) and the challenger's.

    Weights are written as whole percents (90/10), or in hundredths (8750/1250) for a fractional weight; a shadow
    share is the rule's ``RequestMirror`` filter with ``percent`` (it mirrors that share of the rule's requests,
    whichever backend answers them). :meth:`promote` waits, bounded, until ``served_versions()`` says the
    champion's Service serves the new version, then sends it everything.
    """

    supports_shadow = True
    kind_name = "HTTPRoute"  # in what promote() tells the operator

    def __init__(self, obj: CustomObject, champion_service: str, challenger_service: str, port: int | None = None,
                 *, served_versions: Callable[[], dict[str, str | None]] | None = None,
                 handover_timeout_s: float = DEFAULT_HANDOVER_S, handover_poll_s: float = 0.5,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(obj, clock=clock)
        self.champion, self.challenger, self.port = champion_service, challenger_service, port
        self.served_versions = served_versions
        self.handover_timeout_s, self.handover_poll_s = handover_timeout_s, handover_poll_s

    def check_spec(self, spec: RolloutSpec) -> None:
        """The route must hold a rule naming both Services before traffic moves."""
        self._rules(self.obj.get())

    def describe(self) -> RouterHint:
        """Nothing on the cluster reverts a split: by hand, the weights (100, 0) and no mirror filter."""
        name, ns = self.obj.name, self.obj.namespace
        return RouterHint(f"the HTTPRoute {name} (namespace {ns})", f"give {self.champion!r} weight 100 and "
                          f"{self.challenger!r} weight 0, and remove any RequestMirror filter toward "
                          f"{self.challenger!r}, in its rules (`kubectl -n {ns} edit httproute {name}`), or once "
                          "its lease lapsed run `kiln rollout status` of the model", lapses=False)

    def _is(self, ref: dict[str, Any], service: str) -> bool:
        return (ref.get("name") == service and ref.get("kind", "Service") == "Service" and not ref.get("group")
                and (self.port is None or ref.get("port") == self.port))

    def _rules(self, obj: dict[str, Any]) -> list[int]:
        rules = (obj.get("spec") or {}).get("rules") or []
        found = [i for i, rule in enumerate(rules)
                 if any(self._is(r, self.champion) for r in rule.get("backendRefs") or [])
                 and any(self._is(r, self.challenger) for r in rule.get("backendRefs") or [])]
        if not found:
            port = f" (port {self.port})" if self.port else ""
            raise RolloutError(f"no rule of the HTTPRoute {self.url} sends traffic to both Services "
                               f"{self.champion!r} and {self.challenger!r}{port}; add both to one rule's backendRefs "
                               f"(the challenger with weight 0), or fix the router in the rollout_routers setting")
        return found

    def _mirror(self, f: dict[str, Any]) -> bool:
        return f.get("type") == "RequestMirror" and self._is((f.get("requestMirror") or {}).get("backendRef") or {},
                                                             self.challenger)

    def _spec_patch(self, obj: dict[str, Any], split: Split | None) -> dict[str, Any]:
        split = split or ALL_ON_CHAMPION
        rules = copy.deepcopy(obj["spec"]["rules"])
        champion_w, challenger_w = _weights(split.weight)
        for i in self._rules(obj):
            for ref in rules[i]["backendRefs"]:
                if self._is(ref, self.champion):
                    ref["weight"] = champion_w
                elif self._is(ref, self.challenger):
                    ref["weight"] = challenger_w
            filters = [f for f in rules[i].get("filters") or [] if not self._mirror(f)]
            if split.shadow > 0:
                target = {"name": self.challenger} | ({"port": self.port} if self.port else {})
                filters.append({"type": "RequestMirror", "requestMirror": _mirror_share(target, split.shadow)})
            rules[i].pop("filters", None)
            if filters:
                rules[i]["filters"] = filters
        return {"spec": {"rules": rules}}  # a merge patch replaces a list whole: every rule, as read

    def _split_of(self, obj: dict[str, Any]) -> Split:
        rule = obj["spec"]["rules"][self._rules(obj)[0]]
        champion = sum(r.get("weight", 1) for r in rule["backendRefs"] if self._is(r, self.champion))
        challenger = sum(r.get("weight", 1) for r in rule["backendRefs"] if self._is(r, self.challenger))
        weight = 100.0 * challenger / (champion + challenger) if champion + challenger else 0.0
        shadow = 0.0
        for f in rule.get("filters") or []:
            if self._mirror(f):
                mirror = f["requestMirror"]
                if "percent" in mirror:
                    shadow = mirror["percent"] / 100
                elif "fraction" in mirror:
                    shadow = mirror["fraction"]["numerator"] / mirror["fraction"].get("denominator", 100)
                else:
                    shadow = 1.0
        return Split(round(weight, 4), round(shadow, 6))

    def promote(self, version: str) -> str:
        """Once the champion's Service serves ``version`` (its server followed the moved alias), all traffic on
        it; until then the split stays, renewed. After ``handover_timeout_s`` the split is made permanent (no
        lease: it must not revert onto the old version) and the operator is told what to do."""
        deadline, renewed = self.clock() + self.handover_timeout_s, self.clock()
        serving = None
        try:
            while self.served_versions is not None:
                serving = self.served_versions().get("champion")
                serving = None if serving is None else str(serving)
                if serving == str(version) or self.clock() >= deadline:
                    break
                if self._ttl_s is not None and self.clock() - renewed >= self._ttl_s / 3:
                    self.renew(self._ttl_s)
                    renewed = self.clock()
                time.sleep(self.handover_poll_s)
            if self.served_versions is None or serving == str(version):
                self.roll_back()  # all on the champion's Service, which serves the new champion
                return ""
            self._write(self._split, None)
        except RolloutError as exc:
            return (f"traffic was not handed over: {exc}; once the Service {self.champion!r} serves v{version}, set "
                    f"its weight to 100 and {self.challenger!r}'s to 0 in the {self.kind_name} {self.url}")
        old = f"v{serving}" if serving else "an unknown version"
        return (f"the Service {self.champion!r} still serves {old} after {self.handover_timeout_s:g}s, so the "
                f"HTTPRoute keeps {self._split.weight:g}% on {self.challenger!r} (v{version}, now @champion); run "
                f"its server on NAME@champion (`kiln serve NAME@champion` follows the alias) or restart it, then set "
                f"{self.champion!r}'s weight to 100 and {self.challenger!r}'s to 0 in {self.url}")


class VirtualServiceRouter(HTTPRouteRouter):
    """Destination weights of an Istio VirtualService (networking.istio.io/v1) whose HTTP route(s) name the
    champion's and the challenger's destinations: two hosts, or one host's two subsets (a DestinationRule's).

    Weights are whole percents (Istio's are integers); a shadow share is the route's ``mirror`` toward the
    challenger with ``mirrorPercentage``. Promotion hands over as the HTTPRoute router does.
    """

    kind_name = "VirtualService"

    def __init__(self, obj: CustomObject, champion: tuple[str, str | None], challenger: tuple[str, str | None],
                 port: int | None = None, **kw: Any) -> None:
        super().__init__(obj, _dest_name(*champion), _dest_name(*challenger), port, **kw)
        self.destinations = {self.champion: champion, self.challenger: challenger}

    def check_spec(self, spec: RolloutSpec) -> None:
        """A route naming both destinations, and whole-percent weights."""
        self._rules(self.obj.get())
        for n, step in enumerate(spec.steps, 1):
            if not _whole(step.weight):
                raise RolloutError(f"step {n} sends {step.weight:g}% to the challenger; Istio's route weights "
                                   "are whole percents")

    def describe(self) -> RouterHint:
        name, ns = self.obj.name, self.obj.namespace
        return RouterHint(f"the VirtualService {name} (namespace {ns})", f"give {self.champion!r} weight 100 and "
                          f"{self.challenger!r} weight 0, and remove the mirror toward {self.challenger!r}, in its "
                          f"http routes (`kubectl -n {ns} edit virtualservice {name}`), or once its lease lapsed "
                          "run `kiln rollout status` of the model", lapses=False)

    def _is(self, dest: dict[str, Any], name: str) -> bool:
        host, subset = self.destinations[name]
        return (dest.get("host") == host and dest.get("subset") == subset
                and (self.port is None or (dest.get("port") or {}).get("number") == self.port))

    def _rules(self, obj: dict[str, Any]) -> list[int]:
        routes = (obj.get("spec") or {}).get("http") or []
        found = [i for i, r in enumerate(routes)
                 if any(self._is(d.get("destination") or {}, self.champion) for d in r.get("route") or [])
                 and any(self._is(d.get("destination") or {}, self.challenger) for d in r.get("route") or [])]
        if not found:
            raise RolloutError(f"no http route of the VirtualService {self.url} sends traffic to both "
                               f"{self.champion!r} and {self.challenger!r}; add both destinations to one route "
                               "(the challenger with weight 0), or fix the router in the rollout_routers setting")
        return found

    def _mirror(self, route: dict[str, Any]) -> bool:
        return self._is(route.get("mirror") or {}, self.challenger)

    def _spec_patch(self, obj: dict[str, Any], split: Split | None) -> dict[str, Any]:
        split = split or ALL_ON_CHAMPION
        routes = copy.deepcopy(obj["spec"]["http"])
        for i in self._rules(obj):
            for d in routes[i]["route"]:
                if self._is(d["destination"], self.champion):
                    d["weight"] = 100 - whole_percent(split.weight)
                elif self._is(d["destination"], self.challenger):
                    d["weight"] = whole_percent(split.weight)
            if self._mirror(routes[i]):
                routes[i].pop("mirror")
                routes[i].pop("mirrorPercentage", None)
            if split.shadow > 0:
                host, subset = self.destinations[self.challenger]
                mirror = {"host": host} | ({"subset": subset} if subset else {}) | (
                    {"port": {"number": self.port}} if self.port else {})
                routes[i]["mirror"] = mirror
                routes[i]["mirrorPercentage"] = {"value": round(split.shadow * 100, 4)}
        return {"spec": {"http": routes}}  # a merge patch replaces a list whole: every route, as read

    def _split_of(self, obj: dict[str, Any]) -> Split:
        route = obj["spec"]["http"][self._rules(obj)[0]]
        dests = route["route"]
        champion = sum(d.get("weight", 0) for d in dests if self._is(d["destination"], self.champion))
        challenger = sum(d.get("weight", 0) for d in dests if self._is(d["destination"], self.challenger))
        weight = 100.0 * challenger / (champion + challenger) if champion + challenger else 0.0
        shadow = 0.0
        if self._mirror(route):  # Istio mirrors everything when mirrorPercentage is absent
            shadow = (route.get("mirrorPercentage") or {}).get("value", 100.0) / 100
        return Split(round(weight, 4), round(shadow, 6))


def _dest_name(host: str, subset: str | None) -> str:
    return f"{host} (subset {subset})" if subset else host


def _whole(value: float) -> bool:
    return abs(value - whole_percent(value)) < 1e-9  # 0.1 * 100 is 10.000000000000002


def _weights(percent: float) -> tuple[int, int]:
    """(champion, challenger) backendRef weights: whole percents when the split is one, else hundredths."""
    if _whole(percent):
        return 100 - whole_percent(percent), whole_percent(percent)
    hundredths = int(round(percent * 100))
    return 10_000 - hundredths, hundredths


def _mirror_share(target: dict[str, Any], shadow: float) -> dict[str, Any]:
    """A RequestMirror filter's body: ``percent`` when the share is whole percents, else a ``fraction``."""
    if shadow >= 1:
        return {"backendRef": target}
    if _whole(shadow * 100):
        return {"backendRef": target, "percent": whole_percent(shadow * 100)}
    return {"backendRef": target, "fraction": {"numerator": int(round(shadow * 10_000)), "denominator": 10_000}}


def build_router(config: RouterConfig, windows: MetricsWindows, *, handover_timeout_s: float = DEFAULT_HANDOVER_S,
                 api_client: Any = None) -> RoutedCanary:
    """The router ``config`` describes, paired with ``windows`` (which measure, and say what each side serves)."""
    api = api_client if api_client is not None else api_client_for(config)
    if isinstance(config, KServeRouterConfig):
        obj = CustomObject(api, "serving.kserve.io", "v1beta1", "inferenceservices", config.namespace,
                           config.inference_service)
        return RoutedCanary(KServeRouter(obj), windows)
    if isinstance(config, IstioRouterConfig):
        obj = CustomObject(api, "networking.istio.io", "v1", "virtualservices", config.namespace,
                           config.virtual_service)
        return RoutedCanary(VirtualServiceRouter(obj, (config.champion_host, config.champion_subset),
                                                 (config.challenger_host, config.challenger_subset), config.port,
                                                 served_versions=windows.served_versions,
                                                 handover_timeout_s=handover_timeout_s), windows)
    if isinstance(config, GatewayApiRouterConfig):
        obj = CustomObject(api, "gateway.networking.k8s.io", "v1", "httproutes", config.namespace, config.route)
        return RoutedCanary(HTTPRouteRouter(obj, config.champion_service, config.challenger_service, config.port,
                                            served_versions=windows.served_versions,
                                            handover_timeout_s=handover_timeout_s), windows)
    raise ConfigError(f"unknown router kind {getattr(config, 'kind', config)!r}")


class _NoWindows:
    """The windows of a router that is only looked at, not rolled out through."""

    def next_window(self) -> dict[str, Any]:
        raise RolloutError("no analysis runs here")

    def served_versions(self) -> dict[str, str | None]:
        return {}


def revert_lapsed_split(routers: dict[str, RouterConfig], url: str) -> str | None:
    """For `kiln rollout status` once a rollout's driver is gone: the router of ``routers`` it drove (at ``url``),
    its split put back on the champion if the lease lapsed. Says what it did, or could not; None: nothing to do
    (not a Kubernetes router, or its split holds no lapsed lease)."""
    for config in routers.values():
        try:
            canary = build_router(config, _NoWindows())
        except ConfigError:  # no credentials for this one here: not the router of that rollout, as far as we know
            continue
        try:
            if canary.url == url and canary.router.revert_if_lapsed():
                return f"its split on {url} had lapsed: put back on the champion"
        except RolloutError as exc:
            return f"could not check its split on {url}: {exc}"
        finally:
            canary.close()
    return None
