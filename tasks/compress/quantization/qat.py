"""Quantization-aware training: a short fine-tune through simulated INT8, so the float weights quantize well.

Every ``nn.Linear`` (and GPT-2's ``Conv1D``) computes with fake-quantized weights — symmetric, per
output channel, the grid ``int8_static`` and ``int8_dynamic`` use — and, unless ``activations`` is off,
fake-quantized inputs (per tensor, ranges tracked as a moving min/max, uint8 asymmetric like
``int8_static``'s CPU target or int8 symmetric for TensorRT). Rounding passes gradients straight
through (STE). The loss is

    kl_weight * T^2 * KL(float teacher_T || quantized student_T) + task_weight * CE(labels / next token)

where the teacher is the input model itself, frozen: the student learns to give the float model's
answers *despite* quantization. The output is a plain Hugging Face folder — fake quantization removed
and, with ``fold``, the weights snapped onto their INT8 grid — so ``export`` → ``int8_static`` follow.
A run that ends with a wider gap than it started with hands on the input weights instead.
A tied lm_head (GPT-2) is left alone: snapping it would also move the input embedding it shares.
Training runs on ``ctx.device`` (a GPU when the ``device`` setting finds one); the folder is written from the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from kiln.tasks.compress.distill import soft_kl
from kiln.tasks.core.device import to_device
from kiln.tasks.core.stages import Artifact, StageContext, StageResult
from kiln.tasks.models import hf

log = logging.getLogger(__name__)


class QatParams(BaseModel):
    """Parameters of quantization-aware training."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(100, ge=1, le=1_000_000, description="Optimizer steps.")
    batch_size: int = Field(16, ge=1, le=1024, description="Texts per step.")
    lr: float = Field(5e-6, gt=0, lt=1, description="AdamW learning rate; small, because Adam moves every "
                      "weight by ~lr a step and the model starts at its float optimum.")
    temperature: float = Field(2.0, gt=0, le=100, description="Softmax temperature of the distillation KL.")
    kl_weight: float = Field(1.0, ge=0, description="Weight of the KL to the float model's logits.")
    task_weight: float = Field(
        0.1, ge=0, description="Weight of the hard-label (or next-token) cross-entropy; small, since it pulls "
        "away from the float model the KL holds on to.",
    )
    activations: bool = Field(True, description="Fake-quantize Linear inputs too (static INT8); off: weights only.")
    activation_symmetric: bool = Field(False, description="int8 symmetric activations (TensorRT) instead of uint8.")
    observer_momentum: float = Field(0.1, gt=0, le=1, description="Weight of each batch in the moving min/max.")
    calibration_batches: int = Field(4, ge=1, description="Batches that set activation ranges before training.")
    fold: bool = Field(True, description="Save weights snapped to their INT8 grid (else the latent float ones).")
    eval_batches: int = Field(2, ge=1, description="Batches on which the KL to the float model is measured.")
    max_seq_len: int | None = Field(None, ge=2, description="Tokens per text; None: ctx.seq_len.")

    @model_validator(mode="after")
    def _some_loss(self) -> QatParams:
        if self.kl_weight == 0 and self.task_weight == 0:
            raise ValueError("kl_weight and task_weight are both 0: nothing to train on")
        return self


class WeightFakeQuant(nn.Module):
    """Parametrization: symmetric per-channel INT8 rounding of a weight along its output ``axis``."""

    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        other = [d for d in range(weight.dim()) if d != self.axis]
        scale = weight.detach().abs().amax(dim=other).clamp(min=1e-8) / 127
        zero = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(weight, scale, zero, self.axis, -127, 127)


