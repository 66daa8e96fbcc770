"""Quantization-aware training on tiny models: the INT8 gap narrows, weights fold onto the grid, ties survive."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from kiln.errors import ConfigError
from kiln.tasks.compress.quantization import static as qs
from kiln.tasks.compress.quantization.qat import WeightFakeQuant, qat, quantizable
from kiln.tasks.compress.quantization.static import int8_static
from kiln.tasks.core.stages import Artifact, StageContext
from kiln.tasks.models import hf
from kiln.tasks.models.export import export_onnx
from tests.tiny import save_tiny

LABELS = ("negative", "neutral", "positive")
MOODS = {"happy": "positive", "glad": "positive", "sad": "negative", "angry": "negative", "calm": "neutral"}
ANIMALS, COLOURS, WHEN = ["cat", "dog", "bird", "fish", "cow", "owl"], ["red", "big", "old"], ["now", "again"]
TEXTS = [f"the {a} {b} felt {c} {d}" for a, b, c, d in itertools.product(ANIMALS, COLOURS, MOODS, WHEN)]
TASKS = {"bert": "sequence-classification", "gpt2": "causal-lm", "llama": "causal-lm"}
# KL only and a small lr: the gap tiny models have is small, and Adam at the optimum mostly adds noise.
CLOSE_GAP = {"steps": 60, "lr": 5e-6, "task_weight": 0.0, "batch_size": 32}


def _ctx(family: str, folder: Path, workdir: Path) -> StageContext:
    frame = pd.DataFrame({"text": TEXTS, "label": [MOODS[t.split()[4]] for t in TEXTS]})
    classify = TASKS[family] == "sequence-classification"
    workdir.mkdir(parents=True, exist_ok=True)
    data = frame if classify else frame[["text"]]
    return StageContext(task=TASKS[family], workdir=workdir, tokenizer_dir=folder, train=data,
                        validation=data.iloc[1::4], labels=LABELS if classify else (), seq_len=16, threads=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny models trained briefly, so that their answers are confident and worth keeping."""
    root = tmp_path_factory.mktemp("qat")
    torch.set_num_threads(1)
    out = {}
    for family in TASKS:
        src = save_tiny(family, TEXTS, root / "raw" / family, labels=LABELS if family == "bert" else ())
        ctx = _ctx(family, src, root / "ctx" / family)
        model, tokenizer = hf.load_model(src, ctx.task), hf.load_tokenizer(src, ctx)
        hf.finetune(model, hf.batches(ctx.train, tokenizer, ctx, batch_size=32), steps=40, lr=5e-3, seed=0)
        out[family] = hf.save_folder(model, tokenizer, root / family)
    return out


def _qat(trained, family: str, params: dict, workdir: Path):
    return qat(Artifact("hf", trained[family]), params, _ctx(family, trained[family], workdir))


def _int8_gap(folder: Path, reference: Path, family: str, work: Path) -> tuple[float, np.ndarray]:
    """Logit MSE of ``folder``'s static-INT8 graph against ``reference``'s fp32 graph, and its argmax."""
    ctx = _ctx(family, folder, work)
    graphs = {}
    for name, src in (("ref", reference), ("cand", folder)):
        graphs[name] = export_onnx(hf.load_model(src, TASKS[family]), work / f"{name}.onnx")
    q = int8_static(Artifact("onnx", graphs["cand"]), {}, _ctx(family, folder, work / "q")).artifact.path
    feeds = qs.text_feeds(TEXTS, ctx, 32)
    ref, got = qs.run_graph(graphs["ref"], feeds, 1), qs.run_graph(q, feeds, 1)
    return qs.logits_mse(got, ref, feeds), np.concatenate([g.argmax(-1) for g in got])


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_qat_narrows_the_gap_to_the_float_model(trained, tmp_path, family):
    m = _qat(trained, family, CLOSE_GAP, tmp_path).metrics
    # The stage's contract: never hand back a model that quantizes worse than its input. Training usually
    # narrows the gap; when it does not (it depends on the random tiny model), the guard must keep the input
    # weights.
    assert m["quant_kl_after"] <= m["quant_kl_before"] + 1e-9, m
    if m["training_kept"]:
        assert m["quant_kl_trained"] < m["quant_kl_before"], m
    else:
        assert m["quant_kl_trained"] >= m["quant_kl_before"] and m["quant_kl_after"] == m["quant_kl_before"], m
    assert m["quantized_layers"] == {"bert": 14, "gpt2": 8, "llama": 15}[family]  # GPT-2: tied head skipped


def test_qat_model_goes_through_export_and_int8_static_and_keeps_accuracy(trained, tmp_path):
    result = _qat(trained, "llama", CLOSE_GAP, tmp_path / "train")
    before, _ = _int8_gap(trained["llama"], trained["llama"], "llama", tmp_path / "before")
    after, _ = _int8_gap(result.artifact.path, trained["llama"], "llama", tmp_path / "after")
    # Usually smaller, but not always on a tiny model: QAT simulates the Linear layers, while the CPU
    # int8_static target also quantizes attention MatMuls and embeddings, with its own calibration.
    assert after < 1.5 * before, (before, after)

    bert = _qat(trained, "bert", {"steps": 20}, tmp_path / "bert")
    _, predicted = _int8_gap(bert.artifact.path, trained["bert"], "bert", tmp_path / "bert-int8")
    gold = np.array([LABELS.index(MOODS[t.split()[4]]) for t in TEXTS])
    assert np.mean(predicted == gold) >= 0.9  # the mood word decides the label; trained models get it


def test_folded_weights_sit_on_the_int8_grid(trained, tmp_path):
    folded = hf.load_model(_qat(trained, "bert", {"steps": 2}, tmp_path / "f").artifact.path, TASKS["bert"])
    latent = hf.load_model(_qat(trained, "bert", {"steps": 2, "fold": False}, tmp_path / "l").artifact.path,
                           TASKS["bert"])

    def on_grid(model: torch.nn.Module) -> bool:
        for module, axis in quantizable(model).values():
            w = module.weight.detach()
            if not torch.allclose(WeightFakeQuant(axis)(w), w, atol=1e-6):
                return False
        return True

    assert on_grid(folded) and not on_grid(latent)


def test_tied_lm_head_stays_tied(trained, tmp_path):
    model = hf.load_model(_qat(trained, "gpt2", {"steps": 3}, tmp_path).artifact.path, TASKS["gpt2"])
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_a_run_that_widens_the_gap_hands_on_the_input(trained, tmp_path):
    result = _qat(trained, "bert", {"steps": 3, "lr": 0.5, "fold": False}, tmp_path)
    assert result.metrics["training_kept"] == 0
    assert result.metrics["quant_kl_after"] == result.metrics["quant_kl_before"]
    out, src = (hf.load_model(p, TASKS["bert"]) for p in (result.artifact.path, trained["bert"]))
    for (name, a), b in zip(out.state_dict().items(), src.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("params, field", [
    ({"steps": 0}, "steps"),
    ({"kl_weight": 0, "task_weight": 0}, "nothing to train"),
    ({"bogus": 1}, "bogus"),
    ({"lr": 2}, "lr"),
])
def test_bad_params_name_the_field(trained, tmp_path, params, field):
    with pytest.raises(ConfigError, match=field):
        _qat(trained, "bert", params, tmp_path)


def test_qat_needs_a_hugging_face_folder(trained, tmp_path):
    with pytest.raises(ConfigError, match="Hugging Face"):
        qat(Artifact("onnx", tmp_path / "model.onnx"), {}, _ctx("bert", trained["bert"], tmp_path))
