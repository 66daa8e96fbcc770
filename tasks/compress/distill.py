"""Knowledge distillation: a smaller student learns to match its teacher's output distribution.

The teacher is the input folder (or ``teacher``, when the input is an already pruned student). The
student is either a copy of the teacher that keeps some of its layers, initialised from them as
DistilBERT does (e.g. layers [0, 2, 4] of 6), or the input itself. The loss is

    T^2 * KL(teacher_T || student_T) + alpha * CE(labels) + hidden_mse * MSE(mapped hidden states)

with logits softened by temperature T (T^2 keeps gradient sizes independent of T). Causal LMs use a
token-level KL over ``ctx.train.text`` and next-token CE; classifiers use hard-label CE where labels
exist, so unlabelled text still teaches through the KL term.

Three things keep a run short (:mod:`kiln.tasks.compress.distill_data`,
:mod:`kiln.tasks.compress.schedule`): the teacher's logits are computed once per text and cached in the stage
cache (classifiers without ``hidden_mse``), batches hold texts of similar length and are padded to their own
longest (``length_buckets``), and the learning rate warms up to a higher peak and decays (``schedule``), so
fewer steps reach the same quality. Every ``eval_every`` steps ``ctx.progress`` (when set) receives the KL on
the eval batches; an exception it raises (e.g. a pruned search trial) stops the stage, with no model written.

Training is seeded with a fixed data order, and checkpoints (model, optimizer, step, RNG) are written
every ``checkpoint_every`` steps under ``ctx.workdir/checkpoints``: running the stage again in the same
work folder resumes from the last one and ends with the same weights as an uninterrupted run.

Teacher, student and batches live on ``ctx.device`` (a GPU when the ``device`` setting finds one); the
student is saved from the CPU, and checkpoints load onto the CPU first, so one written on a GPU resumes
anywhere.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from kiln.errors import ConfigError
from kiln.tasks.compress.distill_data import Plan, TeacherOutputs, Texts
from kiln.tasks.compress.prune import surgery
from kiln.tasks.compress.schedule import ScheduleKind, set_lr
from kiln.tasks.core.device import to_device
from kiln.tasks.core.stages import Artifact, StageContext, StageResult
from kiln.tasks.models import hf

log = logging.getLogger(__name__)


class DistillParams(BaseModel):
    """Parameters of knowledge distillation."""

    model_config = ConfigDict(extra="forbid")

    layers: list[int] | None = Field(
        None, description="Teacher layers the student keeps (e.g. [0, 2, 4]); None: the input is the student."
    )
    teacher: str | None = Field(
        None, description="Teacher when the input is the student (e.g. pruned): a folder, or 'source' for "
        "the registered model the recipe started from; None: the input is the teacher."
    )
    epochs: int = Field(1, ge=1, description="Passes over ctx.train (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to run; overrides epochs.")
    batch_size: int = Field(16, ge=1, le=1024, description="Texts per step.")
    lr: float = Field(5e-5, gt=0, lt=1, description="AdamW learning rate (the peak, when a schedule warms up).")
    schedule: ScheduleKind = Field(
        "constant", description="Learning rate after the warm-up: constant, or linear/cosine decay to 0.")
    warmup: float = Field(0.0, ge=0, lt=1, description="Fraction of the steps over which the rate rises to lr.")
    length_buckets: int = Field(
        50, ge=0, description="Batches per window sorted by text length, so each batch holds similar lengths "
        "and pads less; 0: plain random batches.")
    temperature: float = Field(2.0, gt=0, le=100, description="Softmax temperature of both models' logits.")
    alpha: float = Field(0.5, ge=0, description="Weight of the hard-label (or next-token) cross-entropy.")
    hidden_mse: float = Field(0.0, ge=0, description="Weight of the MSE between mapped hidden states.")
    checkpoint_every: int = Field(50, ge=0, description="Checkpoint every N steps; 0: never.")
    keep_checkpoints: int = Field(2, ge=1, description="How many recent checkpoints to keep on disk.")
    max_seq_len: int | None = Field(None, ge=2, description="Tokens per text; None: ctx.seq_len.")
    eval_batches: int = Field(2, ge=1, description="Batches on which KL to the teacher is measured.")
    eval_every: int = Field(100, ge=0, description="Report the KL to ctx.progress every N steps; 0: never.")

    @field_validator("layers")
    @classmethod
    def _increasing(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or min(value) < 0 or value != sorted(set(value))):
            raise ValueError("must be distinct, increasing, non-negative layer indices, e.g. [0, 2, 4]")
        return value

    @model_validator(mode="after")
    def _student_differs(self) -> DistillParams:
        if self.layers is None and self.teacher is None:
            raise ValueError("set 'layers' (a smaller student) or 'teacher' (the input is the student); "
                             "otherwise the student is its own teacher")
        return self


def _student(folder: Path, cfg: DistillParams, ctx: StageContext) -> PreTrainedModel:
    student = hf.load_model(folder, ctx.task)
    if cfg.layers is not None:
        depth = len(surgery.blocks(student))
        if cfg.layers[-1] >= depth:
            raise ConfigError(f"layers={cfg.layers}: the teacher has layers 0..{depth - 1}")
        surgery.keep_layers(student, cfg.layers)
    return student


def _layer_map(cfg: DistillParams, student: PreTrainedModel, teacher: PreTrainedModel) -> list[int]:
    """The teacher layer each student layer imitates in the hidden-state MSE."""
    s_depth, t_depth = len(surgery.blocks(student)), len(surgery.blocks(teacher))
    if cfg.layers is not None:
        return cfg.layers
    return [round((i + 1) * t_depth / s_depth) - 1 for i in range(s_depth)]  # evenly spread, last to last


def _check(student: PreTrainedModel, teacher: TeacherOutputs, cfg: DistillParams,
           first: tuple[list[int], hf.Batch]) -> None:
    rows, batch = first
    with torch.no_grad():
        s_n, t_n = hf.forward_logits(student, batch).logits.shape[-1], teacher.logits(rows, batch).shape[-1]
    if s_n != t_n:
        raise ConfigError(f"teacher and student predict {t_n} and {s_n} classes/tokens; they must share "
                          "a head (same tokenizer, same labels)")
    if cfg.hidden_mse and student.config.hidden_size != teacher.model.config.hidden_size:
        raise ConfigError("hidden_mse needs equal hidden sizes in teacher and student; set hidden_mse to 0")


def soft_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
            mask: torch.Tensor | None) -> torch.Tensor:
    """T^2 * KL(teacher || student) per example (classifiers) or per real token (causal LMs)."""
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    per_row = (log_t.exp() * (log_t - log_s)).sum(-1)
    mean = per_row.mean() if mask is None else (per_row * mask).sum() / mask.sum().clamp(min=1)
    return mean * temperature**2


def _losses(student: PreTrainedModel, teacher: TeacherOutputs, rows: list[int], batch: hf.Batch,
            cfg: DistillParams, layer_map: list[int], causal: bool) -> dict[str, torch.Tensor]:
    hidden = cfg.hidden_mse > 0
    if hidden:  # the teacher's hidden states are not cached: it runs on every batch
        with torch.no_grad():
            t_out = hf.forward_logits(teacher.model, batch, output_hidden_states=True)
        t_logits = t_out.logits
    else:
        t_logits = teacher.logits(rows, batch)
    s_out = hf.forward_logits(student, batch, output_hidden_states=hidden)
    mask = batch["attention_mask"].float() if causal else None
    parts = {"kl": soft_kl(s_out.logits, t_logits, cfg.temperature, mask)}
    labels = batch.get("labels")
    if cfg.alpha and labels is not None:
        logits = s_out.logits[:, :-1] if causal else s_out.logits
        targets = labels[:, 1:] if causal else labels
        parts["ce"] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                      ignore_index=-100)
    if hidden:
        keep = batch["attention_mask"].bool()
        pairs = [(s_out.hidden_states[i + 1], t_out.hidden_states[t + 1]) for i, t in enumerate(layer_map)]
        parts["mse"] = torch.stack([F.mse_loss(s[keep], t[keep]) for s, t in pairs]).mean()
    parts["loss"] = parts["kl"] + cfg.alpha * parts.get("ce", 0.0) + cfg.hidden_mse * parts.get("mse", 0.0)
    return parts


def _mean_kl(student: PreTrainedModel, teacher: TeacherOutputs, data: list[tuple[list[int], hf.Batch]],
             temperature: float, causal: bool) -> float:
    """Mean T^2-scaled KL of ``student`` to ``teacher`` on ``data`` (eval mode, no dropout)."""
    student.eval()
    values = []
    with torch.no_grad():
        for rows, batch in data:
            s, t = hf.forward_logits(student, batch).logits, teacher.logits(rows, batch)
            values.append(soft_kl(s, t, temperature, batch["attention_mask"].float() if causal else None))
    return float(torch.stack(values).mean())


def _fingerprint(cfg: DistillParams, ctx: StageContext) -> str:
    """What must match for a checkpoint to continue this run: params, task, seed and training rows."""
    rows = int(pd.util.hash_pandas_object(ctx.train, index=False).sum())
    return f"{cfg.model_dump_json()}|{ctx.task}|{ctx.seed}|{rows}"


def _save_checkpoint(folder: Path, step: int, student: PreTrainedModel, optimizer: torch.optim.Optimizer,
                     fingerprint: str, keep: int) -> Path:
    """Write model, optimizer, step and RNG state atomically; drop all but the ``keep`` newest."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:08d}.pt"
    state = {"step": step, "model": student.state_dict(), "optimizer": optimizer.state_dict(),
             "rng": torch.get_rng_state(), "fingerprint": fingerprint}
    device = next(student.parameters()).device
    if device.type == "cuda":  # dropout draws from the GPU's generator there
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint intact
    for old in sorted(folder.glob("step-*.pt"))[:-keep]:
        old.unlink()
    return path


