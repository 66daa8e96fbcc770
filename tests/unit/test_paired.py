"""Quality evidence: per-row outcomes, intervals of quality metrics, and paired comparisons of two models."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from kiln.tasks.evaluate import paired as paired_module
from kiln.tasks.evaluate.evidence import Interval, RowEvidence
from kiln.tasks.evaluate.paired import Paired, metric_interval, metric_value, paired_comparison
from kiln.tasks.evaluate.quality import Outputs, classification_metrics, lm_metrics, row_evidence

# ---------------------------------------------------------------------------------------------- helpers


def _classifier(correct: np.ndarray, k: int = 3) -> RowEvidence:
    """Evidence whose rows are right exactly where ``correct`` says (truth all class 0, wrong rows say 1)."""
    truth = np.zeros(len(correct), dtype=np.int64)
    return RowEvidence(predicted=np.where(correct, 0, 1), truth=truth)


def _lm_rows(rng: np.random.Generator, n: int, mu: float) -> RowEvidence:
    """Synthetic LM rows whose population perplexity is exactly exp(mu): a row's mean token NLL is mu plus a
    row effect (tokens of a row are correlated) that is independent of the row's length and has mean 0."""
    tokens = 1 + rng.poisson(19, n)
    nll = tokens * (mu + rng.normal(0, 0.5, n))
    return RowEvidence(nll=nll, tokens=tokens, agree=rng.binomial(tokens, 0.9))


def _legacy_classification(outputs: Outputs, labels, gold) -> dict[str, float]:
    """classification_metrics as it was before row evidence existed (the reference the rows must reproduce)."""
    pred = np.concatenate([lg.argmax(axis=1) for lg in outputs.logits])
    index = {name: i for i, name in enumerate(labels)}
    truth = np.array([index[g] for g in gold])
    f1s = []
    for k in range(len(labels)):
        tp = float(np.sum((pred == k) & (truth == k)))
        fp = float(np.sum((pred == k) & (truth != k)))
        fn = float(np.sum((pred != k) & (truth == k)))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"accuracy": float(np.mean(pred == truth)), "macro_f1": float(np.mean(f1s))}


