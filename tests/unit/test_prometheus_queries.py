"""PrometheusWindows without a Prometheus: templates filled in, answers parsed, windows shaped as the judge reads them.

A stand-in for ``/api/v1/query`` (httpx's MockTransport) answers by metric name; the real server runs in
tests/integration/test_prometheus_rollout.py.
"""

from __future__ import annotations

import json
import math

import httpx
import pytest
from pydantic import ValidationError

from kiln.errors import ConfigError
from kiln.metrics_config import MetricsSource
from kiln.settings import Settings
from kiln.tasks.rollout.judge import load_spec, stats_from_state
from kiln.tasks.rollout.params import RolloutError, RolloutParams
from kiln.tasks.rollout.prometheus import (
    KILN,
    PRESETS,
    PrometheusWindows,
    fit_spec,
    one_value,
    parse_result,
    prom_duration,
    queries_of,
    render,
    windows_for,
)

URL = "http://prometheus.test:9090"


def _vector(*series: tuple[dict[str, str], float | str]) -> dict:
    return {"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": labels, "value": [1700000000.0, str(value)]} for labels, value in series]}}


class _Prometheus:
    """Answers each query from ``answers``: the first key found in the query text wins; records every call."""

    def __init__(self, answers: dict[str, dict]) -> None:
        self.answers, self.calls = answers, []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        query, at = request.url.params["query"], request.url.params["time"]
        self.calls.append((query, at))
        for key, body in self.answers.items():
            if key in query:
                return httpx.Response(200, json=body)
        return httpx.Response(200, json=_vector())


def _windows(answers: dict[str, dict], clock: list[float], **kwargs) -> tuple[PrometheusWindows, _Prometheus]:
    server = _Prometheus(answers)
    windows = PrometheusWindows(URL, KILN, clock=lambda: clock[0], transport=httpx.MockTransport(server), **kwargs)
    return windows, server


# ---- templates ---------------------------------------------------------------------------------------------


def test_render_fills_placeholders_and_leaves_promql_braces_alone() -> None:
    values = {"role": "challenger", "interval": "4250ms", "selector": ',job="gw"'}
    out = render(KILN.requests, values)
    assert out == 'sum(increase(kiln_gateway_requests_total{role="challenger",code!~"4..",job="gw"}[4250ms]))'
    assert render('x{a="{role}"}', {}) == 'x{a="{role}"}'  # unfilled stays visible, never silently empty


def test_every_preset_uses_only_known_placeholders() -> None:
    for name in PRESETS:
        queries = queries_of(MetricsSource(url=URL, preset=name))
        assert queries.requests and queries.errors and queries.latency_p95_ms, name
    istio = queries_of(MetricsSource(url=URL, preset="istio"))
    assert "istio_requests_total" in istio.requests and "istio_request_duration_milliseconds_bucket" in \
        istio.latency_p95_ms


def test_overrides_lay_over_the_preset_and_bad_ones_are_named() -> None:
    source = MetricsSource(url=URL, queries={"errors": "sum(increase(my_errors{svc=\"{svc}\"}[{interval}]))",
                                             "shadow": {"agreed": "sum(x)"}}, variables={"svc": "sentiment"})
    queries = queries_of(source)
    assert queries.errors.startswith("sum(increase(my_errors") and queries.requests == KILN.requests
    assert queries.shadow.agreed == "sum(x)" and queries.shadow.compared == KILN.shadow.compared
    with pytest.raises(ConfigError, match=r"query errors uses \{svc\}, which nothing fills"):
        queries_of(MetricsSource(url=URL, queries={"errors": "sum(my_errors{svc=\"{svc}\"})"}))
    with pytest.raises(ConfigError, match="error_count"):
        queries_of(MetricsSource(url=URL, queries={"error_count": "sum(x)"}))


def test_windows_are_whole_milliseconds() -> None:
    assert prom_duration(4.25) == "4250ms" and prom_duration(0.0001) == "1ms"


# ---- answers -----------------------------------------------------------------------------------------------


def test_parse_vectors_and_scalars_and_refuse_the_rest() -> None:
    assert parse_result(_vector(({"version": "2"}, "7")), "q") == [({"version": "2"}, 7.0)]
    assert parse_result({"status": "success", "data": {"resultType": "scalar", "result": [1.0, "3"]}}, "q") == \
        [({}, 3.0)]
    with pytest.raises(RolloutError, match="must be an instant query"):
        parse_result({"status": "success", "data": {"resultType": "matrix", "result": []}}, "q")
    with pytest.raises(RolloutError, match="refused q: boom"):
        parse_result({"status": "error", "error": "boom"}, "q")
    with pytest.raises(RolloutError, match="malformed vector"):
        parse_result({"status": "success", "data": {"resultType": "vector", "result": [{"value": [1]}]}}, "q")


def test_one_value_counts_absent_as_zero_and_quantiles_as_unmeasured() -> None:
    assert one_value([], "q", count=True) == 0.0
    assert one_value([], "q", count=False) is None
    assert one_value([({}, math.nan)], "q", count=False) is None  # histogram_quantile of no requests
    with pytest.raises(ConfigError, match="answered 2 series.*aggregate"):
        one_value([({"a": "1"}, 1.0), ({"a": "2"}, 2.0)], "q", count=True)


