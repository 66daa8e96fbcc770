"""Calibration: the shipped default policies replayed on synthetic measurements, hundreds of times.

Identical engines must pass (false failures ≤ 1 %); a planted 15 % slowdown and a planted 2-point accuracy
drop must be caught (≥ 95 %). The synthetic measurements have what real ones have: a machine whose speed
drifts from round to round (shared by every model timed in that round), per-call noise, rare stalls;
evaluation rows where two similar models disagree on a few percent of rows.
"""

from __future__ import annotations

import numpy as np
import pytest

from kiln.tasks.evaluate.evidence import LatencySamples, RowEvidence
from kiln.tasks.evaluate.gate import Measured, judge
from kiln.tasks.evaluate.latency import latency_metrics
from kiln.tasks.evaluate.policy import Policy, load_policy

REPLAYS = 200


def _preset(task: str, metric: str) -> Policy:
    """The shipped preset, reduced to its clauses on ``metric`` (evidence settings untouched)."""
    preset = load_policy(None, task)
    kept = [c for c in preset.clauses if (c if isinstance(c, str) else c.clause).startswith(metric)]
    assert kept, f"the {task} preset has no {metric} clause"
    return preset.model_copy(update={"clauses": kept, "parity": {}})


# ---- latency -------------------------------------------------------------------------------------------


def _timings(rng: np.random.Generator, rounds: int = 12, calls: int = 20, median_ms: float = 4.0,
             slowdown: float = 0.0) -> tuple[LatencySamples, LatencySamples]:
    """Baseline and candidate timed in the same interleaved rounds."""
    machine = rng.lognormal(0.0, 0.06, size=(rounds, 1))  # the machine's speed this round, for both

    def model(factor: float) -> np.ndarray:
        calls_ms = median_ms * factor * machine * rng.lognormal(0.0, 0.08, size=(rounds, calls))
        stalls = rng.random((rounds, calls)) < 0.02  # a context switch now and then
        return np.where(stalls, calls_ms * rng.uniform(2, 5, size=(rounds, calls)), calls_ms)

    base = LatencySamples(model(1.0), model(1.0) * 8, 32)
    cand = LatencySamples(model(1.0 + slowdown), model(1.0 + slowdown) * 8, 32)
    return base, cand


def _latency_verdicts(slowdown: float, seed: int) -> list[str]:
    policy = _preset("sequence-classification", "latency_p50_ms")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(REPLAYS):
        base, cand = _timings(rng, slowdown=slowdown)
        decision = judge(policy, Measured(latency_metrics(cand), latency=cand),
                         Measured(latency_metrics(base), latency=base), "int8")
        out.append(decision.status)
    return out


def test_identical_engines_pass_latency():
    verdicts = _latency_verdicts(0.0, seed=1)
    assert verdicts.count("fail") / REPLAYS <= 0.01, verdicts.count("fail")
    assert "inconclusive" not in verdicts  # latency clauses pass or fail; noise alone never blocks


def test_planted_15_percent_slowdown_is_caught():
    verdicts = _latency_verdicts(0.15, seed=2)
    assert verdicts.count("fail") / REPLAYS >= 0.95, verdicts.count("fail")


def test_point_comparison_would_flip_on_the_same_noise():
    """The old rule (two medians, `<=`) on the same identical engines: fails about half the time."""
    rng = np.random.default_rng(3)
    flips = 0
    for _ in range(REPLAYS):
        base, cand = _timings(rng)
        flips += latency_metrics(cand)["latency_p50_ms"] > latency_metrics(base)["latency_p50_ms"]
    assert 0.3 < flips / REPLAYS < 0.7


# ---- quality -------------------------------------------------------------------------------------------


def _rows(rng: np.random.Generator, n: int = 3700, accuracy: float = 0.77, discordant: float = 0.02,
          drop: float = 0.0) -> tuple[RowEvidence, RowEvidence]:
    """Baseline and candidate predictions on the same ``n`` rows of a 3-class task. The two disagree on about
    ``discordant`` of the rows; the candidate is right less often by ``drop`` (a fraction) on average."""
    truth = rng.integers(0, 3, n)
    right = rng.random(n) < accuracy
    base = np.where(right, truth, (truth + rng.integers(1, 3, n)) % 3)
    cand = base.copy()
    # Rows the candidate loses (base right → cand wrong) and gains (base wrong → cand right).
    lose_p = (discordant + drop) / 2 / accuracy
    gain_p = (discordant - drop) / 2 / (1 - accuracy)
    lose = right & (rng.random(n) < lose_p)
    gain = ~right & (rng.random(n) < max(gain_p, 0.0))
    cand[lose] = (truth[lose] + 1) % 3
    cand[gain] = truth[gain]
    return RowEvidence(predicted=base, truth=truth), RowEvidence(predicted=cand, truth=truth)


def _quality_verdicts(metric: str, seed: int, replays: int = REPLAYS, **kwargs) -> list[str]:
    policy = _preset("sequence-classification", metric)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(replays):
        base_rows, cand_rows = _rows(rng, **kwargs)
        base = Measured({metric: _value(metric, base_rows)}, rows=base_rows, labels=3)
        cand = Measured({metric: _value(metric, cand_rows)}, rows=cand_rows, labels=3)
        out.append(judge(policy, cand, base, "int8").status)
    return out


def _value(metric: str, rows: RowEvidence) -> float:
    from kiln.tasks.evaluate.paired import metric_value

    return metric_value(metric, rows, 3)


def test_identical_predictions_pass_accuracy():
    verdicts = _quality_verdicts("accuracy", seed=4, discordant=0.0)
    assert verdicts.count("pass") == REPLAYS


def test_similar_models_are_not_failed_on_accuracy():
    """Two engines that disagree on 2 % of rows with no real difference (e.g. INT8 vs FP32)."""
    verdicts = _quality_verdicts("accuracy", seed=5, discordant=0.02)
    assert verdicts.count("fail") / REPLAYS <= 0.01
    assert verdicts.count("pass") / REPLAYS >= 0.95


def test_planted_2_point_accuracy_drop_is_caught():
    verdicts = _quality_verdicts("accuracy", seed=6, discordant=0.04, drop=0.02)
    assert verdicts.count("pass") / REPLAYS <= 0.05, verdicts.count("pass")


@pytest.mark.parametrize(("drop", "caught"), [(0.0, False), (0.04, True)])
def test_macro_f1_is_judged_paired(drop, caught):
    """Fewer replays: each macro-F1 verdict is a paired bootstrap of its own."""
    verdicts = _quality_verdicts("macro_f1", seed=7, replays=60, discordant=0.05, drop=drop)
    if caught:
        assert verdicts.count("pass") <= 3
    else:
        assert verdicts.count("fail") == 0
