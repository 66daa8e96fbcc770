"""The canary judge: verdicts, failure and inconclusive counting, spec errors, the rank test, stat parsing."""

from __future__ import annotations

import re

import numpy as np
import pytest

from kiln.errors import ConfigError
from kiln.infra.gateway_stats import GatewayMetrics, Routing, Splitter, choose, sticky_bucket
from kiln.tasks.rollout.judge import (
    RolloutSpec,
    StepVerdict,
    UpstreamStats,
    judge_step,
    load_spec,
    mann_whitney_u,
    next_action,
    stats_from_state,
)
from tests.prometheus_text import histogram_quantile, stats_from_prometheus

SPEC = """
steps:
  - {weight: 10, analysis_s: 30}
  - {weight: 50, analysis_s: 60, manual_gate: true}
  - {weight: 100, analysis_s: 30}
metrics:
  max_error_rate: 0.01
  max_p95_ratio: 1.25
  max_p99_ratio: 1.5
  latency_test: {alpha: 0.05, tolerance: 0.1}
  max_accuracy_drop: 0.02
failure_limit: 1
min_samples: 100
"""


def _stats(n: int = 500, errors: int = 0, median: float = 10.0, seed: int = 0, feedback: int = 100,
           correct: int = 90) -> UpstreamStats:
    rng = np.random.default_rng(seed)
    return UpstreamStats(requests=n, errors=errors, latency_ms=list(rng.gamma(9.0, median / 9.0, size=n)),
                         feedback=feedback, correct=correct)


@pytest.fixture
def spec() -> RolloutSpec:
    return load_spec(SPEC)


def test_a_healthy_challenger_passes_with_every_check_explained(spec):
    verdict = judge_step(spec, _stats(seed=1), _stats(seed=2))
    assert verdict.outcome == "pass"
    assert [c.name for c in verdict.checks] == ["samples", "error_rate", "latency_p95", "latency_p99",
                                                "latency_test", "accuracy"]
    assert all(r.endswith(": ok") for r in verdict.reasons)


def test_errors_fail_the_step(spec):
    verdict = judge_step(spec, _stats(seed=1), _stats(errors=25, seed=2))
    assert verdict.outcome == "fail"
    assert any("error_rate 5.00% <= 1.00% (25/500): FAILED" in r for r in verdict.reasons)


def test_a_slower_challenger_fails_on_latency(spec):
    verdict = judge_step(spec, _stats(seed=1), _stats(median=14.0, seed=2))
    assert verdict.outcome == "fail"
    failed = {c.name for c in verdict.checks if c.status == "failed"}
    assert {"latency_p95", "latency_test"} <= failed
    assert any("Mann-Whitney p=" in r and "FAILED" in r for r in verdict.reasons)


def test_a_significant_but_tiny_slowdown_is_tolerated():
    spec = RolloutSpec(steps=[{"weight": 10}], metrics={"latency_test": {"alpha": 0.05, "tolerance": 0.1},
                                                        "max_p95_ratio": None, "max_p99_ratio": None})
    base = np.linspace(9, 11, 2000)
    verdict = judge_step(spec, UpstreamStats(2000, latency_ms=list(base)),
                         UpstreamStats(2000, latency_ms=list(base * 1.03)))
    rank = next(c for c in verdict.checks if c.name == "latency_test")
    assert "p=" in rank.reason and "(< alpha" in rank.reason  # significant...
    assert rank.status == "ok" and verdict.outcome == "pass"  # ...but within the 10 % tolerance


def test_too_few_samples_is_inconclusive_never_pass(spec):
    verdict = judge_step(spec, _stats(seed=1), _stats(n=40, seed=2))
    assert verdict.outcome == "inconclusive"
    assert "challenger has 40 requests, fewer than min_samples 100" in verdict.reasons[0]
    # Even a failing metric on too little traffic asks for more data rather than deciding.
    assert judge_step(spec, _stats(seed=1), _stats(n=40, errors=20, seed=2)).outcome == "inconclusive"


def test_missing_feedback_is_inconclusive(spec):
    verdict = judge_step(spec, _stats(seed=1), _stats(seed=2, feedback=5, correct=5))
    assert verdict.outcome == "inconclusive"
    assert any("labelled feedback on challenger 5" in r for r in verdict.reasons)


def test_without_champion_traffic_relative_checks_are_skipped(spec):
    verdict = judge_step(spec, None, _stats(seed=2))
    assert verdict.outcome == "pass"
    assert sum("not judged" in r for r in verdict.reasons) == 4


