"""Deliberate faults for a served model: errors, added latency, wrong answers.

A canary analysis is only trustworthy if it has been seen to catch a bad challenger. The model server
can wrap a version's predictor in :class:`FaultyPredictor` (``python -m kiln.infra.server --fault-errors 0.2``)
so the demo and the tests roll a visibly broken challenger through the same gateway and judge as a good
one. Faults are opt-in per served version and logged loudly at start.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import pandas as pd


class InjectedFault(RuntimeError):
    """The error a faulty predictor raises; the server answers it with a 500 like any engine failure."""

    quiet = True  # expected: logged in one line, without a traceback


@dataclass(frozen=True)
class Faults:
    """What goes wrong: ``errors`` and ``wrong`` are probabilities per engine call / per row."""

    errors: float = 0.0
    latency_ms: float = 0.0
    wrong: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("errors", "wrong"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"fault {name}={value} must be a probability between 0 and 1")
        if self.latency_ms < 0:
            raise ValueError(f"fault latency_ms={self.latency_ms} must be >= 0")

    @property
    def any(self) -> bool:
        return bool(self.errors or self.latency_ms or self.wrong)

    def describe(self) -> str:
        return (f"errors {self.errors:.0%} of calls, +{self.latency_ms:g} ms per call, "
                f"wrong label on {self.wrong:.0%} of rows")


class FaultyPredictor:
    """A predictor that misbehaves as told; everything else is delegated to the real one."""

    def __init__(self, predictor: Any, faults: Faults) -> None:
        self._inner, self.faults = predictor, faults
        self._rng = random.Random(faults.seed)  # only the engine thread calls predict: no lock needed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def predict(self, texts: list[str], **kwargs: Any) -> pd.DataFrame:
        if self.faults.latency_ms:
            time.sleep(self.faults.latency_ms / 1000)
        if self.faults.errors and self._rng.random() < self.faults.errors:
            raise InjectedFault(f"injected fault ({self.faults.describe()})")
        frame = self._inner.predict(texts, **kwargs)
        labels = list(getattr(self._inner.meta, "labels", []) or [])
        if self.faults.wrong and "label" in frame and len(labels) > 1:
            frame = frame.copy()
            frame["label"] = [self._other(label, labels) if self._rng.random() < self.faults.wrong else label
                              for label in frame["label"]]
        return frame

    def _other(self, label: str, labels: list[str]) -> str:
        return self._rng.choice([x for x in labels if x != label])
