"""A gate policy: which candidates may become challenger, how sure the gate must be, and how to rank them.

A policy (YAML)::

    objective: {metric: latency_p50_ms, goal: minimize}
    when_no_champion: source        # compare relative clauses with the source model | skip | fail
    clauses:
      - accuracy >= champion - 0.01
      - {clause: latency_p95_ms <= champion * 0.8, alpha: 0.05, tolerance: 0.02}
      - size_mb <= 25
    evidence:                       # how sure a verdict must be (see kiln.tasks.evaluate.gate)
      alpha: 0.025                  # quality clauses: one-sided error rate of "pass" and of "fail"
      latency_alpha: 0.01           # latency clauses: "significantly slower" at this level
      latency_tolerance: 0.05       # latency clauses: and slower by more than this (5 %)
      inconclusive: more-rows       # or: refuse
    parity:                         # per precision; checked before the clauses
      fp32: {max_abs: 0.001, top1_agreement: 0.999}
      default: {top1_agreement: 0.97}

The verdicts themselves are :mod:`kiln.tasks.evaluate.gate`'s; this module only reads and checks policies.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kiln.errors import ConfigError, validation_problems
from kiln.tasks.core.stages import TaskType
from kiln.tasks.presets import PRESETS
from kiln.yamlfile import read_yaml

COMMON_METRICS = {
    "latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "batch_latency_p50_ms", "batch_latency_p95_ms",
    "throughput_per_s", "size_mb", "peak_memory_mb", "parity_max_abs", "parity_mean_abs",
    "parity_top1_agreement", "cost_per_million", "instances_needed",  # cost: kiln.tasks.evaluate.cost
    "latency_mean_ms", "escalation_rate",  # cascades (kiln.tasks.models.cascade): a bimodal latency, a share passed on
}
TASK_METRICS: dict[str, set[str]] = {
    "sequence-classification": COMMON_METRICS | {"accuracy", "macro_f1"},
    # greedy decoding of the prompt set at batch 1 (kiln.tasks.evaluate.decoding): agreement with the source, speed
    "causal-lm": COMMON_METRICS | {"perplexity", "next_token_agreement", "greedy_agreement", "greedy_prefix_agreement",
                                   "tokens_per_s_b1", "ttft_ms", "itl_ms",
                                   "acceptance_rate", "speculative_speedup"},  # kiln.tasks.models.speculative
}
HIGHER_IS_BETTER = {"accuracy", "macro_f1", "next_token_agreement", "throughput_per_s", "parity_top1_agreement",
                    "greedy_agreement", "greedy_prefix_agreement", "tokens_per_s_b1", "acceptance_rate",
                    "speculative_speedup"}
# How each metric is judged: quality from per-row outcomes (an interval must clear the threshold), speed from
# interleaved latency samples (fail only when significantly and materially worse), the rest as exact numbers.
QUALITY_METRICS = {"accuracy", "macro_f1", "perplexity", "next_token_agreement"}
LATENCY_METRICS = {"latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "batch_latency_p50_ms",
                   "batch_latency_p95_ms", "throughput_per_s"}
OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}
_CLAUSE = re.compile(r"^\s*([a-z][a-z0-9_]*)\s*(<=|>=|<|>)\s*(.+?)\s*$")
_NUM = r"\d+(?:\.\d+)?(?:e-?\d+)?"
_RHS = re.compile(rf"^(?:(?P<num>-?{_NUM})|champion(?:\s*(?P<op>[-+*])\s*(?P<k>{_NUM}))?)$")


@dataclass(frozen=True)
class Clause:
    """``metric OP threshold`` where threshold is a number or ``champion [+-*] k``."""

    text: str
    metric: str
    op: str
    value: float | None  # absolute threshold
    relative: tuple[str, float] | None  # ("-", 0.01) means champion - 0.01

    @classmethod
    def parse(cls, text: str) -> Clause:
        m = _CLAUSE.match(text)
        rhs = _RHS.match(m.group(3)) if m else None
        if not m or not rhs:
            raise ValueError(
                f"cannot parse clause {text!r}: write 'metric OP number' or 'metric OP champion [+|-|*] number'"
                " with OP one of <=, >=, <, >"
            )
        if rhs.group("num") is not None:
            return cls(text, m.group(1), m.group(2), float(rhs.group("num")), None)
        op, k = rhs.group("op"), rhs.group("k")
        return cls(text, m.group(1), m.group(2), None, (op or "+", float(k) if k else 0.0))

    def threshold(self, champion: dict[str, float] | None) -> float | None:
        if self.relative is None:
            return self.value
        if champion is None or self.metric not in champion:
            return None
        base, (op, k) = champion[self.metric], self.relative
        return base - k if op == "-" else base + k if op == "+" else base * k


class _Strict(BaseModel):
    # `clause:` for `clauses:` is an error, not a policy that passes all; `.inf` / `.nan` would switch a check off
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ClauseSpec(_Strict):
    """A clause with its own evidence settings (the mapping form of a clause in a policy file)."""

    clause: str = Field(..., description="The clause, e.g. 'latency_p50_ms <= champion * 1.0'.")
    alpha: float | None = Field(None, gt=0, lt=0.5, description="One-sided error rate for this clause.")
    tolerance: float | None = Field(None, ge=0, lt=1, description=(
        "Latency clauses: tolerated relative slowdown beyond the threshold before a significant one fails."))

    @model_validator(mode="after")
    def _check(self) -> ClauseSpec:
        clause = Clause.parse(self.clause)
        if self.tolerance is not None and clause.metric not in LATENCY_METRICS:
            raise ValueError(f"tolerance applies to latency and throughput clauses, not {clause.metric}: a quality "
                             "clause's margin is its threshold (e.g. 'accuracy >= champion - 0.01')")
        return self


class Evidence(_Strict):
    """How sure the gate must be before it passes or fails a clause, and what to do when it is not."""

    alpha: float = Field(0.025, gt=0, lt=0.5, description=(
        "Quality clauses: one-sided error rate; pass needs the whole (1 - 2 alpha) interval inside the threshold, "
        "fail the whole interval outside it, anything else is inconclusive."))
    latency_alpha: float = Field(0.01, gt=0, lt=0.5, description=(
        "Latency clauses: fail only when the (1 - 2 alpha) interval of the ratio lies entirely beyond the threshold."))
    latency_tolerance: float = Field(0.05, ge=0, lt=1, description=(
        "Latency clauses: and only when the measured ratio exceeds the threshold by more than this fraction."))
    resamples: int = Field(2000, ge=200, le=100_000, description="Bootstrap resamples per interval.")
    inconclusive: Literal["more-rows", "refuse"] = Field("more-rows", description=(
        "When a candidate that could win is inconclusive: judge again on more evaluation rows (while the test "
        "split has more than --eval-limit used), or refuse at once ('not enough evidence', nothing registered)."))
    seed: int = Field(0, description="Seed of the bootstrap resampling (verdicts are reproducible).")


class ParityTolerance(_Strict):
    max_abs: float | None = Field(None, gt=0, description="Largest allowed |Δ| of any output value.")
    top1_agreement: float | None = Field(None, ge=0, le=1, description="Smallest allowed top-1 agreement.")


class Objective(_Strict):
    metric: str = "latency_p50_ms"
    goal: Literal["minimize", "maximize"] = "minimize"


class Policy(_Strict):
    """A gate policy: which candidates may become challenger, and which of them is best."""

    objective: Objective = Field(default_factory=Objective, description="How to rank passing candidates.")
    when_no_champion: Literal["source", "skip", "fail"] = Field(
        "source", description="Without a champion, compare relative clauses with the source model, skip "
        "them, or fail them."
    )
    clauses: list[ClauseSpec] = Field(default_factory=list, description=(
        "Thresholds every candidate must meet: 'metric OP threshold', or {clause, alpha, tolerance}."))
    evidence: Evidence = Field(default_factory=Evidence, description="How sure a verdict must be.")
    parity: dict[str, ParityTolerance] = Field(default_factory=dict, description="Tolerances per precision.")

    @field_validator("clauses", mode="before")
    @classmethod
    def _mapping_form(cls, clauses: Any) -> Any:
        """A plain string is the clause with the policy's evidence settings."""
        if isinstance(clauses, list):
            return [{"clause": c} if isinstance(c, str) else c for c in clauses]
        return clauses

    def specs(self) -> list[ClauseSpec]:
        return list(self.clauses)

    def parsed(self) -> list[Clause]:
        return [Clause.parse(s.clause) for s in self.specs()]

    def alpha_for(self, spec: ClauseSpec, metric: str) -> float:
        if spec.alpha is not None:
            return spec.alpha
        return self.evidence.latency_alpha if metric in LATENCY_METRICS else self.evidence.alpha

    def tolerance_for(self, spec: ClauseSpec) -> float:
        return self.evidence.latency_tolerance if spec.tolerance is None else spec.tolerance

    def check_metrics(self, task: TaskType) -> None:
        """Refuse clauses or objectives on metrics the task never produces."""
        known = TASK_METRICS[task]
        used = [c.metric for c in self.parsed()] + [self.objective.metric]
        unknown = sorted({m for m in used if m not in known})
        if unknown:
            raise ConfigError(f"policy uses unknown metric(s) {unknown} for {task}; known: {sorted(known)}")

    def tolerance(self, precision: str) -> ParityTolerance:
        return self.parity.get(precision) or self.parity.get("default") or ParityTolerance()