def _legacy_lm(outputs: Outputs, reference: Outputs | None = None) -> dict[str, float]:
    """lm_metrics as it was before row evidence existed."""
    nll, count, agree = 0.0, 0, 0
    for b, (logits, mask, ids) in enumerate(zip(outputs.logits, outputs.masks, outputs.ids, strict=True)):
        shifted, target = logits[:, :-1], ids[:, 1:]
        valid = (mask[:, 1:] * mask[:, :-1]).astype(bool)
        z = shifted - shifted.max(axis=-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
        nll -= float(np.take_along_axis(logp, target[..., None], axis=-1)[..., 0][valid].sum())
        count += int(valid.sum())
        if reference is not None:
            agree += int((shifted.argmax(-1) == reference.logits[b][:, :-1].argmax(-1))[valid].sum())
    metrics = {"perplexity": float(np.exp(nll / max(count, 1)))}
    if reference is not None:
        metrics["next_token_agreement"] = agree / max(count, 1)
    return metrics


def _outputs(folder, task, texts, batch_size=16) -> Outputs:
    from transformers import AutoTokenizer

    from kiln.tasks.models.predictor import encode, torch_runner

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    run = torch_runner(folder, task, 1)
    logits, masks, ids_all = [], [], []
    for start in range(0, len(texts), batch_size):
        ids, mask = encode(tokenizer, texts[start : start + batch_size], 64)
        logits.append(run(ids, mask))
        masks.append(mask)
        ids_all.append(ids)
    return Outputs(logits, masks, ids_all)


# ------------------------------------------------------------------------------------- known values


def test_wilson_interval_of_a_hand_computed_case():
    iv = metric_interval("accuracy", _classifier(np.arange(100) < 80), labels=3)
    # Wilson's interval is the set of p with |0.8 - p| <= z sqrt(p (1 - p) / 100): the roots of a quadratic.
    z = 1.959963984540054
    n, p = 100, 0.8
    roots = sorted(np.roots([1 + z * z / n, -(2 * p + z * z / n), p * p]))
    assert iv.value == 0.8
    assert (iv.low, iv.high) == pytest.approx(roots, abs=1e-12)
    assert (iv.low, iv.high) == pytest.approx((0.71117, 0.86663), abs=1e-5)  # as published for 80/100
    wider = metric_interval("accuracy", _classifier(np.arange(100) < 80), labels=3, level=0.99)
    assert wider.low < iv.low and wider.high > iv.high and wider.level == 0.99


def test_accuracy_is_compared_by_an_exact_binomial_test_on_discordant_rows():
    # 100 rows: 70 right for both, 10 only for the candidate, 2 only for the baseline, 18 wrong for both.
    cand = np.array([True] * 70 + [True] * 10 + [False] * 2 + [False] * 18)
    base = np.array([True] * 70 + [False] * 10 + [True] * 2 + [False] * 18)
    result = paired_comparison("accuracy", _classifier(cand), _classifier(base), labels=3)
    assert result.discordant == (10, 2)
    assert result.p_value == pytest.approx(2 * (1 + 12 + 66) / 2**12)  # two-sided: 2 P(X <= 2 | 12, 1/2)
    assert result.p_value == pytest.approx(stats.binomtest(10, 12, 0.5).pvalue)
    assert result.difference.value == pytest.approx(0.08)
    # Newcombe's hybrid score interval (method 10), by hand: Wilson intervals of 0.80 and 0.72 on 100 rows and
    # the rows' phi correlation (70·18 − 10·2) / sqrt(80·20·72·28).
    z = stats.norm.ppf(0.975)

    def wilson(p, n=100):
        centre, half = p + z * z / (2 * n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)

    (l1, u1), (l2, u2) = wilson(0.80), wilson(0.72)
    phi = (70 * 18 - 10 * 2) / np.sqrt(80 * 20 * 72 * 28)
    down = np.sqrt((0.80 - l1) ** 2 - 2 * phi * (0.80 - l1) * (u2 - 0.72) + (u2 - 0.72) ** 2)
    up = np.sqrt((u1 - 0.80) ** 2 - 2 * phi * (u1 - 0.80) * (0.72 - l2) + (0.72 - l2) ** 2)
    assert result.difference.low == pytest.approx(0.08 - down)
    assert result.difference.high == pytest.approx(0.08 + up)
    assert 0 < result.difference.low < 0.08 < result.difference.high  # a real improvement: the interval excludes 0
    assert result.ratio.value == pytest.approx(0.80 / 0.72)
    assert result.ratio.low == pytest.approx((0.72 + result.difference.low) / 0.72)
    assert result.method == "McNemar exact test and Newcombe interval, 12 discordant rows"
    swapped = paired_comparison("accuracy", _classifier(base), _classifier(cand), labels=3)
    assert swapped.discordant == (2, 10) and swapped.difference.high == pytest.approx(-result.difference.low)


def test_no_discordant_rows_is_no_evidence_of_a_difference():
    truth = np.array([0, 1, 2, 0, 1])
    cand = RowEvidence(predicted=np.array([0, 1, 0, 2, 1]), truth=truth)
    base = RowEvidence(predicted=np.array([0, 1, 1, 1, 1]), truth=truth)  # other wrong classes, same rows right
    result = paired_comparison("accuracy", cand, base, labels=3)
    assert result.difference == Interval(0.0, 0.0, 0.0)
    assert result.ratio == Interval(1.0, 1.0, 1.0)
    assert result.p_value == 1.0 and result.discordant == (0, 0)


@pytest.mark.parametrize("metric", ["macro_f1", "perplexity", "next_token_agreement"])
def test_identical_evidence_gives_exactly_no_difference(metric):
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 3, 500)
    rows = RowEvidence(predicted=np.where(rng.random(500) < 0.7, truth, 2), truth=truth)
    if metric != "macro_f1":
        rows = _lm_rows(rng, 500, 2.0)
    same = RowEvidence(**{k: None if v is None else v.copy() for k, v in rows.__dict__.items()})
    result = paired_comparison(metric, rows, same, labels=3)
    assert (result.difference.low, result.difference.value, result.difference.high) == (0.0, 0.0, 0.0)
    assert (result.ratio.low, result.ratio.value, result.ratio.high) == (1.0, 1.0, 1.0)
    assert result.method == "paired bootstrap, 2000 resamples" and result.p_value is None


