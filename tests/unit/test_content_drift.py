"""Content drift: a planted change of subject at equal lengths is caught, the same distribution is not."""

from __future__ import annotations

import random
import re
from collections import Counter

import numpy as np
import pytest

from kiln.errors import DataError
from kiln.tasks.evaluate.content_drift import (
    OTHER,
    ContentDriftConfig,
    ContentReference,
    content_drift_checks,
    population_stability_index,
    reference_profile,
)
from tests.tiny import train_tokenizer

# Another domain's vocabulary: clinical words never seen in the shipped tweets' typical mix.
CLINICAL = ("patient dosage clinical renal hepatic cohort placebo enzyme protein receptor plasma serum tissue biopsy "
            "chronic acute therapy lesion tumour cardiac artery insulin glucose antibody vaccine antigen cortex "
            "marrow infusion syndrome diagnosis prognosis mortality genome mutation allele inhibitor metabolic").split()


def same_lengths_other_domain(texts: list[str], seed: int = 0) -> list[str]:
    """Each text rewritten word for word from clinical words, every word cut to the original's length (and the
    whitespace kept), so characters and words per text are exactly the original's."""
    rng = random.Random(seed)

    def word(n: int) -> str:
        out = ""
        while len(out) < n:
            out += rng.choice(CLINICAL)
        return out[:n]

    return [re.sub(r"\S+", lambda m: word(len(m.group())), t) for t in texts]


@pytest.fixture(scope="module")
def tokenizer(tiny_splits):
    return train_tokenizer(tiny_splits.train["text"].tolist())  # the tiny models' own tokenizer


@pytest.fixture(scope="module")
def reference(tiny_splits, tokenizer) -> ContentReference:
    return reference_profile(tiny_splits.train["text"], tokenizer)


@pytest.fixture(scope="module")
def held_out(tiny_splits) -> list[str]:
    return tiny_splits.validation["text"].tolist() + tiny_splits.test["text"].tolist()


def by_name(checks) -> dict[str, str]:
    return {c.name: c.status for c in checks}


def test_held_out_sample_from_the_reference_distribution_is_not_flagged(reference, held_out, tokenizer):
    checks = content_drift_checks(ContentDriftConfig(), reference, held_out, tokenizer)
    assert by_name(checks) == {"token_psi": "ok", "token_kl": "ok", "oov_share": "ok"}, checks
    assert "PSI of token frequencies" in checks[0].reason and f"({len(held_out)} texts)" in checks[0].reason


def test_other_domain_at_equal_lengths_is_caught_where_length_drift_is_blind(reference, held_out, tokenizer):
    from kiln.tasks.rollout.drift import DriftChecks, InputLengths, drift_checks
    from kiln.tasks.rollout.drift import reference_profile as length_profile

    shifted = same_lengths_other_domain(held_out)
    assert [len(t) for t in shifted] == [len(t) for t in held_out]
    assert [len(t.split()) for t in shifted] == [len(t.split()) for t in held_out]

    checks = content_drift_checks(ContentDriftConfig(), reference, shifted, tokenizer)
    assert by_name(checks) == {"token_psi": "failed", "token_kl": "failed", "oov_share": "ok"}, checks
    assert checks[0].reason.endswith("FAILED") and "> 0.2" in checks[0].reason

    # The rollout's length check sees nothing: the very shift this module exists for.
    lengths = InputLengths([len(t) for t in shifted], [len(t.split()) for t in shifted])
    (length_check,) = drift_checks(DriftChecks(max_class_kl=None), length_profile(held_out), lengths, Counter())
    assert length_check.status == "ok", length_check


def test_unknown_tokens_raise_the_oov_share(reference, held_out, tokenizer):
    # Characters the tokenizer never saw become its unknown token, one word in three.
    rng = random.Random(1)
    texts = [" ".join(w if rng.random() > 0.33 else "ЖЩЮ" for w in t.split()) for t in held_out]
    checks = content_drift_checks(ContentDriftConfig(max_psi=None, max_kl=None), reference, texts, tokenizer)
    assert by_name(checks) == {"oov_share": "failed"}, checks
    assert "unknown-token share" in checks[0].reason


def test_too_few_tokens_is_inconclusive_never_ok(reference, tokenizer):
    checks = content_drift_checks(ContentDriftConfig(min_tokens=500), reference, ["a short tweet"], tokenizer)
    assert set(by_name(checks).values()) == {"inconclusive"}
    assert "fewer than min_tokens 500" in checks[0].reason


def test_reference_is_json_and_buckets_sum_to_one(reference, tokenizer, tiny_splits):
    assert len(reference.buckets) == ContentDriftConfig().top_k + 1 and OTHER in reference.buckets
    assert sum(reference.buckets.values()) == pytest.approx(1.0)
    assert ContentReference.model_validate_json(reference.model_dump_json()) == reference
    assert reference_profile(tiny_splits.train["text"], tokenizer) == reference  # deterministic
    with pytest.raises(DataError, match="no tokens"):
        reference_profile(["", "  "], tokenizer)


def test_population_stability_index():
    assert population_stability_index([0.5, 0.5], [0.5, 0.5]) == 0
    observed, expected = np.array([0.7, 0.3]), np.array([0.5, 0.5])
    assert population_stability_index(observed, expected) == pytest.approx(
        float(np.sum((observed - expected) * np.log(observed / expected))))
