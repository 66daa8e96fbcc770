"""A vocabulary-pruned draft: the surgery is exact, the ce objective teaches it the target's greedy tokens, and
its id map travels through export and the speculative package (the draft then proposes mapped ids)."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from kiln.errors import ArtifactError, ConfigError
from kiln.tasks.compress.draft import DraftParams, draft
from kiln.tasks.compress.draft_vocab import check_size, choose_vocab, revocabularize, special_ids
from kiln.tasks.core.stages import Artifact, StageContext
from kiln.tasks.engines.speculative import DRAFT_VOCAB_FILE, DraftVocab
from kiln.tasks.evaluate.quality import assess_artifact
from kiln.tasks.models.decoder_export import export_decoder_with_past
from kiln.tasks.models.predictor import PackageMeta, Predictor, package, record_checksums
from kiln.tasks.models.speculative import measure_speculation, package_speculative
from tests.tiny import build

PROMPTS = ["the movie was", "a truly wonderful and moving film with a great cast", "boring"]
CE = {"layers": [0, 3], "prompts": 64, "prompt_tokens": 4, "new_tokens": 12, "vocab": 64, "steps": 60,
      "train_batch": 8, "lr": 3e-3}


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return AutoTokenizer.from_pretrained(str(tiny_models["llama"]))


@pytest.fixture(scope="module")
def target(tokenizer, tmp_path_factory):
    """A 4-layer tiny Llama as a Hugging Face folder and a with-past graph."""
    root = tmp_path_factory.mktemp("draft-vocab")
    model = build("llama", tokenizer, layers=4, seed=0)
    model.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    return {"root": root, "hf": root / "hf", "model": model,
            "graph": export_decoder_with_past(model, root / "target.onnx")}


@pytest.fixture(scope="module")
def ce_draft(target, tiny_splits):
    ctx = StageContext(task="causal-lm", workdir=target["root"] / "ce", tokenizer_dir=target["hf"],
                       train=tiny_splits.train, seq_len=32, threads=1)
    ctx.workdir.mkdir()
    return draft(Artifact("hf", target["hf"]), CE, ctx), ctx


def _llama(tokenizer, tied: bool) -> LlamaForCausalLM:
    config = build("llama", tokenizer).config
    config.tie_word_embeddings = tied
    torch.manual_seed(1)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("order", ["sorted", "permuted"])
def test_the_cut_model_gives_the_full_models_logits_on_the_ids_it_keeps(tokenizer, tmp_path, tied, order):
    full = _llama(tokenizer, tied)
    assert (full.lm_head.weight is full.model.embed_tokens.weight) == tied
    rng = np.random.default_rng(0)
    kept = np.union1d(special_ids(tokenizer, 512), rng.choice(np.arange(4, 512), 100, replace=False))
    if order == "permuted":
        kept = rng.permutation(kept)
    vocab = DraftVocab(kept, fallback=5, target_vocab_size=512)
    cut = copy.deepcopy(full)
    revocabularize(cut, vocab)
    assert cut.config.vocab_size == 100 + 4 and (cut.lm_head.weight is cut.model.embed_tokens.weight) == tied
    ids = rng.choice(kept, (2, 9))  # every input id is kept
    with torch.no_grad():
        want = full(input_ids=torch.as_tensor(ids)).logits[..., torch.as_tensor(kept)]
        got = cut(input_ids=torch.as_tensor(vocab.to_draft(ids))).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    cut.save_pretrained(tmp_path)  # and it reloads as itself (config vocab, renumbered specials, tied head)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=torch.as_tensor(vocab.to_draft(ids))).logits, got)
    assert again.config.eos_token_id == vocab.to_draft(np.array([tokenizer.eos_token_id]))[0]


def test_the_vocabulary_keeps_specials_and_the_most_generated_tokens():
    generated = [np.array([7, 7, 7, 9, 9, 11]), np.array([7, 12])]
    distinct = SimpleNamespace(bos_token_id=2, eos_token_id=3, pad_token_id=0, unk_token_id=1)
    vocab, metrics = choose_vocab(generated, [np.array([20, 20])], 7, distinct, 64)
    assert vocab.draft_to_target.tolist() == [0, 1, 2, 3, 7, 9, 11]  # 11 and 12 tie: the lower id
    assert vocab.fallback == 1  # its own unk token
    assert metrics == {"vocab": 7.0, "vocab_coverage": 7 / 8}
    shared = SimpleNamespace(bos_token_id=0, eos_token_id=0, pad_token_id=None, unk_token_id=0)
    vocab, _ = choose_vocab(generated, [np.array([20, 20])], 6, shared, 64)
    assert vocab.draft_to_target.tolist() == [0, 7, 9, 11, 12, 20]  # prompts' ids fill what generations leave
    assert vocab.to_target(vocab.fallback) == 20  # not eos: the rarest kept ordinary token
    assert vocab.to_draft(np.array([7, 13, 999, -1])).tolist() == [1, 5, 5, 5]


def test_bad_vocab_params_are_one_line_config_errors(tokenizer, target, tiny_splits, tmp_path):
    with pytest.raises(ConfigError, match="leaves no room beside the 4 special tokens") as small:
        check_size(4, tokenizer, 512)
    with pytest.raises(ConfigError, match="exceeds the model's 512 tokens") as large:
        check_size(513, tokenizer, 512)
    ctx = StageContext(task="causal-lm", workdir=tmp_path, tokenizer_dir=target["hf"], train=tiny_splits.train,
                       seq_len=32, threads=1)
    with pytest.raises(ConfigError, match="exceeds") as staged:
        draft(Artifact("hf", target["hf"]), {"layers": [0], "vocab": 10_000}, ctx)
    assert all("\n" not in str(e.value) for e in (small, large, staged))
    with pytest.raises(ValueError, match="belong to objective 'kl'"):
        DraftParams(objective="ce", distill={"max_steps": 2})
    assert DraftParams().trained_by == "ce" and DraftParams(distill={"max_steps": 2}).trained_by == "kl"
    with pytest.raises(ConfigError, match="names a target id twice"):
        DraftVocab([3, 3], 0, 512)
    (tmp_path / DRAFT_VOCAB_FILE).write_text('{"format": "kiln-draft-vocab/1", "fallback": 0}')
    with pytest.raises(ArtifactError, match="corrupt"):
        DraftVocab.read(tmp_path)


def test_the_ce_objective_teaches_the_draft_the_targets_greedy_tokens(ce_draft):
    result, ctx = ce_draft
    m = result.metrics
    assert m["draft_loss"] < m["draft_loss_before"] and m["draft_top1"] > m["draft_top1_before"]
    assert m["vocab"] == 64 and 0 < m["vocab_coverage"] <= 1 and m["steps"] == 60 and m["held_out_rows"] > 0
    assert m["params"] < m["teacher_params"] and m["draft_layers"] == 2
    vocab = DraftVocab.read(result.artifact.path)
    assert vocab.size == 64 == AutoModelForCausalLM.from_pretrained(result.artifact.path).config.vocab_size
    ctx.tokenizer_dir = result.artifact.path  # as recipes.build assesses a stage: scored in the draft's own ids
    stage = assess_artifact(result.artifact, ctx)
    assert set(stage) == {"stage_perplexity"} and 1 < stage["stage_perplexity"] < np.inf


def test_the_map_travels_through_export_and_the_package(target, tokenizer, tmp_path):
    # the target itself with its vocabulary permuted: only a draft whose ids are mapped both ways agrees always
    perm = np.random.default_rng(3).permutation(512)
    vocab = DraftVocab(perm, fallback=0, target_vocab_size=512)
    permuted = copy.deepcopy(target["model"])
    revocabularize(permuted, vocab)
    permuted.save_pretrained(tmp_path / "draft-hf")
    vocab.write(tmp_path / "draft-hf")
    graph = export_decoder_with_past(AutoModelForCausalLM.from_pretrained(tmp_path / "draft-hf"),
                                     tmp_path / "draft.onnx")
    meta = PackageMeta(format="onnx", task="causal-lm", seq_len=32, recipe="spec")
    folder = package_speculative(target["graph"], graph, target["hf"], tmp_path / "spec", lookahead=4, meta=meta,
                                 draft_recipe="permuted", target_recipe="t",
                                 draft_vocab=DraftVocab.read(tmp_path / "draft-hf"))
    predictor = Predictor(folder)
    assert predictor.engine.vocab.draft_to_target.tolist() == perm.tolist()
    assert predictor.describe()["draft_vocab"] == "512"
    alone = Predictor(package(Artifact("onnx", target["graph"]), target["hf"], tmp_path / "alone",
                              PackageMeta(format="onnx", task="causal-lm", seq_len=32)))
    assert predictor.predict(PROMPTS, max_new_tokens=8).equals(alone.predict(PROMPTS, max_new_tokens=8))
    assert measure_speculation(predictor, PROMPTS, max_new_tokens=8, rows=2)["acceptance_rate"] == 1.0

    with pytest.raises(ConfigError, match="predicts 512 tokens but its kiln_draft_vocab.json maps 100"):
        package_speculative(target["graph"], graph, target["hf"], tmp_path / "bad", lookahead=4, meta=meta,
                            draft_recipe="d", target_recipe="t", draft_vocab=DraftVocab(range(100), 0, 512))
    DraftVocab(range(100), 0, 512).write(folder / "draft")  # a map that does not fit, checksums made to match
    record_checksums(folder / "draft", PackageMeta.read(folder / "draft"))
    record_checksums(folder, PackageMeta.read(folder))
    with pytest.raises(ConfigError, match="predicts 512 tokens but its") as err:
        Predictor(folder)
    assert "\n" not in str(err.value)


def test_the_benchmark_builds_quantizes_and_measures_a_pruned_draft(target, tokenizer, tiny_splits, tmp_path):
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "speculative_bench.py"
    spec = importlib.util.spec_from_file_location("speculative_bench", path)
    bench = sys.modules.setdefault("speculative_bench", importlib.util.module_from_spec(spec))
    spec.loader.exec_module(bench)
    args = bench.parser().parse_args([])
    assert (args.vocab, args.objective, args.draft_quant, args.target) == (8192, "ce", "none", "fp32")
    params = bench.draft_params([0], vocab=48, objective="ce", prompts=8, new_tokens=6, steps=3, batch=4, lr=1e-3,
                                prompt_tokens=4)
    texts = tiny_splits.train["text"].tolist()
    draft_hf, metrics = bench.build_draft(tmp_path, target["hf"], texts, params, 1)
    assert metrics["vocab"] == 48 and bench.build_draft(tmp_path, target["hf"], texts, params, 1)[1] == metrics
    graph = bench.draft_graph(draft_hf, "int8")
    assert graph.name == "model.onnx" and "kv-int8" in str(graph)
    prompts = [np.asarray([tokenizer(t)["input_ids"]], dtype=np.int64) for t in PROMPTS]
    assert bench.lookaheads("1,3,a2") == [(1, False), (3, False), (2, True)]
    rows = bench.measure(target["graph"], graph, DraftVocab.read(draft_hf), prompts, bench.lookaheads("1,3,a2"), 6,
                         1, 1)
    assert [r["lookahead"] for r in rows] == [0, 1, 3, 2] and all(r["identical"] for r in rows)
    assert rows[-1]["engine"] == "+ draft, adaptive"
    assert all(r["target_ms_per_pass"] > 0 for r in rows) and rows[1]["draft_ms_per_token"] > 0
    assert "draft ms/token" in bench.table(rows) and json.dumps(rows)


def test_quantizing_a_pruned_draft_checks_it_on_its_own_ids(ce_draft, tmp_path):
    """weight_only's parity check tokenizes validation texts: a pruned draft must read them mapped to its ids (the
    target's ids fell out of its embedding's range in ONNX Runtime's Gather)."""
    from kiln.tasks.compress.quantization.dynamic import weight_only
    from kiln.tasks.compress.recipes import export_stage

    result, ctx = ce_draft
    staged = StageContext(task="causal-lm", workdir=tmp_path / "export", tokenizer_dir=result.artifact.path,
                          train=ctx.train, seq_len=32, threads=1)
    staged.workdir.mkdir()
    graph = export_stage(result.artifact, {"past": True}, staged).artifact
    staged.workdir = tmp_path / "int8"
    staged.workdir.mkdir()
    packed = weight_only(graph, {"bits": 8, "group_size": 32, "check_samples": 16}, staged)
    assert packed.metrics["size_ratio"] > 1 and packed.metrics["parity_top1_agreement"] > 0.9
