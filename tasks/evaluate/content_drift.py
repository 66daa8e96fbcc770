"""Content drift: does live text still read like the training split, token for token? Pure functions.

The rollout's length checks (:mod:`kiln.tasks.rollout.drift`) cannot see a change of subject: texts from
another domain at the same lengths pass them. These checks look at what the model actually reads, through the
model's own tokenizer:

* a :class:`ContentReference` summarises a reference sample (the training split): the frequencies of its
  ``top_k`` most common tokens plus one ``other`` bucket, and the share of unknown (out-of-vocabulary) tokens;
* :func:`content_drift_checks` compares a live sample with it: the population stability index (PSI) and the KL
  divergence over those buckets, and the increase of the unknown-token share.

KL is Great Expectations' ``ExpectColumnKLDivergenceToBeLessThan`` over a column of token buckets, the OOV
share is ``ExpectColumnMeanToBeBetween`` over a 0/1 "is unknown" column; GX has no PSI, so PSI is computed here
(``scipy.special.rel_entr``). Each check is a :class:`ContentCheck` (the rollout judge's ``Check`` shape):
``failed`` over its threshold, ``inconclusive`` below ``min_tokens`` live tokens (never ``ok`` on too little).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field
from scipy.special import rel_entr

from kiln.errors import DataError
from kiln.tasks.evaluate.gx_checks import GxValidator, expectations_module

OTHER = "<other>"  # the bucket of every token outside the reference's top_k (a tokenizer never emits this text)
# Pseudo-count added to every bucket (Jeffreys prior) so PSI and KL stay finite where one side saw nothing.
PSEUDO_COUNT = 0.5


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer these checks use."""

    unk_token_id: int | None

    def __call__(self, text: list[str], **kwargs: Any) -> Any: ...

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]: ...


class ContentDriftConfig(BaseModel):
    """Thresholds of the content drift checks; ``null`` switches a check off."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(100, ge=1, description=(
        "Most frequent reference tokens kept as their own bucket; the rest share one 'other' bucket."))
    max_psi: float | None = Field(0.2, gt=0, description=(
        "Largest population stability index of the token buckets (0.1-0.2 moderate, above 0.2 a significant "
        "shift, by the usual rule of thumb)."))
    max_kl: float | None = Field(0.1, gt=0, description=(
        "Largest KL divergence of the live token buckets from the reference's (PSI is roughly KL both ways, so "
        "0.1 matches a PSI of 0.2)."))
    max_oov_increase: float | None = Field(0.02, ge=0, le=1, description=(
        "Largest increase of the unknown-token share over the reference's (0.02 = 2 points)."))
    # Sampling noise: a sample of N tokens from the reference's own distribution shows a KL of about
    # (B - 1) / (2N) over B buckets (and a PSI of about twice that): with 101 buckets, 0.1 at 500 tokens (the
    # threshold itself) but 0.025 at 2000, a quarter of it. (The tweets' 80 held-out texts: 3444 tokens, KL 0.025.)
    min_tokens: int = Field(2000, ge=1, description=(
        "Live tokens needed to judge (about 50-100 short texts); fewer is inconclusive."))


class ContentReference(BaseModel):
    """What the model's inputs should look like, as token buckets. JSON-serialisable."""

    texts: int
    tokens: int
    buckets: dict[str, float]  # token text -> share of the reference's tokens; OTHER holds the rest; sums to 1
    oov_share: float  # share of the reference's tokens that are the tokenizer's unknown token (0 without one)


@dataclass
class ContentCheck:
    """One content check and why it came out so (the rollout judge's ``Check`` shape)."""

    name: str
    status: Literal["ok", "failed", "inconclusive"]
    reason: str


@dataclass
class TokenSample:
    """A text sample through the tokenizer: every token's text, and which of them are unknown."""

    texts: int
    tokens: list[str]
    unknown: np.ndarray  # bool per token


def tokenize(texts: Iterable[str], tokenizer: Tokenizer) -> TokenSample:
    """Tokenize ``texts`` as the model reads them, without special tokens ([CLS], <s>, ...)."""
    texts = [str(t) for t in texts]
    if not texts:
        return TokenSample(0, [], np.zeros(0, bool))
    ids = [i for row in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in row]
    unk = tokenizer.unk_token_id
    unknown = np.array([i == unk for i in ids], bool) if unk is not None else np.zeros(len(ids), bool)
    return TokenSample(len(texts), tokenizer.convert_ids_to_tokens(ids), unknown)


def reference_profile(texts: Iterable[str], tokenizer: Tokenizer, config: ContentDriftConfig | None = None
                      ) -> ContentReference:
    """Summarise reference texts (the training split) into token buckets and an unknown-token share.

    Raises:
        DataError: when the texts yield no tokens.
    """
    config = config or ContentDriftConfig()
    sample = tokenize(texts, tokenizer)
    if not sample.tokens:
        raise DataError("the content drift reference has no tokens; pass the training split's non-empty texts")
    counts = Counter(sample.tokens)
    total = len(sample.tokens)
    # Ties broken by token text, so the same sample gives the same buckets in every process.
    top = sorted(counts, key=lambda t: (-counts[t], t))[:config.top_k]
    buckets = {t: counts[t] / total for t in top}
    buckets[OTHER] = max(0.0, 1.0 - sum(buckets.values()))
    return ContentReference(texts=sample.texts, tokens=total, buckets=buckets,
                            oov_share=float(sample.unknown.mean()))


