import pytest

from kiln.errors import ConfigError
from kiln.tasks.evaluate.gate import Clause, Policy, judge, load_policy, pareto_front, rank


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
