"""The optimize table and the reviewer's page show each number with its interval, and every verdict."""

from __future__ import annotations

from rich.console import Console

from kiln.tasks.reports import review
from kiln.tasks.reports.tables import failed_clauses, noise_line, print_optimize


def _iv(value: float, low: float, high: float) -> dict:
    return {"value": value, "low": low, "high": high, "level": 0.95}


SUMMARY = {
    "source": {"accuracy": 0.7750, "latency_p50_ms": 14.43, "size_mb": 90.9},
    "champion": None,
    "baseline": "source (no champion yet)",
    "intervals": {"source": {"accuracy": _iv(0.7750, 0.7614, 0.7880), "latency_p50_ms": _iv(14.43, 14.1, 14.9)},
                  "champion": None},
    "candidates": {
        "int8-dynamic": {
            "precision": "int8-dynamic", "metrics": {"accuracy": 0.7736, "latency_p50_ms": 3.76, "size_mb": 23.1},
            "intervals": {"accuracy": _iv(0.7736, 0.7600, 0.7868), "latency_p50_ms": _iv(3.76, 3.70, 3.83)},
            "vs_baseline": {"accuracy": {"difference": _iv(-0.0014, -0.0062, 0.0034), "ratio": _iv(1, 1, 1)},
                            "latency_p50_ms": {"ratio": _iv(0.261, 0.255, 0.268)}},
            "verdict": "pass", "passed": True, "reasons": ["accuracy ok"],
            "clauses": [{"status": "pass", "reason": "accuracy 0.7736 (source 0.775): Δ -0.14 pt: ok"}],
        },
        "prune-heads": {
            "precision": "fp32", "metrics": {"accuracy": 0.7650, "latency_p50_ms": 9.1, "size_mb": 80.0},
            "intervals": {"accuracy": _iv(0.7650, 0.7512, 0.7783)},
            "vs_baseline": {"accuracy": {"difference": _iv(-0.0100, -0.0160, -0.0040), "ratio": _iv(1, 1, 1)}},
            "verdict": "inconclusive", "passed": False, "reasons": ["accuracy INCONCLUSIVE"],
            "clauses": [{"status": "inconclusive", "reason": "accuracy 0.765: Δ -1.00 pt [-1.60, -0.40] >= -1.00 "
                         "pt: INCONCLUSIVE (the interval straddles the threshold)"},
                        {"status": "pass", "reason": "size_mb 80 <= 500: ok"}],
        },
    },
    "registered": {"name": "sentiment", "version": "2", "recipe": "int8-dynamic", "alias": "challenger"},
    "noise": {"source v1": 0.012, "int8-dynamic": 0.031},
    "evidence": {"rows": 3724, "available_rows": 3724, "level": 0.95, "alpha": 0.025, "latency_alpha": 0.01,
                 "latency_tolerance": 0.05, "rounds": 12, "resamples": 2000},
    "pareto_front": ["int8-dynamic"],
}


def _printed() -> str:
    console = Console(width=220, record=True)
    print_optimize(SUMMARY, console)
    return console.export_text()


def test_the_table_shows_intervals_deltas_and_three_verdicts():
    out = _printed()
    assert "0.7736 ±0.0134" in out  # a fraction: ± half the interval
    assert "3.76 [3.70, 3.83]" in out  # a latency: its skewed interval
    assert "-0.14 pt [-0.62, +0.34]" in out and "0.261× [0.255, 0.268]" in out  # paired with the baseline
    assert "PASS → challenger" in out and "INCONCLUSIVE" in out
    assert "machine noise: per-round p50 varied by 1.2%–3.1% (CV over 12 interleaved rounds)" in out
    assert "quality judged on 3724 rows of 3724" in out


def test_undecided_clauses_are_listed_like_failed_ones():
    assert failed_clauses(SUMMARY) == [f"prune-heads: {SUMMARY['candidates']['prune-heads']['clauses'][0]['reason']}"]
    assert noise_line({"noise": {}}) is None


def test_the_review_page_says_how_verdicts_are_reached():
    page = review.render(SUMMARY, model="sentiment", run_id="r1", datachecks=None, pareto_png=None)
    assert "0.7736 ±0.0134" in page and "3.76 [3.70, 3.83]" in page and "-0.14 pt [-0.62, +0.34]" in page
    assert '<span class="undecided">INCONCLUSIVE</span>' in page and '<li class="undecided">' in page
    assert "significantly (α=0.01) and materially (by more than 5%) slower" in page
    assert "on the same 3724 rows" in page
