"""Drift checks for a canary interval (GX Core 1.x): do the inputs and the predicted classes still look normal?

Two checks, each a KL divergence judged by Great Expectations' ``ExpectColumnKLDivergenceToBeLessThan``:

* ``input_drift``: the length of the interval's input texts (characters and words, as the gateway records
  them) against a reference eval file, binned at the reference's deciles;
* ``class_drift``: the challenger's predicted-class mix against the champion's in the same interval (the
  same traffic, so a fair comparison), or against the reference file's labels when the champion saw too
  little (weight 100 %).

Both return :class:`kiln.tasks.rollout.judge.Check` objects: ``failed`` above the threshold, ``inconclusive`` with fewer
than ``min_rows`` rows (never ``ok`` on too little data). The reference is summarised once by
:func:`reference_profile` into a small JSON-serialisable :class:`DriftReference` the rollout can store.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator

from kiln.errors import DataError
from kiln.tasks.data.datasets import DatasetSpec, clean, read_table
from kiln.tasks.evaluate.gx_checks import GxValidator, expectations_module
from kiln.tasks.rollout.stats import Check

log = logging.getLogger(__name__)

# Deciles: ten bins keep the sampling noise of KL small at the minimum row count (for n rows from the same
# distribution 2n·KL ~ chi²(bins - 1), so with 50 rows KL > 0.2 happens by chance ~2 % of the time).
INPUT_BINS = 10
# Pseudo-count added to every bin and class (Jeffreys prior) so that KL stays finite where the reference
# saw nothing; it barely moves the weights of a reference with hundreds of rows.
PSEUDO_COUNT = 0.5
_MAX_EXPANDED = 100_000  # label counts are scaled down to this many rows before GX expands them into a column
_FEATURES = ("chars", "words")


def reference_file_format(value: str | None) -> str | None:
    """A reference file Kiln can read (.csv/.parquet/.jsonl/.json), or a ValueError naming the formats."""
    if value is not None and Path(value).suffix.lower() not in {".csv", ".parquet", ".jsonl", ".json"}:
        raise ValueError(f"unsupported reference file {value!r}: use .csv, .parquet or .jsonl")
    return value


class DriftChecks(BaseModel):
    """Drift thresholds of a rollout; ``null`` switches a check off."""

    model_config = ConfigDict(extra="forbid")

    max_input_kl: float | None = Field(0.2, gt=0, description=(
        "Largest KL divergence of the interval's input lengths (characters, words) from the reference's."))
    max_class_kl: float | None = Field(0.2, gt=0, description=(
        "Largest KL divergence of the challenger's predicted classes from the champion's in the same interval "
        "(or from the reference labels when the champion saw too little)."))
    min_rows: int = Field(50, ge=1, description="Rows a distribution needs in an interval to be judged.")
    reference: str | None = Field(None, description=(
        "Eval file (.csv/.parquet/.jsonl) with a 'text' column (and optionally 'label'): what inputs should look "
        "like. Without it input drift is not judged."))

    @field_validator("reference")
    @classmethod
    def _known_format(cls, value: str | None) -> str | None:
        return reference_file_format(value)


class LengthPartition(BaseModel):
    """A histogram of one input feature: ``edges`` between bins (the outer bins reach to ±infinity)."""

    edges: list[float]
    weights: list[float]  # len(edges) + 1, summing to 1, all positive

    def gx_partition(self) -> dict[str, list[float]]:
        return {"bins": [-np.inf, *self.edges, np.inf], "weights": self.weights}


class DriftReference(BaseModel):
    """What normal looks like: input length partitions and class frequencies. JSON-serialisable."""

    rows: int
    inputs: dict[str, LengthPartition]  # by feature: "chars", "words"
    classes: dict[str, float] = Field(default_factory=dict)  # empty when the reference has no labels
    labelled_rows: int = 0


@dataclass
class InputLengths:
    """Per-row input features of an interval, as the gateway's window records them."""

    chars: list[int] = field(default_factory=list)
    words: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return min(len(self.chars), len(self.words))


def _features(texts: Iterable[str]) -> dict[str, np.ndarray]:
    texts = list(texts)
    return {"chars": np.array([len(t) for t in texts], float), "words": np.array([len(t.split()) for t in texts],
                                                                                    float)}


