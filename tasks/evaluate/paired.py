"""Intervals of quality metrics, and paired comparisons of two models on the same evaluation rows.

Pure numpy/scipy statistics on :class:`~kiln.tasks.evaluate.evidence.RowEvidence`, deterministic for a given
``seed``. A single metric gets a Wilson score interval (accuracy) or a percentile bootstrap over rows (the
others). Two models that predicted the same rows are compared *paired*, which is far more sensitive than
comparing two independent intervals: most rows are answered alike by both, and only the rows where they
differ carry information about the difference. Accuracy is compared with McNemar's exact test (a binomial
on the discordant rows) and Newcombe's hybrid score interval for paired proportions; macro-F1, perplexity
and next-token agreement with a paired bootstrap that draws the same rows for both models in every resample.

The unit of resampling is a row, never a token: the tokens of one LM row are correlated, so treating them as
independent would make the intervals too narrow.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from kiln.tasks.evaluate.evidence import LEVEL, Interval, RowEvidence

QUALITY_METRICS = ("accuracy", "macro_f1", "perplexity", "next_token_agreement")

# Elements of one resample chunk's working arrays (row indices, gathered outcomes, per-resample confusion
# matrices): ~32 MB per int64/float64 array, so 2,000 resamples of 3,700 rows take two chunks.
_CHUNK_ELEMENTS = 4_000_000


def has_outcomes(metric: str, rows: RowEvidence) -> bool:
    """Whether ``rows`` hold what ``metric`` (one of :data:`QUALITY_METRICS`) is computed from (and any rows)."""
    needs = {"accuracy": ("predicted", "truth"), "macro_f1": ("predicted", "truth"),
             "perplexity": ("nll", "tokens"), "next_token_agreement": ("agree", "tokens")}.get(metric)
    return needs is not None and rows.rows > 0 and all(getattr(rows, name) is not None for name in needs)


def _statistic(metric: str, rows: RowEvidence, idx: np.ndarray, labels: int) -> np.ndarray:
    """``metric`` on each resample: ``idx`` is ``(resamples, n)`` row indices; returns ``(resamples,)``.

    The point estimate is the same function on the identity resample, so a metric and its bootstrap can
    never disagree on how the metric is defined.
    """
    if metric == "accuracy":
        return rows.correct[idx].mean(axis=1)
    if metric == "macro_f1":
        assert rows.predicted is not None and rows.truth is not None
        # One confusion matrix per resample, from a single bincount over (resample, truth, predicted) codes.
        k = labels
        code = rows.truth.astype(np.int64) * k + rows.predicted.astype(np.int64)
        offsets = (np.arange(idx.shape[0], dtype=np.int64) * k * k)[:, None]
        confusion = np.bincount((code[idx] + offsets).ravel(), minlength=idx.shape[0] * k * k)
        confusion = confusion.reshape(idx.shape[0], k, k).astype(np.float64)  # [resample, truth, predicted]
        tp = np.diagonal(confusion, axis1=1, axis2=2)
        fp = confusion.sum(axis=1) - tp
        fn = confusion.sum(axis=2) - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            f1 = np.where(tp == 0, 0.0, 2 * tp / (2 * tp + fp + fn))
        return f1.mean(axis=1)
    assert rows.tokens is not None
    count = np.maximum(rows.tokens[idx].sum(axis=1), 1)
    if metric == "perplexity":
        assert rows.nll is not None
        return np.exp(rows.nll[idx].sum(axis=1, dtype=np.float64) / count)
    assert rows.agree is not None
    return rows.agree[idx].sum(axis=1) / count


def metric_value(metric: str, rows: RowEvidence, labels: int) -> float:
    """The point estimate of ``metric`` (one of :data:`QUALITY_METRICS`) from per-row outcomes.

    Args:
        metric: accuracy, macro_f1 (needs ``predicted``/``truth``), perplexity (``nll``/``tokens``) or
            next_token_agreement (``agree``/``tokens``).
        rows: the model's per-row outcomes.
        labels: number of classes (macro-F1 averages over all of them, as the evaluation does).

    Raises:
        ValueError: the metric is unknown or ``rows`` lack the outcomes it is computed from.
    """
    if not has_outcomes(metric, rows):
        raise ValueError(f"cannot compute {metric!r} from these rows: known metrics are {', '.join(QUALITY_METRICS)}"
                         " and each needs its per-row outcomes (and at least one row)")
    return float(_statistic(metric, rows, np.arange(rows.rows)[None, :], labels)[0])


def _resamples(n: int, resamples: int, seed: int, labels: int) -> Iterator[np.ndarray]:
    """Bootstrap row indices, ``(chunk, n)`` at a time so that memory stays bounded for any ``resamples``."""
    rng = np.random.default_rng(seed)
    chunk = max(1, min(resamples, _CHUNK_ELEMENTS // (n + labels * labels)))
    for start in range(0, resamples, chunk):
        yield rng.integers(0, n, size=(min(chunk, resamples - start), n))


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2
    # Interpolating between two infinite ratios (x / 0) would give NaN: take the nearest draw then.
    method = "linear" if np.isfinite(values).all() else "nearest"
    low, high = np.quantile(values, [tail, 1 - tail], method=method)
    return float(low), float(high)


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"confidence level must lie strictly between 0 and 1, got {level}")


def wilson(successes: int, n: int, level: float = LEVEL) -> Interval:
    """Wilson score interval of a proportion: unlike the normal approximation it stays inside [0, 1] and keeps
    close to its nominal coverage for proportions near 0 or 1 and for small ``n``."""
    _check_level(level)
    p = successes / n
    z = float(stats.norm.ppf(0.5 + level / 2))
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return Interval(p, float(max(0.0, centre - half)), float(min(1.0, centre + half)), level)


def metric_interval(metric: str, rows: RowEvidence, *, labels: int, level: float = LEVEL, resamples: int = 2000,
                    seed: int = 0) -> Interval | None:
    """``metric`` with its confidence interval; None when ``rows`` lack its outcomes or it is not a quality metric.

    Accuracy: Wilson score interval. Macro-F1, perplexity, next-token agreement: percentile bootstrap over rows
    (``resamples`` draws, seeded by ``seed``).
    """
    if not has_outcomes(metric, rows):
        return None
    _check_level(level)
    if metric == "accuracy":
        return wilson(int(rows.correct.sum()), rows.rows, level)
    draws = np.concatenate([_statistic(metric, rows, idx, labels)
                            for idx in _resamples(rows.rows, resamples, seed, labels)])
    return Interval(metric_value(metric, rows, labels), *_percentiles(draws, level), level)


@dataclass(frozen=True)
class Paired:
    """A paired comparison of a candidate with a baseline on the same rows, for one metric.

    Attributes:
        metric: the compared metric.
        difference: candidate − baseline, in the metric's units, with its interval.
        ratio: candidate / baseline, with its interval.
        method: how the interval was computed, in words.
        p_value: accuracy only: exact two-sided McNemar p (binomial test on the discordant rows).
        discordant: accuracy only: (rows only the candidate gets right, rows only the baseline gets right).
    """

    metric: str
    difference: Interval
    ratio: Interval
    method: str
    p_value: float | None = None
    discordant: tuple[int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "difference": self.difference.to_dict(), "ratio": self.ratio.to_dict(),
                "method": self.method, "p_value": self.p_value,
                "discordant": list(self.discordant) if self.discordant is not None else None}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Paired:
        discordant = raw.get("discordant")
        return cls(raw["metric"], Interval.from_dict(raw["difference"]), Interval.from_dict(raw["ratio"]),
                   raw["method"], raw.get("p_value"),
                   (int(discordant[0]), int(discordant[1])) if discordant is not None else None)


def _ratio(candidate: np.ndarray | float, baseline: np.ndarray | float) -> np.ndarray:
    """candidate / baseline for non-negative metrics, without NaN: 0/0 is 1 (no change), x/0 is +inf."""
    candidate, baseline = np.asarray(candidate, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(baseline > 0, candidate / baseline, np.where(candidate == baseline, 1.0, np.inf))


def newcombe_paired(both: int, only_candidate: int, only_baseline: int, neither: int, level: float = LEVEL
                    ) -> Interval:
    """Interval of the difference of two paired proportions (candidate − baseline accuracy on the same rows):
    Newcombe (1998), method 10 — the two Wilson intervals combined with the rows' correlation."""
    a, b, c, d = both, only_candidate, only_baseline, neither
    n = a + b + c + d
    p1, p2 = (a + b) / n, (a + c) / n
    w1, w2 = wilson(a + b, n, level), wilson(a + c, n, level)
    denominator = (a + b) * (c + d) * (a + c) * (b + d)
    phi = 0.0 if denominator == 0 else (a * d - b * c) / np.sqrt(float(denominator))
    down = np.sqrt(max((p1 - w1.low) ** 2 - 2 * phi * (p1 - w1.low) * (w2.high - p2) + (w2.high - p2) ** 2, 0.0))
    up = np.sqrt(max((w1.high - p1) ** 2 - 2 * phi * (w1.high - p1) * (p2 - w2.low) + (p2 - w2.low) ** 2, 0.0))
    diff = p1 - p2
    return Interval(diff, float(max(-1.0, diff - down)), float(min(1.0, diff + up)), level)


