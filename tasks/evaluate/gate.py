"""The promotion gate: a policy file of thresholds, judged by a pure function with every reason spelled out.

A policy (YAML)::

    objective: {metric: latency_p50_ms, goal: minimize}
    when_no_champion: source        # compare relative clauses with the source model | skip | fail
    clauses:
      - accuracy >= champion - 0.01
      - latency_p95_ms <= champion * 0.8
      - size_mb <= 25
    parity:                         # per precision; checked before the clauses
      fp32: {max_abs: 0.001, top1_agreement: 0.999}
      default: {top1_agreement: 0.97}
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kiln.errors import ConfigError, validation_problems
from kiln.tasks.core.stages import TaskType
from kiln.tasks.presets import PRESETS
from kiln.yamlfile import parse_yaml

COMMON_METRICS = {
    "latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "batch_latency_p50_ms", "batch_latency_p95_ms",
    "throughput_per_s", "size_mb", "peak_memory_mb", "parity_max_abs", "parity_mean_abs",
    "parity_top1_agreement",
}
TASK_METRICS: dict[str, set[str]] = {
    "sequence-classification": COMMON_METRICS | {"accuracy", "macro_f1"},
    "causal-lm": COMMON_METRICS | {"perplexity", "next_token_agreement"},
}
HIGHER_IS_BETTER = {"accuracy", "macro_f1", "next_token_agreement", "throughput_per_s", "parity_top1_agreement"}
_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}
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
    model_config = ConfigDict(extra="forbid")  # `clause:` for `clauses:` is an error, not a policy that passes all


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
    clauses: list[str] = Field(default_factory=list, description="Thresholds every candidate must meet.")
    parity: dict[str, ParityTolerance] = Field(default_factory=dict, description="Tolerances per precision.")

    @field_validator("clauses")
    @classmethod
    def _parse(cls, clauses: list[str]) -> list[str]:
        for text in clauses:
            Clause.parse(text)
        return clauses

    def parsed(self) -> list[Clause]:
        return [Clause.parse(t) for t in self.clauses]

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
    raw: Any = parse_yaml(Path(path).read_text(), f"policy file {path}")
    if not isinstance(raw, dict):
        raise ConfigError(f"policy file {path} must be a mapping with 'clauses', 'objective', 'parity'")
    try:
        policy = Policy.model_validate(raw)
    except ValidationError as exc:
        problems = validation_problems(exc, model=Policy)
        raise ConfigError(f"policy file {path} is invalid: {problems}") from exc
    policy.check_metrics(task)
    return policy


@dataclass
class ClauseResult:
    clause: str
    passed: bool
    observed: float | None
    threshold: float | None
    reason: str


@dataclass
class GateDecision:
    """The verdict on one candidate, with one line per clause."""

    passed: bool
    results: list[ClauseResult] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        return [r.reason for r in self.results if not r.passed]

    def summary(self) -> str:
        return "passed" if self.passed else "failed: " + "; ".join(self.failures)


def judge(policy: Policy, metrics: dict[str, float], champion: dict[str, float] | None, precision: str,
          *, baseline_name: str = "champion") -> GateDecision:
    """Judge one candidate's ``metrics`` against the policy and the ``champion``'s metrics (or None)."""
    results = _parity_results(policy.tolerance(precision), metrics)
    for clause in policy.parsed():
        results.append(_judge_clause(clause, metrics, champion, policy.when_no_champion, baseline_name))
    return GateDecision(all(r.passed for r in results), results)


def _parity_results(tol: ParityTolerance, metrics: dict[str, float]) -> list[ClauseResult]:
    out = []
    if tol.max_abs is not None:
        got = metrics.get("parity_max_abs")
        ok = got is not None and got <= tol.max_abs
        out.append(ClauseResult(f"parity_max_abs <= {tol.max_abs:g}", ok, got, tol.max_abs,
                                f"parity_max_abs {_fmt(got)} <= {tol.max_abs:g}: {_verdict(ok)}"))
    if tol.top1_agreement is not None:
        got = metrics.get("parity_top1_agreement")
        ok = got is not None and got >= tol.top1_agreement
        out.append(ClauseResult(f"parity_top1_agreement >= {tol.top1_agreement:g}", ok, got,
                                tol.top1_agreement,
                                f"parity_top1_agreement {_fmt(got)} >= {tol.top1_agreement:g}: {_verdict(ok)}"))
    return out


def _judge_clause(clause: Clause, metrics: dict[str, float], champion: dict[str, float] | None,
                  when_no_champion: str, baseline_name: str) -> ClauseResult:
    observed = metrics.get(clause.metric)
    if observed is None:
        return ClauseResult(clause.text, False, None, None, f"{clause.text}: metric {clause.metric} not measured")
    threshold = clause.threshold(champion)
    if threshold is None:  # relative clause and nothing to compare with
        passed = when_no_champion == "skip"
        verdict = "skipped" if passed else "failed"
        return ClauseResult(clause.text, passed, observed, None,
                            f"{clause.text}: {verdict}, no champion to compare with")
    passed = _OPS[clause.op](observed, threshold)
    base = f" ({baseline_name} {_fmt(champion[clause.metric])})" if clause.relative and champion else ""
    return ClauseResult(clause.text, passed, observed, threshold,
                        f"{clause.metric} {_fmt(observed)} {clause.op} {_fmt(threshold)}{base}: "
                        f"{_verdict(passed)} [{clause.text}]")


def _verdict(passed: bool) -> str:
    return "ok" if passed else "FAILED"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


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
