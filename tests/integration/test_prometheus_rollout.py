"""A rollout judged from PromQL alone: the Kiln gateway moves the traffic, a real Prometheus (scraping the gateway
and both model servers every second) is the evidence, through ``PrometheusWindows`` and the ``kiln`` preset.

The stack, traffic and registry fixtures are test_rollout.py's; the windows are 3 s, three scrape intervals, so
``increase()`` has samples to count.
"""

from __future__ import annotations

import json

import httpx
import pytest
import typer
from typer.testing import CliRunner

from kiln.cli.rollout import register_commands
from kiln.errors import ConfigError
from kiln.infra.faults import Faults
from kiln.metrics_config import MetricsSource
from kiln.settings import Settings
from kiln.tasks.registry import client as registry
from kiln.tasks.rollout.launch import run_rollout
from kiln.tasks.rollout.params import RolloutParams
from tests.integration.test_rollout import TOKEN, _spec, _stack, _Traffic, approved, rollout_settings, tiny  # noqa: F401
from tests.prometheus import prometheus  # noqa: F401 - the session's Prometheus

WINDOW_S = 3.0
NO_SAMPLES = {"latency_test": None}  # Prometheus keeps no latency samples: the p95 ratio judges latency


def _with_prometheus(settings: Settings, url: str, selector: str) -> Settings:
    source = MetricsSource(kind="prometheus", url=url, preset="kiln", selector=selector)
    return settings.model_copy(update={"rollout_metrics": {"prom": source}})


def _scraped(prometheus, stack) -> str:  # noqa: F811
    return prometheus.scrape([stack.url, *(upstream.url for upstream in stack.gw.upstreams.values())])


def test_healthy_challenger_is_promoted_on_promql_evidence(approved, rollout_settings, prometheus, tmp_path):  # noqa: F811
    spec = _spec(tmp_path, [{"weight": 50, "shadow": 1.0, "analysis_s": WINDOW_S},
                            {"weight": 100, "analysis_s": WINDOW_S}],
                 # p95 from histogram buckets is coarse (1-2.5-5-10-25 ms): equal engines may land a bucket apart
                 metrics=NO_SAMPLES | {"min_agreement": 0.9, "max_p95_ratio": 10.0})
    with _stack() as stack, _Traffic(stack.url) as traffic:
        settings = _with_prometheus(stack.allow(rollout_settings), prometheus.url, _scraped(prometheus, stack))
        state = run_rollout(RolloutParams(model="tiny", spec=spec, metrics="prom", poll_s=0.2), settings)
    reasons = [" | ".join(v.reasons) for v in state.verdicts]
    assert state.status == "promoted", (state.message, reasons)
    assert [v.outcome for v in state.verdicts] == ["pass", "pass"], reasons
    assert registry.aliases_of(approved, "tiny")["champion"] == "2"
    split, full = state.verdicts
    # Every figure is Prometheus's: the challenger's live answers plus the mirrored ones (compared with the
    # champion's), the latency quantiles from the histogram buckets, the labelled feedback.
    assert split.figures["champion_requests"] >= 30 and split.figures["challenger_requests"] >= 60, reasons[0]
    assert split.figures["agreement"] == 1.0 and split.figures["challenger_accuracy"] == 1.0, reasons[0]
    assert split.figures["challenger_p95_ms"] and split.figures["champion_p95_ms"], reasons[0]
    assert not any(r.startswith("latency_test") for r in split.reasons)
    # At 100 % only answers scraped late (from just before the step) can still show for the champion.
    assert full.figures["challenger_requests"] >= 30, reasons[1]
    assert full.figures["champion_requests"] < full.figures["challenger_requests"] / 4, reasons[1]
    assert traffic.summary.failed == 0


def test_faulty_challenger_is_rolled_back_on_promql_evidence(tiny, rollout_settings, prometheus, tmp_path):  # noqa: F811
    spec = _spec(tmp_path, [{"weight": 50, "analysis_s": WINDOW_S}, {"weight": 100, "analysis_s": WINDOW_S}],
                 failure_limit=0, metrics=NO_SAMPLES | {"max_p95_ratio": 2.0})  # +40 ms: p95 >= 48.75 ms
    with _stack(Faults(errors=0.5, latency_ms=40)) as stack, _Traffic(stack.url):
        settings = _with_prometheus(stack.allow(rollout_settings), prometheus.url, _scraped(prometheus, stack))
        state = run_rollout(RolloutParams(model="tiny", spec=spec, metrics="prom", poll_s=0.2), settings)
        weight = stack.gw.routing.weight
    assert state.status == "rolled_back", state.message
    [verdict] = state.verdicts
    failed = [r for r in verdict.reasons if "FAILED" in r]
    assert any(r.startswith("error_rate") for r in failed) and any(r.startswith("latency_p95") for r in failed), \
        verdict.reasons
    assert verdict.figures["challenger_p95_ms"] > 40  # from the histogram buckets, in milliseconds
    assert weight == 0 and registry.aliases_of(tiny, "tiny") == {"champion": "1"}


def test_bad_query_or_unreachable_prometheus_stops_before_traffic_moves(tiny, rollout_settings, prometheus,  # noqa: F811
                                                                        tmp_path):
    spec = _spec(tmp_path, [{"weight": 50, "analysis_s": WINDOW_S}], metrics=NO_SAMPLES)
    params = RolloutParams(model="tiny", spec=spec, metrics="prom")
    with _stack() as stack:
        allowed = stack.allow(rollout_settings)
        bad = MetricsSource(url=prometheus.url, queries={"errors": "sum(rate(kiln_gateway_requests_total[{interval}])"})
        with pytest.raises(ConfigError, match="Prometheus cannot run the errors query"):
            run_rollout(params, allowed.model_copy(update={"rollout_metrics": {"prom": bad}}))
        with pytest.raises(Exception, match="cannot reach Prometheus at http://127.0.0.1:9"):
            run_rollout(params, _with_prometheus(allowed, "http://127.0.0.1:9", ""))
        with pytest.raises(ConfigError, match="unknown metrics source 'prom'"):
            run_rollout(params, allowed)
        assert stack.gw.routing.weight == 0
        assert httpx.get(f"{stack.url}/health").status_code == 200


def test_cli_takes_a_metrics_source_by_name_never_a_url(tiny, prometheus, tmp_path, monkeypatch):  # noqa: F811
    app = typer.Typer()
    register_commands(app)
    monkeypatch.setenv("KILN_GATEWAY_TOKEN", TOKEN)
    monkeypatch.setenv("KILN_ROLLOUT_METRICS", json.dumps({"prom": {"url": prometheus.url}}))
    spec = _spec(tmp_path, [{"weight": 50, "analysis_s": WINDOW_S}])  # sets latency_test: Prometheus cannot
    refused = CliRunner().invoke(app, ["rollout", "tiny", "--spec", spec, "--metrics", "prom"])
    assert refused.exit_code == 2 and "latency_test needs latency samples" in refused.output, refused.output
    unknown = CliRunner().invoke(app, ["rollout", "tiny", "--metrics", "grafana"])
    assert unknown.exit_code == 2 and "unknown metrics source 'grafana'" in unknown.output, unknown.output
    assert "gateway, prom" in unknown.output
    url = CliRunner().invoke(app, ["rollout", "tiny", "--metrics", "http://prometheus.example:9090"])
    assert url.exit_code == 2 and "looks like a URL" in url.output, url.output
    assert "Traceback" not in refused.output + unknown.output + url.output
    assert registry.aliases_of(tiny, "tiny") == {"champion": "1", "challenger": "2"}