def test_a_planted_perplexity_regression_is_resolved_and_identical_seeds_repeat():
    rng = np.random.default_rng(5)
    base = _lm_rows(rng, 800, 2.0)
    worse = RowEvidence(nll=base.nll * 1.02 + rng.normal(0, 1.0, 800), tokens=base.tokens)
    result = paired_comparison("perplexity", worse, base, labels=0)
    assert result.difference.low > 0 and result.ratio.low > 1  # paired: detected although the CIs overlap
    alone_w, alone_b = metric_interval("perplexity", worse, labels=0), metric_interval("perplexity", base, labels=0)
    assert alone_w.low < alone_b.high  # unpaired intervals overlap: pairing is what resolves it
    assert paired_comparison("perplexity", worse, base, labels=0) == result
    assert paired_comparison("perplexity", worse, base, labels=0, seed=1) != result


def test_chunking_the_resamples_does_not_change_the_interval(monkeypatch):
    rng = np.random.default_rng(9)
    rows = _lm_rows(rng, 300, 2.0)
    whole = metric_interval("perplexity", rows, labels=0, resamples=500)
    monkeypatch.setattr(paired_module, "_CHUNK_ELEMENTS", 7 * 300)  # 7 resamples a chunk
    assert metric_interval("perplexity", rows, labels=0, resamples=500) == whole


def test_macro_f1_bootstrap_matches_the_metric_on_a_resample():
    rng = np.random.default_rng(11)
    truth = rng.integers(0, 4, 200)
    rows = RowEvidence(predicted=np.where(rng.random(200) < 0.6, truth, rng.integers(0, 4, 200)), truth=truth)
    idx = rng.integers(0, 200, size=(5, 200))
    vectorised = paired_module._statistic("macro_f1", rows, idx, 4)
    for r in range(5):
        logits = np.eye(4)[rows.predicted[idx[r]]]
        gold = [str(t) for t in truth[idx[r]]]
        one = _legacy_classification(Outputs([logits], [], []), ["0", "1", "2", "3"], gold)["macro_f1"]
        assert vectorised[r] == pytest.approx(one, abs=1e-12)


# ----------------------------------------------------------------------------------------- coverage


def test_intervals_cover_the_truth_at_about_the_nominal_rate():
    """200 synthetic evaluations each: a 95 % interval should cover the population value 90-99 % of the time."""
    rng = np.random.default_rng(2024)
    reps, n, mu, slower = 200, 300, 2.0, 0.01
    hits = {"accuracy": 0, "perplexity": 0, "paired accuracy": 0, "paired perplexity": 0}
    true_diff = np.exp(mu * (1 + slower)) - np.exp(mu)
    for rep in range(reps):
        correct = rng.random(n) < 0.8
        hits["accuracy"] += metric_interval("accuracy", _classifier(correct), labels=3).contains(0.8)
        base = _lm_rows(rng, n, mu)
        cand = RowEvidence(nll=base.nll * (1 + slower) + rng.normal(0, 2.0, n), tokens=base.tokens)
        hits["perplexity"] += metric_interval("perplexity", base, labels=0, resamples=1000, seed=rep).contains(
            np.exp(mu))
        diff = paired_comparison("perplexity", cand, base, labels=0, resamples=1000, seed=rep).difference
        hits["paired perplexity"] += diff.contains(true_diff)
        # rows: both right 75 %, only the candidate 4 %, only the baseline 6 %: true difference -2 points
        u = rng.random(n)
        cand_right, base_right = (u < 0.79), (u < 0.75) | ((u >= 0.79) & (u < 0.85))
        acc = paired_comparison("accuracy", _classifier(cand_right), _classifier(base_right), labels=3)
        hits["paired accuracy"] += acc.difference.contains(-0.02)
    for name, hit in hits.items():
        assert 0.9 <= hit / reps <= 0.99, f"{name}: coverage {hit / reps:.3f}"


# -------------------------------------------------------------------------------------- refusals etc.