def load_policy(path: Path | None, task: TaskType) -> Policy:
    """Read and validate a policy file (default: the task's preset); errors name the file and the fix."""
    path = path or PRESETS / f"policy-{task}.yaml"
    if not Path(path).is_file():
        raise ConfigError(f"policy file {path} does not exist; pass an existing YAML file to --policy")
    raw: Any = read_yaml(Path(path), f"policy file {path}")
    if not isinstance(raw, dict):
        raise ConfigError(f"policy file {path} must be a mapping with 'clauses', 'objective', 'parity'")
    try:
        policy = Policy.model_validate(raw)
    except ValidationError as exc:
        problems = validation_problems(exc, model=Policy)
        raise ConfigError(f"policy file {path} is invalid: {problems}") from exc
    try:
        policy.check_metrics(task)
    except ConfigError as exc:
        raise ConfigError(f"policy file {path}: {exc}") from None
    return policy


def rank(policy: Policy, candidates: dict[str, dict[str, float]]) -> list[str]:
    """Names of ``candidates`` ordered best first by the policy's objective."""
    sign = 1 if policy.objective.goal == "minimize" else -1
    return sorted(candidates, key=lambda name: sign * candidates[name].get(policy.objective.metric, float("inf")))


def pareto_front(candidates: dict[str, dict[str, float]], axes: tuple[str, ...] = ("accuracy", "latency_p50_ms",
                 "size_mb")) -> list[str]:
    """Candidates no other candidate beats on every axis (direction per metric)."""
    def better_or_equal(a: dict[str, float], b: dict[str, float], m: str) -> bool:
        return a[m] >= b[m] if m in HIGHER_IS_BETTER else a[m] <= b[m]

    names = [n for n in candidates if all(m in candidates[n] for m in axes)]
    front = []
    for n in names:
        dominated = any(
            all(better_or_equal(candidates[o], candidates[n], m) for m in axes)
            and any(candidates[o][m] != candidates[n][m] for m in axes)
            for o in names if o != n
        )
        if not dominated:
            front.append(n)
    return front
