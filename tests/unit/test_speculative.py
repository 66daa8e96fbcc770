"""Speculative decoding: a draft may change how fast tokens come, never which tokens come.

Correctness is the target decoding alone (:class:`KVCacheGenerator`): greedy tokens must be the same for every
prompt and lookahead, with a draft that agrees (the target itself: acceptance 1.0), one that almost never agrees
(a random 1-layer Llama), and one the ``draft`` stage derives from the model (a layer kept, distilled on its
generations); and with vocabulary-pruned drafts (one the stage derives with the ce objective, one random), whose
ids are mapped, on prompts holding ids outside their vocabulary. The package opens through ``Predictor`` as one
model.
"""

import json

import numpy as np
import pandas as pd
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from kiln.errors import ArtifactError, ConfigError
from kiln.tasks.compress import recipes
from kiln.tasks.compress.draft import DraftParams, draft, draft_layers
from kiln.tasks.compress.draft_vocab import revocabularize, special_ids
from kiln.tasks.core.stages import Artifact, StageContext
from kiln.tasks.engines.onnx_generation import GenerationConfig, KVCacheGenerator
from kiln.tasks.engines.speculative import DraftVocab, SpeculativeConfig, SpeculativeGenerator
from kiln.tasks.models.decoder_export import export_decoder_with_past
from kiln.tasks.models.predictor import PackageMeta, Predictor, package
from kiln.tasks.models.speculative import SpeculativePredictor, measure_speculation, package_speculative
from tests.tiny import build

PROMPTS = ["the movie was", "a truly wonderful and moving film with a great cast", "boring", "i"]


@pytest.fixture(scope="module")
def graphs(tiny_models, tiny_splits, tmp_path_factory):
    """Target (4 layers), a random draft (1 layer) and a draft from the ``draft`` stage, as with-past graphs."""
    folder = tiny_models["llama"]
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    root = tmp_path_factory.mktemp("speculative")
    target = build("llama", tokenizer, layers=4, seed=0)
    target.save_pretrained(root / "target-hf")
    tokenizer.save_pretrained(root / "target-hf")
    ctx = StageContext(task="causal-lm", workdir=root / "stage", tokenizer_dir=folder, train=tiny_splits.train,
                       seq_len=32, threads=1)
    ctx.workdir.mkdir()
    derived = draft(Artifact("hf", root / "target-hf"), {"layers": [0, 3], "prompts": 8, "prompt_tokens": 4,
                                                         "new_tokens": 6, "distill": {"max_steps": 2,
                                                                                      "batch_size": 4}}, ctx)
    ctx.workdir = root / "stage-ce"
    ctx.workdir.mkdir()
    pruned = draft(Artifact("hf", root / "target-hf"), {"layers": [0, 3], "prompts": 16, "prompt_tokens": 4,
                                                        "new_tokens": 8, "vocab": 48, "steps": 4}, ctx)
    rng = np.random.default_rng(7)
    kept = np.union1d(special_ids(tokenizer, len(tokenizer)), rng.choice(np.arange(4, len(tokenizer)), 36, False))
    random_vocab = DraftVocab(kept, fallback=10, target_vocab_size=len(tokenizer))
    random_pruned = build("llama", tokenizer, layers=1, seed=5)
    revocabularize(random_pruned, random_vocab)
    return {
        "tokenizer": tokenizer, "folder": folder, "draft_metrics": derived.metrics,
        "pruned": export_decoder_with_past(AutoModelForCausalLM.from_pretrained(pruned.artifact.path),
                                           root / "pruned.onnx"),
        "random_pruned": export_decoder_with_past(random_pruned, root / "random_pruned.onnx"),
        "vocabs": {"pruned": DraftVocab.read(pruned.artifact.path), "random_pruned": random_vocab},
        "target": export_decoder_with_past(target, root / "target.onnx"),
        "random": export_decoder_with_past(build("llama", tokenizer, layers=1, seed=5), root / "random.onnx"),
        "derived": export_decoder_with_past(AutoModelForCausalLM.from_pretrained(derived.artifact.path),
                                            root / "derived.onnx"),
    }


def _ids(tokenizer, text):
    ids = np.asarray([tokenizer(text)["input_ids"]], dtype=np.int64)
    return ids, np.ones_like(ids)