def bucket_counts(sample: TokenSample, reference: ContentReference) -> dict[str, int]:
    """Live token counts per reference bucket (tokens outside the reference's top_k count as OTHER)."""
    counts = Counter(t if t in reference.buckets else OTHER for t in sample.tokens)
    return {b: counts.get(b, 0) for b in reference.buckets}


def _smoothed(weights: Sequence[float], total: float) -> np.ndarray:
    counts = np.asarray(weights, float) * total + PSEUDO_COUNT
    return counts / counts.sum()


def population_stability_index(observed: Sequence[float], expected: Sequence[float]) -> float:
    """PSI = sum((o - e) * ln(o / e)) over buckets: KL both ways, 0 for equal shares. Both must be positive."""
    o, e = np.asarray(observed, float), np.asarray(expected, float)
    return float(np.sum(rel_entr(o, e) + rel_entr(e, o)))


def _verdict(name: str, passed: bool, text: str) -> ContentCheck:
    return ContentCheck(name, "ok" if passed else "failed", f"{name}: {text}: {'ok' if passed else 'FAILED'}")


def _top_movers(live: dict[str, int], reference: ContentReference, rows: int, n: int = 3) -> str:
    """The buckets whose share moved most, e.g. ``'<other>' 31% (ref 12%)``: what a reader needs to see why."""
    moved = sorted(reference.buckets, key=lambda b: -abs(live[b] / rows - reference.buckets[b]))[:n]
    return ", ".join(f"{b!r} {live[b] / rows:.0%} (ref {reference.buckets[b]:.0%})" for b in moved)


def content_drift_checks(config: ContentDriftConfig, reference: ContentReference, texts: Iterable[str],
                         tokenizer: Tokenizer) -> list[ContentCheck]:
    """Judge a live text sample against the reference's token buckets and unknown-token share.

    Args:
        config: thresholds; a ``None`` threshold leaves its check out.
        reference: :func:`reference_profile` of the training split, with the same tokenizer.
        texts: the live sample (what the served model was asked).
        tokenizer: the served model's tokenizer.

    Returns:
        ``token_psi``, ``token_kl`` and ``oov_share`` checks, each with a reason naming the observed value, the
        threshold and the token count.
    """
    names = [n for n, limit in (("token_psi", config.max_psi), ("token_kl", config.max_kl),
                                ("oov_share", config.max_oov_increase)) if limit is not None]
    sample = tokenize(texts, tokenizer)
    rows = len(sample.tokens)
    if rows < config.min_tokens:
        return [ContentCheck(n, "inconclusive", f"{n}: {rows} live tokens ({sample.texts} texts), fewer than "
                                                f"min_tokens {config.min_tokens}") for n in names]
    live = bucket_counts(sample, reference)
    expected = _smoothed(list(reference.buckets.values()), reference.tokens)
    of = f"over {rows} tokens ({sample.texts} texts) vs reference of {reference.tokens} tokens"
    checks: list[ContentCheck] = []
    if config.max_psi is not None:
        psi = population_stability_index(_smoothed([live[b] / rows for b in reference.buckets], rows), expected)
        ok = psi <= config.max_psi
        checks.append(_verdict("token_psi", ok, f"PSI of token frequencies {psi:.3g} {'<=' if ok else '>'} "
                                                f"{config.max_psi:g} {of}; moved most: "
                                                f"{_top_movers(live, reference, rows)}"))
    frame = pd.DataFrame({"bucket": pd.Series([t if t in reference.buckets else OTHER for t in sample.tokens],
                                              dtype=object), "unknown": sample.unknown.astype(float)})
    expectations = []
    if config.max_kl is not None or config.max_oov_increase is not None:
        ex = expectations_module()  # slow import: only when a GX check is judged

        if config.max_kl is not None:
            expectations.append(ex.ExpectColumnKLDivergenceToBeLessThan(
                column="bucket", threshold=config.max_kl,
                partition_object={"values": list(reference.buckets), "weights": [float(w) for w in expected]}))
        if config.max_oov_increase is not None:
            expectations.append(ex.ExpectColumnMeanToBeBetween(
                column="unknown", max_value=reference.oov_share + config.max_oov_increase))
    results = GxValidator("kiln-content-drift").validate("sample", frame, expectations) if expectations else []
    by_kind = {r.expectation_config.type: r for r in results}
    if config.max_kl is not None:
        r = by_kind["expect_column_kl_divergence_to_be_less_than"]
        kl = (r.result or {}).get("observed_value")
        ok = bool(r.success)
        checks.append(_verdict("token_kl", ok, f"KL of token frequencies {'inf' if kl is None else f'{kl:.3g}'} "
                                               f"{'<=' if ok else '>'} {config.max_kl:g} {of}"))
    if config.max_oov_increase is not None:
        r = by_kind["expect_column_mean_to_be_between"]
        share, ok = float(sample.unknown.mean()), bool(r.success)
        checks.append(_verdict("oov_share", ok, f"unknown-token share {share:.2%} {'<=' if ok else '>'} reference "
                                                f"{reference.oov_share:.2%} + {config.max_oov_increase:g} {of}"))
    return checks
