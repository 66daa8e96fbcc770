"""Distillation on tiny models: the student moves toward its teacher, and resuming changes nothing."""

from __future__ import annotations

import itertools
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from kiln.errors import ConfigError
from kiln.tasks.compress import distill as distill_module
from kiln.tasks.compress.distill import distill
from kiln.tasks.compress.prune.stages import prune_layers
from kiln.tasks.core.stages import Artifact, StageContext, StageResult
from kiln.tasks.models import hf
from tests.tiny import save_tiny

LABELS = ("negative", "neutral", "positive")
MOODS = {"happy": "positive", "glad": "positive", "sad": "negative", "angry": "negative", "calm": "neutral"}
ANIMALS, COLOURS, WHEN = ["cat", "dog", "bird", "fish", "cow", "owl"], ["red", "big", "old"], ["now", "again"]
TEXTS = [f"the {a} {b} felt {c} {d}" for a, b, c, d in itertools.product(ANIMALS, COLOURS, MOODS, WHEN)]
TASKS = {"bert": "sequence-classification", "gpt2": "causal-lm", "llama": "causal-lm"}


def _ctx(family: str, src: Path, workdir: Path, *, labelled: bool = True) -> StageContext:
    train = pd.DataFrame({"text": TEXTS, "label": [MOODS[t.split()[4]] for t in TEXTS]})
    classify = TASKS[family] == "sequence-classification"
    workdir.mkdir(parents=True, exist_ok=True)
    # One thread: on shared cores, two OpenMP threads make tiny ops ~100x slower (spin-waiting).
    return StageContext(task=TASKS[family], workdir=workdir, tokenizer_dir=src, seq_len=16, threads=1,
                        train=train if classify and labelled else train[["text"]],
                        labels=LABELS if classify else ())


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny models trained briefly, so their outputs are confident and a student has something to learn."""
    root = tmp_path_factory.mktemp("teachers")
    out = {}
    for family in TASKS:
        src = save_tiny(family, TEXTS, root / "raw" / family, labels=LABELS if family == "bert" else ())
        ctx = _ctx(family, src, root / "ctx" / family)
        model, tokenizer = hf.load_model(src, ctx.task), hf.load_tokenizer(src, ctx)
        torch.set_num_threads(1)
        hf.finetune(model, hf.batches(ctx.train, tokenizer, ctx, batch_size=32), steps=40, lr=5e-3, seed=0)
        out[family] = hf.save_folder(model, tokenizer, root / family)
    return out


def _run(family: str, src: Path, params: dict, workdir: Path, **ctx_kwargs) -> StageResult:
    return distill(Artifact("hf", src), params, _ctx(family, src, workdir, **ctx_kwargs))


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_distillation_moves_student_toward_teacher(teachers, tmp_path, family):
    # Margins are generous: they should hold for any random tiny teacher, not only the one tests/tiny.py builds.
    params = {"layers": [0], "max_steps": 20, "batch_size": 16, "lr": 5e-4, "alpha": 0.0}
    result = _run(family, teachers[family], params, tmp_path)
    m = result.metrics
    assert m["kl_after"] < 0.6 * m["kl_before"], m
    assert m["params"] < m["teacher_params"] and m["steps"] == 20
    student = hf.load_model(result.artifact.path, TASKS[family])
    assert student.config.num_hidden_layers == 1
    assert (result.artifact.path / "tokenizer.json").is_file()


def test_student_starts_from_the_chosen_teacher_layers(teachers, tmp_path):
    result = _run("bert", teachers["bert"], {"layers": [1], "max_steps": 1, "lr": 1e-9}, tmp_path)
    teacher = hf.load_model(teachers["bert"], TASKS["bert"])
    student = hf.load_model(result.artifact.path, TASKS["bert"])
    t_layer, s_layer = teacher.bert.encoder.layer[1], student.bert.encoder.layer[0]
    torch.testing.assert_close(s_layer.output.dense.weight, t_layer.output.dense.weight, atol=1e-6, rtol=0)


def test_resume_from_checkpoint_equals_uninterrupted_run(teachers, tmp_path, monkeypatch):
    # Dropout is on in the student, so equal results also need the RNG state restored.
    params = {"layers": [0], "max_steps": 12, "batch_size": 16, "lr": 1e-3, "hidden_mse": 0.1,
              "checkpoint_every": 4, "epochs": 1}
    straight = _run("bert", teachers["bert"], params, tmp_path / "straight")

    save = distill_module._save_checkpoint
    saves = []

    def crash_after_second_save(*args, **kwargs):
        saves.append(save(*args, **kwargs))
        if len(saves) == 2:
            raise KeyboardInterrupt("simulated crash")
        return saves[-1]

    monkeypatch.setattr(distill_module, "_save_checkpoint", crash_after_second_save)
    with pytest.raises(KeyboardInterrupt):
        _run("bert", teachers["bert"], params, tmp_path / "resumed")
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == [
        "step-00000004.pt", "step-00000008.pt"]
    monkeypatch.setattr(distill_module, "_save_checkpoint", save)
    resumed = _run("bert", teachers["bert"], params, tmp_path / "resumed")

    assert resumed.metrics["resumed_from_step"] == 8 and straight.metrics["resumed_from_step"] == 0
    a = load_file(straight.artifact.path / "model.safetensors")
    b = load_file(resumed.artifact.path / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metrics["kl_after"] == straight.metrics["kl_after"]
    assert not (tmp_path / "resumed" / "checkpoints").exists()  # cleaned up once the model is saved


def test_checkpoint_written_on_a_gpu_resumes_on_the_cpu(teachers, tmp_path, monkeypatch):
    # Checkpoints of a GPU run hold tensors tagged cuda:0; torch.load without map_location refuses them on a
    # machine without CUDA. Tag this run's storages cuda:0 as they are saved, then resume here on the CPU.
    params = {"layers": [0], "max_steps": 8, "batch_size": 16, "lr": 1e-3, "checkpoint_every": 4}
    straight = _run("bert", teachers["bert"], params, tmp_path / "straight")
    registry = list(torch.serialization._package_registry)
    as_gpu = [(0, lambda obj: "cuda:0" if obj.device.type == "cpu" else None, lambda obj, location: None)]
    monkeypatch.setattr(torch.serialization, "_package_registry", as_gpu + registry)

    save = distill_module._save_checkpoint

    def crash_after_first_save(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(distill_module, "_save_checkpoint", crash_after_first_save)
    with pytest.raises(KeyboardInterrupt):
        _run("bert", teachers["bert"], params, tmp_path / "resumed")
    monkeypatch.setattr(distill_module, "_save_checkpoint", save)
    monkeypatch.setattr(torch.serialization, "_package_registry", registry)
    written = tmp_path / "resumed" / "checkpoints" / "step-00000004.pt"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):  # what a load without map_location would meet
            torch.load(written, weights_only=True)

    resumed = _run("bert", teachers["bert"], params, tmp_path / "resumed")
    assert resumed.metrics["resumed_from_step"] == 4
    a = load_file(straight.artifact.path / "model.safetensors")
    b = load_file(resumed.artifact.path / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_from_other_params_is_refused(teachers, tmp_path):
    params = {"layers": [0], "max_steps": 6, "checkpoint_every": 2}
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.save({"step": 2, "fingerprint": "another run"}, ckpt / "step-00000002.pt")
    with pytest.raises(ConfigError, match="other params"):
        _run("bert", teachers["bert"], params, tmp_path)


def test_pruned_input_learns_from_a_separate_teacher(teachers, tmp_path):
    ctx = _ctx("gpt2", teachers["gpt2"], tmp_path / "prune")
    pruned = prune_layers(Artifact("hf", teachers["gpt2"]), {"layers": [1]}, ctx).artifact
    params = {"teacher": str(teachers["gpt2"]), "max_steps": 10, "lr": 5e-4, "alpha": 0.0, "hidden_mse": 0.1}
    result = _run("gpt2", pruned.path, params, tmp_path / "distill")
    assert result.metrics["params"] == hf.count_params(hf.load_model(pruned.path, "causal-lm"))
    assert result.metrics["kl_after"] < result.metrics["kl_before"]
    assert result.metrics["params"] < result.metrics["teacher_params"]


def test_unlabelled_text_distils_through_kl_alone(teachers, tmp_path):
    result = _run("bert", teachers["bert"], {"layers": [0], "max_steps": 3, "alpha": 1.0}, tmp_path,
                  labelled=False)
    assert result.metrics["steps"] == 3 and torch.isfinite(torch.tensor(result.metrics["loss"]))


@pytest.mark.parametrize(("params", "field"), [
    ({}, "layers"),
    ({"layers": [2, 0]}, "layers"),
    ({"layers": [0, 5]}, "layers"),
    ({"layers": [0], "temperature": 0}, "temperature"),
    ({"layers": [0], "alpha": -1}, "alpha"),
    ({"layers": [0], "max_steps": 0}, "max_steps"),
    ({"layers": [0], "checkpoint_every": -1}, "checkpoint_every"),
    ({"layers": [0], "lerning_rate": 0.1}, "lerning_rate"),
])
def test_bad_params_raise_config_error_naming_the_field(teachers, tmp_path, params, field):
    with pytest.raises(ConfigError, match=field):
        _run("bert", teachers["bert"], params, tmp_path)
