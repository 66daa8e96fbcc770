"""Fault injection for served models, and folding extra checks (drift) into a canary verdict."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest

from kiln.infra.faults import Faults, FaultyPredictor, InjectedFault
from kiln.infra.runtime import ServedModel
from kiln.infra.server import with_faults
from kiln.tasks.rollout.judge import Check, StepVerdict, with_checks


class _Always:
    meta = SimpleNamespace(task="sequence-classification", labels=["a", "b", "c"])

    def predict(self, texts):
        return pd.DataFrame({"label": ["a"] * len(texts), "score": [1.0] * len(texts)})


def test_wrong_answers_change_about_the_asked_share_of_labels():
    predictor = FaultyPredictor(_Always(), Faults(wrong=0.3, seed=3))
    labels = predictor.predict(["x"] * 5000)["label"]
    assert 0.27 < (labels != "a").mean() < 0.33
    assert set(labels) == {"a", "b", "c"}
    assert predictor.meta.labels == ["a", "b", "c"]  # everything else is the real predictor's


def test_errors_fail_about_the_asked_share_of_calls():
    predictor = FaultyPredictor(_Always(), Faults(errors=0.5, seed=0))
    failures = 0
    for _ in range(1000):
        try:
            predictor.predict(["x"])
        except InjectedFault:
            failures += 1
    assert 450 < failures < 550


@pytest.mark.parametrize("kwargs", [{"errors": 1.5}, {"wrong": -0.1}, {"latency_ms": -1}])
def test_impossible_faults_are_refused(kwargs):
    with pytest.raises(ValueError, match="must be"):
        Faults(**kwargs)


def test_servers_wrap_only_when_a_fault_is_asked_for():
    models = [ServedModel("m", "1", _Always())]
    assert with_faults(models, Faults()) is models
    wrapped = with_faults(models, Faults(latency_ms=5))
    assert isinstance(wrapped[0].predictor, FaultyPredictor) and wrapped[0].version == "1"


def _verdict(outcome, first="ok"):
    checks = [Check("samples", first, "samples"), Check("error_rate", "ok", "errors ok")]
    return StepVerdict(outcome, [c.reason for c in checks], checks)


def test_with_checks_folds_extra_checks_by_the_judges_rules():
    drift_failed = [Check("input_drift", "failed", "input_drift: FAILED")]
    drift_unsure = [Check("class_drift", "inconclusive", "class_drift: too few rows")]
    assert with_checks(_verdict("pass"), drift_failed).outcome == "fail"
    assert with_checks(_verdict("pass"), drift_unsure).outcome == "inconclusive"
    assert with_checks(_verdict("pass"), [Check("input_drift", "ok", "ok")]).outcome == "pass"
    # Too little traffic stays inconclusive even when a drift check failed on it.
    assert with_checks(_verdict("inconclusive", first="inconclusive"), drift_failed).outcome == "inconclusive"
    merged = with_checks(_verdict("pass"), drift_failed)
    assert merged.reasons[-1] == "input_drift: FAILED" and len(merged.checks) == 3