def test_evidence_of_different_rows_is_refused():
    a = _classifier(np.arange(10) < 5)
    with pytest.raises(ValueError, match="10 candidate rows with 9 baseline rows"):
        paired_comparison("accuracy", a, _classifier(np.arange(9) < 5), labels=3)
    other_truth = RowEvidence(predicted=a.predicted, truth=np.ones(10, dtype=np.int64))
    with pytest.raises(ValueError, match="different gold labels"):
        paired_comparison("macro_f1", a, other_truth, labels=3)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="same evaluation rows"):
        paired_comparison("perplexity", _lm_rows(rng, 20, 2.0), _lm_rows(rng, 21, 2.0), labels=0)


def test_metrics_the_rows_cannot_give_are_none():
    rng = np.random.default_rng(0)
    lm = RowEvidence(nll=rng.random(5), tokens=np.ones(5, dtype=np.int64))
    cls = _classifier(np.arange(5) < 3)
    assert metric_interval("next_token_agreement", lm, labels=0) is None  # no reference, no `agree`
    assert metric_interval("accuracy", lm, labels=0) is None
    assert metric_interval("perplexity", cls, labels=3) is None
    assert metric_interval("latency_p50_ms", cls, labels=3) is None
    assert metric_interval("accuracy", RowEvidence(), labels=3) is None
    assert paired_comparison("next_token_agreement", lm, lm, labels=0) is None
    with pytest.raises(ValueError, match="cannot compute 'perplexity'"):
        metric_value("perplexity", cls, 3)


def test_paired_round_trips_through_a_dict():
    cand = _classifier(np.arange(50) < 40)
    base = _classifier(np.arange(50) < 35)
    result = paired_comparison("accuracy", cand, base, labels=3)
    raw = result.to_dict()
    assert raw["discordant"] == [5, 0] and raw["difference"]["value"] == pytest.approx(0.1)
    assert Paired.from_dict(raw) == result


# ------------------------------------------------------------------------- row evidence on tiny models


def test_classifier_rows_reproduce_the_metrics(tiny_models, tiny_splits):
    frame = tiny_splits.test
    texts, gold, labels = frame["text"].tolist(), frame["label"].tolist(), tiny_splits.labels
    outputs = _outputs(tiny_models["bert"], "sequence-classification", texts)
    rows = row_evidence(outputs, "sequence-classification", labels, gold)
    assert rows.rows == len(texts) and rows.truth.tolist() == [labels.index(g) for g in gold]
    legacy = _legacy_classification(outputs, labels, gold)
    assert metric_value("accuracy", rows, len(labels)) == legacy["accuracy"] == float(np.mean(rows.correct))
    assert metric_value("macro_f1", rows, len(labels)) == pytest.approx(legacy["macro_f1"], abs=1e-12)
    assert classification_metrics(outputs, labels, gold) == pytest.approx(legacy, abs=1e-12)
    assert row_evidence(outputs, "sequence-classification", labels, None).truth is None


def test_lm_rows_reproduce_the_metrics_and_score_each_row_alone(tiny_models, tiny_splits):
    texts = tiny_splits.test["text"].tolist()[:40]
    folder = tiny_models["gpt2"]
    outputs = _outputs(folder, "causal-lm", texts)
    noise = np.random.default_rng(0)
    reference = Outputs([lg + noise.normal(0, 0.05, lg.shape).astype(lg.dtype) for lg in outputs.logits],
                        outputs.masks, outputs.ids)
    rows = row_evidence(outputs, "causal-lm", (), None, reference)
    legacy = _legacy_lm(outputs, reference)
    assert rows.rows == len(texts) and rows.nll.dtype == np.float64
    assert 0 < rows.agree.sum() < rows.tokens.sum()  # the noisy reference disagrees on some tokens
    assert np.exp(rows.nll.sum() / rows.tokens.sum()) == pytest.approx(legacy["perplexity"], rel=1e-6)
    assert rows.agree.sum() / rows.tokens.sum() == legacy["next_token_agreement"]
    assert lm_metrics(outputs, reference) == pytest.approx(legacy, rel=1e-6)
    assert row_evidence(outputs, "causal-lm", (), None).agree is None
    # A row's evidence is that text's own: scored alone (no padding), the same tokens and the same NLL.
    for i in (0, 17, 39):
        alone = row_evidence(_outputs(folder, "causal-lm", [texts[i]]), "causal-lm", (), None)
        assert alone.tokens[0] == rows.tokens[i]
        assert alone.nll[0] == pytest.approx(rows.nll[i], rel=1e-4)
