"""A small-model-first cascade: one Kiln package that answers from a small model and escalates uncertain rows.

A cascade package is a Kiln package folder whose ``kiln.json`` (format ``cascade``) lists every file below it,
so the registry's one pin covers both members::

    kiln.json       format "cascade", task, labels, seq_len, sha256 of every file below (members included)
    cascade.json    threshold, members, how the threshold was chosen and what it gave on the validation split
    small/          a Kiln package (its own kiln.json, engine, tokenizer)
    large/          a Kiln package: the champion or a larger candidate

:class:`CascadePredictor` has :class:`~kiln.tasks.models.predictor.Predictor`'s surface (``run``, ``encode``,
``predict``, ``predict_columns``, ``meta``, ``tokenizer``, ``describe``), and ``Predictor(folder)`` opens a
cascade folder as one, so the MLflow pyfunc, the model server, evaluation and latency benchmarks treat it as
one model. A batch runs on the small model; rows whose confidence (max softmax probability) is below the
threshold run on the large model in one sub-batch, and their answers replace the small model's. Both members
tokenize alike (building a cascade checks it), so raw token tensors work too.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kiln.errors import ArtifactError, ConfigError
from kiln.tasks.engines import EngineOptions
from kiln.tasks.models.predictor import (
    CASCADE_FILE,
    PackageMeta,
    Predictor,
    _load_tokenizer,
    record_checksums,
    softmax,
    verify,
)

MEMBERS = ("small", "large")


@dataclass
class CascadeSpec:
    """What ``cascade.json`` records: the threshold, the members' folders and recipes, and how it was chosen."""

    threshold: float
    members: dict[str, dict[str, str]]  # "small"/"large" -> {"folder": ..., "recipe": ...}
    confidence: str = "max_softmax"
    chosen: dict[str, Any] = field(default_factory=dict)  # rule, target and validation numbers (ThresholdChoice)

    @classmethod
    def read(cls, folder: Path) -> CascadeSpec:
        path = folder / CASCADE_FILE
        try:
            raw = json.loads(path.read_bytes())
            spec = cls(**raw)
        except (OSError, ValueError, TypeError) as exc:
            raise ArtifactError(f"{path} is unreadable or corrupt ({str(exc)[:120]}); re-register the model") from None
        if set(spec.members) != set(MEMBERS) or not 0.0 <= float(spec.threshold) <= 2.0:
            raise ArtifactError(f"{path} must name members {list(MEMBERS)} and a threshold in [0, 1]; "
                                "re-register the model")
        return spec

    def write(self, folder: Path) -> None:
        (folder / CASCADE_FILE).write_text(json.dumps(asdict(self), indent=2, sort_keys=True))


@dataclass
class CascadeCall:
    """One engine call of a cascade: rows, rows escalated, and seconds spent in each member."""

    rows: int = 0
    escalated: int = 0
    small_seconds: float = 0.0
    large_seconds: float = 0.0


@dataclass
class CascadeStats(CascadeCall):
    """Totals since the predictor was opened (or :meth:`CascadePredictor.reset_stats`): the calls' sums."""

    calls: int = 0

    @property
    def escalation_rate(self) -> float:
        return self.escalated / self.rows if self.rows else 0.0

    def add(self, call: CascadeCall) -> None:
        self.calls += 1
        self.rows += call.rows
        self.escalated += call.escalated
        self.small_seconds += call.small_seconds
        self.large_seconds += call.large_seconds