@pytest.mark.parametrize("which", ["target", "random", "derived"])
def test_greedy_tokens_are_the_targets_own_for_every_prompt_and_lookahead(graphs, which):
    tokenizer = graphs["tokenizer"]
    target, drafter = KVCacheGenerator(graphs["target"]), KVCacheGenerator(graphs[which])
    config = GenerationConfig(max_new_tokens=12)
    for lookahead, adaptive in ((1, False), (4, False), (2, True)):
        engine = SpeculativeGenerator(target, drafter, SpeculativeConfig(lookahead=lookahead, adaptive=adaptive,
                                                                         max_lookahead=6))
        for i, text in enumerate(PROMPTS[:3]):
            ids, mask = _ids(tokenizer, text)
            eos = None if i % 2 else tokenizer.eos_token_id
            want = target.generate(ids, mask, config, eos_token_id=eos)
            got = engine.generate(ids, mask, config, eos_token_id=eos)
            np.testing.assert_array_equal(got, want, err_msg=f"{which} k={lookahead} {adaptive=} {text!r}")
        if which == "target":
            assert engine.stats.acceptance_rate == 1.0
            assert engine.stats.tokens_per_pass > 1
        if which == "random":
            assert engine.stats.acceptance_rate < 0.5  # it disagreed often, and still changed nothing


def test_an_adaptive_lookahead_grows_while_the_draft_is_right_and_shrinks_when_it_is_not(graphs):
    tokenizer = graphs["tokenizer"]
    target = KVCacheGenerator(graphs["target"])
    ids, mask = _ids(tokenizer, PROMPTS[0])
    config = GenerationConfig(max_new_tokens=30)
    passes = {}
    for which in ("target", "random"):
        drafted = []
        engine = SpeculativeGenerator(target, KVCacheGenerator(graphs[which]),
                                      SpeculativeConfig(lookahead=2, adaptive=True, max_lookahead=6))
        original = engine._propose
        engine._propose = lambda d, seq, k, v, original=original, drafted=drafted: drafted.append(k) or original(
            d, seq, k, v)
        np.testing.assert_array_equal(engine.generate(ids, mask, config, eos_token_id=None),
                                      target.generate(ids, mask, config, eos_token_id=None))
        passes[which] = drafted
    right = passes["target"]  # always accepted: 2, 4, 6, 6 ... (bounded by what is left to write)
    assert right[:3] == [2, 4, 6] and max(right) == 6
    wrong = passes["random"]  # mostly rejected: down to single guesses
    assert wrong[0] == 2 and wrong.count(1) > len(wrong) // 2


@pytest.mark.parametrize("which", ["pruned", "random_pruned"])
def test_a_vocabulary_pruned_draft_changes_no_token_even_on_ids_it_does_not_know(graphs, which):
    tokenizer, vocab = graphs["tokenizer"], graphs["vocabs"][which]
    target, drafter = KVCacheGenerator(graphs["target"]), KVCacheGenerator(graphs[which])
    outside = [t for t in range(4, len(tokenizer)) if t not in set(vocab.draft_to_target.tolist())]
    inside = int(vocab.draft_to_target[-1])
    prompts = [_ids(tokenizer, PROMPTS[1])[0], np.asarray([[outside[0], inside, outside[1], outside[2]]])]
    assert vocab.size < len(tokenizer) and (vocab.to_draft(prompts[1]) == vocab.fallback).sum() == 3
    config = GenerationConfig(max_new_tokens=12)
    for lookahead in (1, 4):
        engine = SpeculativeGenerator(target, drafter, SpeculativeConfig(lookahead=lookahead), vocab)
        for ids in prompts:
            mask = np.ones_like(ids)
            want = target.generate(ids, mask, config, eos_token_id=None)
            np.testing.assert_array_equal(engine.generate(ids, mask, config, eos_token_id=None), want,
                                          err_msg=f"{which} k={lookahead} {ids}")
        assert engine.stats.drafted > 0
    with pytest.raises(ConfigError, match="needs the kiln_draft_vocab.json"):
        SpeculativeGenerator(target, drafter)  # its ids read as the target's would be wrong guesses


def test_a_stop_token_ends_a_row_inside_an_accepted_run(graphs):
    tokenizer = graphs["tokenizer"]
    target = KVCacheGenerator(graphs["target"])
    ids, mask = _ids(tokenizer, PROMPTS[1])
    free = target.generate(ids, mask, GenerationConfig(max_new_tokens=10), eos_token_id=None)
    eos = int(free[0, 4])  # declared EOS: decoding must stop there even when the draft guessed past it
    engine = SpeculativeGenerator(target, target, SpeculativeConfig(lookahead=6))
    got = engine.generate(ids, mask, GenerationConfig(max_new_tokens=10), eos_token_id=eos)
    want = target.generate(ids, mask, GenerationConfig(max_new_tokens=10), eos_token_id=eos)
    np.testing.assert_array_equal(got, want)
    assert list(engine.stream(ids, mask, GenerationConfig(max_new_tokens=10), eos_token_id=eos)) == list(want.T)