def test_agreement_needs_mirrored_rows():
    spec = RolloutSpec(steps=[{"weight": 0, "shadow": 1.0}], min_samples=50,
                       metrics={"min_agreement": 0.9, "latency_test": None})
    good = UpstreamStats(200, compared=200, agreed=190, latency_ms=[1.0] * 200)
    champion = UpstreamStats(200, latency_ms=[1.0] * 200)
    assert judge_step(spec, champion, good).outcome == "pass"
    bad = UpstreamStats(200, compared=200, agreed=150, latency_ms=[1.0] * 200)
    assert "agreement 75.00% >= 90.00%" in judge_step(spec, champion, bad).reasons[-1]
    assert judge_step(spec, champion, UpstreamStats(200, latency_ms=[1.0] * 200)).outcome == "inconclusive"


def _v(outcome: str) -> StepVerdict:
    return StepVerdict(outcome, [f"{outcome} reason"])


def test_failure_limit_counts_failures_across_steps(spec):
    assert next_action(spec, 0, [_v("fail")]).kind == "repeat"  # 1 failure, 1 tolerated
    history = [_v("fail"), _v("pass"), _v("fail")]
    action = next_action(spec, 1, history)
    assert action.kind == "rollback"
    assert action.reasons[0].startswith("2 failed analyses > failure_limit 1")
    assert "fail reason" in action.reasons


def test_progress_manual_gate_and_promotion(spec):
    first = next_action(spec, 0, [_v("pass")])
    assert (first.kind, first.step) == ("pause", 1) and "manual gate" in first.reasons[0]
    assert next_action(spec, 1, [_v("pass"), _v("pass")]).kind == "advance"
    assert next_action(spec, 2, [_v("pass")] * 3).kind == "promote"


def test_inconclusive_repeats_then_pauses(spec):
    assert next_action(spec, 0, [_v("inconclusive")] * 3).kind == "repeat"
    action = next_action(spec, 0, [_v("pass")] + [_v("inconclusive")] * 4)
    assert action.kind == "pause" and "4 inconclusive analyses in a row" in action.reasons[0]


@pytest.mark.parametrize(("text", "field"), [
    ("steps: [{weight: 150}]", "steps.0.weight"),
    ("steps: [{weight: 10, analysis_s: 0}]", "steps.0.analysis_s"),
    ("steps: [{weight: 10, wieght: 5}]", "steps.0"),  # "unknown key 'wieght' ...": see test_strict_files.py
    ("steps: [{weight: 0}]", "steps.0"),
    ("steps: []", "steps"),
    ("steps: [{weight: 10}]\nmetrics: {max_error_rate: 2}", "metrics.max_error_rate"),
    ("steps: [{weight: 10}]\nmetrics: {latency_test: {alpha: 0.9}}", "metrics.latency_test.alpha"),
    ("steps: [{weight: 10}]\nfailure_limit: -1", "failure_limit"),
])
def test_spec_errors_name_the_field(text, field):
    with pytest.raises(ConfigError, match=f"rollout spec is invalid: {re.escape(field)}: "):
        load_spec(text)


