"""Canary analysis: is the challenger at least as good as the champion on live traffic? Pure functions.

A rollout is data (shaped after Argo Rollouts and Flagger): steps of traffic weight (and optional shadow
mirroring) each followed by an analysis interval, metric thresholds, a failure limit, a minimum sample
count and optional manual gates. After each interval :func:`judge_step` compares the two upstreams'
statistics and returns pass, fail or inconclusive with one reason per check; :func:`next_action` turns
the verdicts so far into what the rollout does next (advance, analyse again, pause, promote, roll back).

Latency is judged twice: by p95/p99 ratios to the champion, and, in the manner of Kayenta, by a
one-sided Mann-Whitney U test on the latency samples that fails only when the challenger is both
significantly slower and slower by more than a tolerated effect size (a real but tiny slowdown passes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kiln.errors import ConfigError, validation_problems
from kiln.tasks.rollout.drift import DriftChecks
from kiln.tasks.rollout.stats import (  # re-exported: the judge's inputs live beside it for callers
    CHALLENGER,
    CHAMPION,
    Check,
    RankTest,
    UpstreamStats,
    mann_whitney_u,
    stats_from_state,
)
from kiln.yamlfile import parse_yaml, read_text

__all__ = ["CHALLENGER", "CHAMPION", "Action", "Check", "LatencyTest",
           "MetricThresholds", "RankTest", "RolloutSpec", "Step", "StepVerdict",
           "UpstreamStats", "judge_step", "judge_window", "load_spec", "mann_whitney_u", "next_action",
           "stats_from_state", "with_checks"]

Outcome = Literal["pass", "fail", "inconclusive"]
MIN_RANK_SAMPLES = 20  # below this the normal approximation of U is poor


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error that names it, not a silent default


class Step(_Strict):
    """One rollout step: set the traffic, then analyse for ``analysis_s`` seconds."""

    weight: float = Field(..., ge=0, le=100, description="Percent of live traffic answered by the challenger.")
    shadow: float = Field(0.0, ge=0, le=1, description="Fraction of champion traffic mirrored to the challenger.")
    analysis_s: float = Field(60.0, gt=0, description="Seconds of traffic to collect before judging the step.")
    manual_gate: bool = Field(False, description="Wait for a person's approval before this step starts.")

    @model_validator(mode="after")
    def _sends_traffic(self) -> Step:
        if self.weight == 0 and self.shadow == 0:
            raise ValueError("a step with weight 0 must mirror traffic (shadow > 0), or it measures nothing")
        return self


class LatencyTest(_Strict):
    """Kayenta-style rank test: fail when the challenger is significantly and materially slower."""

    alpha: float = Field(0.05, gt=0, lt=0.5, description="Significance level of the one-sided test.")
    tolerance: float = Field(0.1, ge=0, description="Tolerated relative increase of the median latency (0.1 = 10%).")


class MetricThresholds(_Strict):
    """What the challenger must show in each analysis interval; ``null`` switches a check off."""

    max_error_rate: float | None = Field(0.01, ge=0, le=1, description="Errors (5xx, unreachable) per request.")
    max_p95_ratio: float | None = Field(1.25, gt=0, description="Challenger p95 latency / champion p95.")
    max_p99_ratio: float | None = Field(1.5, gt=0, description="Challenger p99 latency / champion p99.")
    latency_test: LatencyTest | None = Field(default_factory=LatencyTest, description="Rank test on latency.")
    min_agreement: float | None = Field(None, ge=0, le=1, description=(
        "Share of mirrored rows whose predicted label equals the champion's; needs shadow > 0 in every step."))
    max_accuracy_drop: float | None = Field(None, ge=0, le=1, description=(
        "Challenger accuracy on labelled feedback may trail the champion's by at most this much."))
    min_feedback: int = Field(30, ge=1, description="Labelled rows per upstream needed to judge accuracy.")


class RolloutSpec(_Strict):
    """A rollout: steps, metric thresholds, and how many failures and how little data it tolerates."""

    steps: list[Step] = Field(..., min_length=1, description="Traffic steps in order.")
    metrics: MetricThresholds = Field(default_factory=MetricThresholds)
    failure_limit: int = Field(0, ge=0, description="Failed analyses tolerated; one more rolls the challenger back.")
    inconclusive_limit: int = Field(3, ge=0, description=(
        "Consecutive inconclusive analyses re-run before the rollout pauses for a person."))
    min_samples: int = Field(100, ge=1, description="Requests each upstream needs in an interval to be judged.")
    drift: DriftChecks | None = Field(None, description=(
        "Great Expectations drift checks on the interval's inputs and predicted classes; the reference is "
        "drift.reference, else the test split of the dataset recorded on the champion."))

    @model_validator(mode="after")
    def _agreement_needs_shadow(self) -> RolloutSpec:
        if self.metrics.min_agreement is not None:
            silent = [i for i, s in enumerate(self.steps) if s.shadow == 0 and s.weight < 100]
            if silent:
                raise ValueError(f"metrics.min_agreement needs shadow > 0 in every step below weight 100; steps "
                                 f"{silent} have none")
        return self


def load_spec(source: Path | str | dict[str, Any]) -> RolloutSpec:
    """A rollout spec from a YAML file, YAML text or a mapping; errors name the field and the fix."""
    where = "rollout spec"
    raw: Any = source
    if isinstance(source, Path):
        where = f"rollout spec {source}"
        if not source.is_file():
            raise ConfigError(f"{where} does not exist; pass an existing YAML file")
        source = read_text(source, where)
    if isinstance(source, str):
        raw = parse_yaml(source, where)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping with 'steps' (and optionally 'metrics', 'failure_limit', ...)")
    if "strategy" in raw or raw.get("kind") == "Rollout":  # Argo Rollouts' form: strategy.canary.steps
        from kiln.tasks.rollout.argo_spec import from_argo

        return from_argo(raw, where)
    try:
        return RolloutSpec.model_validate(raw)
    except ValidationError as exc:
        problems = validation_problems(exc, "spec", model=RolloutSpec)
        raise ConfigError(f"{where} is invalid: {problems}") from exc


# ---- judging one interval --------------------------------------------------------------------------------


@dataclass
class StepVerdict:
    """The judgement of one analysis interval, with every check spelled out."""

    outcome: Outcome
    reasons: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)


def _fmt(value: float | None, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:.4g}{unit}"


def _samples_check(spec: RolloutSpec, champion: UpstreamStats | None, challenger: UpstreamStats) -> Check:
    short = [f"{role} has {s.requests}" for role, s in (("challenger", challenger), ("champion", champion))
             if s is not None and s.requests < spec.min_samples]
    if short:
        return Check("samples", "inconclusive", f"samples: {', '.join(short)} requests, fewer than min_samples "
                                                f"{spec.min_samples}: too little traffic to judge")
    return Check("samples", "ok", f"samples: enough traffic (>= {spec.min_samples} requests each): ok")


def _error_check(limit: float, challenger: UpstreamStats) -> Check:
    rate = challenger.error_rate
    if rate is None:
        return Check("error_rate", "inconclusive", "error_rate: no requests reached the challenger")
    ok = rate <= limit
    return Check("error_rate", "ok" if ok else "failed",
                 f"error_rate {rate:.2%} <= {limit:.2%} ({challenger.errors}/{challenger.requests}): "
                 f"{'ok' if ok else 'FAILED'}")


def _ratio_check(name: str, q: float, limit: float, champion: UpstreamStats | None, challenger: UpstreamStats
                 ) -> Check:
    if champion is None:
        return Check(name, "ok", f"{name}: no champion traffic to compare with (weight 100%): not judged")
    ours, theirs = challenger.quantile_ms(q), champion.quantile_ms(q)
    if ours is None or theirs is None or theirs <= 0:
        return Check(name, "inconclusive", f"{name}: no latency measured (challenger {_fmt(ours, ' ms')}, "
                                           f"champion {_fmt(theirs, ' ms')})")
    ratio = ours / theirs
    ok = ratio <= limit
    return Check(name, "ok" if ok else "failed", f"{name} {ours:.3g} ms / champion {theirs:.3g} ms = {ratio:.3g} "
                                                 f"<= {limit:g}: {'ok' if ok else 'FAILED'}")


def _rank_check(test: LatencyTest, champion: UpstreamStats | None, challenger: UpstreamStats) -> Check:
    if champion is None:
        return Check("latency_test", "ok", "latency_test: no champion traffic to compare with: not judged")
    a, b = challenger.latency_ms, champion.latency_ms
    if min(len(a), len(b)) < MIN_RANK_SAMPLES:
        return Check("latency_test", "inconclusive", f"latency_test: needs >= {MIN_RANK_SAMPLES} latency samples "
                                                     f"per upstream (challenger {len(a)}, champion {len(b)})")
    result = mann_whitney_u(a, b, alternative="greater")
    effect = float(np.median(a) / np.median(b) - 1) if np.median(b) > 0 else 0.0
    slower = result.p_value < test.alpha
    failed = slower and effect > test.tolerance
    verdict = "FAILED" if failed else "ok"
    return Check("latency_test", "failed" if failed else "ok",
                 f"latency_test: challenger median {effect:+.1%} vs champion (tolerance +{test.tolerance:.0%}), "
                 f"Mann-Whitney p={result.p_value:.3g} ({'<' if slower else '>='} alpha {test.alpha:g}): {verdict}")


def _agreement_check(minimum: float, min_samples: int, challenger: UpstreamStats) -> Check:
    if challenger.compared < min_samples:
        return Check("agreement", "inconclusive", f"agreement: {challenger.compared} mirrored rows compared, fewer "
                                                  f"than {min_samples}")
    value = challenger.agreement or 0.0
    ok = value >= minimum
    return Check("agreement", "ok" if ok else "failed",
                 f"agreement {value:.2%} >= {minimum:.2%} ({challenger.agreed}/{challenger.compared} rows): "
                 f"{'ok' if ok else 'FAILED'}")


def _accuracy_check(drop: float, min_feedback: int, champion: UpstreamStats | None, challenger: UpstreamStats
                    ) -> Check:
    if champion is None:
        return Check("accuracy", "ok", "accuracy: no champion traffic to compare with: not judged")
    if min(challenger.feedback, champion.feedback) < min_feedback:
        return Check("accuracy", "inconclusive", f"accuracy: labelled feedback on challenger {challenger.feedback}, "
                                                 f"champion {champion.feedback} rows; needs {min_feedback} each")
    ours, theirs = challenger.accuracy or 0.0, champion.accuracy or 0.0
    ok = ours >= theirs - drop
    return Check("accuracy", "ok" if ok else "failed", f"accuracy {ours:.2%} >= champion {theirs:.2%} - "
                                                       f"{drop:.2%}: {'ok' if ok else 'FAILED'}")


def judge_step(spec: RolloutSpec, champion_stats: UpstreamStats | None, challenger_stats: UpstreamStats
               ) -> StepVerdict:
    """Judge one analysis interval.

    Args:
        spec: the rollout's thresholds.
        champion_stats: the champion's stats for the interval; None when it got no traffic by design
            (weight 100 %), which skips the comparisons rather than failing them.
        challenger_stats: the challenger's stats (live plus mirrored traffic).

    Returns:
        ``fail`` when any check failed; otherwise ``inconclusive`` when there was too little traffic or a
        check lacked data (never ``pass`` on too little data); otherwise ``pass``. Every check gives a reason.
    """
    m = spec.metrics
    checks = [_samples_check(spec, champion_stats, challenger_stats)]
    if m.max_error_rate is not None:
        checks.append(_error_check(m.max_error_rate, challenger_stats))
    if m.max_p95_ratio is not None:
        checks.append(_ratio_check("latency_p95", 0.95, m.max_p95_ratio, champion_stats, challenger_stats))
    if m.max_p99_ratio is not None:
        checks.append(_ratio_check("latency_p99", 0.99, m.max_p99_ratio, champion_stats, challenger_stats))
    if m.latency_test is not None:
        checks.append(_rank_check(m.latency_test, champion_stats, challenger_stats))
    if m.min_agreement is not None:
        checks.append(Check("agreement", "ok", "agreement: no champion traffic to mirror (weight 100%): not judged")
                      if champion_stats is None else _agreement_check(m.min_agreement, spec.min_samples,
                                                                      challenger_stats))
    if m.max_accuracy_drop is not None:
        checks.append(_accuracy_check(m.max_accuracy_drop, m.min_feedback, champion_stats, challenger_stats))
    statuses = {c.status for c in checks}
    # Too little traffic is inconclusive even when a check failed: the failure may be noise, so collect more.
    if checks[0].status == "inconclusive":
        outcome: Outcome = "inconclusive"
    else:
        outcome = "fail" if "failed" in statuses else "inconclusive" if "inconclusive" in statuses else "pass"
    return StepVerdict(outcome, [c.reason for c in checks], checks)


def judge_window(spec: RolloutSpec, window: dict[str, Any], *, weight: float | None = None,
                 drift: Callable[[dict[str, Any]], list[Check]] | None = None) -> StepVerdict:
    """Judge one closed analysis window (a :class:`~kiln.tasks.rollout.router.MetricsWindows` answer) as a rollout
    step does: at ``weight`` 100 the champion got no traffic by design and is not compared; ``drift`` adds checks."""
    stats = stats_from_state(window)
    champion = None if weight is not None and weight >= 100 else stats[CHAMPION]
    verdict = judge_step(spec, champion, stats[CHALLENGER])
    return with_checks(verdict, drift(window)) if drift is not None else verdict


def with_checks(verdict: StepVerdict, checks: list[Check]) -> StepVerdict:
    """``verdict`` with more checks (e.g. drift) folded in by the same rules as :func:`judge_step`."""
    if not checks:
        return verdict
    merged = [*verdict.checks, *checks]
    statuses = {c.status for c in checks}
    outcome: Outcome = verdict.outcome
    if outcome != "inconclusive" or not verdict.checks or verdict.checks[0].status != "inconclusive":
        if "failed" in statuses:
            outcome = "fail"
        elif "inconclusive" in statuses and outcome == "pass":
            outcome = "inconclusive"
    return StepVerdict(outcome, [c.reason for c in merged], merged)


# ---- what happens next -----------------------------------------------------------------------------------


@dataclass
class Action:
    """What the rollout does after a verdict.

    ``kind``: ``advance`` (to ``step``), ``repeat`` (analyse ``step`` again), ``pause`` (wait for a person
    before ``step``: a manual gate or too many inconclusive analyses), ``promote`` (make the challenger
    champion), ``rollback`` (weight 0, challenger rejected).
    """

    kind: Literal["advance", "repeat", "pause", "promote", "rollback"]
    step: int
    reasons: list[str] = field(default_factory=list)


def next_action(spec: RolloutSpec, step: int, history: list[StepVerdict]) -> Action:
    """Decide what follows the latest verdict (``history[-1]``, from step ``step``).

    ``history`` holds every verdict of this rollout so far, oldest first: failures count across all steps
    (Argo's ``failureLimit``); inconclusive analyses count while they are consecutive.
    """
    if not history:
        raise ValueError("next_action needs at least one verdict")
    if not 0 <= step < len(spec.steps):
        raise ValueError(f"step {step} is outside the spec's {len(spec.steps)} steps")
    last = history[-1]
    failures = sum(v.outcome == "fail" for v in history)
    if failures > spec.failure_limit:
        return Action("rollback", step, [f"{failures} failed analyses > failure_limit {spec.failure_limit}: "
                                         "rolling back", *last.reasons])
    if last.outcome == "fail":
        return Action("repeat", step, [f"analysis failed ({failures} of {spec.failure_limit} tolerated): "
                                       "analysing again", *last.reasons])
    if last.outcome == "inconclusive":
        streak = next((i for i, v in enumerate(reversed(history)) if v.outcome != "inconclusive"), len(history))
        if streak > spec.inconclusive_limit:
            return Action("pause", step, [f"{streak} inconclusive analyses in a row > inconclusive_limit "
                                          f"{spec.inconclusive_limit}: a person must decide", *last.reasons])
        return Action("repeat", step, ["inconclusive: analysing again", *last.reasons])
    if step == len(spec.steps) - 1:
        return Action("promote", step, ["every step passed: promote the challenger", *last.reasons])
    if spec.steps[step + 1].manual_gate:
        return Action("pause", step + 1, [f"step {step} passed; step {step + 1} has a manual gate: waiting for "
                                          "approval", *last.reasons])
    return Action("advance", step + 1, [f"step {step} passed", *last.reasons])
