"""The canary gateway's ``/metrics`` text read back as per-role :class:`UpstreamStats`, for tests.

The judge reads the gateway's ``/admin/state`` JSON (which carries latency samples for the rank test);
tests use this reading of the Prometheus exposition to check that the gateway's counters and histograms
say the same thing.
"""

from __future__ import annotations

import math
from collections import defaultdict

from kiln.tasks.rollout.stats import CHALLENGER, CHAMPION, UpstreamStats


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus's ``histogram_quantile``: linear interpolation inside the bucket holding the rank."""
    bounds = sorted(buckets)
    total = buckets.get(math.inf, 0.0)
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for upper in bounds:
        count = buckets[upper]
        if count >= rank:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = upper, count
    return lower


def stats_from_prometheus(text: str, before: str | None = None) -> dict[str, UpstreamStats]:
    """Per-role stats from the gateway's ``/metrics`` text; with ``before``, only what happened since then.

    Latency comes as p95/p99 estimated from histogram buckets (no samples: the rank test needs the state).
    """
    now = _samples(text)
    if before is not None:
        prior = _samples(before)
        now = {k: v - prior.get(k, 0.0) for k, v in now.items()}
    stats = {CHAMPION: UpstreamStats(), CHALLENGER: UpstreamStats()}
    buckets: dict[str, dict[float, float]] = {CHAMPION: defaultdict(float), CHALLENGER: defaultdict(float)}
    for (name, labels), value in now.items():
        lab = dict(labels)
        role = CHALLENGER if name.startswith("kiln_gateway_shadow") else lab.get("role")
        if role not in stats:
            continue
        s = stats[role]
        if name in {"kiln_gateway_requests_total", "kiln_gateway_shadow_requests_total"}:
            s.requests += int(value)
            s.errors += int(value) if int(lab["code"]) >= 500 else 0
        elif name in {"kiln_gateway_request_duration_seconds_bucket",
                      "kiln_gateway_shadow_request_duration_seconds_bucket"}:
            buckets[role][float(lab["le"])] += value
        elif name == "kiln_gateway_shadow_comparisons_total":
            s.compared += int(value)
            s.agreed += int(value) if lab["result"] == "agree" else 0
        elif name == "kiln_gateway_feedback_total":
            s.feedback += int(value)
            s.correct += int(value) if lab["result"] == "correct" else 0
    for role, s in stats.items():
        p95, p99 = histogram_quantile(0.95, buckets[role]), histogram_quantile(0.99, buckets[role])
        s.latency_p95_ms = None if p95 is None else p95 * 1000
        s.latency_p99_ms = None if p99 is None else p99 * 1000
    return stats