def test_spec_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [{weight: 10\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML at line"):
        load_spec(bad)
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_spec("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="min_agreement needs shadow > 0 in every step below weight 100; steps "
                                          "\\[0\\]"):
        load_spec("steps: [{weight: 10}]\nmetrics: {min_agreement: 0.9}")
    # At 100 % the champion gets nothing to mirror: such a step needs no shadow, and agreement is not judged.
    spec = load_spec("steps: [{weight: 10, shadow: 0.5}, {weight: 100}]\nmetrics: {min_agreement: 0.9}\n"
                     "min_samples: 50")
    verdict = judge_step(spec, None, UpstreamStats(200, latency_ms=[1.0] * 200))
    assert verdict.outcome == "pass" and "agreement: no champion traffic" in " ".join(verdict.reasons)


def test_mann_whitney_textbook_example():
    # Worked by hand: x's ranks (16 ties with a y value at 4.5) sum to 41.5, so U = 41.5 - 5*6/2 = 26.5;
    # mean 15, variance 30/12 * (12 - 6/110) = 29.864, z = (26.5 - 15 - 0.5) / 5.4648 = 2.0129, p = 0.0221.
    # Samples this small without ties would make scipy choose its exact method; the judge always uses the
    # normal approximation, tie and continuity corrected.
    x = [19, 22, 16, 29, 24]
    y = [20, 11, 17, 12, 15, 16]
    result = mann_whitney_u(x, y, alternative="greater")
    assert result.u == 26.5
    assert result.p_value == pytest.approx(0.0221, abs=1e-4)
    assert mann_whitney_u(y, x, alternative="less").p_value == pytest.approx(0.0221, abs=1e-4)
    assert mann_whitney_u(x, y, alternative="two-sided").p_value == pytest.approx(0.0442, abs=1e-4)


@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_mann_whitney_matches_scipy(alternative):
    from scipy import stats

    rng = np.random.default_rng(7)
    x = np.round(rng.gamma(4, 2.6, 300), 1)  # rounded: plenty of ties
    y = np.round(rng.gamma(4, 2.4, 250), 1)
    ours = mann_whitney_u(x, y, alternative=alternative)
    ref = stats.mannwhitneyu(x, y, alternative=alternative, method="asymptotic")
    assert ours.u == pytest.approx(ref.statistic)
    assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-9)


def test_identical_samples_give_no_evidence():
    assert mann_whitney_u([5.0] * 30, [5.0] * 30).p_value == 1.0


def test_mann_whitney_needs_two_samples():
    with pytest.raises(ValueError, match="both samples need at least one value"):
        mann_whitney_u([], [1.0, 2.0])


def test_stats_from_state_merges_shadow_into_challenger():
    state = {"weight": 10, "window": {
        "champion": {"requests": 900, "errors": 1, "latency_ms": [1.0, 2.0], "feedback": 10, "correct": 9},
        "challenger": {"requests": 100, "errors": 2, "latency_ms": [3.0], "feedback": 5, "correct": 4},
        "shadow": {"requests": 50, "errors": 1, "latency_ms": [4.0], "compared": 50, "agreed": 45}}}
    stats = stats_from_state(state)
    assert stats["champion"].requests == 900 and stats["champion"].accuracy == 0.9
    ch = stats["challenger"]
    assert (ch.requests, ch.errors, ch.latency_ms, ch.agreement) == (150, 3, [3.0, 4.0], 0.9)


def test_stats_from_prometheus_text_and_deltas():
    metrics = GatewayMetrics()
    for _ in range(90):
        metrics.requests.labels("champion", "1", "200").inc()
        metrics.duration.labels("champion", "1").observe(0.004)
    before = _exposition(metrics)
    for code in ["200"] * 8 + ["503"] * 2:
        metrics.requests.labels("challenger", "2", code).inc()
    for _ in range(8):
        metrics.duration.labels("challenger", "2").observe(0.02)
    metrics.shadow_rows.labels("2", "agree").inc(30)
    metrics.shadow_rows.labels("2", "disagree").inc(10)
    metrics.feedback.labels("challenger", "2", "live", "correct").inc(3)
    metrics.feedback.labels("challenger", "2", "live", "incorrect").inc(1)
    total = stats_from_prometheus(_exposition(metrics))
    assert total["champion"].requests == 90 and 2.5 < total["champion"].latency_p95_ms <= 5
    ch = total["challenger"]
    assert (ch.requests, ch.errors, ch.agreement, ch.accuracy) == (10, 2, 0.75, 0.75)
    assert 10 < ch.latency_p99_ms <= 25
    since = stats_from_prometheus(_exposition(metrics), before=before)
    assert since["champion"].requests == 0 and since["champion"].latency_p95_ms is None
    assert since["challenger"].requests == 10


def _exposition(metrics: GatewayMetrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()


def test_histogram_quantile_interpolates_like_prometheus():
    buckets = {0.1: 50.0, 0.2: 100.0, float("inf"): 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.15)
    assert histogram_quantile(0.5, {float("inf"): 0.0}) is None


def test_split_is_exact_and_sticky_assignment_is_monotonic():
    splitter = Splitter()
    routes = [choose(Routing(weight=25), None, splitter) for _ in range(2000)]
    assert routes.count("challenger") == 500
    users = [f"user-{i}" for i in range(1000)]
    at_10 = {u for u in users if choose(Routing(weight=10), u, splitter) == "challenger"}
    at_30 = {u for u in users if choose(Routing(weight=30), u, splitter) == "challenger"}
    assert at_10 < at_30  # raising the weight only moves users onto the challenger
    assert 0.05 < len(at_10) / 1000 < 0.15 and 0 <= sticky_bucket("anyone") < 100
