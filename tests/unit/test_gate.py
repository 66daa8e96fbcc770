import numpy as np
import pytest

from kiln.errors import ConfigError
from kiln.tasks.evaluate.gate import Measured, judge
from kiln.tasks.evaluate.policy import Clause, Policy, load_policy, pareto_front, rank


def test_clause_parsing():
    assert Clause.parse("size_mb <= 25").value == 25
    assert Clause.parse("accuracy >= champion - 0.01").relative == ("-", 0.01)
    assert Clause.parse("latency_p95_ms <= champion * 0.8").threshold({"latency_p95_ms": 10}) == pytest.approx(8)
    with pytest.raises(ValueError, match="cannot parse clause"):
        Clause.parse("accuracy is good")


def test_judge_spells_out_each_failed_clause():
    policy = Policy(clauses=["accuracy >= champion - 0.01", "size_mb <= 25", "latency_p50_ms <= champion * 0.8"])
    decision = judge(policy, {"accuracy": 0.80, "size_mb": 30, "latency_p50_ms": 4}, {"accuracy": 0.82,
                     "latency_p50_ms": 10}, "int8")
    assert not decision.passed
    assert len(decision.failures) == 2
    assert "accuracy 0.8 >= 0.81 (champion 0.82): FAILED" in decision.failures[0]
    assert "size_mb 30 <= 25: FAILED" in decision.failures[1]


def test_parity_tolerance_per_precision():
    policy = Policy(parity={"fp32": {"max_abs": 1e-3}, "default": {"top1_agreement": 0.99}})
    ok = {"parity_max_abs": 1e-4, "parity_top1_agreement": 0.95}
    assert judge(policy, ok, None, "fp32").passed
    assert not judge(policy, ok, None, "int8").passed


@pytest.mark.parametrize(("mode", "passed"), [("skip", True), ("fail", False)])
def test_no_champion_is_explicit(mode, passed):
    policy = Policy(clauses=["accuracy >= champion - 0.01"], when_no_champion=mode)
    decision = judge(policy, {"accuracy": 0.5}, None, "fp32")
    assert decision.passed is passed
    assert "no champion to compare with" in decision.results[0].reason


def test_missing_metric_fails_the_clause():
    decision = judge(Policy(clauses=["size_mb <= 1"]), {}, None, "fp32")
    assert not decision.passed and "not measured" in decision.failures[0]


