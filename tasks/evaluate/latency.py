"""Latency evidence: models timed side by side in interleaved rounds, and intervals on their quantiles and ratios.

Two medians of identical engines timed one after the other differ by the machine's drift (frequency scaling,
another process, a warm or cold cache), so a gate that compares them flips on noise. Here every model is
opened in this one process (same threads, same inputs padded to its sequence length), warmed up, and timed in
``rounds``: in each round every model runs a block of calls at batch 1 and a block at batch N, in an order
that changes from round to round (:func:`round_order`). A slow moment of the machine then lands in the same
round for every model, which is why intervals resample whole rounds (a cluster bootstrap) and why a ratio
draws the same rounds for both models (paired): the shared drift cancels in the ratio instead of widening it.
"""

from __future__ import annotations

import gc
import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy.stats import norm
from scipy.stats import t as t_dist
from tqdm.auto import tqdm

from kiln.tasks.engines import EngineOptions
from kiln.tasks.evaluate.benchmark import BenchConfig
from kiln.tasks.evaluate.evidence import LEVEL, Interval, LatencySamples
from kiln.tasks.models.predictor import Predictor

# metric -> (which samples, quantile). Throughput is the batch size over the batch median: higher is better.
LATENCY_METRICS: dict[str, tuple[str, float]] = {
    "latency_p50_ms": ("single", 0.50),
    "latency_p95_ms": ("single", 0.95),
    "latency_p99_ms": ("single", 0.99),
    "batch_latency_p50_ms": ("batch", 0.50),
    "batch_latency_p95_ms": ("batch", 0.95),
    "throughput_per_s": ("batch", 0.50),
}
HIGHER_IS_BETTER = frozenset({"throughput_per_s"})
MAX_CALLS = 500  # per block: past this a block of a very fast model only adds bootstrap cost, not information
_ESTIMATE_CALLS = 3  # timed calls after warm-up that size the blocks
_CHUNK = 256  # resamples per matrix product: bounds memory at ~calls × rounds × 256 floats