class ActivationFakeQuant:
    """Forward pre-hook: per-tensor INT8 rounding of a layer's input, ranges from a moving min/max."""

    def __init__(self, momentum: float, symmetric: bool) -> None:
        self.momentum, self.symmetric = momentum, symmetric
        self.low: float | None = None
        self.high = 0.0
        self.observe = True

    def _update(self, x: torch.Tensor) -> None:
        low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)  # the range must hold 0 exactly
        if self.low is None:
            self.low, self.high = low, high
        else:
            m = self.momentum
            self.low, self.high = (1 - m) * self.low + m * low, (1 - m) * self.high + m * high

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        if self.observe:
            self._update(x.detach())
        if self.low is None or self.high - self.low < 1e-8:
            return args
        if self.symmetric:
            scale, zero, qmin, qmax = max(-self.low, self.high) / 127, 0, -127, 127
        else:
            scale = (self.high - self.low) / 255
            zero, qmin, qmax = min(255, max(0, round(-self.low / scale))), 0, 255
        return (torch.fake_quantize_per_tensor_affine(x, scale, zero, qmin, qmax), *args[1:])


def quantizable(model: PreTrainedModel) -> dict[str, tuple[nn.Module, int]]:
    """Linear-like layers by name, with the axis of their weight's output channels (tied lm_head left out)."""
    tied = model.get_output_embeddings() if getattr(model.config, "tie_word_embeddings", False) else None
    out = {}
    for name, module in model.named_modules():
        if module is tied:
            continue
        if isinstance(module, nn.Linear):
            out[name] = (module, 0)  # weight [out, in]
        elif isinstance(module, Conv1D):
            out[name] = (module, 1)  # GPT-2 stores [in, out]
    return out


def attach(model: PreTrainedModel, cfg: QatParams) -> tuple[list[ActivationFakeQuant], list[Any]]:
    """Put fake quantization on every quantizable layer; returns the activation hooks and their handles."""
    observers, handles = [], []
    for module, axis in quantizable(model).values():
        parametrize.register_parametrization(module, "weight", WeightFakeQuant(axis))
        if cfg.activations:
            observer = ActivationFakeQuant(cfg.observer_momentum, cfg.activation_symmetric)
            handles.append(module.register_forward_pre_hook(observer))
            observers.append(observer)
    return observers, handles


def detach(model: PreTrainedModel, handles: list[Any]) -> None:
    """Remove fake quantization, leaving the latent float weights."""
    for handle in handles:
        handle.remove()
    for module, _ in quantizable(model).values():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)


@torch.no_grad()
def snap(model: PreTrainedModel) -> None:
    """Round every quantizable weight onto its per-channel INT8 grid, so quantizing it later is lossless."""
    for module, axis in quantizable(model).values():
        module.weight.copy_(WeightFakeQuant(axis)(module.weight))


def _loss(student: PreTrainedModel, teacher: PreTrainedModel, batch: hf.Batch, cfg: QatParams,
          causal: bool) -> torch.Tensor:
    with torch.no_grad():
        target = hf.forward_logits(teacher, batch).logits
    out = student(**batch, **({"use_cache": False} if causal else {}))
    loss = cfg.kl_weight * soft_kl(out.logits, target, cfg.temperature,
                               batch["attention_mask"].float() if causal else None)
    if cfg.task_weight and out.loss is not None:
        loss = loss + cfg.task_weight * out.loss
    return loss


def _mean_kl(student: PreTrainedModel, teacher: PreTrainedModel, data: list[hf.Batch], causal: bool) -> float:
    """Mean KL (T=1) of the fake-quantized student to the float teacher; eval mode, ranges frozen."""
    student.eval()
    with torch.no_grad():
        values = [soft_kl(hf.forward_logits(student, b).logits, hf.forward_logits(teacher, b).logits, 1.0,
                      b["attention_mask"].float() if causal else None) for b in data]
    return float(torch.stack(values).mean())


def _stream(ctx: StageContext, tokenizer: Any, cfg: QatParams) -> Iterator[hf.Batch]:
    """Seeded batches of ``ctx.train`` on ``ctx.device``, reshuffled every epoch, for as long as asked."""
    epoch = 0
    while True:
        order = torch.randperm(len(ctx.train), generator=torch.Generator().manual_seed(ctx.seed * 1000 + epoch))
        for batch in hf.batches(ctx.train, tokenizer, ctx, batch_size=cfg.batch_size,
                                max_len=cfg.max_seq_len or ctx.seq_len, order=order):
            yield to_device(batch, ctx.device)
        epoch += 1


def _observe(observers: list[ActivationFakeQuant], on: bool) -> None:
    for observer in observers:
        observer.observe = on


