"""Pruning stages on tiny BERT / GPT-2 / Llama models: sizes, reloads, exports, and what gets removed."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForSequenceClassification, LlamaForCausalLM

from kiln.errors import ConfigError
from kiln.tasks.compress.prune import stages as prune
from kiln.tasks.compress.prune import surgery
from kiln.tasks.core.stages import Artifact, StageContext, StageResult
from kiln.tasks.models import hf
from kiln.tasks.models.export import export_onnx
from tests.tiny import save_tiny

LABELS = ("negative", "neutral", "positive")
TEXTS = [f"the {a} {b} felt {c} {d}" for a, b, c, d in itertools.product(
    ["cat", "dog", "bird", "fish", "cow", "owl"], ["red", "big", "old", "new", "shy"],
    ["happy", "sad", "angry", "calm"], ["today", "again"])]  # 240 texts
TASKS = {"bert": "sequence-classification", "gpt2": "causal-lm", "llama": "causal-lm"}
HIDDEN, LAYERS, HEAD = 64, 2, 16  # tests/tiny.py: 4 heads of 16; Llama 2 KV heads; FFN 256 (Llama 192)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {fam: save_tiny(fam, TEXTS, root / fam, labels=LABELS if fam == "bert" else ()) for fam in TASKS}


def _ctx(family: str, src: Path, workdir: Path) -> StageContext:
    train = pd.DataFrame({"text": TEXTS, "label": [LABELS[i % 3] for i in range(len(TEXTS))]})
    classify = TASKS[family] == "sequence-classification"
    workdir.mkdir(parents=True, exist_ok=True)
    # One thread: on shared cores, two OpenMP threads make tiny ops ~100x slower (spin-waiting).
    return StageContext(task=TASKS[family], workdir=workdir, tokenizer_dir=src, seq_len=16, threads=1,
                        train=train if classify else train[["text"]], labels=LABELS if classify else ())


def _run(stage, family: str, src: Path, params: dict, workdir: Path) -> StageResult:
    return stage(Artifact("hf", src), params, _ctx(family, src, workdir))


def _logits(folder: Path, family: str) -> torch.Tensor:
    model = hf.load_model(folder, TASKS[family])
    tokenizer = hf.load_tokenizer(folder, _ctx(family, folder, folder))
    batch = hf.encode(tokenizer, TEXTS[:6], 16, TASKS[family])
    with torch.no_grad():
        return hf.forward_logits(model, batch).logits


def _save(model: torch.nn.Module, src: Path, out: Path) -> Path:
    return hf.save_folder(model, hf.load_tokenizer(src, _ctx("bert", src, out)), out)


def _kill_head(model: torch.nn.Module, family: str, layer: torch.nn.Module, head: int) -> None:
    """Zero every weight of one head (hand-written slices), so removing it cannot change the output."""
    span = slice(head * HEAD, (head + 1) * HEAD)
    with torch.no_grad():
        if family == "bert":
            for m in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value):
                m.weight[span], m.bias[span] = 0, 0
            layer.attention.output.dense.weight[:, span] = 0
        elif family == "gpt2":
            for offset in (0, HIDDEN, 2 * HIDDEN):  # fused q | k | v
                qkv = slice(offset + span.start, offset + span.stop)
                layer.attn.c_attn.weight[:, qkv], layer.attn.c_attn.bias[qkv] = 0, 0
            layer.attn.c_proj.weight[span] = 0
        else:
            layer.self_attn.q_proj.weight[span] = 0
            layer.self_attn.o_proj.weight[:, span] = 0


# -- structured: sizes, reload, export ---------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_head_pruning_shrinks_reloads_and_exports(tiny, tmp_path, family):
    result = _run(prune.prune_heads, family, tiny[family], {"remove_per_layer": 1}, tmp_path)
    per_head = 4 * HEAD * HIDDEN + 3 * HEAD  # q, k, v rows (+ bias) and the output projection's columns
    assert result.metrics["params_before"] - result.metrics["params"] == LAYERS * per_head
    folder = result.artifact.path
    assert (folder / "tokenizer.json").is_file() and (folder / "modeling_kiln_pruned.py").is_file()
    assert json.loads((folder / "config.json").read_text())["kiln_heads_per_layer"] == [3, 3]
    model = hf.load_model(folder, TASKS[family])
    assert hf.count_params(model) == result.metrics["params"]
    export_onnx(model, tmp_path / "model.onnx")


def test_head_pruned_bert_loads_with_stock_auto_class(tiny, tmp_path):
    folder = _run(prune.prune_heads, "bert", tiny["bert"], {"remove_per_layer": 2}, tmp_path).artifact.path
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    assert model.bert.encoder.layer[0].attention.self.query.out_features == 2 * HEAD


@pytest.mark.parametrize(("gqa", "remove", "heads", "kv"), [("queries", 2, 2, 2), ("groups", 1, 2, 1)])
def test_llama_head_pruning_keeps_gqa_consistent(tiny, tmp_path, gqa, remove, heads, kv):
    params = {"remove_per_layer": remove, "gqa": gqa}
    result = _run(prune.prune_heads, "llama", tiny["llama"], params, tmp_path)
    config = json.loads((result.artifact.path / "config.json").read_text())
    shape = [config[k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim")]
    assert shape == [heads, kv, HEAD]
    removed_q, removed_kv = 4 - heads, 2 - kv
    assert result.metrics["params_before"] - result.metrics["params"] == LAYERS * HEAD * HIDDEN * (
        2 * removed_q + 2 * removed_kv)
    model = LlamaForCausalLM.from_pretrained(result.artifact.path)  # stock class: no Kiln code needed
    assert model.model.layers[1].self_attn.num_key_value_groups == heads // kv
    export_onnx(model.eval(), tmp_path / "model.onnx")


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_ffn_pruning_shrinks_reloads_and_exports(tiny, tmp_path, family):
    result = _run(prune.prune_ffn, family, tiny[family], {"fraction": 0.25}, tmp_path)
    width = 192 if family == "llama" else 256
    assert result.metrics["ffn_width"] == width * 3 // 4
    per_channel = 3 * HIDDEN if family == "llama" else 2 * HIDDEN + 1  # Llama: gate, up, down; no biases
    assert result.metrics["params_before"] - result.metrics["params"] == LAYERS * (width // 4) * per_channel
    export_onnx(hf.load_model(result.artifact.path, TASKS[family]), tmp_path / "model.onnx")


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_layer_pruning_drops_a_layer_and_exports(tiny, tmp_path, family):
    params = {"remove": 1, "importance": "activation"}
    result = _run(prune.prune_layers, family, tiny[family], params, tmp_path)
    model = hf.load_model(result.artifact.path, TASKS[family])
    assert model.config.num_hidden_layers == 1 and len(surgery.blocks(model)) == 1
    assert result.metrics["sparsity"] > 0.3  # one of two layers is most of a tiny model
    export_onnx(model, tmp_path / "model.onnx")


def test_chained_structured_stages_reload(tiny, tmp_path):
    heads = _run(prune.prune_heads, "bert", tiny["bert"], {"importance": "taylor"}, tmp_path / "a").artifact
    ffn = _run(prune.prune_ffn, "bert", heads.path, {"importance": "activation"}, tmp_path / "b").artifact
    layers = _run(prune.prune_layers, "bert", ffn.path, {"layers": [0]}, tmp_path / "c").artifact
    config = json.loads((layers.path / "config.json").read_text())
    assert config["kiln_heads_per_layer"] == [3]
    assert (config["intermediate_size"], config["num_hidden_layers"]) == (192, 1)
    export_onnx(hf.load_model(layers.path, TASKS["bert"]), tmp_path / "model.onnx")


# -- structured: what gets removed -------------------------------------------------------------------


@pytest.mark.parametrize(("stage", "params"), [
    (prune.prune_heads, {"remove_per_layer": 0}), (prune.prune_ffn, {"fraction": 0.0}),
    (prune.prune_layers, {"remove": 0}), (prune.prune_unstructured, {"sparsity": 0.0}),
])
def test_pruning_nothing_leaves_outputs_identical(tiny, tmp_path, stage, params):
    result = _run(stage, "gpt2", tiny["gpt2"], params, tmp_path)
    assert torch.equal(_logits(result.artifact.path, "gpt2"), _logits(tiny["gpt2"], "gpt2"))


@pytest.mark.parametrize(("family", "params", "dead"), [
    ("bert", {}, [1]),
    ("gpt2", {}, [1]),
    ("llama", {"remove_per_layer": 2}, [1, 2]),  # one query head in each KV group (heads 0-1 | 2-3)
    ("llama", {"remove_per_layer": 1, "gqa": "groups"}, [2, 3]),  # KV group 1 whole
])
def test_dead_heads_go_first_and_cost_nothing(tiny, tmp_path, family, params, dead):
    model = hf.load_model(tiny[family], TASKS[family])
    for layer in surgery.blocks(model):
        for head in dead:
            _kill_head(model, family, layer, head)
        if params.get("gqa") == "groups":  # the group's key/value head too
            with torch.no_grad():
                layer.self_attn.k_proj.weight[HEAD:], layer.self_attn.v_proj.weight[HEAD:] = 0, 0
    src = _save(model, tiny[family], tmp_path / "src")
    result = _run(prune.prune_heads, family, src, params, tmp_path / "out")
    torch.testing.assert_close(_logits(result.artifact.path, family), _logits(src, family), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_dead_ffn_channels_go_first_and_cost_nothing(tiny, tmp_path, family):
    model = hf.load_model(tiny[family], TASKS[family])
    for layer in surgery.blocks(model):
        layout = surgery.ffn_layout(model, layer)
        quarter = layout.probe.index.shape[0] // 4
        with torch.no_grad():  # zero the first quarter of the down projection's inputs and what feeds them
            for group in layout.groups:
                surgery.oriented(group.module, group.axis)[:quarter] = 0
    src = _save(model, tiny[family], tmp_path / "src")
    result = _run(prune.prune_ffn, family, src, {"fraction": 0.25}, tmp_path / "out")
    torch.testing.assert_close(_logits(result.artifact.path, family), _logits(src, family), atol=1e-5, rtol=0)


@pytest.mark.parametrize("importance", ["magnitude", "activation", "taylor"])
def test_least_important_head_changes_output_less_than_most_important(tiny, tmp_path, importance):
    model = hf.load_model(tiny["bert"], TASKS["bert"])
    with torch.no_grad():  # head 0 weak, head 3 strong, in every layer
        for layer in surgery.blocks(model):
            for head, scale in ((0, 0.05), (3, 3.0)):
                span = slice(head * HEAD, (head + 1) * HEAD)
                for m in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value):
                    m.weight[span] *= scale
                layer.attention.output.dense.weight[:, span] *= scale
    src = _save(model, tiny["bert"], tmp_path / "src")
    reference = _logits(src, "bert")
    least = _run(prune.prune_heads, "bert", src, {"importance": importance}, tmp_path / "least").artifact.path
    pruned = hf.load_model(least, TASKS["bert"])
    kept_query = pruned.bert.encoder.layer[0].attention.self.query.weight
    original = model.bert.encoder.layer[0].attention.self.query.weight
    assert torch.equal(kept_query, original[HEAD:])  # the weak head 0 is the one removed
    for layer in surgery.blocks(model):  # remove the strongest head instead
        surgery.keep_units(surgery.head_layout(model, layer), torch.tensor([0, 1, 2]))
        surgery.set_heads(model, layer)
    with torch.no_grad():
        batch = hf.encode(hf.load_tokenizer(src, _ctx("bert", src, src)), TEXTS[:6], 16, TASKS["bert"])
        most_delta = (hf.forward_logits(model, batch).logits - reference).abs().mean()
    least_delta = (_logits(least, "bert") - reference).abs().mean()
    assert least_delta < most_delta / 5


def test_recovery_finetune_is_seeded(tiny, tmp_path):
    params = {"fraction": 0.5, "recovery_steps": 3, "recovery_lr": 1e-3}
    first = _run(prune.prune_ffn, "bert", tiny["bert"], params, tmp_path / "a")
    second = _run(prune.prune_ffn, "bert", tiny["bert"], params, tmp_path / "b")
    assert first.metrics["recovery_loss"] == second.metrics["recovery_loss"]
    assert torch.equal(_logits(first.artifact.path, "bert"), _logits(second.artifact.path, "bert"))


# -- unstructured -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "method"), [("bert", "magnitude"), ("gpt2", "wanda"), ("llama", "wanda")])
def test_unstructured_reaches_target_sparsity_and_reports_size_honestly(tiny, tmp_path, family, method):
    params = {"method": method, "sparsity": 0.7}
    result = _run(prune.prune_unstructured, family, tiny[family], params, tmp_path)
    m = result.metrics
    assert m["sparsity"] == pytest.approx(0.7, abs=0.01)
    model = hf.load_model(result.artifact.path, TASKS[family])
    matrices = prune.prunable(model)
    zeros = sum(int((w.weight == 0).sum()) for w in matrices) / sum(w.weight.numel() for w in matrices)
    assert zeros == pytest.approx(m["sparsity"])
    assert m["params"] == hf.count_params(model) and m["dense_bytes"] == 4 * m["params"]  # nothing removed
    assert m["nonzero_params"] < m["params"] and m["sparse_bytes"] < m["dense_bytes"]


# -- bad params --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("stage", "family", "params", "field"), [
    (prune.prune_heads, "bert", {"remove_per_layer": -1}, "remove_per_layer"),
    (prune.prune_heads, "bert", {"remove_per_layer": 4}, "remove_per_layer"),
    (prune.prune_heads, "llama", {"remove_per_layer": 1}, "remove_per_layer"),
    (prune.prune_heads, "bert", {"importance": "random"}, "importance"),
    (prune.prune_ffn, "bert", {"fraction": 1.0}, "fraction"),
    (prune.prune_ffn, "bert", {"fractoin": 0.5}, "fractoin"),
    (prune.prune_layers, "bert", {"remove": 2}, "remove"),
    (prune.prune_layers, "bert", {"layers": [0, 7]}, "layers"),
    (prune.prune_unstructured, "bert", {"sparsity": 1.5}, "sparsity"),
    (prune.prune_unstructured, "bert", {"method": "random"}, "method"),
])
def test_bad_params_raise_config_error_naming_the_field(tiny, tmp_path, stage, family, params, field):
    with pytest.raises(ConfigError, match=field):
        _run(stage, family, tiny[family], params, tmp_path)


def test_onnx_input_is_refused(tiny, tmp_path):
    with pytest.raises(ConfigError, match="before 'export'"):
        prune.prune_ffn(Artifact("onnx", tmp_path / "m.onnx"), {}, _ctx("bert", tiny["bert"], tmp_path))


def test_classifier_with_other_classes_is_refused(tiny, tmp_path):
    ctx = _ctx("bert", tiny["bert"], tmp_path)
    ctx.labels = ("no", "yes")
    with pytest.raises(ConfigError, match="3 classes but the task has 2"):
        prune.prune_heads(Artifact("hf", tiny["bert"]), {}, ctx)
