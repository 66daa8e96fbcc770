"""Cost per request: what serving a candidate at a latency target costs, from its measured speed.

Each model is timed at two batch sizes (:mod:`kiln.tasks.evaluate.latency`): batch 1 (p95 ``latency_p95_ms``,
``1000 / latency_p50_ms`` rows/s) and batch N (p95 ``batch_latency_p95_ms``, ``throughput_per_s`` rows/s). A
request in a batch waits for the whole batch, so a batch size is usable only when its p95 meets the target.

- usable throughput per instance = the measured rows/s at the largest measured batch whose p95 ≤
  ``target_p95_ms`` (none meets it: not servable at that target → no cost, with the reason);
- instances = ceil(expected_rps / usable);
- cost_per_million = instances × instance_hour / (expected_rps × 3600) × 1e6.

The price is a currency-less number per instance-hour; the metric is what one million requests cost at the
expected load. It steps with whole instances: a model twice as fast costs half only once the load needs more
than one instance of it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from kiln.settings import Settings

SECONDS_PER_HOUR = 3600


class CostConfig(BaseModel):
    """The load a model must serve, how fast, and what an instance costs."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    target_p95_ms: float = Field(100.0, gt=0, description="Latency target: p95 per request in milliseconds.")
    # The default load needs several CPU instances of a small encoder, so that a speed-up shows in the cost.
    expected_rps: float = Field(1000.0, gt=0, description="Expected load in requests per second.")
    instance_hour: float = Field(1.0, gt=0, description="Price of one instance for one hour (no currency).")


def cost_config(settings: Settings) -> CostConfig:
    """The cost settings (``KILN_COST_*`` / kiln.yaml) as the bench config carries them."""
    return CostConfig(target_p95_ms=settings.cost_target_p95_ms, expected_rps=settings.cost_expected_rps,
                      instance_hour=settings.cost_instance_hour)


@dataclass(frozen=True)
class LoadPoint:
    """One measured operating point: rows per call, the p95 of a call, and rows per second."""

    batch: int
    p95_ms: float
    rows_per_s: float


@dataclass(frozen=True)
class Cost:
    """The estimate: ``cost_per_million`` is None when no measured batch meets the target (``reason`` says)."""

    usable_rows_per_s: float | None
    instances: int | None
    cost_per_million: float | None
    reason: str


def usable_throughput(points: Sequence[LoadPoint], target_p95_ms: float) -> LoadPoint | None:
    """The point at the largest batch whose p95 meets the target, or None when none does."""
    meeting = [p for p in points if p.p95_ms <= target_p95_ms and p.rows_per_s > 0]
    return max(meeting, key=lambda p: p.batch) if meeting else None


def instances_needed(expected_rps: float, usable_rows_per_s: float) -> int:
    """Whole instances that together serve ``expected_rps`` (at least one)."""
    if usable_rows_per_s <= 0:
        raise ValueError(f"usable throughput must be positive, not {usable_rows_per_s}")
    return max(1, math.ceil(expected_rps / usable_rows_per_s))


def cost_per_million(instances: int, instance_hour: float, expected_rps: float) -> float:
    """What one million requests cost when ``instances`` serve ``expected_rps`` around the clock."""
    return instances * instance_hour / (expected_rps * SECONDS_PER_HOUR) * 1e6


def estimate(points: Sequence[LoadPoint], config: CostConfig) -> Cost:
    """Instances and cost per million requests at the configured target and load (module docstring)."""
    best = usable_throughput(points, config.target_p95_ms)
    if best is None:
        measured = ", ".join(f"b{p.batch} p95 {p.p95_ms:.1f} ms" for p in points) or "nothing measured"
        return Cost(None, None, None, f"not servable at p95 ≤ {config.target_p95_ms:g} ms ({measured}); "
                                      "raise cost_target_p95_ms or choose a faster candidate")
    n = instances_needed(config.expected_rps, best.rows_per_s)
    cost = cost_per_million(n, config.instance_hour, config.expected_rps)
    return Cost(best.rows_per_s, n, cost, f"b{best.batch} at {best.rows_per_s:.0f} rows/s per instance "
                                          f"(p95 {best.p95_ms:.1f} ms): {n} instance(s) for "
                                          f"{config.expected_rps:g} req/s")


def load_points(metrics: Mapping[str, float], batch_sizes: tuple[int, int]) -> list[LoadPoint]:
    """The operating points a model's latency metrics describe (those present and finite)."""
    small, large = batch_sizes
    out = []
    p50, p95 = metrics.get("latency_p50_ms"), metrics.get("latency_p95_ms")
    if p50 and p95 and math.isfinite(p50) and math.isfinite(p95):
        out.append(LoadPoint(small, p95, small * 1e3 / p50))
    rate, bp95 = metrics.get("throughput_per_s"), metrics.get("batch_latency_p95_ms")
    if rate and bp95 and math.isfinite(rate) and math.isfinite(bp95):
        out.append(LoadPoint(large, bp95, rate))
    return out


def cost_metrics(metrics: Mapping[str, float], batch_sizes: tuple[int, int], config: CostConfig
                 ) -> dict[str, float]:
    """``cost_per_million`` and ``instances_needed`` to merge into a model's metrics; empty when it is not
    servable at the target (a gate clause on cost then fails as "not measured")."""
    got = estimate(load_points(metrics, batch_sizes), config)
    if got.cost_per_million is None or got.instances is None:
        return {}
    return {"cost_per_million": got.cost_per_million, "instances_needed": float(got.instances)}