def round_order(names: Sequence[str], r: int) -> list[str]:
    """The order in which the models run in round ``r``.

    Rounds come in pairs: round ``2k`` runs the names rotated by ``k``, round ``2k + 1`` the same rotation
    reversed. Over ``2 × len(names)`` rounds every model runs first twice and follows each of its two
    neighbours equally often. (Rotating by ``r`` itself would, with an even number of models, make the reversed
    odd rounds repeat the even ones: with two models the same one would always run first.)
    """
    if not names:
        return []
    k = (r // 2) % len(names)
    order = list(names[k:]) + list(names[:k])
    return order[::-1] if r % 2 else order


def calls_per_block(seconds_per_call: float, config: BenchConfig) -> int:
    """Calls in one block so that ``rounds`` blocks take about ``max_seconds``: at least
    ``ceil(min_runs / rounds)`` and 2 (a round needs a spread), at most :data:`MAX_CALLS`."""
    floor = max(2, math.ceil(config.min_runs / config.rounds))
    target = config.max_seconds / config.rounds / max(seconds_per_call, 1e-9)
    return max(floor, min(MAX_CALLS, round(target)))


def measure_interleaved(folders: Mapping[str, Path], texts: Sequence[str], options: EngineOptions,
                        config: BenchConfig) -> dict[str, LatencySamples]:
    """Time every package in ``folders`` in interleaved rounds (see the module docstring).

    Args:
        folders: model name -> package folder; every package is opened here, all at once.
        texts: evaluation texts; the first ``batch_sizes[1]`` (repeated if fewer) are the inputs.
        options: how every engine is opened (threads, backend), the same for all.
        config: warm-up calls, rounds, timed seconds per model and batch size, batch sizes.

    Returns:
        name -> milliseconds per call shaped ``(rounds, calls per block)``; every model has the same rounds.
    """
    if not folders:
        raise ValueError("no models to time")
    if not texts:
        raise ValueError("no texts to time the models with")
    small, large = config.batch_sizes
    runners = {name: _runners(Predictor(folder, options), texts, small, large) for name, folder in folders.items()}
    calls: dict[str, dict[str, int]] = {}
    for name, pair in runners.items():
        calls[name] = {}
        for which, fn in pair.items():
            for _ in range(config.warmup):
                fn()
            estimate = float(np.median(_timed(fn, _ESTIMATE_CALLS))) / 1e3
            calls[name][which] = calls_per_block(estimate, config)
    times = {name: {which: np.empty((config.rounds, n)) for which, n in per.items()} for name, per in calls.items()}
    names = list(folders)
    for r in tqdm(range(config.rounds), desc="latency", unit="round", leave=False):
        for which in ("single", "batch"):
            for name in round_order(names, r):
                times[name][which][r] = _timed(runners[name][which], calls[name][which])
    return {name: LatencySamples(t["single"], t["batch"], large) for name, t in times.items()}


def _runners(predictor: Predictor, texts: Sequence[str], small: int, large: int) -> dict[str, Callable[[], object]]:
    seq = predictor.meta.seq_len
    pool = list(texts) * (1 + large // len(texts))
    ids1, mask1 = predictor.encode(pool[:small], pad_to=seq)
    idsN, maskN = predictor.encode(pool[:large], pad_to=seq)
    if getattr(predictor, "is_cascade", False):  # its work depends on the text (escalated or not): cycle the texts
        inputs = itertools.cycle([predictor.encode(pool[i:i + small], pad_to=seq) for i in range(0, len(texts), small)])
        return {"single": lambda: predictor.run(*next(inputs)), "batch": lambda: predictor.run(idsN, maskN)}
    return {"single": lambda: predictor.run(ids1, mask1), "batch": lambda: predictor.run(idsN, maskN)}


def _timed(fn: Callable[[], object], calls: int) -> np.ndarray:
    """Milliseconds of ``calls`` back-to-back calls, with the garbage collector held off (as ``timeit`` does)."""
    out = np.empty(calls)
    enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(calls):
            t0 = time.perf_counter()
            fn()
            out[i] = (time.perf_counter() - t0) * 1e3
    finally:
        if enabled:
            gc.enable()
    return out


def latency_metrics(samples: LatencySamples) -> dict[str, float]:
    """p50/p95/p99 at batch 1, p50/p95 and samples/s at the batch size, all over the pooled calls of every round."""
    return {metric: float(_value(metric, samples, _pooled_quantile(_array(samples, metric), metric)))
            for metric in LATENCY_METRICS}


def metric_interval(metric: str, samples: LatencySamples, *, level: float = LEVEL, resamples: int = 2000,
                    seed: int = 0) -> Interval:
    """The metric with its percentile-bootstrap interval: whole rounds resampled with replacement, their calls
    pooled, the quantile taken (calls within a round are not independent; rounds are)."""
    x = _array(samples, metric)
    counts = _round_counts(x.shape[0], resamples, seed)
    boot = _value(metric, samples, _bootstrap_quantile(x, counts, LATENCY_METRICS[metric][1]))
    return _interval(_value(metric, samples, _pooled_quantile(x, metric)), boot, level, x.shape[0])


def ratio_interval(metric: str, candidate: LatencySamples, baseline: LatencySamples, *, level: float = LEVEL,
                   resamples: int = 2000, seed: int = 0) -> Interval:
    """Candidate / baseline of the metric (throughput: candidate / baseline throughput), with a paired
    interval: each resample draws round indices once and uses them for both models, since round ``r`` of
    both ran together."""
    cand, base = _array(candidate, metric), _array(baseline, metric)
    if cand.shape[0] != base.shape[0]:
        raise ValueError(f"cannot pair latency samples with {candidate.rounds} and {baseline.rounds} rounds: "
                         "time the candidate and baseline together in one interleaved measurement")
    counts = _round_counts(cand.shape[0], resamples, seed)
    q = LATENCY_METRICS[metric][1]
    point = (_value(metric, candidate, _pooled_quantile(cand, metric))
             / _value(metric, baseline, _pooled_quantile(base, metric)))
    boot = (_value(metric, candidate, _bootstrap_quantile(cand, counts, q))
            / _value(metric, baseline, _bootstrap_quantile(base, counts, q)))
    return _interval(float(point), boot, level, cand.shape[0])


def noise_cv(samples: LatencySamples, which: str = "single") -> float:
    """Coefficient of variation (sample std / mean) of the per-round medians: the machine's round-to-round noise.

    Identical work repeated round after round should take the same time; what varies is the machine. A ratio
    between models much smaller than this noise is within what the machine does by itself.
    """
    x = _which(samples, which)
    if x.shape[0] < 2:
        raise ValueError("noise needs at least 2 rounds")
    medians = np.median(x, axis=1)
    return float(np.std(medians, ddof=1) / np.mean(medians))


def _which(samples: LatencySamples, which: str) -> np.ndarray:
    if which not in ("single", "batch"):
        raise ValueError(f"which must be 'single' or 'batch', not {which!r}")
    return np.asarray(samples.single if which == "single" else samples.batch, dtype=float)


def _array(samples: LatencySamples, metric: str) -> np.ndarray:
    if metric not in LATENCY_METRICS:
        raise ValueError(f"{metric!r} is not a latency metric; one of {', '.join(LATENCY_METRICS)}")
    x = _which(samples, LATENCY_METRICS[metric][0])
    if x.ndim != 2 or x.size == 0:
        raise ValueError(f"latency samples must be shaped (rounds, calls), not {x.shape}")
    return x


def _pooled_quantile(x: np.ndarray, metric: str) -> float:
    return float(np.percentile(x, 100 * LATENCY_METRICS[metric][1]))


def _value(metric: str, samples: LatencySamples, quantile_ms: float | np.ndarray) -> float | np.ndarray:
    """The metric from its quantile in milliseconds: the quantile itself, or samples per second."""
    return samples.batch_size * 1e3 / quantile_ms if metric == "throughput_per_s" else quantile_ms


def _interval(point: float, boot: np.ndarray, level: float, rounds: int) -> Interval:
    """The percentile-bootstrap interval, widened for the few rounds it resamples.

    Resampling ``R`` rounds underestimates the variance by ``(R - 1) / R`` and uses normal rather than
    Student-t tails; with 12 rounds the plain interval missed an A/A ratio of 1 about twice as often as its
    level says. So its distance from the point is stretched, on the log scale (times are positive and
    ratios multiplicative), by ``sqrt(R / (R - 1)) × t(R - 1) / z`` (1.17 for 12 rounds).
    """
    tail = (1 - level) / 2
    low, high = np.quantile(boot, [tail, 1 - tail])
    stretch = math.sqrt(rounds / (rounds - 1)) * float(t_dist.ppf(1 - tail, rounds - 1) / norm.ppf(1 - tail))
    if point > 0 and low > 0 and high > 0:
        low, high = point * (low / point) ** stretch, point * (high / point) ** stretch
    return Interval(float(point), float(low), float(high), level)


def _round_counts(rounds: int, resamples: int, seed: int) -> np.ndarray:
    """How often each round is drawn in each resample, ``(resamples, rounds)``; the same for every model."""
    idx = np.random.default_rng(seed).integers(0, rounds, size=(resamples, rounds))
    counts = np.zeros((resamples, rounds))
    np.add.at(counts, (np.arange(resamples)[:, None], idx), 1)
    return counts


def _bootstrap_quantile(x: np.ndarray, counts: np.ndarray, q: float) -> np.ndarray:
    """The ``q`` quantile (numpy's linear interpolation) of the pooled calls of every resample, without
    building the resampled arrays: a resample holds round ``r`` ``counts[b, r]`` times, so the number of its
    values at or below each pooled value ``v`` is ``counts[b] @ (values of each round <= v)``; the order
    statistics the quantile needs are where that count first passes their rank."""
    rounds, calls = x.shape
    values = np.sort(x, axis=None)
    per_round = np.sort(x, axis=1)
    at_or_below = np.stack([np.searchsorted(per_round[r], values, side="right") for r in range(rounds)],
                           axis=1).astype(float)  # (n, rounds); exact in float64: counts are small integers
    n = rounds * calls  # every resample pools ``rounds`` whole rounds
    h = (n - 1) * q
    k = math.floor(h)
    frac = h - k
    out = np.empty(counts.shape[0])
    for start in range(0, counts.shape[0], _CHUNK):
        le = at_or_below @ counts[start:start + _CHUNK].T  # (n, chunk): values <= each pooled value
        lo = values[(le <= k).sum(axis=0)]
        hi = values[np.minimum((le <= k + 1).sum(axis=0), n - 1)]
        out[start:start + _CHUNK] = lo + frac * (hi - lo)
    return out
