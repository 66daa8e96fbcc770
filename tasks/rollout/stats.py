"""What the canary judge measures with: per-upstream statistics and a rank test on latency samples.

Pure functions, no I/O: the gateway's ``/admin/state`` JSON or ``/metrics`` text goes in as a value.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

CHAMPION, CHALLENGER = "champion", "challenger"


@dataclass
class Check:
    """One check of an analysis interval (a threshold, the rank test, a drift check) and why it came out so."""

    name: str
    status: Literal["ok", "failed", "inconclusive"]
    reason: str


@dataclass
class UpstreamStats:
    """One upstream's traffic over an analysis window.

    Attributes:
        requests: answers counted (live, plus mirrored ones for the challenger).
        errors: answers with status >= 500 and unreachable-upstream failures.
        latency_ms: latency samples of successful answers (may be empty when only quantiles are known).
        latency_p95_ms / latency_p99_ms: used when there are no samples (e.g. from Prometheus buckets).
        compared / agreed: mirrored rows whose challenger label was compared with / equal to the champion's.
        feedback / correct: rows with a true label from ``/feedback``, and how many this upstream got right.
    """

    requests: int = 0
    errors: int = 0
    latency_ms: list[float] = field(default_factory=list)
    latency_p95_ms: float | None = None
    latency_p99_ms: float | None = None
    compared: int = 0
    agreed: int = 0
    feedback: int = 0
    correct: int = 0

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.compared if self.compared else None

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.feedback if self.feedback else None

    def quantile_ms(self, q: float) -> float | None:
        """The ``q`` quantile (0-1) from samples, else the stored p95/p99."""
        if self.latency_ms:
            return float(np.percentile(self.latency_ms, q * 100))
        return {0.95: self.latency_p95_ms, 0.99: self.latency_p99_ms}.get(q)


# ---- the rank test ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankTest:
    """A Mann-Whitney U test: ``u`` is the statistic of the first sample; ``p_value`` for the alternative."""

    u: float
    z: float
    p_value: float


def rank_average(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1-based ranks with ties given their average rank, and the size of every tie group."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.r_[True, ordered[1:] != ordered[:-1]]
    bounds = np.r_[np.flatnonzero(starts), len(values)]
    average = (bounds[:-1] + bounds[1:] - 1) / 2 + 1
    ranks = np.empty(len(values))
    ranks[order] = average[np.cumsum(starts) - 1]
    return ranks, np.diff(bounds)


def mann_whitney_u(x: Sequence[float], y: Sequence[float],
                   alternative: Literal["greater", "less", "two-sided"] = "greater") -> RankTest:
    """Mann-Whitney U test of ``x`` against ``y``: normal approximation, tie and continuity corrected.

    ``alternative="greater"`` asks whether ``x`` tends to be larger than ``y`` (e.g. slower latencies).
    Matches ``scipy.stats.mannwhitneyu(x, y, alternative=..., method="asymptotic")``.
    """
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n1, n2 = len(a), len(b)
    if n1 == 0 or n2 == 0:
        raise ValueError("both samples need at least one value")
    ranks, ties = rank_average(np.concatenate([a, b]))
    u1 = float(ranks[:n1].sum() - n1 * (n1 + 1) / 2)
    n = n1 + n2
    mean = n1 * n2 / 2
    variance = n1 * n2 / 12 * ((n + 1) - float((ties**3 - ties).sum()) / (n * (n - 1)))
    if variance <= 0:  # every value equal: no evidence either way
        return RankTest(u1, 0.0, 1.0)
    sd = math.sqrt(variance)
    if alternative == "greater":
        z = (u1 - mean - 0.5) / sd
        p = _normal_sf(z)
    elif alternative == "less":
        z = (n1 * n2 - u1 - mean - 0.5) / sd
        p = _normal_sf(z)
    else:
        z = (max(u1, n1 * n2 - u1) - mean - 0.5) / sd
        p = min(1.0, 2 * _normal_sf(z))
    return RankTest(u1, z, p)


def _normal_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2))


# ---- from the gateway ------------------------------------------------------------------------------------


def _from_window(w: dict[str, Any]) -> UpstreamStats:
    return UpstreamStats(requests=int(w.get("requests", 0)), errors=int(w.get("errors", 0)),
                         latency_ms=[float(v) for v in w.get("latency_ms", [])],
                         latency_p95_ms=w.get("latency_p95_ms"), latency_p99_ms=w.get("latency_p99_ms"),
                         compared=int(w.get("compared", 0)), agreed=int(w.get("agreed", 0)),
                         feedback=int(w.get("feedback", 0)), correct=int(w.get("correct", 0)))


def _merge(live: UpstreamStats, shadow: UpstreamStats) -> UpstreamStats:
    busier = live if live.requests >= shadow.requests else shadow  # quantiles cannot be added; keep the larger
    return UpstreamStats(live.requests + shadow.requests, live.errors + shadow.errors,
                         live.latency_ms + shadow.latency_ms, busier.latency_p95_ms, busier.latency_p99_ms,
                         live.compared + shadow.compared, live.agreed + shadow.agreed,
                         live.feedback + shadow.feedback, live.correct + shadow.correct)


def stats_from_state(state: dict[str, Any]) -> dict[str, UpstreamStats]:
    """Per-role stats from the gateway's ``GET /admin/state?samples=1`` or ``POST /admin/reset`` JSON.

    The challenger's figures include its mirrored (shadow) traffic: in a shadow step that is all it sees.
    """
    window = state.get("window", state)
    champion = _from_window(window.get(CHAMPION, {}))
    challenger = _merge(_from_window(window.get(CHALLENGER, {})), _from_window(window.get("shadow", {})))
    return {CHAMPION: champion, CHALLENGER: challenger}


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