def _partition(values: np.ndarray) -> LengthPartition:
    edges = np.unique(np.quantile(values, np.arange(1, INPUT_BINS) / INPUT_BINS))
    counts, _ = np.histogram(values, [-np.inf, *edges, np.inf])
    weights = (counts + PSEUDO_COUNT) / (counts.sum() + PSEUDO_COUNT * len(counts))
    return LengthPartition(edges=[float(e) for e in edges], weights=[float(w) for w in weights])


def reference_profile(texts: Iterable[str], labels: Iterable[str] | None = None) -> DriftReference:
    """Summarise reference texts (and their labels, if any) into the partitions the checks compare against.

    Raises:
        DataError: when there are no texts.
    """
    features = _features(texts)
    rows = len(features["chars"])
    if rows == 0:
        raise DataError("the drift reference has no texts; pass an eval file with rows in its 'text' column")
    counts = Counter(str(label) for label in ([] if labels is None else labels))
    total = sum(counts.values())
    return DriftReference(rows=rows, inputs={name: _partition(v) for name, v in features.items()},
                          classes={k: v / total for k, v in sorted(counts.items())}, labelled_rows=total)


def load_reference(path: str | Path) -> DriftReference:
    """:func:`reference_profile` of an eval file's ``text`` (and ``label``, when present) columns.

    Raises:
        DataError: when the file is missing, unreadable, lacks a ``text`` column or has no usable rows.
    """
    spec = DatasetSpec(source=str(path), label_column=None)
    frame = read_table(spec)
    if "label" in frame.columns:
        spec = spec.model_copy(update={"label_column": "label"})
    frame = clean(frame, spec)
    return reference_profile(frame["text"], frame["label"] if "label" in frame else None)


def observed_from_state(state: Mapping[str, Any]) -> tuple[InputLengths, Counter, Counter | None]:
    """The challenger's inputs and predicted classes (live plus mirrored) and the champion's classes.

    ``state`` is the gateway's ``GET /admin/state?samples=1`` or ``POST /admin/reset`` JSON (the input
    lengths are only in it with samples). The champion's classes are None when it predicted nothing.
    """
    window = state.get("window", state)
    sides = [window.get("challenger", {}), window.get("shadow", {})]
    inputs = InputLengths([n for s in sides for n in s.get("input_chars", [])],
                          [n for s in sides for n in s.get("input_words", [])])
    challenger = Counter()
    for side in sides:
        challenger.update(side.get("labels", {}))
    champion = Counter(window.get("champion", {}).get("labels", {}))
    return inputs, challenger, champion or None


# ---- Great Expectations -------------------------------------------------------------------------------------


def _kl(gx: GxValidator, name: str, frame: pd.DataFrame, partitions: Mapping[str, dict[str, Any]],
        threshold: float) -> dict[str, tuple[bool, float | None]]:
    """Validate ``frame``'s columns against their partitions; per column: (passed, KL or None if infinite)."""
    ex = expectations_module()
    results = gx.validate(name, frame, [
        ex.ExpectColumnKLDivergenceToBeLessThan(column=column, partition_object=partition, threshold=threshold)
        for column, partition in partitions.items()])
    out = {}
    for r in results:
        observed = (r.result or {}).get("observed_value")
        out[r.expectation_config.kwargs["column"]] = (bool(r.success), None if observed is None else
                                                      float(observed))
    return out


def _kl_text(value: float | None) -> str:
    return "inf" if value is None else f"{value:.3g}"


def _input_check(cfg: DriftChecks, limit: float, reference: DriftReference | None, inputs: InputLengths,
                 gx: GxValidator) -> Check:
    if reference is None:
        return Check("input_drift", "ok", "input_drift: no reference eval file to compare with: not judged")
    rows = len(inputs)
    if rows < cfg.min_rows:
        hint = " (the gateway state carries input lengths only with samples=1)" if rows == 0 else ""
        return Check("input_drift", "inconclusive", f"input_drift: {rows} input rows recorded, fewer than min_rows "
                                                    f"{cfg.min_rows}{hint}")
    frame = pd.DataFrame({name: np.asarray(getattr(inputs, name)[:rows], float) for name in _FEATURES})
    results = _kl(gx, "inputs", frame, {name: reference.inputs[name].gx_partition() for name in _FEATURES}, limit)
    ok = all(passed for passed, _ in results.values())
    observed = ", ".join(f"{_kl_text(kl)} ({name})" for name, (_, kl) in results.items())
    medians = ", ".join(f"{np.median(frame[name]):.0f} {name}" for name in _FEATURES)
    return Check("input_drift", "ok" if ok else "failed",
                 f"input_drift: KL of input lengths {observed} {'<=' if ok else '>'} {limit:g} over {rows} rows "
                 f"(median {medians}) vs reference of {reference.rows} texts: {'ok' if ok else 'FAILED'}")