def test_a_window_is_the_time_since_the_last_one_in_the_gateways_shape() -> None:
    clock = [1000.0]
    answers = {
        'role="champion",code!~': _vector(({}, "200.4")), 'role="champion",code=~"5..': _vector(),
        'role="challenger",code!~': _vector(({}, "100")), 'role="challenger",code=~"5..': _vector(({}, "12.6")),
        'duration_seconds_bucket{role="champion"': _vector(({}, "4.5")),
        'duration_seconds_bucket{role="challenger"': _vector(({}, "48.0")),
        'by (version) (increase(kiln_gateway_requests_total{role="champion"': _vector(({"version": "1"}, "9"),
                                                                                    ({"version": "unknown"}, "1")),
        "shadow_requests_total{version!=\"\",code!~": _vector(({}, "50")),
        "sum by (version) (increase(kiln_gateway_shadow": _vector(({"version": "2"}, "50")),
    }
    windows, server = _windows(answers, clock)
    clock[0] = 1004.25
    window = windows.next_window()
    assert window["seconds"] == 4.25 and window["source"] == "prometheus"
    assert {at for _, at in server.calls} == {"1004.250"} and all("[4250ms]" in q for q, _ in server.calls)
    assert window["champion"]["requests"] == 200 and window["challenger"]["errors"] == 13
    assert window["challenger"]["latency_p95_ms"] == 48.0 and window["shadow"]["requests"] == 50
    stats = stats_from_state(window)
    assert stats["challenger"].requests == 150 and stats["challenger"].errors == 13  # live + mirrored
    assert stats["challenger"].quantile_ms(0.95) == 48.0 and stats["champion"].quantile_ms(0.95) == 4.5
    # versions: "unknown" (the gateway's label until it learns one) is not a version; the mirrored traffic counts
    assert windows.served_versions() == {"champion": "1", "challenger": "2"}
    clock[0] = 1008.0
    server.answers = {"sum by (version) (increase(kiln_gateway_requests_total{role=\"challenger\"":
                      _vector(({"version": "2"}, "3"), ({"version": "3"}, "1"))}
    window = windows.next_window()
    assert window["champion"]["requests"] == 0 and window["champion"]["latency_p95_ms"] is None
    # no champion traffic this time: still the version it served last; two versions: both, so a check fails
    assert windows.served_versions() == {"champion": "1", "challenger": "2,3"}


def test_the_first_served_versions_look_back_and_without_a_versions_query_say_nothing() -> None:
    clock = [500.0]
    windows, server = _windows({'requests_total{role="champion"': _vector(({"version": "1"}, "4"))}, clock)
    assert windows.served_versions() == {"champion": "1", "challenger": None}
    assert any("[300000ms]" in q for q, _ in server.calls)
    bare = PrometheusWindows(URL, KILN.model_copy(update={"versions": None}), transport=httpx.MockTransport(server))
    assert bare.served_versions() == {}  # the driver then fails closed: it must know what it judges


def test_http_failures_say_what_to_fix() -> None:
    def answer(status: int, body: dict | None = None):
        return httpx.MockTransport(lambda r: httpx.Response(status, json=body or {}))

    bad = {"status": "error", "errorType": "bad_data", "error": "parse error at char 5"}
    windows = PrometheusWindows(URL, KILN, transport=answer(400, bad))
    with pytest.raises(ConfigError, match="cannot run the requests query.*parse error at char 5.*rollout_metrics"):
        windows.check()
    with pytest.raises(RolloutError, match="KILN_PROMETHEUS_TOKEN"):
        PrometheusWindows(URL, KILN, transport=answer(401)).check()

    def down(request):
        raise httpx.ConnectError("refused")

    with pytest.raises(RolloutError, match=f"cannot reach Prometheus at {URL}"):
        PrometheusWindows(URL, KILN, transport=httpx.MockTransport(down)).next_window()


def test_the_bearer_token_goes_to_prometheus() -> None:
    seen = []
    transport = httpx.MockTransport(lambda r: seen.append(r.headers.get("authorization")) or
                                    httpx.Response(200, json=_vector()))
    PrometheusWindows(URL, KILN, token="s3cret", transport=transport).check()
    assert set(seen) == {"Bearer s3cret"}


# ---- the spec, the settings, the parameters -------------------------------------------------------------------


def test_fit_spec_switches_off_a_defaulted_rank_test_and_refuses_what_prometheus_cannot_judge() -> None:
    spec, notes = fit_spec(load_spec({"steps": [{"weight": 50}]}), KILN)
    assert spec.metrics.latency_test is None and "latency_test" in notes[0]
    with pytest.raises(ConfigError, match="latency_test needs latency samples"):
        fit_spec(load_spec({"steps": [{"weight": 50}], "metrics": {"latency_test": {"alpha": 0.01}}}), KILN)
    with pytest.raises(ConfigError, match="drift checks need the inputs"):
        fit_spec(load_spec({"steps": [{"weight": 50}], "drift": {"reference": "ref.csv"}}), KILN)
    istio = queries_of(MetricsSource(url=URL, preset="istio"))
    with pytest.raises(ConfigError, match="max_accuracy_drop need figures"):
        fit_spec(load_spec({"steps": [{"weight": 50}], "metrics": {"max_accuracy_drop": 0.1}}), istio)


def test_sources_are_names_in_settings(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KILN_ROLLOUT_METRICS", json.dumps({"prom": {"url": URL, "preset": "istio",
                                                                    "namespace": "ml"}}))
    settings = Settings(home=tmp_path)
    assert settings.rollout_metrics["prom"].preset == "istio"
    spec = load_spec({"steps": [{"weight": 50}]})
    assert windows_for("gateway", settings, spec) == (None, spec)
    with pytest.raises(ConfigError, match="unknown metrics source 'other'.*gateway, prom"):
        windows_for("other", settings, spec)
    with pytest.raises(ValidationError, match="needs url"):
        MetricsSource(kind="prometheus")
    with pytest.raises(ValidationError, match="no credentials"):
        MetricsSource(url="http://user:pw@prometheus:9090")
    with pytest.raises(ValidationError, match="looks like a URL"):
        RolloutParams(model="m", metrics="http://prometheus:9090")