def test_a_padded_batch_goes_to_the_target_alone(graphs):
    tokenizer = graphs["tokenizer"]
    tokenizer.padding_side = "left"
    enc = tokenizer(PROMPTS, return_tensors="np", padding=True)
    target = KVCacheGenerator(graphs["target"])
    engine = SpeculativeGenerator(target, KVCacheGenerator(graphs["derived"]))
    config = GenerationConfig(max_new_tokens=9)
    want = target.generate(enc["input_ids"], enc["attention_mask"], config, eos_token_id=None, pad_token_id=0)
    got = engine.generate(enc["input_ids"], enc["attention_mask"], config, eos_token_id=None, pad_token_id=0)
    np.testing.assert_array_equal(got, want)
    assert engine.stats.target_passes == 0  # batched, no speculation


def test_the_draft_stage_keeps_layers_and_learns_from_the_teachers_generations(graphs):
    metrics = graphs["draft_metrics"]
    assert metrics["draft_layers"] == 2 and metrics["corpus_rows"] == 8
    assert metrics["params"] < metrics["teacher_params"]
    assert draft_layers(30, DraftParams()) == [0, 4, 8, 12, 16, 20, 24, 28, 29]
    with pytest.raises(ConfigError, match="indices of the teacher's 4 layers"):
        draft_layers(4, DraftParams(layers=[0, 5]))
    with pytest.raises(ValueError, match="set by the draft stage"):
        DraftParams(distill={"layers": [0]})


def test_the_package_opens_as_one_model_through_predictor(graphs, tmp_path):
    tokenizer_dir = graphs["folder"]
    meta = PackageMeta(format="onnx", task="causal-lm", seq_len=32, recipe="spec")
    folder = package_speculative(graphs["target"], graphs["derived"], tokenizer_dir, tmp_path / "spec", lookahead=3,
                                 meta=meta, draft_recipe="draft-2l", target_recipe="champion v1")
    alone = package(Artifact("onnx", graphs["target"]), tokenizer_dir, tmp_path / "alone",
                    PackageMeta(format="onnx", task="causal-lm", seq_len=32))
    predictor = Predictor(folder)
    assert isinstance(predictor, SpeculativePredictor) and predictor.describe()["lookahead"] == "3"
    assert isinstance(predictor.engine, KVCacheGenerator)  # so every KV-cache decoding path uses the draft
    # target and draft take turns on the same cores: neither session's threads spin between runs
    for session in (predictor.engine.target.session, predictor.engine.draft.session):
        assert session.get_session_options().get_session_config_entry("session.force_spinning_stop") == "1"
    assert Predictor(alone).describe()["spin"] == "on"  # a lone engine keeps ONNX Runtime's default
    assert json.loads((folder / "speculative.json").read_text())["draft"]["recipe"] == "draft-2l"
    pd.testing.assert_frame_equal(predictor.predict(PROMPTS, max_new_tokens=8),
                                  Predictor(alone).predict(PROMPTS, max_new_tokens=8))
    measured = measure_speculation(predictor, PROMPTS, max_new_tokens=8, rows=2)
    assert 0.0 <= measured["acceptance_rate"] <= 1.0 and measured["speculative_speedup"] > 0
    assert measured["speculative_identical"] == 1.0
    (folder / "draft" / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="draft/model.onnx .* is corrupt"):
        Predictor(folder)


def test_a_speculative_recipe_names_recipes_with_stages(tmp_path):
    path = tmp_path / "recipes.yaml"
    path.write_text("d:\n  stages: [{stage: draft, params: {layers: [0, 1]}}, {stage: export}]\n"
                    "s:\n  speculative: {draft: d, lookahead: 3}\n"
                    "bad:\n  speculative: {draft: s}\n"
                    "both:\n  stages: [{stage: export}]\n  speculative: {draft: d}\n")
    with pytest.raises(ConfigError, match="only one"):
        recipes.library(path)
    path.write_text(path.read_text().split("both:")[0])
    (spec,) = recipes.resolve_recipes(["s"], path)
    assert spec.speculative.lookahead == 3 and set(spec.members) == {"draft"}
    with pytest.raises(ConfigError, match="speculative draft 's' is itself a speculative recipe"):
        recipes.resolve_recipes(["bad"], path)