class CascadePredictor:
    """Opens a cascade package as one model (see the module docstring).

    Attributes:
        threshold: rows whose small-model confidence is below it escalate to the large model.
        last_call: the latest engine call's :class:`CascadeCall` (the model server reads it after each batch,
            on the same engine thread, for ``kiln_cascade_*`` metrics).
        stats: :class:`CascadeStats` totals (evaluation reads ``escalation_rate`` from it).
    """

    is_cascade = True

    def __init__(self, folder: Path, options: EngineOptions | None = None, *, check: bool = True) -> None:
        self.folder = Path(folder)
        self.meta = PackageMeta.read(self.folder)
        if self.meta.format != "cascade":
            raise ArtifactError(f"{self.folder} holds {CASCADE_FILE} but its kiln.json says format "
                                f"{self.meta.format!r}, not 'cascade'; re-register the model")
        if check:
            verify(self.folder, self.meta)  # every member file is listed in the top kiln.json
        self.spec = CascadeSpec.read(self.folder)
        self.threshold = float(self.spec.threshold)
        self.options = options or EngineOptions()
        # Members were verified above through the top manifest (which pins their kiln.json too).
        self.small = Predictor(self.folder / self.spec.members["small"]["folder"], options, check=check)
        self.large = Predictor(self.folder / self.spec.members["large"]["folder"], options, check=check)
        self.tokenizer = self.small.tokenizer
        self.last_call = CascadeCall()
        self.stats = CascadeStats()
        self._lock = threading.Lock()

    def describe(self) -> dict[str, str]:
        small, large = self.small.describe(), self.large.describe()
        return {"backend": small.get("backend", ""), "cascade": "small-first", "threshold": f"{self.threshold:.6g}",
                "small_backend": small.get("backend", ""), "large_backend": large.get("backend", "")}

    def encode(self, texts: Sequence[str], *, pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        return self.small.encode(texts, pad_to=pad_to)

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Logits of each row from the member that answered it: the small model's, or for rows below the
        threshold the large model's (run once on those rows)."""
        started = time.perf_counter()
        logits = np.asarray(self.small.run(input_ids, attention_mask), dtype=np.float32)
        small_s = time.perf_counter() - started
        escalate = softmax(logits).max(axis=1) < self.threshold
        large_s = 0.0
        if escalate.any():
            started = time.perf_counter()
            ids, mask = input_ids[escalate], attention_mask[escalate]
            real = np.flatnonzero(mask.any(axis=0))  # columns some escalated row uses: drop the padding after
            width = int(real[-1]) + 1 if real.size else mask.shape[1]
            logits = logits.copy()
            logits[escalate] = self.large.run(np.ascontiguousarray(ids[:, :width]),
                                              np.ascontiguousarray(mask[:, :width]))
            large_s = time.perf_counter() - started
        call = CascadeCall(len(logits), int(escalate.sum()), small_s, large_s)
        with self._lock:
            self.last_call = call
            self.stats.add(call)
        return logits

    def reset_stats(self) -> None:
        with self._lock:
            self.stats = CascadeStats()

    def predict(self, texts: Sequence[str], **_: Any) -> pd.DataFrame:
        columns = self.predict_columns(texts)
        return pd.DataFrame({"label": columns["label"], "score": columns["score"].astype(float),
                             "scores": [row.astype(float).tolist() for row in columns["scores"]]})

    def predict_columns(self, texts: Sequence[str], **_: Any) -> dict[str, Any]:
        ids, mask = self.encode(list(texts))
        probs = softmax(self.run(ids, mask))
        labels = self.meta.labels or [str(i) for i in range(probs.shape[1])]
        return {"label": [labels[i] for i in probs.argmax(axis=1)], "score": probs.max(axis=1), "scores": probs}


def package_cascade(small: Path, large: Path, out_dir: Path, threshold: float, *, recipe: str,
                    member_recipes: dict[str, str], chosen: dict[str, Any] | None = None) -> Path:
    """Copy two member packages into ``out_dir`` with ``cascade.json`` and a ``kiln.json`` listing every file.

    Raises:
        ConfigError: the members are not classifiers with the same labels, sequence length and tokenizer, or a
            member is itself a cascade.
    """
    metas = {"small": PackageMeta.read(small), "large": PackageMeta.read(large)}
    check_members(metas, small, large)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, source in (("small", small), ("large", large)):
        shutil.rmtree(out_dir / name, ignore_errors=True)
        shutil.copytree(source, out_dir / name)
    CascadeSpec(float(threshold), {m: {"folder": m, "recipe": member_recipes.get(m, "")} for m in MEMBERS},
                chosen=dict(chosen or {})).write(out_dir)
    base = metas["large"]
    meta = PackageMeta(format="cascade", task=base.task, labels=list(base.labels), seq_len=base.seq_len,
                       precision="cascade", recipe=recipe)
    record_checksums(out_dir, meta)
    return out_dir


def check_members(metas: dict[str, PackageMeta], small: Path, large: Path) -> None:
    """Refuse members that cannot form one cascade (one line each, saying what to change)."""
    s, g = metas["small"], metas["large"]
    if "cascade" in (s.format, g.format):
        raise ConfigError("a cascade member is itself a cascade; use a plain candidate or the champion as member")
    if s.task != "sequence-classification" or g.task != "sequence-classification":
        raise ConfigError(f"cascades are for classifiers; the members are {s.task} and {g.task}")
    if s.labels != g.labels:
        raise ConfigError(f"cascade members predict different labels ({s.labels} vs {g.labels}); build both "
                          "from the same model")
    if s.seq_len != g.seq_len:
        raise ConfigError(f"cascade members have different sequence lengths ({s.seq_len} vs {g.seq_len}); "
                          "package both at the same --seq-len")
    if _load_tokenizer(small).get_vocab() != _load_tokenizer(large).get_vocab():
        raise ConfigError(f"cascade members tokenize differently ({small} vs {large}: the vocabularies differ); "
                          "choose a small recipe without prune_vocab")


def is_cascade(folder: Path) -> bool:
    return (Path(folder) / CASCADE_FILE).is_file()
