"""The monitor's verdict on one window of the champion's traffic: healthy, breach or inconclusive. Pure.

Every check the policy enables is judged and spelled out (a :class:`~kiln.tasks.rollout.stats.Check`: name,
status, reason), under the breach kind it belongs to:

    slo               error_rate (significantly above max_error_rate), latency_p95 (above max_p95_ms)
    input_drift       the rollout's length check (GX KL of chars and words against the reference)
    content_drift     token PSI / KL / unknown share   } computed by the monitor flow with the model's tokenizer
    embedding_drift   the pooled representation        } and model, passed in as ``extra_checks``
    prediction_drift  predicted-class mix against the reference labels (GX KL, PSI)
    quality           accuracy on delayed labelled feedback (significantly below min_accuracy)

The window is **healthy** only when it has ``min_requests`` requests and every enabled check is ok; any failed
check makes it a **breach**; anything else (too little traffic, too few rows for a check, a check with
nothing to compare with or not computed) is **inconclusive** — never healthy on missing evidence.

Counts are judged with an interval, so noise does not fire actions: the error rate fails only when its
Wilson lower bound is above the objective, accuracy only when its upper bound is below the minimum
(one-sided, at the policy's ``alpha``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from scipy.stats import norm

from kiln.tasks.evaluate.content_drift import population_stability_index
from kiln.tasks.monitor.policy import (
    BREACH_KINDS,
    InputDriftPolicy,
    MonitorPolicy,
    PredictionDriftPolicy,
    QualityPolicy,
    SloPolicy,
)
from kiln.tasks.monitor.snapshot import LiveSnapshot
from kiln.tasks.rollout.drift import PSEUDO_COUNT, DriftChecks, DriftReference, InputLengths, drift_checks
from kiln.tasks.rollout.stats import Check

Status = Literal["healthy", "breach", "inconclusive"]
COMPUTED_BY_FLOW = ("content_drift", "embedding_drift")  # judged outside (tokenizer, model), passed in


@dataclass
class MonitorVerdict:
    """The verdict on one window, with every check, the kinds that failed and the actions they set off.

    Attributes:
        status: healthy | breach | inconclusive.
        checks: every check judged, in the order of the policy's kinds (``min_requests`` first).
        breaches: the kinds with a failed check, in the order of the policy's kinds.
        actions: what the breaches set off by the policy, each once, in the order notify, rollback, retrain.
        metrics: numbers to log as MLflow metrics (requests, error_rate, p95_ms, accuracy, prediction_psi, ...).
        kinds: each check's breach kind by check name (absent for ``min_requests``).
    """

    status: Status
    checks: list[Check] = field(default_factory=list)
    breaches: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)

    @property
    def reasons(self) -> list[str]:
        """The reasons of the checks that were not ok: why the window is not healthy."""
        return [c.reason for c in self.checks if c.status != "ok"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable: the status, breaches, actions, metrics and every check with its kind."""
        return {"status": self.status, "breaches": list(self.breaches), "actions": list(self.actions),
                "metrics": dict(self.metrics),
                "checks": [asdict(c) | {"kind": self.kinds.get(c.name)} for c in self.checks]}


# ---- intervals ---------------------------------------------------------------------------------------------


def wilson_interval(successes: int, n: int, alpha: float) -> tuple[float, float]:
    """Two-sided ``1 - 2 * alpha`` Wilson score interval of a proportion (each side one-sided at ``alpha``)."""
    if n <= 0:
        return 0.0, 1.0
    z = float(norm.ppf(1 - alpha))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


# ---- the checks ------------------------------------------------------------------------------------------


def _requests_check(policy: MonitorPolicy, s: LiveSnapshot) -> Check:
    where = f"{s.requests} requests in {s.seconds:.0f} s" + (f" on v{s.version}" if s.version else "")
    if s.requests < policy.min_requests:
        return Check("min_requests", "inconclusive", f"min_requests: {where}, fewer than {policy.min_requests}: "
                                                     "too little traffic to call the window healthy")
    return Check("min_requests", "ok", f"min_requests: {where} >= {policy.min_requests}: ok")


