"""The promotion gate's verdicts: every clause pass, fail or inconclusive, decided on evidence, reasons spelled out.

How a clause is judged depends on what its metric is (policy: :mod:`kiln.tasks.evaluate.policy`):

- **Quality** (accuracy, macro-F1, perplexity, next-token agreement) — non-inferiority on the same rows. The
  candidate and the baseline predicted the same evaluation rows, so the comparison is paired (McNemar's exact
  test and Newcombe's paired interval for accuracy, paired bootstrap otherwise) and yields an interval of
  the difference (or ratio, for ``champion * k``) at level ``1 - 2 alpha``. *Pass* when the whole interval
  satisfies the clause, *fail* when the whole interval violates it, *inconclusive* when it straddles the
  threshold: the rows cannot tell, and more rows (or a wider margin) would.
- **Speed** (latency quantiles, throughput) — Kayenta-style, as the canary judge does: candidate and baseline
  were timed in interleaved rounds; a clause fails only when the candidate is *significantly* worse (the whole
  ``1 - 2 alpha`` interval of the ratio beyond the threshold) **and** *materially* worse (the measured ratio
  beyond the threshold by more than ``tolerance``). Identical engines pass; a real slowdown is caught.
- **Exact** (size, peak memory, parity) — compared as numbers: a file size has no sampling error, and parity
  tolerances are about numerics on these rows.

A metric without evidence (a caller with point values only) falls back to the plain comparison, and says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from kiln.tasks.evaluate import latency, paired
from kiln.tasks.evaluate.evidence import Interval, LatencySamples, RowEvidence
from kiln.tasks.evaluate.policy import (
    LATENCY_METRICS,
    OPS,
    QUALITY_METRICS,
    Clause,
    ClauseSpec,
    ParityTolerance,
    Policy,
)

Status = Literal["pass", "fail", "inconclusive"]
_POINTS = {"accuracy", "macro_f1", "next_token_agreement"}  # fractions, shown in percentage points


@dataclass
class Measured:
    """One model's evidence: point metrics, per-row outcomes (quality) and interleaved latency samples."""

    metrics: dict[str, float]
    rows: RowEvidence | None = None
    latency: LatencySamples | None = None
    labels: int = 0


@dataclass
class ClauseResult:
    """One clause's verdict. ``interval`` is the observed metric's; ``comparison`` the paired difference or
    ratio to the baseline (``comparison_kind``) that decided it."""

    clause: str
    status: Status
    observed: float | None
    threshold: float | None
    reason: str
    interval: Interval | None = None
    comparison: Interval | None = None
    comparison_kind: Literal["difference", "ratio"] | None = None
    method: str = "point"

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def to_dict(self) -> dict[str, Any]:
        return {"clause": self.clause, "status": self.status, "passed": self.passed, "observed": self.observed,
                "threshold": self.threshold, "reason": self.reason, "method": self.method,
                "interval": self.interval.to_dict() if self.interval else None,
                "comparison": self.comparison.to_dict() if self.comparison else None,
                "comparison_kind": self.comparison_kind}


@dataclass
class GateDecision:
    """The verdict on one candidate, with one result per clause."""

    results: list[ClauseResult] = field(default_factory=list)

    @property
    def status(self) -> Status:
        statuses = {r.status for r in self.results}
        return "fail" if "fail" in statuses else "inconclusive" if "inconclusive" in statuses else "pass"

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    @property
    def failures(self) -> list[str]:
        return [r.reason for r in self.results if r.status == "fail"]

    @property
    def undecided(self) -> list[str]:
        return [r.reason for r in self.results if r.status == "inconclusive"]

    def summary(self) -> str:
        if self.passed:
            return "passed"
        if self.status == "fail":
            return "failed: " + "; ".join(self.failures)
        return "inconclusive (not enough evidence): " + "; ".join(self.undecided)

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "passed": self.passed, "clauses": [r.to_dict() for r in self.results]}