def _label_column(counts: Counter) -> pd.DataFrame:
    """Counts expanded into a column of raw values (GX counts them again), scaled down when huge."""
    total = sum(counts.values())
    scale = min(1.0, _MAX_EXPANDED / total)
    values = [str(k) for k in counts]
    repeats = [max(1, round(c * scale)) for c in counts.values()]
    return pd.DataFrame({"label": pd.Series(np.repeat(np.array(values, dtype=object), repeats), dtype=object)})


def _smoothed(counts: Mapping[str, float], values: Sequence[str]) -> dict[str, list]:
    total = sum(counts.get(v, 0.0) for v in values) + PSEUDO_COUNT * len(values)
    return {"values": list(values), "weights": [(counts.get(v, 0.0) + PSEUDO_COUNT) / total for v in values]}


def _class_check(cfg: DriftChecks, limit: float, reference: DriftReference | None, challenger: Counter,
                 champion: Counter | None, gx: GxValidator) -> Check:
    challenger = Counter({str(k): v for k, v in challenger.items() if v > 0})
    rows, champion_rows = sum(challenger.values()), sum((champion or Counter()).values())
    if rows < cfg.min_rows:
        return Check("class_drift", "inconclusive", f"class_drift: {rows} challenger predictions, fewer than "
                                                    f"min_rows {cfg.min_rows}")
    if champion_rows >= cfg.min_rows:
        expected: Mapping[str, float] = Counter({str(k): v for k, v in champion.items()})
        against = f"the champion's {champion_rows} predictions"
    elif reference is not None and reference.classes:
        # Frequencies as pseudo-counts of the reference's size, so smoothing weighs the same as for counts.
        expected = {k: f * reference.labelled_rows for k, f in reference.classes.items()}
        against = f"the reference's {reference.labelled_rows} labels"
    elif champion_rows:
        return Check("class_drift", "inconclusive", f"class_drift: the champion made {champion_rows} predictions, "
                                                    f"fewer than min_rows {cfg.min_rows}, and there are no "
                                                    "reference labels")
    else:
        return Check("class_drift", "ok", "class_drift: no champion predictions or reference labels to compare "
                                          "with: not judged")
    values = sorted(set(challenger) | set(expected))
    (passed, kl), = _kl(gx, "classes", _label_column(challenger), {"label": _smoothed(expected, values)},
                          limit).values()
    shares = ", ".join(f"{k} {challenger[k] / rows:.0%}" for k in sorted(challenger, key=challenger.get,
                                                                         reverse=True)[:5])
    return Check("class_drift", "ok" if passed else "failed",
                 f"class_drift: KL of predicted classes {_kl_text(kl)} {'<=' if passed else '>'} {limit:g} over "
                 f"{rows} rows ({shares}) vs {against}: {'ok' if passed else 'FAILED'}")


def drift_checks(cfg: DriftChecks, reference: DriftReference | None, challenger_inputs: InputLengths,
                 challenger_labels: Counter, champion_labels: Counter | None = None) -> list[Check]:
    """Judge one interval's input and predicted-class drift.

    Args:
        cfg: thresholds; a ``None`` threshold leaves its check out.
        reference: the reference eval file's profile (:func:`reference_profile`); None leaves input drift
            unjudged and class drift compared with the champion only.
        challenger_inputs: the lengths of the inputs the challenger saw (see :func:`observed_from_state`).
        challenger_labels: the challenger's predicted classes and their counts.
        champion_labels: the champion's predicted classes in the same interval; None when it had no traffic.

    Returns:
        ``input_drift`` and ``class_drift`` checks, each with a reason naming the observed KL, the threshold
        and the row count.
    """
    checks: list[Check] = []
    if cfg.max_input_kl is None and cfg.max_class_kl is None:
        return checks
    gx = GxValidator("kiln-drift")  # one GX context for both checks, opened only if one is judged
    if cfg.max_input_kl is not None:
        checks.append(_input_check(cfg, cfg.max_input_kl, reference, challenger_inputs, gx))
    if cfg.max_class_kl is not None:
        checks.append(_class_check(cfg, cfg.max_class_kl, reference, challenger_labels, champion_labels, gx))
    return checks
