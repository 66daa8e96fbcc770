"""Faster distillation on a tiny classifier: cached teacher outputs, length buckets, schedules, progress hook."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kiln.tasks.compress import distill as distill_module
from kiln.tasks.compress.distill_data import CACHE_DIR, Plan, Texts
from kiln.tasks.compress.schedule import lr_factor
from kiln.tasks.core.stages import Artifact
from kiln.tasks.models import hf
from tests.tiny import save_tiny
from tests.unit.test_distill import LABELS, TASKS, TEXTS, _ctx

PARAMS = {"layers": [0], "max_steps": 8, "batch_size": 16, "lr": 1e-3, "checkpoint_every": 4, "warmup": 0.25,
          "schedule": "cosine", "length_buckets": 2}
# Lengths that vary a lot, so that bucketing has something to sort.
MIXED = [" ".join([t] * (1 + i % 4)) for i, t in enumerate(TEXTS)]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("teacher")
    src = save_tiny("bert", TEXTS, root / "raw", labels=LABELS)
    ctx = _ctx("bert", src, root / "ctx")
    model, tokenizer = hf.load_model(src, ctx.task), hf.load_tokenizer(src, ctx)
    torch.set_num_threads(1)
    hf.finetune(model, hf.batches(ctx.train, tokenizer, ctx, batch_size=32), steps=20, lr=5e-3, seed=0)
    return hf.save_folder(model, tokenizer, root / "bert")


def _run(teacher: Path, workdir: Path, params: dict = PARAMS, **ctx_kwargs):
    ctx = _ctx("bert", teacher, workdir)
    for key, value in ctx_kwargs.items():
        setattr(ctx, key, value)
    return distill_module.distill(Artifact("hf", teacher), params, ctx)


def _teacher_calls(monkeypatch: pytest.MonkeyPatch, teacher_layers: int) -> list[int]:
    """Record every forward pass of a model as deep as the teacher (the student keeps one layer)."""
    calls, forward = [], hf.forward_logits

    def counting(model, batch, **kwargs):
        if model.config.num_hidden_layers == teacher_layers:
            calls.append(len(batch["input_ids"]))
        return forward(model, batch, **kwargs)

    monkeypatch.setattr(hf, "forward_logits", counting)
    return calls


def _weights(result) -> dict[str, torch.Tensor]:
    return load_file(result.artifact.path / "model.safetensors")


def test_second_run_reads_teacher_outputs_from_the_cache(teacher, tmp_path, monkeypatch):
    depth = hf.load_model(teacher, TASKS["bert"]).config.num_hidden_layers
    calls = _teacher_calls(monkeypatch, depth)
    first = _run(teacher, tmp_path / "first")
    assert calls and first.metrics["teacher_runs"] == sum(calls) > 0
    assert list((tmp_path / CACHE_DIR).glob("*/shard-*.pt"))  # beside the stage folders, as in the stage cache

    calls.clear()
    second = _run(teacher, tmp_path / "second")
    assert calls == [] and second.metrics["teacher_runs"] == 0 and second.metrics["teacher_cache_hits"] > 0
    a, b = _weights(first), _weights(second)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the cached logits are the ones the first run used

    calls.clear()  # hidden states are not cached: the teacher runs, and the cache is left alone
    _run(teacher, tmp_path / "hidden", PARAMS | {"hidden_mse": 0.1})
    assert calls


def test_buckets_pad_each_batch_to_its_own_longest_text(teacher, tmp_path):
    ctx = _ctx("bert", teacher, tmp_path)
    ctx.train = ctx.train.assign(text=MIXED)
    texts = Texts(ctx.train, hf.load_tokenizer(teacher, ctx), ctx, max_len=64)
    assert len(set(texts.lengths)) > 3
    bucketed, plain = (Plan(tuple(texts.lengths), 16, 100, buckets) for buckets in (4, 0))

    groups = bucketed.groups(epoch=0, seed=0)
    assert groups == bucketed.groups(epoch=0, seed=0) and groups != bucketed.groups(epoch=1, seed=0)
    assert sorted(r for g in groups for r in g) == list(range(len(texts)))  # each row once per epoch
    assert len(groups) == bucketed.steps_per_epoch
    for rows in groups:
        width = texts.batch(rows)["input_ids"].shape[1]
        assert width == max(texts.lengths[r] for r in rows) < 64

    def padding(plan: Plan) -> int:
        return sum(len(g) * max(texts.lengths[r] for r in g) for g in plan.groups(0, 0)) - sum(texts.lengths)

    assert padding(bucketed) < 0.5 * padding(plain)


def test_resume_with_cache_buckets_and_schedule_equals_uninterrupted_run(teacher, tmp_path, monkeypatch):
    straight = _run(teacher, tmp_path / "straight")
    save = distill_module._save_checkpoint

    def crash_after_first_save(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(distill_module, "_save_checkpoint", crash_after_first_save)
    with pytest.raises(KeyboardInterrupt):
        _run(teacher, tmp_path / "resumed")
    monkeypatch.setattr(distill_module, "_save_checkpoint", save)
    resumed = _run(teacher, tmp_path / "resumed")
    assert resumed.metrics["resumed_from_step"] == 4
    a, b = _weights(straight), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_progress_is_reported_and_can_stop_the_stage(teacher, tmp_path):
    seen = []
    result = _run(teacher, tmp_path / "reported", PARAMS | {"eval_every": 3},
                  progress=lambda stage, step, metrics: seen.append((stage, step, sorted(metrics))))
    assert seen == [("distill", 3, ["kl"]), ("distill", 6, ["kl"])] and result.metrics["steps"] == 8

    class Pruned(Exception):
        pass

    def stop(stage: str, step: int, metrics: dict[str, float]) -> None:
        raise Pruned(f"{stage} step {step}: kl {metrics['kl']:.3f}")

    with pytest.raises(Pruned, match="distill step 3"):
        _run(teacher, tmp_path / "stopped", PARAMS | {"eval_every": 3}, progress=stop)
    assert not (tmp_path / "stopped" / "model").exists()


def test_schedules_warm_up_then_decay():
    assert [round(lr_factor(s, 10, warmup=0.2, kind="constant"), 3) for s in (0, 1, 2, 9)] == [0.333, 0.667, 1, 1]
    linear = [lr_factor(s, 10, warmup=0.2, kind="linear") for s in range(10)]
    cosine = [lr_factor(s, 10, warmup=0.2, kind="cosine") for s in range(10)]
    assert linear[2] == cosine[2] == 1.0 and linear[-1] == pytest.approx(0.125) and 0 < cosine[-1] < 0.05
    assert all(a >= b for a, b in zip(linear[2:], linear[3:], strict=False))
    assert lr_factor(0, 10, warmup=0.0, kind="linear") == 1.0