def _paired_accuracy(candidate: RowEvidence, baseline: RowEvidence, level: float) -> Paired:
    cand, base = candidate.correct, baseline.correct
    b, c = int(np.sum(cand & ~base)), int(np.sum(~cand & base))
    d = b + c
    base_acc = float(base.mean())
    if d == 0:
        # Both models got exactly the same rows right: these rows give no evidence of any difference, so the
        # interval is the point [0, 0] (an exact test of 0 discordant pairs has nothing to reject).
        difference, p_value = Interval(0.0, 0.0, 0.0, level), 1.0
    else:
        # The exact McNemar test (a binomial on the d discordant rows) gives the p-value; the interval is
        # Newcombe's hybrid score interval for paired proportions, which — unlike mapping the conditional
        # binomial interval onto d/n — also carries the uncertainty of how often the models disagree at all
        # (with all 40 of 4,000 discordant rows lost, the conditional interval would end exactly at −1 pt).
        p_value = float(stats.binomtest(b, d, 0.5).pvalue)
        difference = newcombe_paired(int(np.sum(cand & base)), b, c, int(np.sum(~cand & ~base)), level)
    # Accuracy of the candidate implied by each end of the difference, kept within [0, 1].
    implied = np.clip([base_acc + x for x in (difference.value, difference.low, difference.high)], 0.0, 1.0)
    ratio = Interval(*(float(r) for r in _ratio(implied, base_acc)), level)
    method = f"McNemar exact test and Newcombe interval, {d} discordant row{'' if d == 1 else 's'}"
    return Paired("accuracy", difference, ratio, method, p_value, (b, c))


