"""Argo Rollouts' canary steps as a Kiln rollout spec: a spec file may hold ``strategy: canary: steps:``.

    Argo Rollouts (strategy.canary.steps)          Kiln (RolloutSpec.steps)
    setWeight: W                                   a step at weight W (it ends at the next setWeight)
    pause: {duration: D}                           that step analyses for D (several pauses add up)
    analysis: {templates: [...]}                   that step is analysed (for the default 60 s if no pause says)
    pause: {}  (no duration: until promoted)       that step is analysed; the next has ``manual_gate: true``
    setMirrorRoute: {name, percentage: P, match}   shadow P/100 from here on (only a name: mirroring stops)
    setCanaryScale                                 ignored: Kiln's model servers are not scaled per step

A setWeight with neither a pause nor an analysis after it is passed through at once, as Argo does, so it
becomes no Kiln step. After the last step Argo sends all traffic to the new version, and Kiln promotes: the
same end. What Kiln cannot do (``experiment``, ``setHeaderRoute``, ``plugin``) is an error naming the step.
Kiln's own keys (``metrics``, ``failure_limit``, ``min_samples``, ``drift``, ...) sit beside ``strategy``;
a whole Argo ``Rollout`` object is read through its ``spec``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from kiln.errors import ConfigError, validation_problems
from kiln.tasks.rollout.judge import RolloutSpec, Step

UNSUPPORTED = {"experiment": "Kiln runs no experiments beside a rollout",
               "setHeaderRoute": "Kiln's routers split by weight, not by header",
               "plugin": "Kiln runs no Argo step plugins"}
KNOWN = {"setWeight", "pause", "analysis", "setMirrorRoute", "setCanaryScale", *UNSUPPORTED}
DEFAULT_ANALYSIS_S = Step.model_fields["analysis_s"].default  # an analysis step whose length no pause gives
# Go's time.ParseDuration units, which Argo's pause.duration takes (a bare number means seconds).
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def duration_s(value: Any, where: str) -> float:
    """Seconds of an Argo ``pause.duration``: an integer (seconds), ``"30"``, or a Go duration like ``"1h30m"``."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f"{where}: duration {value!r} must be seconds or a duration like 30s, 5m, 1h")
    text = str(value).strip()
    if re.fullmatch(r"\d+", text):
        return float(text)
    parts = _PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ConfigError(f"{where}: duration {value!r} must be seconds or a duration like 30s, 5m, 1h")
    return sum(float(n) * _UNITS[u] for n, u in parts)


@dataclass
class _Segment:
    """The traffic between two changes of it, and how long it is analysed."""

    weight: float
    shadow: float
    gate: bool = False
    seconds: float = 0.0
    analysed: bool = False

    def step(self) -> Step | None:
        if not self.seconds and not self.analysed:
            return None  # passed through at once, as Argo does
        return Step(weight=self.weight, shadow=self.shadow, analysis_s=self.seconds or DEFAULT_ANALYSIS_S,
                    manual_gate=self.gate)


def _canary_steps(raw: dict[str, Any], where: str) -> list[Any]:
    body = raw.get("spec") if raw.get("kind") == "Rollout" else raw
    strategy = body.get("strategy") if isinstance(body, dict) else None
    canary = strategy.get("canary") if isinstance(strategy, dict) else None
    steps = canary.get("steps") if isinstance(canary, dict) else None
    if not isinstance(steps, list) or not steps:
        raise ConfigError(f"{where}: strategy.canary.steps must be a non-empty list of Argo Rollouts steps "
                          "(setWeight, pause, analysis, setMirrorRoute)")
    return steps


