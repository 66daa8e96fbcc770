"""Latency evidence: interleaved measurement of real tiny packages, and the round-paired intervals on synthetic
samples whose truth is known."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from kiln.tasks.engines import EngineOptions
from kiln.tasks.evaluate.benchmark import BenchConfig
from kiln.tasks.evaluate.evidence import LatencySamples
from kiln.tasks.evaluate.latency import (
    LATENCY_METRICS,
    MAX_CALLS,
    _bootstrap_quantile,
    _round_counts,
    calls_per_block,
    latency_metrics,
    measure_interleaved,
    metric_interval,
    noise_cv,
    ratio_interval,
    round_order,
)


def _samples(rng: np.random.Generator, rounds: int = 12, calls: int = 60, scale: float = 1.0,
             drift: np.ndarray | None = None, batch_size: int = 32) -> LatencySamples:
    """Lognormal call times around 5 ms (single) and 40 ms (batch), times a per-round drift factor."""
    drift = np.ones(rounds) if drift is None else drift
    single = 5.0 * scale * rng.lognormal(0, 0.1, (rounds, calls)) * drift[:, None]
    batch = 40.0 * scale * rng.lognormal(0, 0.1, (rounds, calls)) * drift[:, None]
    return LatencySamples(single, batch, batch_size)


# (a) the measurement ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def packages(tiny_models, tiny_splits, tmp_path_factory) -> dict[str, Path]:
    """The tiny BERT packaged twice, as Hugging Face weights (PyTorch) and as an ONNX engine."""
    from kiln.tasks.core.stages import Artifact
    from kiln.tasks.models.export import export_onnx
    from kiln.tasks.models.hf import load_model
    from kiln.tasks.models.predictor import PackageMeta, package

    hf, root, labels = tiny_models["bert"], tmp_path_factory.mktemp("latency"), list(tiny_splits.labels)
    onnx = export_onnx(load_model(hf, "sequence-classification"), root / "model.onnx")
    meta = {"task": "sequence-classification", "labels": labels, "seq_len": 32}
    return {"torch": package(Artifact("hf", hf), hf, root / "torch", PackageMeta(format="hf", **meta)),
            "onnx": package(Artifact("onnx", onnx), hf, root / "onnx", PackageMeta(format="onnx", **meta))}


def test_interleaved_measurement_of_two_packages(packages, tiny_splits):
    config = BenchConfig(max_seconds=0.1, rounds=4, warmup=1, min_runs=8, batch_sizes=(1, 4))
    texts = tiny_splits.test["text"].tolist()[:10]
    samples = measure_interleaved(packages, texts, EngineOptions(threads=1), config)
    assert set(samples) == {"torch", "onnx"}
    for got in samples.values():
        assert got.rounds == 4 and got.batch.shape[0] == 4 and got.batch_size == 4
        for x in (got.single, got.batch):
            assert x.ndim == 2 and 2 <= x.shape[1] <= MAX_CALLS and (x > 0).all() and np.isfinite(x).all()
        assert set(latency_metrics(got)) == set(LATENCY_METRICS)
    got = ratio_interval("latency_p50_ms", samples["onnx"], samples["torch"], resamples=200)
    assert 0 < got.low <= got.value <= got.high


def test_round_order_alternates():
    for n in (2, 3, 4, 5):
        names = [f"m{i}" for i in range(n)]
        orders = [round_order(names, r) for r in range(2 * n)]
        assert all(sorted(o) == names for o in orders)
        firsts = [o[0] for o in orders]
        assert all(firsts.count(m) == 2 for m in names)  # every model first equally often
        for m in names:  # and never always behind the same model
            before = {o[o.index(m) - 1] for o in orders if o.index(m) > 0}
            assert len(before) >= min(2, n - 1)
    assert round_order(["a", "b"], 0)[0] != round_order(["a", "b"], 1)[0]
    assert {tuple(round_order("abc", r)) for r in range(6)} == set(itertools.permutations("abc"))


def test_calls_per_block_fills_the_time_within_bounds():
    config = BenchConfig(max_seconds=1.2, rounds=12, min_runs=30)
    assert calls_per_block(0.001, config) == 100  # 0.1 s per block of 1 ms calls
    assert calls_per_block(1.0, config) == 3  # slow model: ceil(30 / 12) calls still
    assert calls_per_block(1e-7, config) == MAX_CALLS
    assert calls_per_block(1.0, BenchConfig(min_runs=3, rounds=12)) == 2


# (b) the intervals --------------------------------------------------------------------------------------------------

def test_identical_distributions_give_a_ratio_interval_containing_one():
    contained = []
    for seed in range(30):  # 95 % intervals: about 1 in 20 may miss; far more would mean they are too narrow
        rng = np.random.default_rng(100 + seed)
        drift = rng.lognormal(0, 0.05, 12)  # the machine's round-to-round noise, shared by both models
        cand, base = _samples(rng, drift=drift), _samples(rng, drift=drift)
        for metric in LATENCY_METRICS:
            got = ratio_interval(metric, cand, base, resamples=500, seed=seed)
            assert got.low < got.value < got.high
            contained.append(got.contains(1.0))
    assert np.mean(contained) >= 0.9


def test_a_planted_slowdown_is_excluded_from_one():
    rng = np.random.default_rng(2)
    base, cand = _samples(rng), _samples(rng, scale=1.2)
    got = ratio_interval("latency_p50_ms", cand, base)
    assert got.low > 1.0 and got.value == pytest.approx(1.2, abs=0.03)
    throughput = ratio_interval("throughput_per_s", cand, base)  # higher is better: the inverse ratio
    assert throughput.high < 1.0 and throughput.value == pytest.approx(1 / 1.2, abs=0.03)
    batch = ratio_interval("batch_latency_p50_ms", cand, base)
    assert throughput.value == pytest.approx(1 / batch.value)


def test_pairing_rounds_cancels_drift_shared_by_both_models():
    rng = np.random.default_rng(3)
    drift = np.where(np.arange(12) % 3 == 0, 1.3, 1.0)  # every third round 30 % slower for everyone
    base, cand = _samples(rng, drift=drift), _samples(rng, drift=drift)
    paired = ratio_interval("latency_p50_ms", cand, base)
    shuffled = rng.permutation(12)
    while (drift[shuffled] == drift).all():
        shuffled = rng.permutation(12)
    unpaired = ratio_interval("latency_p50_ms", LatencySamples(cand.single[shuffled], cand.batch, 32), base)
    assert paired.contains(1.0)
    assert paired.high - paired.low < 0.5 * (unpaired.high - unpaired.low)


def test_unequal_rounds_cannot_be_paired():
    rng = np.random.default_rng(4)
    with pytest.raises(ValueError, match="12 and 8 rounds"):
        ratio_interval("latency_p50_ms", _samples(rng), _samples(rng, rounds=8))
    with pytest.raises(ValueError, match="not a latency metric"):
        metric_interval("accuracy", _samples(rng))


def test_metric_interval_is_deterministic_and_brackets_the_pooled_value():
    rng = np.random.default_rng(5)
    samples = _samples(rng, drift=rng.uniform(0.9, 1.1, 12))
    values = latency_metrics(samples)
    for metric in LATENCY_METRICS:
        got = metric_interval(metric, samples, level=0.9, seed=7)
        assert got == metric_interval(metric, samples, level=0.9, seed=7) and got.level == 0.9
        assert got.value == pytest.approx(values[metric]) and got.low <= got.value <= got.high
    assert metric_interval("latency_p50_ms", samples, seed=8) != metric_interval("latency_p50_ms", samples, seed=9)


def test_bootstrap_quantiles_equal_those_of_the_materialised_resamples():
    rng = np.random.default_rng(6)
    x = rng.lognormal(0, 0.3, (6, 17))
    idx = rng.integers(0, 6, (300, 6))
    counts = np.zeros((300, 6))
    np.add.at(counts, (np.arange(300)[:, None], idx), 1)
    for q in (0.0, 0.5, 0.95, 0.99, 1.0):
        brute = np.quantile(x[idx].reshape(300, -1), q, axis=1)
        np.testing.assert_allclose(_bootstrap_quantile(x, counts, q), brute, rtol=1e-12)
    assert (_round_counts(12, 50, 0).sum(axis=1) == 12).all()


# (c) point values, (d) noise ----------------------------------------------------------------------------------------

def test_latency_metrics_are_percentiles_of_the_pooled_calls():
    rng = np.random.default_rng(7)
    samples = _samples(rng, rounds=5, calls=40, batch_size=16)
    single, batch = samples.single.ravel(), samples.batch.ravel()
    assert latency_metrics(samples) == pytest.approx({
        "latency_p50_ms": np.percentile(single, 50), "latency_p95_ms": np.percentile(single, 95),
        "latency_p99_ms": np.percentile(single, 99), "batch_latency_p50_ms": np.percentile(batch, 50),
        "batch_latency_p95_ms": np.percentile(batch, 95), "throughput_per_s": 16 / (np.median(batch) / 1e3)})


def test_noise_cv_of_the_round_medians():
    single = np.array([[1.0, 1.0, 9.0], [2.0, 2.0, 0.1], [3.0, 3.0, 3.0], [4.0, 4.0, 4.0]])  # medians 1, 2, 3, 4
    samples = LatencySamples(single, 2 * np.ones((4, 3)), 8)
    assert noise_cv(samples) == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2.5)
    assert noise_cv(samples, "batch") == 0.0
    with pytest.raises(ValueError, match="'single' or 'batch'"):
        noise_cv(samples, "double")
