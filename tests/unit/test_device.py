"""The ``device`` setting: resolution, validation at the edge, and cache keys that change only off the CPU."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from kiln.errors import ConfigError
from kiln.settings import load_settings
from kiln.tasks.compress import recipes
from kiln.tasks.core.cache import StageCache, code_version, make_key
from kiln.tasks.core.device import key_part, resolve_device, to_device
from kiln.tasks.core.stages import Artifact, StageContext, StageResult
from kiln.tasks.models import hf
from kiln.tasks.models.finetune import FinetuneConfig, finetune_classifier
from tests.tiny import save_tiny


def _gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize(("requested", "gpus", "expected"), [
    ("auto", 0, "cpu"), ("auto", 2, "cuda:0"), ("cpu", 2, "cpu"), ("cuda", 1, "cuda:0"), ("cuda:1", 2, "cuda:1"),
    (" CUDA:0 ", 1, "cuda:0"),
], ids=["auto-no-gpu", "auto-gpu", "cpu-despite-gpu", "cuda", "cuda-index", "spaces-and-case"])
def test_resolve_device(monkeypatch, requested, gpus, expected):
    _gpus(monkeypatch, gpus)
    assert resolve_device(requested) == expected


@pytest.mark.parametrize(("requested", "gpus", "words"), [
    ("cuda", 0, "sees 0 CUDA GPU"), ("cuda:2", 2, "sees 2 CUDA GPU"), ("gpu", 1, "use auto, cpu, cuda or cuda:N"),
], ids=["cuda-missing", "index-too-high", "unknown-name"])
def test_unusable_device_is_a_one_line_config_error_naming_the_variable(monkeypatch, requested, gpus, words):
    _gpus(monkeypatch, gpus)
    with pytest.raises(ConfigError) as info:
        resolve_device(requested)
    assert "KILN_DEVICE" in str(info.value) and words in str(info.value) and "\n" not in str(info.value)
    assert info.value.exit_code == 2


def test_settings_default_to_auto_and_check_the_device_at_the_edge(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KILN_CONFIG", raising=False)
    monkeypatch.delenv("KILN_DEVICE", raising=False)
    assert load_settings().device == "auto"
    _gpus(monkeypatch, 0)
    for value, words in (("cuda", "KILN_DEVICE=cuda but torch sees 0 CUDA GPU"), ("tpu", "use auto, cpu, cuda")):
        monkeypatch.setenv("KILN_DEVICE", value)
        with pytest.raises(ConfigError, match=words):
            load_settings()
    _gpus(monkeypatch, 1)
    monkeypatch.setenv("KILN_DEVICE", "CUDA")
    assert load_settings().device == "cuda"


def test_batches_move_only_off_the_cpu():
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long)}
    assert to_device(batch, "cpu")["input_ids"] is batch["input_ids"]
    assert key_part("cpu") == () and key_part("cuda:1") == ("cuda",)


def _fake_stage(artifact: Artifact, params: dict, ctx: StageContext) -> StageResult:
    return StageResult(Artifact("hf", ctx.workdir))


@pytest.mark.parametrize("stage", ["distill", "qat", "prune_heads"])
def test_training_stages_key_the_device_only_off_the_cpu(monkeypatch, tmp_path, stage):
    monkeypatch.setattr(recipes, "stage_function", lambda name: _fake_stage)
    recipe = recipes.Recipe(name="r", stages=[recipes.StageSpec(stage=stage)])
    frame = pd.DataFrame({"text": ["a"]})

    def key(device: str) -> str:
        def make(workdir: Path) -> StageContext:
            return StageContext(task="sequence-classification", workdir=workdir, tokenizer_dir=tmp_path,
                                train=frame, device=device)
        return recipes.build(recipe, Artifact("hf", tmp_path), "src", make, StageCache(tmp_path / device)).key

    assert key("cpu") == make_key("src", stage, {}, code_version(_fake_stage))  # the key as before devices
    assert (key("cuda:0") != key("cpu")) == (stage in recipes.TRAINS_ON_DEVICE)


def test_finetune_reports_every_step_and_saves_a_model_that_loads_on_the_cpu(tmp_path):
    texts = [f"{w} {v} day" for w in ("good", "bad", "fine", "awful") for v in ("very", "quite", "so")] * 4
    frame = pd.DataFrame({"text": texts, "label": ["pos" if t.startswith(("good", "fine")) else "neg" for t in texts]})
    base = save_tiny("bert", texts, tmp_path / "base", labels=("neg", "pos"))
    steps: list[tuple[int, float]] = []
    config = FinetuneConfig(max_steps=3, batch_size=8, eval_every=3, eval_rows=16, threads=1)
    metrics = finetune_classifier(base, frame, frame, ("neg", "pos"), tmp_path / "out", config,
                                  on_step=lambda step, loss: steps.append((step, loss)))
    assert [s for s, _ in steps] == [1, 2, 3] and set(metrics) == {"validation_accuracy", "train_loss"}
    assert next(hf.load_model(tmp_path / "out", "sequence-classification").parameters()).device.type == "cpu"
