"""A rollout's evidence from Prometheus: :class:`PrometheusWindows`, the :class:`MetricsWindows` of PromQL.

Each analysis window is the time since the last :meth:`PrometheusWindows.next_window` call. When it closes,
each query template (in the manner of Flagger's metric templates) is filled in for each role and evaluated at
that instant over the Prometheus HTTP API (``GET /api/v1/query``)::

    requests        answers the upstream served in the window (client errors, 4xx, not counted)
    errors          of which status >= 500 (or unreachable)
    latency_p95_ms  histogram_quantile(0.95, ... _bucket rates ...), in milliseconds
    latency_p99_ms  the same at 0.99
    compared/agreed mirrored rows compared with the champion / equal to it (optional)
    feedback/correct rows with a true label / predicted right (optional)
    versions        one series per version served, labelled ``version_label`` (optional; see served_versions)

Placeholders: ``{role}`` (champion, challenger), ``{upstream}`` (that role's name in the metrics: a Service, a
workload), ``{interval}`` (the window, e.g. ``4250ms``), ``{namespace}``, ``{selector}`` (extra label matchers,
with their leading comma) and any ``variables``. Every query must answer one value (aggregate with ``sum``);
no series is 0 for a count and "not measured" for a quantile. The answers fill the same window shape as the
Kiln gateway's ``POST /admin/reset`` (``champion``, ``challenger``, ``shadow``), so the judge reads both alike;
there are no latency samples, so the rank test cannot run (:func:`fit_spec` says so before traffic moves).

Counts come from ``increase()`` over the window, which Prometheus extrapolates from the samples it scraped: a
window shorter than about three scrape intervals sees too few samples to count, and traffic in the last scrape
interval before the window closed is not in it yet. Choose ``analysis_s`` of several scrape intervals.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kiln.errors import ConfigError, validation_problems
from kiln.metrics_config import GATEWAY_WINDOWS, MetricsSource
from kiln.settings import Settings
from kiln.tasks.rollout.judge import CHALLENGER, CHAMPION, RolloutSpec
from kiln.tasks.rollout.params import RolloutError

log = logging.getLogger(__name__)
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")  # PromQL never writes {name} alone: a matcher has =
BUILTIN = ("role", "upstream", "interval", "namespace", "selector")
COUNTS = ("requests", "errors", "compared", "agreed", "feedback", "correct")
QUANTILES = ("latency_p95_ms", "latency_p99_ms")
UNKNOWN_VERSION = "unknown"  # what the Kiln gateway labels an upstream's metrics with until it names its version


class MetricQueries(BaseModel):
    """PromQL templates for one kind of traffic; None switches a figure off (the judge then lacks it)."""

    model_config = ConfigDict(extra="forbid")
    requests: str = Field(..., description="Answers served in the window (4xx not counted).")
    errors: str = Field(..., description="Of which failed: status >= 500, or the upstream unreachable.")
    latency_p95_ms: str | None = Field(None, description="p95 latency in milliseconds.")
    latency_p99_ms: str | None = Field(None, description="p99 latency in milliseconds.")
    compared: str | None = Field(None, description="Mirrored rows whose label was compared with the champion's.")
    agreed: str | None = Field(None, description="Of which the same label.")
    feedback: str | None = Field(None, description="Rows with a true label from feedback.")
    correct: str | None = Field(None, description="Of which predicted right.")
    versions: str | None = Field(None, description="One series per version served in the window (value: its "
                                 "requests), the version in the label ``version_label``.")

    def templates(self) -> dict[str, str]:
        return {name: q for name in (*COUNTS, *QUANTILES) if isinstance(q := getattr(self, name), str)}


class PrometheusQueries(MetricQueries):
    """The query set of a rollout: live traffic per role, optional mirrored traffic, the versions served."""

    version_label: str = Field("version", description="The label that names the version in ``versions``.")
    shadow: MetricQueries | None = Field(None, description="The challenger's mirrored traffic, added to its live "
                                         "figures (as the gateway's windows do).")

    def all_templates(self) -> dict[str, str]:
        both = [("", self), ("shadow.", self.shadow)] if self.shadow else [("", self)]
        return {f"{prefix}{name}": q for prefix, queries in both
                for name, q in (queries.templates() | ({"versions": queries.versions} if queries.versions else {})
                                ).items()}


def _kiln(metric: str, matchers: str, rate: str = "increase") -> str:
    return f"sum({rate}({metric}{{{matchers}{{selector}}}}[{{interval}}]))"


def _kiln_quantile(metric: str, q: float, matchers: str) -> str:
    return (f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{matchers}{{selector}}}}[{{interval}}])))"
            " * 1000")


_LIVE, _SHADOW = 'role="{role}"', 'version!=""'
KILN = PrometheusQueries(  # the Kiln gateway's own metrics (infra/gateway_stats.py GatewayMetrics)
    requests=_kiln("kiln_gateway_requests_total", _LIVE + ',code!~"4.."'),
    errors=_kiln("kiln_gateway_requests_total", _LIVE + ',code=~"5.."'),
    latency_p95_ms=_kiln_quantile("kiln_gateway_request_duration_seconds", 0.95, _LIVE),
    latency_p99_ms=_kiln_quantile("kiln_gateway_request_duration_seconds", 0.99, _LIVE),
    feedback=_kiln("kiln_gateway_feedback_total", _LIVE + ',source="live"'),
    correct=_kiln("kiln_gateway_feedback_total", _LIVE + ',source="live",result="correct"'),
    versions='sum by (version) (increase(kiln_gateway_requests_total{role="{role}"{selector}}[{interval}]))',
    shadow=MetricQueries(
        requests=_kiln("kiln_gateway_shadow_requests_total", _SHADOW + ',code!~"4.."'),
        errors=_kiln("kiln_gateway_shadow_requests_total", _SHADOW + ',code=~"5.."'),
        latency_p95_ms=_kiln_quantile("kiln_gateway_shadow_request_duration_seconds", 0.95, _SHADOW),
        latency_p99_ms=_kiln_quantile("kiln_gateway_shadow_request_duration_seconds", 0.99, _SHADOW),
        compared=_kiln("kiln_gateway_shadow_comparisons_total", _SHADOW),
        agreed=_kiln("kiln_gateway_shadow_comparisons_total", _SHADOW + ',result="agree"'),
        feedback=_kiln("kiln_gateway_feedback_total", 'role="{role}",source="shadow"'),
        correct=_kiln("kiln_gateway_feedback_total", 'role="{role}",source="shadow",result="correct"'),
        versions='sum by (version) (increase(kiln_gateway_shadow_requests_total{version!=""{selector}}[{interval}]))'))

# The versions behind a mesh or a KServe canary: from the Kiln model servers' own metrics (`kiln serve` labels
# every request with the version it served), scoped to the role's pods by {upstream}.
_SERVED = ('sum by (version) (increase(kiln_server_requests_total{namespace="{namespace}",pod=~"{upstream}-.*"'
           '{selector}}[{interval}]))')
_ISTIO = 'reporter="destination",destination_workload_namespace="{namespace}",destination_workload="{upstream}"'
ISTIO = PrometheusQueries(  # Flagger's istio request-success-rate / request-duration, split into counts
    requests=f"sum(increase(istio_requests_total{{{_ISTIO}{{selector}}}}[{{interval}}]))",
    errors=f'sum(increase(istio_requests_total{{{_ISTIO},response_code=~"5.*"{{selector}}}}[{{interval}}]))',
    latency_p95_ms=f"histogram_quantile(0.95, sum by (le) (rate(istio_request_duration_milliseconds_bucket"
                   f"{{{_ISTIO}{{selector}}}}[{{interval}}])))",
    latency_p99_ms=f"histogram_quantile(0.99, sum by (le) (rate(istio_request_duration_milliseconds_bucket"
                   f"{{{_ISTIO}{{selector}}}}[{{interval}}])))",
    versions=_SERVED)
_ENVOY = 'envoy_cluster_name=~"{upstream}"'  # the role's Envoy cluster(s); check the names in /stats/prometheus
ENVOY_GATEWAY = PrometheusQueries(
    requests=f"sum(increase(envoy_cluster_upstream_rq{{{_ENVOY}{{selector}}}}[{{interval}}]))",
    errors=f'sum(increase(envoy_cluster_upstream_rq{{{_ENVOY},envoy_response_code=~"5.*"{{selector}}}}'
           f"[{{interval}}]))",
    latency_p95_ms=f"histogram_quantile(0.95, sum by (le) (rate(envoy_cluster_upstream_rq_time_bucket"
                   f"{{{_ENVOY}{{selector}}}}[{{interval}}])))",
    latency_p99_ms=f"histogram_quantile(0.99, sum by (le) (rate(envoy_cluster_upstream_rq_time_bucket"
                   f"{{{_ENVOY}{{selector}}}}[{{interval}}])))",
    versions=_SERVED)
_KNATIVE = 'namespace_name="{namespace}",revision_name="{upstream}"'  # Knative queue-proxy, one revision a role
KSERVE = PrometheusQueries(
    requests=f"sum(increase(revision_app_request_count{{{_KNATIVE}{{selector}}}}[{{interval}}]))",
    errors=f'sum(increase(revision_app_request_count{{{_KNATIVE},response_code_class="5xx"{{selector}}}}'
           f"[{{interval}}]))",
    latency_p95_ms=f"histogram_quantile(0.95, sum by (le) (rate(revision_app_request_latencies_bucket"
                   f"{{{_KNATIVE}{{selector}}}}[{{interval}}])))",
    latency_p99_ms=f"histogram_quantile(0.99, sum by (le) (rate(revision_app_request_latencies_bucket"
                   f"{{{_KNATIVE}{{selector}}}}[{{interval}}])))",
    versions=_SERVED)
PRESETS: dict[str, PrometheusQueries] = {"kiln": KILN, "istio": ISTIO, "envoy-gateway": ENVOY_GATEWAY,
                                         "kserve": KSERVE}


def queries_of(source: MetricsSource) -> PrometheusQueries:
    """The source's preset with its ``queries`` overrides laid over it; a ConfigError names a bad key or
    placeholder."""
    base = PRESETS[source.preset].model_dump()
    overrides = dict(source.queries)
    if isinstance(overrides.get("shadow"), dict) and base.get("shadow"):
        overrides["shadow"] = base["shadow"] | overrides["shadow"]
    try:
        queries = PrometheusQueries.model_validate(base | overrides)
    except ValidationError as exc:
        raise ConfigError(f"rollout_metrics queries: {validation_problems(exc, model=PrometheusQueries)}") from exc
    known = set(BUILTIN) | set(source.variables)
    for name, template in queries.all_templates().items():
        if unknown := sorted({p for p in PLACEHOLDER.findall(template)} - known):
            braced = ", ".join("{" + k + "}" for k in sorted(known))
            raise ConfigError(f"rollout_metrics query {name} uses {', '.join('{' + u + '}' for u in unknown)}, "
                              f"which nothing fills; the placeholders are {braced} (add more under variables)")
    return queries


def render(template: str, values: dict[str, str]) -> str:
    """``template`` with each ``{name}`` replaced by ``values[name]`` (PromQL's own braces left alone)."""
    return PLACEHOLDER.sub(lambda m: values[m.group(1)] if m.group(1) in values else m.group(0), template)


def prom_duration(seconds: float) -> str:
    """A Prometheus duration for a window, in milliseconds (at least 1 ms)."""
    return f"{max(1, round(seconds * 1000))}ms"


def parse_result(body: Any, what: str) -> list[tuple[dict[str, str], float]]:
    """The series of an ``/api/v1/query`` answer as (labels, value); NaN stays NaN. RolloutError if malformed."""
    if not isinstance(body, dict) or body.get("status") != "success" or not isinstance(body.get("data"), dict):
        error = body.get("error") if isinstance(body, dict) else None
        raise RolloutError(f"Prometheus refused {what}: {error or str(body)[:200]}")
    data = body["data"]
    kind, result = data.get("resultType"), data.get("result")
    try:
        if kind == "scalar":
            return [({}, float(result[1]))]
        if kind == "vector":
            return [(dict(item.get("metric") or {}), float(item["value"][1])) for item in result]
    except (TypeError, ValueError, KeyError, IndexError) as exc:
        raise RolloutError(f"Prometheus answered {what} with a malformed {kind}: {str(result)[:200]}") from exc
    raise RolloutError(f"{what} must be an instant query (a vector or a scalar), not a {kind}")


def one_value(series: list[tuple[dict[str, str], float]], what: str, *, count: bool) -> float | None:
    """The single value of a query: no series is 0 for a count and None for a quantile; NaN (e.g. a quantile of
    no requests) is None; several series are a ConfigError that says to aggregate."""
    if len(series) > 1:
        raise ConfigError(f"{what} answered {len(series)} series, it must answer one value: aggregate it in the "
                          "rollout_metrics setting (e.g. sum(...), or sum by (le) inside histogram_quantile)")
    if not series:
        return 0.0 if count else None
    value = series[0][1]
    if math.isnan(value) or math.isinf(value):
        return None
    return max(0.0, value) if count else value


class PrometheusWindows:
    """Analysis windows as PromQL answers (see the module docstring).

    Args:
        url: Prometheus base URL.
        queries: the templates.
        values: the fixed placeholders (namespace, selector with its leading comma, variables).
        upstreams: ``{role: name}`` for ``{upstream}`` (default: the role's name).
        token: bearer token for Prometheus, if it needs one.
        timeout_s: per query.
        clock: wall-clock time; the query time and the window's length come from it.
        transport: an httpx transport (tests answer without a Prometheus).
    """

    def __init__(self, url: str, queries: PrometheusQueries, *, values: dict[str, str] | None = None,
                 upstreams: dict[str, str] | None = None, token: str | None = None, timeout_s: float = 10.0,
                 clock: Callable[[], float] = time.time, transport: httpx.BaseTransport | None = None) -> None:
        self.url, self.queries, self.clock = url.rstrip("/"), queries, clock
        self.values = {"namespace": "", "selector": ""} | (values or {})
        self.upstreams = {CHAMPION: CHAMPION, CHALLENGER: CHALLENGER} | (upstreams or {})
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(base_url=self.url, timeout=timeout_s, headers=headers, transport=transport)
        self._opened = clock()
        self._versions: dict[str, str | None] = {}  # the last version each role was seen serving

    @classmethod
    def from_source(cls, source: MetricsSource, token: str | None = None) -> PrometheusWindows:
        """The windows a ``rollout_metrics`` entry of kind prometheus describes."""
        selector = source.selector.strip().strip(",")
        values = source.variables | {"namespace": source.namespace, "selector": f",{selector}" if selector else ""}
        return cls(str(source.url), queries_of(source), values=values, upstreams=source.upstreams, token=token,
                   timeout_s=source.timeout_s)

    def close(self) -> None:
        self._client.close()

    # -- the HTTP API --
    def query(self, promql: str, at: float, what: str) -> list[tuple[dict[str, str], float]]:
        """Evaluate ``promql`` at time ``at`` (``GET /api/v1/query``)."""
        try:
            response = self._client.get("/api/v1/query", params={"query": promql, "time": f"{at:.3f}"})
        except httpx.HTTPError as exc:
            raise RolloutError(f"cannot reach Prometheus at {self.url} ({exc.__class__.__name__}); check the url of "
                               "the rollout_metrics source the rollout names (--metrics)") from exc
        if response.status_code in (401, 403):
            raise RolloutError(f"Prometheus at {self.url} refused the request ({response.status_code}); set "
                               "KILN_PROMETHEUS_TOKEN to a token it accepts")
        try:
            body = response.json()
        except ValueError:
            raise RolloutError(f"{self.url} answered {what} with {response.status_code} and no JSON; is it "
                               "Prometheus?") from None
        if response.status_code == 400:  # bad_data: the template, not the server
            raise ConfigError(f"Prometheus cannot run {what}: {body.get('error', '?')}; fix that query in the "
                              f"rollout_metrics setting (it ran as: {promql})")
        return parse_result(body, what)

    def _values(self, role: str, seconds: float) -> dict[str, str]:
        return self.values | {"role": role, "upstream": self.upstreams[role], "interval": prom_duration(seconds)}

    def measure(self, queries: MetricQueries, role: str, seconds: float, at: float) -> dict[str, Any]:
        """One role's figures over the ``seconds`` before ``at``, in the gateway's window shape."""
        values, out = self._values(role, seconds), {}
        for name, template in queries.templates().items():
            what = f"the {name} query for the {role}"
            series = self.query(render(template, values), at, what)
            value = one_value(series, what, count=name in COUNTS)
            out[name] = round(value) if name in COUNTS and value is not None else value
        requests, errors = out.get("requests", 0), out.get("errors", 0)
        out["errors"] = min(errors, requests)  # extrapolated separately, errors can overshoot by a fraction
        out["error_rate"] = out["errors"] / requests if requests else None
        return out

    def versions_in(self, role: str, seconds: float, at: float) -> str | None:
        """The versions ``role`` served in the window, mirrored traffic included (several: comma-joined, so a
        check against one version fails)."""
        templates = [self.queries.versions]
        if role == CHALLENGER and self.queries.shadow is not None:
            templates.append(self.queries.shadow.versions)
        seen: set[str] = set()
        for template in filter(None, templates):
            series = self.query(render(template, self._values(role, seconds)), at, f"the versions query for the {role}")
            seen |= {labels.get(self.queries.version_label, "") for labels, value in series if value > 0}
        return ",".join(sorted(seen - {"", UNKNOWN_VERSION})) or None

    # -- MetricsWindows --
    def next_window(self) -> dict[str, Any]:
        """Close the window (the time since the last call) and open the next; returns its figures per role."""
        end = self.clock()
        seconds, started, self._opened = max(end - self._opened, 0.001), self._opened, end
        window: dict[str, Any] = {"started": started, "seconds": round(seconds, 3), "source": "prometheus",
                                  "interval": prom_duration(seconds)}
        for role in (CHAMPION, CHALLENGER):
            window[role] = self.measure(self.queries, role, seconds, end)
            if version := self.versions_in(role, seconds, end):
                self._versions[role] = version
        if self.queries.shadow is not None:
            window["shadow"] = self.measure(self.queries.shadow, CHALLENGER, seconds, end)
        return window

    def served_versions(self, lookback_s: float = 300.0) -> dict[str, str | None]:
        """The version each role served in the last window (a role without traffic in it: the one it served
        last, looking back ``lookback_s`` before the first window). Empty without a ``versions`` query, so a
        driver that must know fails closed."""
        if not self.queries.versions:
            return {}
        for role in (CHAMPION, CHALLENGER):
            if role not in self._versions:
                self._versions[role] = self.versions_in(role, lookback_s, self.clock())
        return dict(self._versions)

    def check(self) -> None:
        """Run every query once (over the last minute), so a bad template or an unreachable Prometheus stops a
        rollout before traffic moves."""
        at = self.clock()
        for name, template in self.queries.all_templates().items():
            role = CHALLENGER if name.startswith("shadow.") else CHAMPION
            series = self.query(render(template, self._values(role, 60.0)), at, f"the {name} query")
            if not name.endswith("versions"):
                one_value(series, f"the {name} query", count=True)


def fit_spec(spec: RolloutSpec, queries: PrometheusQueries) -> tuple[RolloutSpec, list[str]]:
    """``spec`` as Prometheus can judge it, and what was changed: the latency rank test needs samples Prometheus
    does not keep, so a defaulted one is switched off (the p95/p99 ratios judge latency); asked for explicitly,
    or a check whose figures no query gives, is a ConfigError before traffic moves."""
    m, notes = spec.metrics, []
    if m.latency_test is not None:
        if "latency_test" in m.model_fields_set:
            raise ConfigError("the spec's metrics.latency_test needs latency samples, which Prometheus does not "
                              "keep; set it to null (the p95/p99 ratios still judge latency) or use --metrics gateway")
        m = m.model_copy(update={"latency_test": None})
        notes.append("latency_test: off (Prometheus keeps no latency samples; the p95/p99 ratios judge latency)")
    if spec.drift is not None:
        raise ConfigError("the spec's drift checks need the inputs the Kiln gateway's windows keep; remove drift "
                          "from the spec or use --metrics gateway")
    shadow = queries.shadow
    needs = {"max_p95_ratio": queries.latency_p95_ms, "max_p99_ratio": queries.latency_p99_ms,
             "min_agreement": shadow.agreed if shadow else None, "max_accuracy_drop": queries.correct}
    if missing := [k for k, q in needs.items() if getattr(m, k) is not None and not q]:
        raise ConfigError(f"the spec's metrics {', '.join(missing)} need figures the rollout_metrics queries do "
                          "not give; add those queries or set the checks to null")
    return spec.model_copy(update={"metrics": m}), notes


def windows_for(name: str, settings: Settings, spec: RolloutSpec) -> tuple[PrometheusWindows | None, RolloutSpec]:
    """The windows of the ``rollout_metrics`` source called ``name`` (None for the router's own: ``gateway``, or
    a source of kind gateway), checked against Prometheus once, and ``spec`` as they can judge it."""
    source = settings.rollout_metrics.get(name)
    if source is None and name != GATEWAY_WINDOWS:
        known = ", ".join(sorted({GATEWAY_WINDOWS, *settings.rollout_metrics}))
        raise ConfigError(f"unknown metrics source {name!r}; a rollout reads its evidence from {known} (add a "
                          "source to the rollout_metrics setting in kiln.yaml or KILN_ROLLOUT_METRICS)")
    if source is None or source.kind == "gateway":
        return None, spec
    spec, notes = fit_spec(spec, queries_of(source))
    for note in notes:
        log.warning("metrics %s: %s", name, note)
    token = settings.prometheus_token.get_secret_value() if settings.prometheus_token else None
    windows = PrometheusWindows.from_source(source, token)
    try:
        windows.check()
    except BaseException:
        windows.close()
        raise
    return windows, spec
