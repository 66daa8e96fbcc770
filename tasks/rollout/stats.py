"""What the canary judge measures with: per-upstream statistics and a rank test on latency samples.

Pure functions, no I/O: the gateway's ``/admin/state`` JSON goes in as a value. The rank test is
``scipy.stats.mannwhitneyu``; the tolerance around it (fail only when significantly *and* noticeably
slower, in the manner of Kayenta) is the judge's (:mod:`kiln.tasks.rollout.judge`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

# The gateway's two upstream roles are named after the aliases they serve.
from kiln.tasks.core.tags import CHALLENGER, CHAMPION


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
    p_value: float


def mann_whitney_u(x: Sequence[float], y: Sequence[float],
                   alternative: Literal["greater", "less", "two-sided"] = "greater") -> RankTest:
    """Mann-Whitney U test of ``x`` against ``y``: normal approximation, tie and continuity corrected.

    ``alternative="greater"`` asks whether ``x`` tends to be larger than ``y`` (e.g. slower latencies).
    Always the asymptotic method: the judge needs tens of samples per upstream anyway, and scipy's exact
    method (picked automatically for small samples without ties) would make the same data judge differently.
    """
    from scipy.stats import mannwhitneyu  # slow to import: only when a rollout is judged

    if len(x) == 0 or len(y) == 0:
        raise ValueError("both samples need at least one value")
    result = mannwhitneyu(np.asarray(x, dtype=float), np.asarray(y, dtype=float), alternative=alternative,
                          method="asymptotic", use_continuity=True)
    p_value = float(result.pvalue)
    # Every value equal: no evidence either way (scipy says 1.0 or, in some versions, nan).
    return RankTest(float(result.statistic), 1.0 if math.isnan(p_value) else p_value)


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