def paired_comparison(metric: str, candidate: RowEvidence, baseline: RowEvidence, *, labels: int,
                      level: float = LEVEL, resamples: int = 2000, seed: int = 0) -> Paired | None:
    """Compare ``candidate`` with ``baseline`` on ``metric``, paired row by row.

    Accuracy: McNemar's exact test on the discordant rows, Newcombe's paired interval. Macro-F1, perplexity,
    next-token agreement: paired percentile bootstrap — the same resampled rows for both models in each of
    ``resamples`` draws, the difference and the ratio taken from the same draws. Identical evidence gives
    exactly [0, 0] and [1, 1].

    Returns:
        The comparison, or None when either evidence lacks the metric's outcomes (or the metric is unknown).

    Raises:
        ValueError: the two evidences are not of the same rows (different row counts or gold labels).
    """
    if candidate.rows != baseline.rows:
        raise ValueError(f"cannot pair {candidate.rows} candidate rows with {baseline.rows} baseline rows: "
                         "evaluate both models on the same evaluation rows")
    if (candidate.truth is not None and baseline.truth is not None
            and not np.array_equal(candidate.truth, baseline.truth)):
        raise ValueError("candidate and baseline rows have different gold labels: evaluate both models on the "
                         "same evaluation rows, with the same label order")
    if not (has_outcomes(metric, candidate) and has_outcomes(metric, baseline)):
        return None
    _check_level(level)
    if metric == "accuracy":
        return _paired_accuracy(candidate, baseline, level)
    cand_draws, base_draws = [], []
    for idx in _resamples(candidate.rows, resamples, seed, labels):
        cand_draws.append(_statistic(metric, candidate, idx, labels))
        base_draws.append(_statistic(metric, baseline, idx, labels))
    cand_all, base_all = np.concatenate(cand_draws), np.concatenate(base_draws)
    cand_value, base_value = metric_value(metric, candidate, labels), metric_value(metric, baseline, labels)
    difference = Interval(cand_value - base_value, *_percentiles(cand_all - base_all, level), level)
    ratio = Interval(float(_ratio(cand_value, base_value)), *_percentiles(_ratio(cand_all, base_all), level), level)
    return Paired(metric, difference, ratio, f"paired bootstrap, {resamples} resamples")
