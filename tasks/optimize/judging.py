"""Judging candidates on evidence: timed together, gated with intervals, and given more rows when undecided.

Latency is measured for every model of a run at once — the source, the champion and each candidate — in
interleaved rounds in one process (:func:`kiln.tasks.evaluate.latency.measure_interleaved`), so a slow
moment of the machine slows all of them in the same round and the gate's round-paired ratios cancel it.
Quality evidence (per-row outcomes) comes from the cached evaluations on the same rows.

When a candidate that could win is inconclusive (its interval straddles a threshold), the policy decides:
``more-rows`` evaluates every model again on a larger seeded sample of the test split while it has more rows
than were used; ``refuse`` (or no more rows) leaves it undecided, and if nothing passed the run stops with
"not enough evidence".
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kiln.tasks.core.cache import StageCache, code_version, make_key
from kiln.tasks.engines import EngineOptions
from kiln.tasks.evaluate import cost, latency, paired
from kiln.tasks.evaluate.benchmark import BenchConfig
from kiln.tasks.evaluate.evidence import LEVEL, Interval, LatencySamples
from kiln.tasks.evaluate.gate import judge
from kiln.tasks.evaluate.policy import Policy, rank
from kiln.tasks.optimize.candidates import Evaluated

log = logging.getLogger(__name__)


def time_together(models: Sequence[Evaluated], texts: Sequence[str], options: EngineOptions,
                  bench: BenchConfig, cache: StageCache | None = None) -> dict[str, float]:
    """Time ``models`` in interleaved rounds; attach samples and latency metrics to each. Returns each model's
    machine noise: the coefficient of variation of its per-round median latency at batch 1.

    With a ``cache``, the same set of models timed the same way reuses its samples: re-running the same work
    reaches the same verdicts and the same ranking (so it finds the version it registered before), instead of
    letting two equally fast candidates swap places on noise. ``kiln bench`` passes none: it always times.
    """
    unique = {m.name: m for m in models}

    def measure(workdir: Path | None = None) -> dict[str, LatencySamples]:
        samples = latency.measure_interleaved({n: m.folder for n, m in unique.items()}, texts, options, bench)
        if workdir is not None:
            np.savez(workdir / "latency.npz", **{f"{i}.{part}": getattr(samples[n], part)
                                                 for i, n in enumerate(unique) for part in ("single", "batch")})
        return samples

    if cache is None:
        samples = measure()
    else:
        key = make_key("latency", [(n, m.key) for n, m in unique.items()], list(texts), options.model_dump(),
                       bench.model_dump(exclude={"cost"}), code_version(latency))
        def run(workdir: Path) -> dict[str, list[str]]:
            measure(workdir)
            return {"models": list(unique)}

        _, cached = cache.run(key, run)
        if cached:
            log.info("latency samples of %s reused from cache (the same models timed the same way)",
                     ", ".join(unique))
        with np.load(cache.folder(key) / "latency.npz") as saved:
            samples = {n: LatencySamples(saved[f"{i}.single"], saved[f"{i}.batch"], bench.batch_sizes[1])
                       for i, n in enumerate(unique)}
    for model in models:
        model.latency = samples[model.name]
        model.metrics = model.metrics | latency.latency_metrics(model.latency)
        # A cascade's batch-1 latency is bimodal (answered small, or escalated): its mean is what it saves.
        model.metrics["latency_mean_ms"] = float(np.mean(model.latency.single))
        model.metrics |= cost.cost_metrics(model.metrics, bench.batch_sizes, bench.cost)
    return {name: latency.noise_cv(s) for name, s in samples.items()}


def gate_all(policy: Policy, candidates: Sequence[Evaluated], baseline: Evaluated | None,
             baseline_name: str) -> None:
    """Attach a gate decision to every candidate."""
    for cand in candidates:
        cand.decision = judge(policy, cand.measured(), baseline.measured() if baseline else None, cand.precision,
                              baseline_name=baseline_name)
        log.info("gate %s: %s", cand.name, cand.decision.summary())


def undecided_contenders(policy: Policy, candidates: Sequence[Evaluated]) -> list[str]:
    """Inconclusive candidates that would outrank every passing one: the ones more rows could change the
    outcome for (an inconclusive candidate behind a passing winner would not be chosen anyway)."""
    passing = {c.name: c.metrics for c in candidates if c.decision and c.decision.passed}
    undecided = {c.name: c.metrics for c in candidates if c.decision and c.decision.status == "inconclusive"}
    if not undecided:
        return []
    if not passing:
        return sorted(undecided)
    order = rank(policy, passing | undecided)
    best_passing = min(order.index(n) for n in passing)
    return [n for n in order[:best_passing] if n in undecided]


def next_row_count(current: int, available: int) -> int | None:
    """How many rows the next round of evaluation uses (four times as many, at most all), or None when all
    were already used."""
    if current >= available:
        return None
    return min(available, current * 4)


def intervals(model: Evaluated, *, level: float = LEVEL, resamples: int = 2000, seed: int = 0
              ) -> dict[str, Interval]:
    """The interval shown beside each of the model's numbers: quality from its rows, speed from its rounds,
    exact values (size, memory) with no width."""
    out: dict[str, Interval] = {}
    for metric in model.metrics:
        got: Interval | None = None
        if model.rows is not None and metric in paired.QUALITY_METRICS:
            got = paired.metric_interval(metric, model.rows, labels=model.labels, level=level,
                                         resamples=resamples, seed=seed)
        elif model.latency is not None and metric in latency.LATENCY_METRICS:
            got = latency.metric_interval(metric, model.latency, level=level, resamples=resamples, seed=seed)
        if got is not None:
            out[metric] = got
    return out


def deltas(model: Evaluated, baseline: Evaluated, *, level: float = LEVEL, resamples: int = 2000, seed: int = 0
           ) -> dict[str, dict]:
    """Paired differences (quality) and ratios (speed) of ``model`` to ``baseline``, for display."""
    out: dict[str, dict] = {}
    if model.rows is not None and baseline.rows is not None and model.rows.rows == baseline.rows.rows:
        for metric in paired.QUALITY_METRICS:
            if metric in model.metrics and metric in baseline.metrics:
                comp = paired.paired_comparison(metric, model.rows, baseline.rows, labels=model.labels,
                                                level=level, resamples=resamples, seed=seed)
                if comp is not None:
                    out[metric] = {"difference": comp.difference.to_dict(), "ratio": comp.ratio.to_dict(),
                                   "method": comp.method}
    if model.latency is not None and baseline.latency is not None and \
            model.latency.rounds == baseline.latency.rounds:
        for metric in latency.LATENCY_METRICS:
            ratio = latency.ratio_interval(metric, model.latency, baseline.latency, level=level,
                                           resamples=resamples, seed=seed)
            out[metric] = {"ratio": ratio.to_dict(), "method": "interleaved rounds, round-paired bootstrap"}
    return out