def _slo_checks(slo: SloPolicy, policy: MonitorPolicy, s: LiveSnapshot) -> list[Check]:
    checks: list[Check] = []
    enough = s.requests >= policy.min_requests
    if slo.max_error_rate is not None:
        limit = slo.max_error_rate
        if not enough:
            checks.append(Check("error_rate", "inconclusive", f"error_rate: {s.errors}/{s.requests} requests, fewer "
                                                              f"than min_requests {policy.min_requests}: not judged"))
        else:
            low, high = wilson_interval(s.errors, s.requests, policy.alpha)
            failed = low > limit
            checks.append(Check("error_rate", "failed" if failed else "ok", (
                f"error_rate {s.errors / s.requests:.2%} ({s.errors}/{s.requests}; {1 - 2 * policy.alpha:.0%} interval "
                f"{low:.2%}-{high:.2%}) "
                f"{'significantly above' if failed else 'not significantly above'} {limit:.2%}: "
                f"{'FAILED' if failed else 'ok'}")))
    if slo.max_p95_ms is not None:
        limit, p95 = slo.max_p95_ms, s.p95_ms
        if not enough or p95 is None:
            why = (f"fewer than min_requests {policy.min_requests}" if not enough else
                   "no latency samples or p95 in the window (the gateway gives samples with samples=1)")
            checks.append(Check("latency_p95", "inconclusive", f"latency_p95: {why}: not judged"))
        else:
            ok = p95 <= limit
            count = f"{len(s.latency_ms)} samples" if s.latency_ms else "the source's p95"
            checks.append(Check("latency_p95", "ok" if ok else "failed", (
                f"latency_p95 {p95:.1f} ms {'<=' if ok else '>'} {limit:g} ms ({count}): {'ok' if ok else 'FAILED'}")))
    return checks


def _no_reference(name: str, what: str) -> Check:
    return Check(name, "inconclusive", f"{name}: no reference {what} to compare with (the champion's recorded test "
                                       "split, or the policy's reference file): not judged")


def _input_check(cfg: InputDriftPolicy, reference: DriftReference | None, s: LiveSnapshot) -> Check:
    if reference is None:
        return _no_reference("input_drift", "texts")
    checks = DriftChecks(max_input_kl=cfg.max_kl, max_class_kl=None, min_rows=cfg.min_rows)
    (check,) = drift_checks(checks, reference, s.inputs, Counter())
    return check


def _renamed(check: Check, name: str) -> Check:
    reason = check.reason.replace(f"{check.name}:", f"{name}:", 1).replace("challenger predictions", "predictions")
    return Check(name, check.status, reason)


def _class_psi(labels: Counter, reference: DriftReference) -> float:
    """PSI of the predicted classes against the reference labels, both smoothed as the KL check smooths them."""
    values = sorted(set(labels) | set(reference.classes))
    observed = [labels.get(v, 0) + PSEUDO_COUNT for v in values]
    expected = [reference.classes.get(v, 0.0) * reference.labelled_rows + PSEUDO_COUNT for v in values]
    return population_stability_index([o / sum(observed) for o in observed], [e / sum(expected) for e in expected])


def _prediction_checks(cfg: PredictionDriftPolicy, reference: DriftReference | None, s: LiveSnapshot,
                       metrics: dict[str, float]) -> list[Check]:
    if reference is None or not reference.classes:
        return [_no_reference("prediction_drift", "labels")]
    labels = Counter({k: v for k, v in s.labels.items() if v > 0})
    rows = sum(labels.values())
    checks: list[Check] = []
    if cfg.max_kl is not None:
        kl = DriftChecks(max_input_kl=None, max_class_kl=cfg.max_kl, min_rows=cfg.min_rows)
        (check,) = drift_checks(kl, reference, InputLengths(), labels, None)
        checks.append(_renamed(check, "prediction_drift"))
    if cfg.max_psi is not None:
        if rows < cfg.min_rows:
            checks.append(Check("prediction_psi", "inconclusive", f"prediction_psi: {rows} predictions, fewer than "
                                                                  f"min_rows {cfg.min_rows}"))
        else:
            psi = metrics["prediction_psi"] = _class_psi(labels, reference)
            ok = psi <= cfg.max_psi
            checks.append(Check("prediction_psi", "ok" if ok else "failed", (
                f"prediction_psi: PSI of predicted classes {psi:.3g} {'<=' if ok else '>'} {cfg.max_psi:g} over "
                f"{rows} rows vs the reference's {reference.labelled_rows} labels: {'ok' if ok else 'FAILED'}")))
    return checks