def judge(policy: Policy, candidate: Measured | dict[str, float], baseline: Measured | dict[str, float] | None,
          precision: str, *, baseline_name: str = "champion") -> GateDecision:
    """Judge ``candidate`` against the policy and the ``baseline`` (the champion's evidence, or None)."""
    cand = candidate if isinstance(candidate, Measured) else Measured(dict(candidate))
    base = baseline if isinstance(baseline, Measured) or baseline is None else Measured(dict(baseline))
    results = _parity_results(policy.tolerance(precision), cand.metrics)
    for spec in policy.specs():
        results.append(_judge_clause(policy, spec, cand, base, baseline_name))
    return GateDecision(results)


def _parity_results(tol: ParityTolerance, metrics: dict[str, float]) -> list[ClauseResult]:
    out = []
    for metric, op, limit in (("parity_max_abs", "<=", tol.max_abs), ("parity_top1_agreement", ">=",
                                                                        tol.top1_agreement)):
        if limit is None:
            continue
        got = metrics.get(metric)
        ok = got is not None and OPS[op](got, limit)
        out.append(ClauseResult(f"{metric} {op} {limit:g}", "pass" if ok else "fail", got, limit,
                                f"{metric} {_fmt(got)} {op} {limit:g}: {_word('pass' if ok else 'fail')}"))
    return out


def _judge_clause(policy: Policy, spec: ClauseSpec, cand: Measured, base: Measured | None,
                  baseline_name: str) -> ClauseResult:
    clause = Clause.parse(spec.clause)
    observed = cand.metrics.get(clause.metric)
    if observed is None:
        return ClauseResult(clause.text, "fail", None, None, f"{clause.text}: metric {clause.metric} not measured")
    threshold = clause.threshold(base.metrics if base else None)
    if threshold is None:  # relative clause and nothing to compare with
        status: Status = "pass" if policy.when_no_champion == "skip" else "fail"
        verdict = "skipped" if status == "pass" else "FAILED"
        return ClauseResult(clause.text, status, observed, None,
                            f"{clause.text}: {verdict}, no champion to compare with")
    alpha = policy.alpha_for(spec, clause.metric)
    level = 1 - 2 * alpha
    # Every reason reads "<what was observed> (<baseline> <its value>): <verdict> [<clause>]".
    note = f" ({baseline_name} {_fmt(base.metrics[clause.metric])})" if clause.relative and base else ""
    result = None
    if clause.metric in QUALITY_METRICS and cand.rows is not None:
        result = _quality(policy, clause, cand, base, threshold, level, note)
    elif clause.metric in LATENCY_METRICS and cand.latency is not None and (clause.relative is None or (
            base is not None and base.latency is not None and base.latency.rounds == cand.latency.rounds)):
        result = _speed(policy, clause, cand, base, threshold, level, policy.tolerance_for(spec), note)
    if result is None:  # exact metrics, or evidence missing: the plain comparison
        status = "pass" if OPS[clause.op](observed, threshold) else "fail"
        result = ClauseResult(clause.text, status, observed, threshold,
                              f"{clause.metric} {_fmt(observed)} {clause.op} {_fmt(threshold)}{note}: {_word(status)}")
    result.reason += f" [{clause.text}]"
    return result


def _quality(policy: Policy, clause: Clause, cand: Measured, base: Measured | None, threshold: float,
             level: float, note: str) -> ClauseResult | None:
    ev = policy.evidence
    interval = paired.metric_interval(clause.metric, cand.rows, labels=cand.labels, level=level,
                                      resamples=ev.resamples, seed=ev.seed)
    if interval is None:
        return None
    if clause.relative is None:  # absolute: the candidate's own interval against the number
        status = _three_way(interval, clause.op, threshold)
        return ClauseResult(clause.text, status, interval.value, threshold,
                            f"{clause.metric} {_iv(interval)} {clause.op} {_fmt(threshold)}{note}: {_word(status)}",
                            interval, method=f"{level:.0%} interval")
    if base is None or base.rows is None or base.rows.rows != cand.rows.rows:
        return None
    comp = paired.paired_comparison(clause.metric, cand.rows, base.rows, labels=cand.labels, level=level,
                                    resamples=ev.resamples, seed=ev.seed)
    if comp is None:
        return None
    op, k = clause.relative
    if op == "*":
        kind, got, bound = "ratio", comp.ratio, k
        shown = f"ratio {_fmt(got.value)} [{_fmt(got.low)}, {_fmt(got.high)}] {clause.op} {k:g}"
    else:
        kind, got, bound = "difference", comp.difference, k if op == "+" else -k
        shown = f"Δ {_delta(clause.metric, got)} {clause.op} {_signed(clause.metric, bound)}"
    status = _three_way(got, clause.op, bound)
    cand_iv = paired.metric_interval(clause.metric, cand.rows, labels=cand.labels, level=level,
                                     resamples=ev.resamples, seed=ev.seed)
    return ClauseResult(clause.text, status, cand.metrics[clause.metric], threshold,
                        f"{clause.metric} {_fmt(cand.metrics[clause.metric])}{note}: {shown}: {_word(status)}",
                        cand_iv, got, kind, comp.method)


