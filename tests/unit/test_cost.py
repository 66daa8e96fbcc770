"""Cost per request: the pure formula, its wiring into metrics, gate clauses, tables and settings."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from kiln.settings import load_settings
from kiln.tasks.evaluate.cost import (
    CostConfig,
    LoadPoint,
    cost_config,
    cost_metrics,
    cost_per_million,
    estimate,
    instances_needed,
    load_points,
    usable_throughput,
)
from kiln.tasks.evaluate.gate import judge
from kiln.tasks.evaluate.policy import Policy
from kiln.tasks.reports.plots import pareto_png
from kiln.tasks.reports.tables import optimize_table

POINTS = [LoadPoint(1, 4.0, 250.0), LoadPoint(32, 60.0, 1600.0)]


def test_the_largest_batch_that_meets_the_target_sets_the_usable_throughput() -> None:
    assert usable_throughput(POINTS, 100.0) == POINTS[1]
    assert usable_throughput(POINTS, 10.0) == POINTS[0]  # batch 32 misses 10 ms: serve one at a time
    assert usable_throughput(POINTS, 3.0) is None


def test_the_documented_formula() -> None:
    config = CostConfig(target_p95_ms=100, expected_rps=4000, instance_hour=2.5)
    got = estimate(POINTS, config)
    assert got.instances == 3  # ceil(4000 / 1600)
    assert got.cost_per_million == pytest.approx(3 * 2.5 / (4000 * 3600) * 1e6)
    assert "b32" in got.reason


def test_not_servable_at_the_target_is_no_cost_with_a_reason() -> None:
    got = estimate(POINTS, CostConfig(target_p95_ms=2))
    assert got.cost_per_million is None and got.instances is None
    assert "not servable at p95 ≤ 2 ms" in got.reason and "cost_target_p95_ms" in got.reason
    assert cost_metrics({"latency_p50_ms": 3, "latency_p95_ms": 4}, (1, 32), CostConfig(target_p95_ms=2)) == {}


@settings(max_examples=60, deadline=None)
@given(rps=st.floats(0.1, 1e5), rate=st.floats(0.1, 1e5), price=st.floats(0.01, 100))
def test_instances_cover_the_load_with_less_than_one_to_spare(rps: float, rate: float, price: float) -> None:
    n = instances_needed(rps, rate)
    assert n >= 1 and n * rate >= rps * (1 - 1e-12)
    assert n == 1 or (n - 1) * rate < rps
    cost = cost_per_million(n, price, rps)
    assert cost > 0 and math.isclose(cost * rps * 3600 / 1e6, n * price)


@settings(max_examples=40, deadline=None)
@given(p95=st.floats(0.1, 1000), rate=st.floats(1, 1e4), faster=st.floats(1.0, 10.0))
def test_a_faster_model_never_costs_more(p95: float, rate: float, faster: float) -> None:
    config = CostConfig(target_p95_ms=1000, expected_rps=500)
    slow = estimate([LoadPoint(8, p95, rate)], config)
    fast = estimate([LoadPoint(8, p95 / faster, rate * faster)], config)
    assert fast.cost_per_million is not None and slow.cost_per_million is not None
    assert fast.cost_per_million <= slow.cost_per_million


def test_latency_metrics_give_both_operating_points() -> None:
    metrics = {"latency_p50_ms": 2.0, "latency_p95_ms": 3.0, "batch_latency_p95_ms": 40.0, "throughput_per_s": 900}
    assert load_points(metrics, (1, 32)) == [LoadPoint(1, 3.0, 500.0), LoadPoint(32, 40.0, 900.0)]
    got = cost_metrics(metrics, (1, 32), CostConfig(target_p95_ms=50, expected_rps=1000, instance_hour=1))
    assert got == {"cost_per_million": pytest.approx(2 / 3600 / 1000 * 1e6), "instances_needed": 2.0}


def test_gate_clause_relative_to_the_champion() -> None:
    policy = Policy(clauses=["cost_per_million <= champion * 0.5"])
    policy.check_metrics("sequence-classification")
    champion = {"cost_per_million": 1.0}
    assert judge(policy, {"cost_per_million": 0.4}, champion, "int8").passed
    decision = judge(policy, {"cost_per_million": 0.6}, champion, "int8")
    assert decision.status == "fail" and "cost_per_million 0.6" in decision.failures[0]
    unservable = judge(policy, {}, champion, "int8")  # not servable at the target: no cost, no pass
    assert unservable.status == "fail" and "not measured" in unservable.failures[0]


def test_settings_reach_the_cost_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KILN_COST_TARGET_P95_MS", "25")
    monkeypatch.setenv("KILN_COST_EXPECTED_RPS", "300")
    monkeypatch.setenv("KILN_COST_INSTANCE_HOUR", "0.9")
    got = cost_config(load_settings(home=tmp_path))
    assert got == CostConfig(target_p95_ms=25, expected_rps=300, instance_hour=0.9)
    assert cost_config(load_settings(home=tmp_path, cost_target_p95_ms=80)).target_p95_ms == 80


def _summary() -> dict:
    source = {"accuracy": 0.8, "latency_p50_ms": 4.0, "size_mb": 17.0, "cost_per_million": 0.56}
    cand = {"accuracy": 0.79, "latency_p50_ms": 2.0, "size_mb": 5.0, "cost_per_million": 0.28}
    return {"source": source, "candidates": {"int8": {"precision": "int8", "metrics": cand, "passed": True}},
            "pareto_front": ["int8"]}


def test_optimize_table_and_plot_show_cost(tmp_path: Path) -> None:
    console = Console(record=True, width=200)
    console.print(optimize_table(_summary()))
    text = console.export_text()
    assert "cost/1M req" in text and "0.28" in text and "0.56" in text
    assert pareto_png(_summary(), tmp_path / "pareto.png").stat().st_size > 0