def test_policy_file_errors(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("clauses: [accuracy >= 0.5\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_policy(bad_yaml, "sequence-classification")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("clauses: ['acuracy >= 0.5']\n")
    with pytest.raises(ConfigError, match=r"unknown metric\(s\) \['acuracy'\]"):
        load_policy(unknown, "sequence-classification")
    with pytest.raises(ConfigError, match="perplexity"):
        (tmp_path / "lm.yaml").write_text("clauses: ['perplexity <= 10']\n")
        load_policy(tmp_path / "lm.yaml", "sequence-classification")
    with pytest.raises(ConfigError, match="does not exist"):
        load_policy(tmp_path / "missing.yaml", "causal-lm")


def test_presets_load_for_both_tasks():
    assert load_policy(None, "sequence-classification").clauses
    assert load_policy(None, "causal-lm").clauses


def test_rank_and_pareto():
    cands = {"a": {"accuracy": 0.9, "latency_p50_ms": 5, "size_mb": 50},
             "b": {"accuracy": 0.89, "latency_p50_ms": 2, "size_mb": 20},
             "c": {"accuracy": 0.85, "latency_p50_ms": 3, "size_mb": 30}}
    assert rank(Policy(), cands) == ["b", "c", "a"]
    assert rank(Policy(objective={"metric": "accuracy", "goal": "maximize"}), cands)[0] == "a"
    assert sorted(pareto_front(cands)) == ["a", "b"]


# ---- verdicts on evidence ------------------------------------------------------------------------------


def _classifier(predicted, truth) -> "Measured":
    from kiln.tasks.evaluate.evidence import RowEvidence

    rows = RowEvidence(predicted=np.asarray(predicted), truth=np.asarray(truth))
    return Measured({"accuracy": float(np.mean(rows.correct))}, rows=rows, labels=2)


def _pair(n: int, lost: int, gained: int) -> tuple["Measured", "Measured"]:
    """Baseline right on every row; the candidate loses ``lost`` rows and gains ``gained`` of ``n`` others."""
    truth = np.zeros(2 * n, dtype=int)
    base = np.r_[np.zeros(n, dtype=int), np.ones(n, dtype=int)]  # right on the first n rows only
    cand = base.copy()
    cand[:lost] = 1
    cand[n:n + gained] = 0
    return _classifier(cand, truth), _classifier(base, truth)


@pytest.mark.parametrize(("lost", "gained", "status"), [
    (0, 0, "pass"),        # identical predictions: the difference is exactly 0
    (10, 10, "pass"),      # disagree on 20 of 4000 rows, no net loss: well inside one point
    (120, 0, "fail"),      # 3 points lost, for sure
    (40, 0, "inconclusive"),  # 1 point lost on 4000 rows: the interval straddles the margin
])
def test_accuracy_is_judged_on_paired_rows(lost, gained, status):
    cand, base = _pair(2000, lost, gained)
    decision = judge(Policy(clauses=["accuracy >= champion - 0.01"]), cand, base, "int8")
    (result,) = decision.results
    assert result.status == status, result.reason
    assert result.comparison_kind == "difference" and result.comparison.low <= result.comparison.high
    assert "pt [" in result.reason and "(champion 0.5)" in result.reason
    assert decision.status == status and decision.passed is (status == "pass")


def test_inconclusive_is_spelled_out_and_a_wider_alpha_decides_it():
    cand, base = _pair(2000, 52, 0)  # 1.3 points lost on 4000 rows: more than the margin, but not surely
    decision = judge(Policy(clauses=["accuracy >= champion - 0.01"]), cand, base, "int8")
    assert decision.summary().startswith("inconclusive (not enough evidence): accuracy")
    assert "INCONCLUSIVE" in decision.undecided[0]
    # Asking for less certainty (alpha 0.45: a 10 % interval) decides the same rows.
    loose = Policy(clauses=[{"clause": "accuracy >= champion - 0.01", "alpha": 0.45}])
    assert judge(loose, cand, base, "int8").status == "fail"


def _timed(median: float, rounds: int = 12, calls: int = 30, seed: int = 0) -> "Measured":
    from kiln.tasks.evaluate.evidence import LatencySamples
    from kiln.tasks.evaluate.latency import latency_metrics

    rng = np.random.default_rng(seed)
    samples = LatencySamples(median * rng.lognormal(0, 0.05, (rounds, calls)),
                             8 * median * rng.lognormal(0, 0.05, (rounds, calls)), 32)
    return Measured(latency_metrics(samples), latency=samples)


@pytest.mark.parametrize(("slowdown", "tolerance", "status"), [
    (1.00, 0.05, "pass"),   # the same speed
    (1.03, 0.05, "pass"),   # significantly slower, but within the tolerance
    (1.03, 0.0, "fail"),    # ... which a zero tolerance does not forgive
    (1.20, 0.05, "fail"),   # significantly and materially slower
])
def test_latency_fails_only_when_significantly_and_materially_slower(slowdown, tolerance, status):
    policy = Policy(clauses=[{"clause": "latency_p50_ms <= champion * 1.0", "tolerance": tolerance}])
    decision = judge(policy, _timed(4.0 * slowdown, seed=1), _timed(4.0, seed=2), "int8")
    (result,) = decision.results
    assert result.status == status, result.reason
    assert result.comparison_kind == "ratio" and "ratio" in result.reason and "[" in result.reason


def test_latency_without_samples_falls_back_to_the_plain_comparison():
    decision = judge(Policy(clauses=["latency_p50_ms <= champion * 1.0"]), {"latency_p50_ms": 5.0},
                     {"latency_p50_ms": 4.0}, "int8")
    assert decision.status == "fail" and decision.results[0].method == "point"
