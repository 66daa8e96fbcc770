"""What a gate verdict rests on: per-row outcomes and latency samples, and the intervals computed from them.

A number without its uncertainty invites a wrong decision: two medians of identical engines differ, and an
accuracy measured on a few thousand rows moves by most of a point between samples. So evaluation keeps the
raw evidence — for classifiers the predicted class of every row, for causal LMs each row's summed
negative log-likelihood, scored tokens and tokens agreeing with the reference; for latency every timed call,
grouped by the interleaved round it ran in — and every shown number comes with an :class:`Interval`.

Plain data, no statistics here: :mod:`kiln.tasks.evaluate.paired` (quality) and
:mod:`kiln.tasks.evaluate.latency` (speed) compute the intervals; :mod:`kiln.tasks.evaluate.gate` judges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

LEVEL = 0.95  # default confidence level of every interval Kiln shows


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval ``[low, high]`` at ``level`` (two-sided)."""

    value: float
    low: float
    high: float
    level: float = LEVEL

    @classmethod
    def exact(cls, value: float, level: float = LEVEL) -> Interval:
        """A value known without sampling error (a file size, a count)."""
        return cls(value, value, value, level)

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high

    def scaled(self, k: float) -> Interval:
        """The interval of ``k × value`` (``k > 0``), e.g. a fraction shown in points."""
        return Interval(self.value * k, self.low * k, self.high * k, self.level)

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high, "level": self.level}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Interval:
        return cls(float(raw["value"]), float(raw["low"]), float(raw["high"]), float(raw.get("level", LEVEL)))

    def is_finite(self) -> bool:
        return all(math.isfinite(x) for x in (self.value, self.low, self.high))


@dataclass
class RowEvidence:
    """Per-row outcomes of one model on the evaluation rows, in the rows' order (the same for every model).

    Classifiers fill ``predicted`` and ``truth`` (class indices); causal LMs fill ``nll`` (summed negative
    log-likelihood of the row's scored tokens), ``tokens`` (scored tokens) and, when evaluated against a
    reference model, ``agree`` (scored tokens whose argmax equals the reference's).
    """

    predicted: np.ndarray | None = None
    truth: np.ndarray | None = None
    nll: np.ndarray | None = None
    tokens: np.ndarray | None = None
    agree: np.ndarray | None = None

    @property
    def rows(self) -> int:
        for array in (self.predicted, self.nll):
            if array is not None:
                return len(array)
        return 0

    @property
    def correct(self) -> np.ndarray:
        if self.predicted is None or self.truth is None:
            raise ValueError("no classification outcomes in this evidence")
        return self.predicted == self.truth

    def save(self, path: Path) -> None:
        np.savez(path, **{k: v for k, v in self.__dict__.items() if v is not None})

    @classmethod
    def load(cls, path: Path) -> RowEvidence:
        with np.load(path) as data:
            return cls(**{k: data[k] for k in data.files})


@dataclass
class LatencySamples:
    """Milliseconds of every timed call of one model, shaped ``(rounds, calls per round)``.

    ``single`` at the latency batch size (1), ``batch`` at the throughput batch size (``batch_size``).
    Round ``r`` of every model in one measurement ran in the same interleaved round, so rows pair up:
    a slow moment of the machine lands in the same round for all of them.
    """

    single: np.ndarray
    batch: np.ndarray
    batch_size: int

    @property
    def rounds(self) -> int:
        return int(self.single.shape[0])

    def to_dict(self) -> dict[str, Any]:
        return {"single": self.single.round(4).tolist(), "batch": self.batch.round(4).tolist(),
                "batch_size": self.batch_size}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LatencySamples:
        return cls(np.asarray(raw["single"], dtype=float), np.asarray(raw["batch"], dtype=float),
                   int(raw["batch_size"]))
