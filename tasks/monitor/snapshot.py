"""The served champion's live statistics over one window, from whichever source the deployment uses.

* the Kiln gateway: its ``GET /admin/state?samples=1`` (or ``POST /admin/reset``) JSON, the same window the
  rollout judges, with latency samples, predicted classes, labelled feedback, input lengths and, where the
  gateway keeps them, a bounded sample of the input texts (``input_texts``);
* Prometheus: the rollout's PromQL templates (:class:`kiln.tasks.rollout.prometheus.PrometheusWindows`) over a
  look-back, which give counts and quantiles but no samples, classes or texts: the checks that need those are
  then inconclusive, never passed.

Pure shape conversion, no judging: :mod:`kiln.tasks.monitor.evaluate` judges a :class:`LiveSnapshot`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiln.tasks.core.tags import CHALLENGER, CHAMPION
from kiln.tasks.rollout.drift import InputLengths
from kiln.tasks.rollout.prometheus import PrometheusWindows


@dataclass
class LiveSnapshot:
    """One window of a served version's traffic.

    Attributes:
        version: the registry version the upstream served (None when the source does not say).
        seconds: how long the window was open.
        requests / errors: answers counted, and those with status >= 500 or no answer at all.
        latency_ms: latency samples of successful answers (empty when only quantiles are known).
        latency_p95_ms: the p95 the source computed (used when there are no samples).
        labels: predicted classes and their counts.
        feedback / correct: labelled feedback rows scored against this upstream, and how many it got right.
        input_chars / input_words: per-row input lengths (the rollout's length drift reads them).
        texts: a sample of the input texts (may be empty: the gateway keeps them only when configured to).
        source: where the numbers come from ("gateway" or "prometheus").
    """

    version: str | None = None
    seconds: float = 0.0
    requests: int = 0
    errors: int = 0
    latency_ms: list[float] = field(default_factory=list)
    latency_p95_ms: float | None = None
    labels: Counter = field(default_factory=Counter)
    feedback: int = 0
    correct: int = 0
    input_chars: list[int] = field(default_factory=list)
    input_words: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    source: str = "gateway"

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.feedback if self.feedback else None

    @property
    def p95_ms(self) -> float | None:
        """The p95 latency from the samples, else the source's own p95."""
        if self.latency_ms:
            return float(np.percentile(self.latency_ms, 95))
        return self.latency_p95_ms

    @property
    def inputs(self) -> InputLengths:
        """The input lengths in the shape the rollout's drift check reads."""
        return InputLengths(list(self.input_chars), list(self.input_words))


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _side(w: Mapping[str, Any]) -> LiveSnapshot:
    p95 = w.get("latency_p95_ms")
    return LiveSnapshot(requests=_int(w.get("requests")), errors=_int(w.get("errors")),
                        latency_ms=[float(v) for v in w.get("latency_ms") or []],
                        latency_p95_ms=None if p95 is None else float(p95),
                        labels=Counter({str(k): _int(v) for k, v in (w.get("labels") or {}).items()}),
                        feedback=_int(w.get("feedback")), correct=_int(w.get("correct")),
                        input_chars=[_int(v) for v in w.get("input_chars") or []],
                        input_words=[_int(v) for v in w.get("input_words") or []],
                        texts=[str(t) for t in w.get("input_texts") or []])


def _merge(a: LiveSnapshot, b: LiveSnapshot) -> LiveSnapshot:
    busier = a if a.requests >= b.requests else b  # quantiles cannot be added; keep the busier side's
    return LiveSnapshot(a.version, a.seconds, a.requests + b.requests, a.errors + b.errors,
                        a.latency_ms + b.latency_ms, busier.latency_p95_ms, a.labels + b.labels,
                        a.feedback + b.feedback, a.correct + b.correct, a.input_chars + b.input_chars,
                        a.input_words + b.input_words, a.texts + b.texts, a.source)


def snapshot_from_gateway(state: Mapping[str, Any], role: str = CHAMPION) -> LiveSnapshot:
    """``role``'s window from the gateway's ``GET /admin/state?samples=1`` or ``POST /admin/reset`` JSON.

    The challenger's figures include its mirrored (shadow) traffic, as the rollout counts them; the version
    is the one the gateway last saw the upstream serve (``upstreams.<role>.version``), None when unknown.
    Without ``samples=1`` there are no latency samples, input lengths or texts: the p95 is the gateway's own
    and the drift checks see no rows (inconclusive).
    """
    if role not in (CHAMPION, CHALLENGER):
        raise ValueError(f"role must be {CHAMPION!r} or {CHALLENGER!r}, not {role!r}")
    window = state.get("window", state)
    snapshot = _side(window.get(role) or {})
    if role == CHALLENGER:
        snapshot = _merge(snapshot, _side(window.get("shadow") or {}))
    version = ((state.get("upstreams") or {}).get(role) or {}).get("version")
    snapshot.version = None if version in (None, "") else str(version)
    seconds = window.get("seconds")
    if seconds is None and window.get("started") is not None:
        seconds = time.time() - float(window["started"])
    snapshot.seconds = float(seconds or 0.0)
    return snapshot


def snapshot_from_prometheus(windows: PrometheusWindows, name: str, *, seconds: float = 3600.0,
                             role: str = CHAMPION, at: float | None = None) -> LiveSnapshot:
    """``role``'s traffic over the ``seconds`` before ``at`` (default: now), from the rollout's PromQL templates.

    Counts (requests, errors, feedback, correct) and the p95 come from the queries the source defines, the
    version from its ``versions`` query (several versions in the window: comma-joined, so a comparison with one
    version fails). Prometheus keeps no latency samples, predicted classes, input lengths or texts, so those
    checks are inconclusive on this source.

    Args:
        windows: the source's windows (``PrometheusWindows.from_source``); not closed here.
        name: the monitored model, for the record (``source`` reads ``prometheus:<name>``).
        seconds: the look-back, e.g. the monitor's schedule interval.
        role: the gateway role (upstream) to read.
        at: the end of the window, epoch seconds.

    Raises:
        RolloutError: Prometheus cannot be reached or refuses; ConfigError: a query it cannot parse.
    """
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, not {seconds}")
    end = windows.clock() if at is None else at
    figures = windows.measure(windows.queries, role, seconds, end)
    if role == CHALLENGER and windows.queries.shadow is not None:
        shadow = windows.measure(windows.queries.shadow, role, seconds, end)
        window = {CHALLENGER: figures, "shadow": shadow, "seconds": seconds}
    else:
        window = {role: figures, "seconds": seconds}
    version = windows.versions_in(role, seconds, end) if windows.queries.versions else None
    snapshot = snapshot_from_gateway({"window": window, "upstreams": {role: {"version": version}}}, role)
    snapshot.source = f"prometheus:{name}"
    return snapshot
