"""Small-model-first cascades: the threshold choice (pure), the recipe kind, and the cascade package/predictor."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kiln.errors import ArtifactError, ConfigError
from kiln.tasks.compress.recipes import Recipe, library, resolve_recipes
from kiln.tasks.core.stages import Artifact
from kiln.tasks.models.cascade import CascadePredictor, package_cascade
from kiln.tasks.models.predictor import PackageMeta, Predictor, package, softmax
from kiln.tasks.optimize.cascade import choose_threshold


# ── threshold choice ─────────────────────────────────────────────────────────────────────────────────
def _accuracy_at(threshold, conf, small, large, truth):
    escalate = conf < threshold
    return float(np.mean(np.where(escalate, large, small) == truth)), float(escalate.mean())


def test_a_small_model_good_enough_escalates_nothing():
    conf = np.array([0.9, 0.6, 0.7, 0.8])
    truth = np.array([0, 1, 1, 0])
    choice = choose_threshold(conf, truth, truth, truth, max_accuracy_drop=0.0)
    assert choice.threshold == 0.0 and choice.escalation_rate == 0.0 and choice.accuracy == 1.0


def test_the_fewest_least_confident_rows_escalate_to_meet_the_target():
    conf = np.array([0.55, 0.95, 0.60, 0.90, 0.70, 0.99])
    truth = np.array([0, 0, 1, 1, 0, 1])
    small = np.array([1, 0, 0, 1, 0, 1])  # wrong on the two least confident rows
    large = truth.copy()
    choice = choose_threshold(conf, small, large, truth, max_accuracy_drop=0.0)
    assert choice.escalation_rate == pytest.approx(2 / 6)
    assert 0.60 < choice.threshold < 0.70  # halfway between the last escalated and the first kept confidence
    assert _accuracy_at(choice.threshold, conf, small, large, truth) == (1.0, pytest.approx(2 / 6))
    # Allowing one row in six of loss (16.7 points) escalates one row fewer.
    looser = choose_threshold(conf, small, large, truth, max_accuracy_drop=0.17)
    assert looser.escalation_rate == pytest.approx(1 / 6) and looser.accuracy >= looser.target_accuracy


def test_rows_of_equal_confidence_escalate_together_and_everything_may_escalate():
    conf = np.array([0.5, 0.5, 0.5, 0.5])
    truth = np.array([0, 1, 0, 1])
    small = np.array([0, 0, 0, 0])
    choice = choose_threshold(conf, small, truth, truth, max_accuracy_drop=0.0)
    assert choice.escalation_rate == 1.0 and choice.threshold > 0.5
    assert _accuracy_at(choice.threshold, conf, small, truth, truth)[0] == 1.0


def test_the_choice_is_the_smallest_share_meeting_the_target_on_random_outcomes():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(5, 60))
        conf = rng.choice([0.4, 0.5, 0.6, 0.7, 0.8, 0.9], size=n)
        truth = rng.integers(0, 3, n)
        small = np.where(rng.random(n) < conf, truth, (truth + 1) % 3)
        large = np.where(rng.random(n) < 0.9, truth, (truth + 2) % 3)
        drop = float(rng.choice([0.0, 0.003, 0.05]))
        choice = choose_threshold(conf, small, large, truth, max_accuracy_drop=drop)
        acc, share = _accuracy_at(choice.threshold, conf, small, large, truth)
        assert acc == pytest.approx(choice.accuracy) and share == pytest.approx(choice.escalation_rate)
        assert acc >= choice.large_accuracy - drop - 1e-9
        cheaper = [t for t in np.unique(conf) if _accuracy_at(t, conf, small, large, truth)[1] < share]
        assert all(_accuracy_at(t, conf, small, large, truth)[0] < choice.target_accuracy - 1e-9 for t in cheaper)


def test_mismatched_or_empty_inputs_are_refused():
    with pytest.raises(ValueError, match="same non-zero number of rows"):
        choose_threshold(np.array([]), np.array([]), np.array([]), np.array([]), max_accuracy_drop=0.0)
    with pytest.raises(ValueError, match="same non-zero number of rows"):
        choose_threshold(np.array([0.5]), np.array([0, 1]), np.array([0]), np.array([0]), max_accuracy_drop=0.0)


# ── the recipe kind ──────────────────────────────────────────────────────────────────────────────────
def test_the_preset_cascade_names_its_small_member():
    (recipe,) = resolve_recipes(["cascade-distill-3l"])
    assert recipe.cascade.large == "champion" and recipe.cascade.max_accuracy_drop == 0.003
    assert set(recipe.members) == {"small"} and recipe.members["small"].name == "distill-3l+int8-dynamic"
    assert "cascade-distill-3l" in library()


def test_cascade_recipes_that_cannot_work_say_why(tmp_path):
    with pytest.raises(ValueError, match="either 'stages'"):
        Recipe(name="both", stages=[{"stage": "export"}], cascade={"small": "int8-dynamic"})
    with pytest.raises(ValueError, match="either 'stages'"):
        Recipe(name="neither")
    extra = tmp_path / "recipes.yaml"
    extra.write_text("c1: {cascade: {small: int9}}\nc2: {cascade: {small: int8-dynamic, large: c1}}\n"
                     "c3: {cascade: {small: int8-dynamic, large: onnx-fp32, max_accuracy_drop: 0.01}}\n")
    with pytest.raises(ConfigError, match=r"cascade small 'int9' is not a recipe"):
        resolve_recipes(["c1"], extra)
    with pytest.raises(ConfigError, match=r"cascade large 'c1' is itself a cascade"):
        resolve_recipes(["c2"], extra)
    (c3,) = resolve_recipes(["c3"], extra)
    assert {role: r.name for role, r in c3.members.items()} == {"small": "int8-dynamic", "large": "onnx-fp32"}


# ── the package and its predictor ────────────────────────────────────────────────────────────────────
@pytest.fixture(scope="module")
def members(tmp_path_factory, tiny_models, tiny_splits):
    """Two tiny BERT packages with the same tokenizer: seed 0 (the small member) and seed 1 (the large one)."""
    from tests.tiny import save_tiny

    root = tmp_path_factory.mktemp("cascade-members")
    large_hf = save_tiny("bert", tiny_splits.train["text"].tolist(), root / "hf-large", labels=tiny_splits.labels,
                         seed=1)
    out = {}
    for role, hf in (("small", tiny_models["bert"]), ("large", large_hf)):
        meta = PackageMeta(format="hf", task="sequence-classification", labels=list(tiny_splits.labels))
        out[role] = package(Artifact("hf", hf), hf, root / role, meta)
    return out


def _cascade(members, tmp_path, threshold):
    return package_cascade(members["small"], members["large"], tmp_path / "cascade", threshold, recipe="c",
                           member_recipes={"small": "s", "large": "champion"})


def test_a_cascade_answers_from_the_small_model_and_escalates_uncertain_rows(members, tmp_path, tiny_splits):
    texts = tiny_splits.validation["text"].tolist()[:40]
    small, large = Predictor(members["small"]), Predictor(members["large"])
    ids, mask = small.encode(texts)
    small_logits, large_logits = small.run(ids, mask), large.run(ids, mask)
    conf = softmax(small_logits).max(axis=1)
    threshold = float(np.median(conf))
    folder = _cascade(members, tmp_path, threshold)

    cascade = Predictor(folder)  # any package opens through Predictor; a cascade opens as one model
    assert isinstance(cascade, CascadePredictor) and cascade.meta.format == "cascade"
    logits = cascade.run(ids, mask)
    escalate = conf < threshold
    assert 0 < escalate.sum() < len(texts)
    np.testing.assert_allclose(logits[~escalate], small_logits[~escalate], atol=1e-5)
    np.testing.assert_allclose(logits[escalate], large_logits[escalate], atol=1e-4)
    assert cascade.last_call.rows == len(texts) and cascade.last_call.escalated == int(escalate.sum())
    assert cascade.last_call.large_seconds > 0 and cascade.stats.escalation_rate == pytest.approx(escalate.mean())

    frame = cascade.predict(texts[:3])
    assert list(frame.columns) == ["label", "score", "scores"] and set(frame["label"]) <= set(tiny_splits.labels)
    spec = json.loads((folder / "cascade.json").read_text())
    assert spec["threshold"] == threshold and spec["members"]["large"] == {"folder": "large", "recipe": "champion"}


def test_a_changed_member_file_is_refused(members, tmp_path):
    folder = _cascade(members, tmp_path, 0.5)
    (folder / "large" / "config.json").write_text("{}")
    with pytest.raises(ArtifactError, match="large/config.json .* is corrupt"):
        Predictor(folder)


def test_members_that_cannot_form_a_cascade_are_refused(members, tmp_path, tiny_models):
    lm = package(Artifact("hf", tiny_models["gpt2"]), tiny_models["gpt2"], tmp_path / "lm",
                 PackageMeta(format="hf", task="causal-lm"))
    with pytest.raises(ConfigError, match="cascades are for classifiers"):
        package_cascade(members["small"], lm, tmp_path / "c", 0.5, recipe="c", member_recipes={})
    nested = _cascade(members, tmp_path, 0.5)
    with pytest.raises(ConfigError, match="itself a cascade"):
        package_cascade(members["small"], nested, tmp_path / "c2", 0.5, recipe="c", member_recipes={})