def _mirror(value: Any, where: str) -> float:
    if not isinstance(value, dict) or not value.get("name"):
        raise ConfigError(f"{where}: setMirrorRoute needs a name (and match and percentage to mirror)")
    if not value.get("match"):
        return 0.0  # Argo: a setMirrorRoute with only its name removes the mirror route
    percentage = value.get("percentage", 100)  # unset: the mirror copies every matched request
    if isinstance(percentage, bool) or not isinstance(percentage, int | float) or not 0 <= percentage <= 100:
        raise ConfigError(f"{where}: setMirrorRoute.percentage {percentage!r} must be 0-100")
    return percentage / 100


def to_steps(argo_steps: list[Any], where: str = "strategy.canary.steps") -> list[Step]:
    """Kiln steps from Argo Rollouts' ``strategy.canary.steps`` (see the module docstring for the mapping)."""
    segments: list[_Segment] = []
    current = _Segment(0.0, 0.0)
    gate = False
    for i, item in enumerate(argo_steps):
        here = f"{where}[{i}]"
        if not isinstance(item, dict) or len(item) != 1:
            raise ConfigError(f"{here}: each step is a mapping with one key (setWeight, pause, analysis, ...)")
        (kind, value), = item.items()
        if kind not in KNOWN:
            raise ConfigError(f"{here}: unknown step {kind!r}; Argo's canary steps are {', '.join(sorted(KNOWN))}")
        if kind in UNSUPPORTED:
            raise ConfigError(f"{here}: {kind} has no Kiln equivalent ({UNSUPPORTED[kind]}); remove the step")
        if kind == "setWeight":
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 100:
                raise ConfigError(f"{here}: setWeight {value!r} must be a percentage, 0-100")
            segments.append(current)
            current = _Segment(float(value), current.shadow, gate=gate)
            gate = False
        elif kind == "setMirrorRoute":
            segments.append(current)
            current = _Segment(current.weight, _mirror(value, here), gate=gate)
            gate = False
        elif kind == "pause":
            if not isinstance(value, dict):
                raise ConfigError(f"{here}: pause must be a mapping ({{}} or {{duration: 5m}})")
            if value.get("duration") is None:
                # Argo holds this traffic until a person promotes: Kiln judges it (so it is a step) and gates the next
                gate = current.analysed = True
            else:
                current.seconds += duration_s(value["duration"], f"{here}.pause")
        elif kind == "analysis":
            current.analysed = True
    segments.append(current)
    steps, carried = [], False  # a gate before a step that is passed through waits before the next one
    for segment in segments:
        segment.gate = segment.gate or carried
        # Before any traffic reaches the canary there is nothing to measure (Argo's pre-checks): no step.
        silent = segment.weight == 0 and segment.shadow == 0
        try:
            step = None if silent else segment.step()
        except ValidationError as exc:
            raise ConfigError(f"{where}: {validation_problems(exc, 'step', model=Step)}") from exc
        carried = step is None and segment.gate
        if step is not None:
            steps.append(step)
    if not steps:
        raise ConfigError(f"{where}: no step sends the canary traffic and waits (a pause with a duration, or an "
                          "analysis, after a setWeight > 0 or a setMirrorRoute)")
    return steps


def from_argo(raw: dict[str, Any], where: str = "rollout spec") -> RolloutSpec:
    """A :class:`RolloutSpec` from a mapping holding Argo's ``strategy: canary: steps:`` (or a whole ``Rollout``)
    beside Kiln's own keys (``metrics``, ``failure_limit``, ...); errors name the step and the fix."""
    steps = to_steps(_canary_steps(raw, where), f"{where}: strategy.canary.steps")
    kiln_keys = {k: v for k, v in raw.items() if k not in {"strategy", "apiVersion", "kind", "metadata", "spec"}}
    if "steps" in kiln_keys:
        raise ConfigError(f"{where} has both 'steps' and 'strategy.canary.steps'; keep one")
    try:
        return RolloutSpec.model_validate(kiln_keys | {"steps": [s.model_dump() for s in steps]})
    except ValidationError as exc:
        raise ConfigError(f"{where} is invalid: {validation_problems(exc, 'spec', model=RolloutSpec)}") from exc