def _speed(policy: Policy, clause: Clause, cand: Measured, base: Measured | None, threshold: float, level: float,
           tolerance: float, note: str) -> ClauseResult:
    ev = policy.evidence
    worse_is_higher = clause.op in ("<=", "<")
    if clause.relative is not None and base is not None and base.latency is not None:
        got = latency.ratio_interval(clause.metric, cand.latency, base.latency, level=level,
                                     resamples=ev.resamples, seed=ev.seed)
        op, k = clause.relative
        base_value = base.metrics[clause.metric]
        bound = k if op == "*" else (threshold / base_value if base_value else k)
        kind, what = "ratio", "ratio"
    else:
        got = latency.metric_interval(clause.metric, cand.latency, level=level, resamples=ev.resamples, seed=ev.seed)
        bound, kind, what = threshold, None, clause.metric
    significant = got.low > bound if worse_is_higher else got.high < bound
    material = got.value > bound * (1 + tolerance) if worse_is_higher else got.value < bound * (1 - tolerance)
    status: Status = "fail" if significant and material else "pass"
    direction = "slower" if clause.metric != "throughput_per_s" else "lower throughput"
    why = (f"significantly (α={(1 - level) / 2:g}) and materially (>{tolerance:.0%}) {direction}" if status == "fail"
           else "materially but not significantly " + direction if material
           else "significantly but within tolerance" if significant else "no significant difference")
    cand_iv = latency.metric_interval(clause.metric, cand.latency, level=level, resamples=ev.resamples, seed=ev.seed)
    shown = f"{what} {_fmt(got.value)} [{_fmt(got.low)}, {_fmt(got.high)}] {clause.op} {_fmt(bound)}"
    return ClauseResult(clause.text, status, cand.metrics[clause.metric], threshold,
                        f"{clause.metric} {_iv(cand_iv)}{note}: {shown}: {_word(status)} ({why})", cand_iv,
                        got if kind else None, kind, f"interleaved rounds, {level:.0%} round-paired bootstrap")


def _three_way(got: Interval, op: str, bound: float) -> Status:
    """Pass when the whole interval satisfies ``value OP bound``, fail when none of it does, else inconclusive."""
    if OPS[op](got.low, bound) and OPS[op](got.high, bound):
        return "pass"
    if not OPS[op](got.low, bound) and not OPS[op](got.high, bound):
        return "fail"
    return "inconclusive"


def _word(status: Status) -> str:
    return {"pass": "ok", "fail": "FAILED", "inconclusive": "INCONCLUSIVE (the interval straddles the threshold)"}[
        status]


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _iv(iv: Interval) -> str:
    return f"{_fmt(iv.value)} [{_fmt(iv.low)}, {_fmt(iv.high)}]"


def _signed(metric: str, x: float) -> str:
    return f"{x * 100:+.2f} pt" if metric in _POINTS else f"{x:+.4g}"


def _delta(metric: str, iv: Interval) -> str:
    if metric in _POINTS:
        return f"{iv.value * 100:+.2f} pt [{iv.low * 100:+.2f}, {iv.high * 100:+.2f}]"
    return f"{iv.value:+.4g} [{iv.low:+.4g}, {iv.high:+.4g}]"
