"""Prometheus metrics of served cascades (:mod:`kiln.tasks.models.cascade`): escalations and per-member latency.

The model server observes them after each engine call, on the engine thread that made it, from the cascade
predictor's ``last_call``; models that are not cascades add nothing. The escalation share is
``rate(kiln_cascade_escalations_total[5m]) / rate(kiln_cascade_rows_total[5m])``.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

# Seconds per member call: a small member answers in about a millisecond, an escalation costs the large one's.
_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5)


class CascadeMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.rows = Counter("kiln_cascade_rows_total", "Rows a cascade answered.", ["model", "version"],
                            registry=registry)
        self.escalations = Counter("kiln_cascade_escalations_total", "Rows a cascade's small model passed to its "
                                   "large model (confidence below the threshold).", ["model", "version"],
                                   registry=registry)
        self.stage_seconds = Histogram("kiln_cascade_stage_seconds", "Seconds of one engine call in one cascade "
                                       "member (large: only calls with escalated rows).",
                                       ["model", "version", "stage"], buckets=_BUCKETS, registry=registry)

    def observe(self, name: str, version: str, predictor: Any) -> None:
        """Count the predictor's latest call, if it is a cascade (wrappers delegate the attributes)."""
        if not getattr(predictor, "is_cascade", False):
            return
        call = predictor.last_call
        self.rows.labels(name, version).inc(call.rows)
        self.escalations.labels(name, version).inc(call.escalated)
        self.stage_seconds.labels(name, version, "small").observe(call.small_seconds)
        if call.escalated:
            self.stage_seconds.labels(name, version, "large").observe(call.large_seconds)