def _train(student: PreTrainedModel, teacher: PreTrainedModel, data: Iterator[hf.Batch], cfg: QatParams,
           causal: bool, observers: list[ActivationFakeQuant]) -> float:
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr)
    # Dropout stays off (eval mode; gradients still flow): the student must match the teacher's
    # eval-mode outputs, and a short run gains nothing from dropout's regularisation, only noise.
    student.eval()
    _observe(observers, True)
    last = float("nan")
    bar = tqdm(range(cfg.steps), desc="qat", unit="step", leave=False)
    for _ in bar:
        loss = _loss(student, teacher, next(data), cfg, causal)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        last = float(loss.item())
        bar.set_postfix(loss=f"{last:.4f}", refresh=False)
    _observe(observers, False)
    return last


def qat(artifact: Artifact, params: dict[str, Any], ctx: StageContext) -> StageResult:
    """Quantization-aware fine-tune of an ``hf`` model (see the module docstring for the loss).

    Args:
        artifact: an ``hf`` folder; also the frozen float teacher.
        params: :class:`QatParams` fields.
        ctx: stage context; trains on ``ctx.train``, measures on ``ctx.validation`` (else ``ctx.train``).

    Returns:
        A Hugging Face folder (with tokenizer) of plain float weights, and ``quant_kl_before`` /
        ``quant_kl_trained``: KL (T=1, on held-out batches) of the fake-quantized model to the float input
        before and after training — the INT8 gap QAT closes. If training widened it, the input weights
        are kept (``training_kept`` 0) and ``quant_kl_after`` is the final model's gap either way.
        Also ``loss``, ``steps``, ``quantized_layers``.
    """
    cfg = hf.parse_params(QatParams, params, "qat")
    folder = hf.require_hf(artifact, "qat")
    torch.set_num_threads(ctx.threads)
    torch.manual_seed(ctx.seed)
    teacher = hf.load_model(folder, ctx.task).requires_grad_(False).to(ctx.device)
    hf.check_task(teacher, ctx)
    student = hf.load_model(folder, ctx.task).to(ctx.device)
    tokenizer = hf.load_tokenizer(folder, ctx)
    causal, seq = ctx.task == "causal-lm", cfg.max_seq_len or ctx.seq_len
    held_out = ctx.validation if ctx.validation is not None and not ctx.validation.empty else ctx.train
    eval_data = [to_device(b, ctx.device) for b in hf.batches(
        held_out.iloc[: cfg.batch_size * cfg.eval_batches], tokenizer, ctx, batch_size=cfg.batch_size, max_len=seq)]
    data = _stream(ctx, tokenizer, cfg)

    observers, handles = attach(student, cfg)
    with torch.no_grad():  # set activation ranges before the first step, on training text
        student.eval()
        for _ in range(cfg.calibration_batches):
            hf.forward_logits(student, next(data))
    _observe(observers, False)
    kl_before = _mean_kl(student, teacher, eval_data, causal)
    last = _train(student, teacher, data, cfg, causal, observers)
    kl_trained = _mean_kl(student, teacher, eval_data, causal)
    detach(student, handles)
    kept = kl_trained <= kl_before
    if not kept:  # a run that widened the gap is worth nothing: hand on the input weights
        log.warning("qat: training raised KL(fake-quant || float) %.3g -> %.3g; keeping the input weights "
                    "(try a lower lr or more steps)", kl_before, kl_trained)
        student.load_state_dict(teacher.state_dict())
    if cfg.fold:
        snap(student)

    out = hf.save_folder(student.to("cpu"), tokenizer, ctx.workdir / "model")  # nothing saved needs CUDA
    log.info("qat: KL(fake-quant || float) %.4g -> %.4g over %d steps", kl_before, kl_trained, cfg.steps)
    metrics = {"quant_kl_before": kl_before, "quant_kl_trained": kl_trained,
               "quant_kl_after": kl_trained if kept else kl_before, "training_kept": float(kept),
               "loss": last, "steps": float(cfg.steps), "quantized_layers": float(len(quantizable(student)))}
    return StageResult(Artifact("hf", out), metrics=metrics)