def _quality_check(cfg: QualityPolicy, alpha: float, s: LiveSnapshot) -> Check:
    if s.feedback < cfg.min_feedback:
        return Check("accuracy", "inconclusive", f"accuracy: {s.feedback} labelled feedback rows, fewer than "
                                                 f"min_feedback {cfg.min_feedback}")
    low, high = wilson_interval(s.correct, s.feedback, alpha)
    failed = high < cfg.min_accuracy
    return Check("accuracy", "failed" if failed else "ok", (
        f"accuracy {s.correct / s.feedback:.1%} ({s.correct}/{s.feedback} feedback rows; {1 - 2 * alpha:.0%} "
        f"interval {low:.1%}-{high:.1%}) {'significantly below' if failed else 'not significantly below'} "
        f"{cfg.min_accuracy:.1%}: {'FAILED' if failed else 'ok'}"))


def _metrics(s: LiveSnapshot) -> dict[str, float]:
    values = {"requests": s.requests, "errors": s.errors, "error_rate": s.error_rate, "p95_ms": s.p95_ms,
              "feedback": s.feedback, "accuracy": s.accuracy, "window_s": s.seconds,
              "requests_per_s": s.requests / s.seconds if s.seconds > 0 else None,
              "input_rows": len(s.inputs), "texts": len(s.texts)}
    return {k: float(v) for k, v in values.items() if v is not None}


# ---- the verdict -----------------------------------------------------------------------------------------


def evaluate(policy: MonitorPolicy, snapshot: LiveSnapshot, reference: DriftReference | None, *,
             extra_checks: Sequence[tuple[str, Check]] = (),
             extra_metrics: Mapping[str, float] | None = None) -> MonitorVerdict:
    """Judge one window of the champion's traffic by ``policy``.

    Args:
        policy: the monitoring policy.
        snapshot: the window (:func:`~kiln.tasks.monitor.snapshot.snapshot_from_gateway` or ``..._prometheus``).
        reference: the length and class reference (:func:`kiln.tasks.rollout.drift.reference_profile` of the
            champion's test split); None leaves input and prediction drift inconclusive.
        extra_checks: ``(kind, Check)`` pairs judged by the caller (content and embedding drift need the
            tokenizer and the model); a kind the policy switches off is left out, an enabled kind of
            :data:`COMPUTED_BY_FLOW` with no check here is inconclusive ("not computed").
        extra_metrics: more numbers for :attr:`MonitorVerdict.metrics` (e.g. the content drift's PSI).

    Returns:
        The verdict: healthy only with ``min_requests`` met and every enabled check ok; breach when any
        check failed; inconclusive otherwise.

    Raises:
        ValueError: an extra check names an unknown kind (a bug in the caller).
    """
    by_kind: dict[str, list[Check]] = {kind: [] for kind in BREACH_KINDS}
    for kind, check in extra_checks:
        if kind not in by_kind:
            raise ValueError(f"unknown breach kind {kind!r} for check {check.name!r}; one of {BREACH_KINDS}")
        by_kind[kind].append(check)
    metrics = _metrics(snapshot)
    own: dict[str, list[Check]] = {}
    if policy.slo is not None:
        own["slo"] = _slo_checks(policy.slo, policy, snapshot)
    if policy.input_drift is not None:
        own["input_drift"] = [_input_check(policy.input_drift, reference, snapshot)]
    if policy.prediction_drift is not None:
        own["prediction_drift"] = _prediction_checks(policy.prediction_drift, reference, snapshot, metrics)
    if policy.quality is not None:
        own["quality"] = [_quality_check(policy.quality, policy.alpha, snapshot)]
    for kind in COMPUTED_BY_FLOW:
        if getattr(policy, kind) is not None and not by_kind[kind]:
            own[kind] = [Check(kind, "inconclusive", f"{kind}: enabled in the policy but not computed for this "
                                                     "window (no texts, or no reference to compare with)")]

    checks, kinds, breaches = [_requests_check(policy, snapshot)], {}, []
    for kind in policy.enabled():
        for check in own.get(kind, []) + by_kind[kind]:
            checks.append(check)
            kinds[check.name] = kind
            if check.status == "failed" and kind not in breaches:
                breaches.append(kind)
    if breaches:
        status: Status = "breach"
    elif all(c.status == "ok" for c in checks):
        status = "healthy"
    else:
        status = "inconclusive"
    metrics.update({k: float(v) for k, v in (extra_metrics or {}).items() if v is not None})
    metrics["checks_failed"] = float(sum(c.status == "failed" for c in checks))
    metrics["checks_inconclusive"] = float(sum(c.status == "inconclusive" for c in checks))
    return MonitorVerdict(status, checks, breaches, policy.actions_for(breaches), metrics, kinds)