def _resume(folder: Path, student: PreTrainedModel, optimizer: torch.optim.Optimizer,
            fingerprint: str) -> int:
    """Load the newest checkpoint into ``student`` and ``optimizer``; the step to continue from (0: none)."""
    found = sorted(folder.glob("step-*.pt"))
    if not found:
        return 0
    # Onto the CPU first: a checkpoint written on a GPU resumes where there is none; load_state_dict
    # then copies each tensor to wherever the student lives.
    state = torch.load(found[-1], map_location="cpu", weights_only=True)
    if state["fingerprint"] != fingerprint:
        raise ConfigError(f"checkpoint {found[-1]} was written by a distill run with other params or data; "
                          f"delete {folder} to start over")
    student.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    device = next(student.parameters()).device
    if "cuda_rng" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    log.info("distill: resuming from %s", found[-1].name)
    return int(state["step"])


def _fit(student: PreTrainedModel, teacher: TeacherOutputs, texts: Texts, cfg: DistillParams, ctx: StageContext,
         plan: Plan, eval_data: list[tuple[list[int], hf.Batch]]) -> tuple[int, float]:
    """Train ``student`` (resuming from a checkpoint if one exists); returns (first step run, last loss)."""
    causal, layer_map = ctx.task == "causal-lm", _layer_map(cfg, student, teacher.model)
    torch.manual_seed(ctx.seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr)
    checkpoints, fingerprint = ctx.workdir / "checkpoints", _fingerprint(cfg, ctx)
    start = _resume(checkpoints, student, optimizer, fingerprint)
    student.train()
    data, last = None, float("nan")
    bar = tqdm(total=plan.total_steps, initial=start, desc="distill", unit="step", leave=False)
    try:
        for step in range(start, plan.total_steps):
            epoch, offset = divmod(step, plan.steps_per_epoch)
            if data is None or offset == 0:
                data = texts.batches(plan.groups(epoch, ctx.seed), start=offset)
            rows, batch = next(data)
            set_lr(optimizer, cfg.lr, step, plan.total_steps, warmup=cfg.warmup, kind=cfg.schedule)
            loss = _losses(student, teacher, rows, to_device(batch, ctx.device), cfg, layer_map, causal)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            last = float(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{last:.4f}", refresh=False)
            done = step + 1
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < plan.total_steps:
                teacher.flush()
                _save_checkpoint(checkpoints, done, student, optimizer, fingerprint, cfg.keep_checkpoints)
            if ctx.progress is not None and cfg.eval_every and done % cfg.eval_every == 0:
                # May raise to stop the run (a pruned search trial): it propagates, and no model is written.
                ctx.progress("distill", done, {"kl": _mean_kl(student, teacher, eval_data, cfg.temperature, causal)})
                student.train()
    finally:
        bar.close()
        teacher.flush()  # what was computed stays useful, whether the run finished or not
    student.eval()
    return start, last


def _teacher_dir(cfg: DistillParams, folder: Path, ctx: StageContext) -> Path:
    """``teacher: source`` means the registered model the recipe started from (e.g. before pruning)."""
    if cfg.teacher == "source":
        if ctx.source_dir is None:
            raise ConfigError("teacher 'source' needs the recipe's source model; none was given")
        return ctx.source_dir
    return Path(cfg.teacher) if cfg.teacher else folder


def distill(artifact: Artifact, params: dict[str, Any], ctx: StageContext) -> StageResult:
    """Distil the teacher into a student on ``ctx.train`` (see the module docstring for the loss).

    Args:
        artifact: an ``hf`` folder: the teacher, or the student when ``teacher`` is set.
        params: :class:`DistillParams` fields.
        ctx: stage context; ``ctx.workdir`` holds checkpoints and the output folder.

    Returns:
        The student folder (with tokenizer) and ``kl_before`` / ``kl_after`` (on the first
        ``eval_batches`` of ``ctx.train``), ``params``, ``teacher_params``, ``steps``, ``loss``.
    """
    cfg = hf.parse_params(DistillParams, params, "distill")
    folder = hf.require_hf(artifact, "distill")
    torch.set_num_threads(ctx.threads)
    teacher_dir = _teacher_dir(cfg, folder, ctx)
    teacher = hf.load_model(teacher_dir, ctx.task)
    teacher.requires_grad_(False)
    hf.check_task(teacher, ctx)
    tokenizer = hf.load_tokenizer(folder, ctx)
    student = _student(folder, cfg, ctx)
    teacher.to(ctx.device)
    student.to(ctx.device)  # before the optimizer exists: it holds the parameters, wherever they are
    texts = Texts(ctx.train, tokenizer, ctx, cfg.max_seq_len or ctx.seq_len)
    causal = ctx.task == "causal-lm"
    outputs = TeacherOutputs.open(teacher, teacher_dir, texts, ctx, enabled=not causal and not cfg.hidden_mse)
    n_eval = min(len(texts), cfg.batch_size * cfg.eval_batches)
    eval_rows = [list(range(i, min(i + cfg.batch_size, n_eval))) for i in range(0, n_eval, cfg.batch_size)]
    eval_data = [(rows, to_device(batch, ctx.device)) for rows, batch in texts.batches(eval_rows)]
    _check(student, outputs, cfg, eval_data[0])
    kl_before = _mean_kl(student, outputs, eval_data, cfg.temperature, causal)

    steps = cfg.max_steps or cfg.epochs * -(-len(texts) // cfg.batch_size)
    plan = Plan(tuple(texts.lengths), cfg.batch_size, steps, cfg.length_buckets)
    start, last = _fit(student, outputs, texts, cfg, ctx, plan, eval_data)

    kl_after = _mean_kl(student, outputs, eval_data, cfg.temperature, causal)
    outputs.flush()
    out = hf.save_folder(student.to("cpu"), tokenizer, ctx.workdir / "model")  # nothing saved needs CUDA
    shutil.rmtree(ctx.workdir / "checkpoints", ignore_errors=True)  # superseded; 3x the model with Adam
    log.info("distill: KL to teacher %.4f -> %.4f over %d steps (teacher outputs from the cache for %d of %d rows)",
             kl_before, kl_after, plan.total_steps, outputs.hits, outputs.hits + outputs.misses)
    metrics = {"kl_before": kl_before, "kl_after": kl_after, "loss": last, "steps": float(plan.total_steps),
               "resumed_from_step": float(start), "params": float(hf.count_params(student)),
               "teacher_params": float(hf.count_params(teacher)),
               "teacher_cache_hits": float(outputs.hits), "teacher_runs": float(outputs.misses)}
    return StageResult(Artifact("hf", out), metrics=metrics)
