"""The ``draft`` stage: a speculative-decoding draft derived from the champion itself.

Why it exists: a draft is only worth its cost when it guesses what the *target* would say next, not what the
training text says, so it learns from the target's own generations. The stage

1. takes prefixes of the training texts (``prompt_tokens`` tokens of the first ``prompts`` rows) and lets the
   input model (the teacher, normally the champion) continue each for ``new_tokens`` tokens, greedily (the
   decoding the draft will assist) or sampled with the stage seed;
2. calls :func:`kiln.tasks.compress.distill.distill` with those generations in place of ``ctx.train``, keeping
   a subset of the teacher's layers (every ``keep_every``-th plus the last, or ``layers``), so the student
   starts from the teacher's own weights and is trained on token-level KL to it.

It is one stage rather than a corpus stage followed by ``distill`` because a stage's only output is an
artifact: a replaced ``ctx.train`` would not reach the next stage. Follow it with ``export`` as usual; the
``speculative:`` candidate kind (:mod:`kiln.tasks.optimize.speculative`) exports the draft with its KV cache.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from kiln.errors import ConfigError
from kiln.tasks.compress.distill import DistillParams, distill
from kiln.tasks.compress.prune import surgery
from kiln.tasks.core.stages import Artifact, StageContext, StageResult
from kiln.tasks.models import hf

log = logging.getLogger(__name__)


class DraftParams(BaseModel):
    """Parameters of the ``draft`` stage."""

    model_config = ConfigDict(extra="forbid")

    layers: list[int] | None = Field(None, description="Teacher layers the draft keeps; None: every keep_every-th "
                                                       "layer plus the last.")
    keep_every: int = Field(4, ge=1, description="With layers unset: keep layers 0, k, 2k, … and the last.")
    prompts: int = Field(256, ge=1, description="Training rows whose prefixes the teacher continues.")
    prompt_tokens: int = Field(16, ge=1, description="Tokens of each training text used as the prompt.")
    new_tokens: int = Field(32, ge=1, le=1024, description="Tokens the teacher generates per prompt.")
    do_sample: bool = Field(False, description="Sample the teacher's continuations (seeded) instead of greedy.")
    temperature: float = Field(1.0, gt=0, le=100, description="Sampling temperature (with do_sample).")
    batch_size: int = Field(16, ge=1, le=1024, description="Prompts the teacher continues at once.")
    distill: dict[str, Any] = Field(default_factory=dict, description="Parameters of the distill stage run on the "
                                                                      "generations (all but layers and teacher).")

    @field_validator("distill")
    @classmethod
    def _distill_params(cls, value: dict[str, Any]) -> dict[str, Any]:
        taken = sorted({"layers", "teacher"} & set(value))
        if taken:
            raise ValueError(f"{taken} are set by the draft stage itself; use draft's own 'layers'")
        DistillParams.model_validate({**value, "layers": [0]})  # unknown keys and bad values fail here
        return value


def draft_layers(depth: int, params: DraftParams) -> list[int]:
    """The teacher layers the draft keeps: ``params.layers``, or every ``keep_every``-th plus the last."""
    layers = params.layers if params.layers is not None else sorted({*range(0, depth, params.keep_every), depth - 1})
    if not layers or max(layers) >= depth or min(layers) < 0 or layers != sorted(set(layers)):
        raise ConfigError(f"draft layers {layers} must be distinct, increasing indices of the teacher's "
                          f"{depth} layers (0..{depth - 1})")
    return layers


def teacher_generations(model: torch.nn.Module, tokenizer: Any, texts: list[str], params: DraftParams,
                        seed: int) -> list[str]:
    """Prompt prefix + the teacher's continuation, as text, for each of ``texts``."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generate appends after the last column
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(seed)
    out: list[str] = []
    try:
        for first in range(0, len(texts), params.batch_size):
            enc = tokenizer(texts[first: first + params.batch_size], truncation=True,
                            max_length=params.prompt_tokens, padding=True, return_tensors="pt")
            sampling = {"do_sample": True, "temperature": params.temperature, "top_k": 0} if params.do_sample else {
                "do_sample": False}
            with torch.inference_mode():
                ids = model.generate(**enc, max_new_tokens=params.new_tokens, pad_token_id=pad, **sampling)
            out.extend(tokenizer.batch_decode(ids, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return [text for text in out if text.strip()]


def draft(artifact: Artifact, params: dict[str, Any], ctx: StageContext) -> StageResult:
    """Distil a layer subset of the input model on the input model's own generations (see the module docstring).

    Returns:
        The draft folder (with tokenizer), the distill stage's metrics, ``draft_layers`` and ``corpus_rows``.
    """
    cfg = hf.parse_params(DraftParams, params, "draft")
    folder = hf.require_hf(artifact, "draft")
    if ctx.task != "causal-lm":
        raise ConfigError("the draft stage makes a speculative-decoding draft for a causal LM; this model is a "
                          f"{ctx.task}")
    torch.set_num_threads(ctx.threads)
    teacher = hf.load_model(folder, ctx.task)
    tokenizer = hf.load_tokenizer(folder, ctx)
    layers = draft_layers(len(surgery.blocks(teacher)), cfg)
    prompts = ctx.train["text"].astype(str).head(cfg.prompts).tolist()
    corpus = teacher_generations(teacher, tokenizer, prompts, cfg, ctx.seed)
    del teacher
    if not corpus:
        raise ConfigError("the teacher generated no text from the training prompts; check the training split")
    log.info("draft: %d teacher generations, keeping layers %s", len(corpus), layers)
    distill_params = {"max_seq_len": cfg.prompt_tokens + cfg.new_tokens + 8, **cfg.distill, "layers": layers}
    result = distill(artifact, distill_params, dataclasses.replace(ctx, train=pd.DataFrame({"text": corpus})))
    result.metrics |= {"draft_layers": float(len(layers)), "corpus_rows": float(len(corpus))}
    return result
