"""Stand-in engines for tests that measure routing and bookkeeping, not inference."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd


class FastFake:
    """An engine that answers at once, always with one label."""

    meta = SimpleNamespace(task="sequence-classification", labels=["negative", "positive"])

    def __init__(self, label: str) -> None:
        self.label = label

    def predict(self, texts):
        return pd.DataFrame({"label": [self.label] * len(texts), "score": [0.9] * len(texts),
                             "scores": [[0.1, 0.9]] * len(texts)})

    def run(self, ids, mask):
        return np.zeros((ids.shape[0], 2), np.float32)
