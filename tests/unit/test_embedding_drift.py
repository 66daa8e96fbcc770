"""Embedding drift: the model's own pooled representation moves for another domain at equal lengths, not for
held-out rows of the training distribution; the statistic and its storage are exact."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from kiln.errors import ConfigError, DataError
from kiln.tasks.data.planted import another_domain
from kiln.tasks.evaluate.embedding_drift import (
    LOGITS,
    POOLED,
    EmbeddingDriftConfig,
    EmbeddingReference,
    embed_texts,
    embedding_drift_check,
    hotelling,
    open_embedder,
    reference_from_embeddings,
)


@pytest.fixture(scope="module")
def embedder(tiny_models):
    return open_embedder(tiny_models["bert"])  # the tiny BERT classifier's folder, as a model server loads it


@pytest.fixture(scope="module")
def reference(embedder, tiny_splits) -> EmbeddingReference:
    return reference_from_embeddings(embedder.embed(tiny_splits.train["text"].tolist()))  # 320 training texts


@pytest.fixture(scope="module")
def held_out(tiny_splits) -> list[str]:
    return tiny_splits.validation["text"].tolist() + tiny_splits.test["text"].tolist()  # 80 texts


def test_other_domain_at_equal_lengths_moves_the_embedding_held_out_rows_do_not(embedder, reference, held_out):
    shifted = another_domain(held_out)
    assert [len(t) for t in shifted] == [len(t) for t in held_out]
    assert [len(t.split()) for t in shifted] == [len(t.split()) for t in held_out]
    cfg = EmbeddingDriftConfig()
    live_same, live_moved = embedder.embed(held_out), embedder.embed(shifted)

    same = embedding_drift_check(cfg, reference, live_same, kind=embedder.kind)
    assert same.status == "ok", same
    moved = embedding_drift_check(cfg, reference, live_moved, kind=embedder.kind)
    assert moved.status == "failed", moved
    assert moved.reason.startswith("embedding_drift: Hotelling T2 of the mean-pooled last hidden state mean")
    assert "over 80 texts vs reference of 320" in moved.reason and moved.reason.endswith("FAILED")
    # Not a near miss: the shift is several times the threshold, the held-out rows under it.
    limit = np.quantile(reference.null, cfg.quantile) * cfg.margin
    assert hotelling(reference, live_moved.mean(axis=0), 80) > 3 * limit
    assert hotelling(reference, live_same.mean(axis=0), 80) < limit


def test_too_few_rows_is_inconclusive_never_ok(embedder, reference, held_out):
    check = embedding_drift_check(EmbeddingDriftConfig(min_rows=50), reference, embedder.embed(held_out[:10]))
    assert check.status == "inconclusive" and "10 live texts, fewer than min_rows 50" in check.reason


def test_wrong_width_or_kind_is_refused(reference):
    with pytest.raises(DataError, match="64 wide but the reference is 65|65 wide but the reference is 64"):
        embedding_drift_check(EmbeddingDriftConfig(), reference, np.zeros((60, reference.width + 1)))
    with pytest.raises(DataError, match="live embeddings are logits but the reference holds mean-pooled"):
        embedding_drift_check(EmbeddingDriftConfig(), reference, np.zeros((60, reference.width)), kind=LOGITS)
    with pytest.raises(DataError, match="at least 2 x min_rows = 100"):
        reference_from_embeddings(np.zeros((99, 4)))
    with pytest.raises(DataError, match="finite 2-D array"):
        reference_from_embeddings(np.full((200, 4), np.nan))


def test_padding_does_not_change_a_texts_embedding(embedder):
    alone = embed_texts(embedder, ["great flight"])
    padded = embed_texts(embedder, ["great flight", "a much longer text that makes the first one padded " * 3])
    assert embedder.kind == POOLED and padded.shape == (2, alone.shape[1])
    np.testing.assert_allclose(padded[0], alone[0], rtol=1e-4, atol=1e-5)


def test_woodbury_distance_matches_the_dense_inverse():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 12)) @ rng.normal(size=(12, 12))  # correlated columns
    ref = reference_from_embeddings(x, EmbeddingDriftConfig(rank=4, bootstrap=20))
    dense = np.diag(ref.diag) + ref.factors @ np.diag(ref.eigenvalues) @ ref.factors.T
    delta = rng.normal(size=12)
    assert ref.mahalanobis2(delta) == pytest.approx(float(delta @ np.linalg.solve(dense, delta)), rel=1e-9)
    # rank 4 of 12 plus the diagonal still carries each column's whole variance (plus the ridge)
    np.testing.assert_allclose(np.diag(dense), x.var(axis=0, ddof=1) + 0.1 * x.var(axis=0, ddof=1).mean(),
                               rtol=1e-9)


def test_null_is_the_same_scale_as_samples_from_the_reference_distribution():
    # Same Gaussian for reference and live: the live statistic sits inside the bootstrap's range at any size.
    rng = np.random.default_rng(1)
    ref = reference_from_embeddings(rng.normal(size=(1000, 8)), EmbeddingDriftConfig(bootstrap=100))
    live = [hotelling(ref, rng.normal(size=(n, 8)).mean(axis=0), n) for n in (60, 300, 1000) for _ in range(20)]
    assert np.quantile(live, 0.9) < np.quantile(ref.null, 0.99) * EmbeddingDriftConfig().margin
    assert 0.5 < np.median(live) / np.median(ref.null) < 2


def test_reference_round_trips_through_npz(reference, tmp_path):
    loaded = EmbeddingReference.load(reference.save(tmp_path / "embedding.npz"))
    assert loaded.kind == reference.kind and loaded.rows == reference.rows
    for name in ("mean", "diag", "factors", "eigenvalues", "null"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(reference, name))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="delete it to rebuild"):
        EmbeddingReference.load(tmp_path / "bad.npz")


def test_config_is_strict_and_sources_are_checked():
    with pytest.raises(ValidationError):
        EmbeddingDriftConfig(min_row=3)
    with pytest.raises(ConfigError, match="cannot embed with int"):
        open_embedder(3)


def test_a_package_embeds_with_its_hidden_states_an_onnx_engine_with_its_logits(tiny_models, tiny_splits,
                                                                                tmp_path):
    from kiln.tasks.core.stages import Artifact
    from kiln.tasks.models.export import export_onnx
    from kiln.tasks.models.hf import load_model
    from kiln.tasks.models.predictor import PackageMeta, Predictor, package

    hf, labels = tiny_models["bert"], list(tiny_splits.labels)
    meta = {"task": "sequence-classification", "labels": labels, "seq_len": 64}
    onnx = export_onnx(load_model(hf, "sequence-classification"), tmp_path / "model.onnx")
    torch_pkg = package(Artifact("hf", hf), hf, tmp_path / "torch", PackageMeta(format="hf", **meta))
    onnx_pkg = Predictor(package(Artifact("onnx", onnx), hf, tmp_path / "onnx", PackageMeta(format="onnx", **meta)))
    texts = ["great flight", "lost my luggage again", "ok"]

    pooled = open_embedder(torch_pkg)  # a package folder opens as its Predictor
    assert pooled.kind == POOLED
    np.testing.assert_allclose(pooled.embed(texts), embed_texts(hf, texts), rtol=1e-4, atol=1e-5)
    logits = open_embedder(onnx_pkg)
    assert logits.kind == LOGITS
    np.testing.assert_allclose(logits.embed(texts, batch_size=2), onnx_pkg.run(*onnx_pkg.encode(texts)), rtol=1e-5)
