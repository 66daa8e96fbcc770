"""The ``draft`` stage: a speculative-decoding draft derived from the champion itself.

Why it exists: a draft is only worth its cost when it guesses what the *target* would say next, not what the
training text says, so it learns from the target's own generations. The stage

1. takes prefixes of the training texts (``prompt_tokens`` tokens from ``prefixes`` starts in each of the first
   ``prompts`` rows) and lets the input model (the teacher, normally the champion) continue each for
   ``new_tokens`` tokens, greedily (the decoding the draft will assist) or, for a ``sample_share``, sampled with
   the stage seed (``open_prompts`` more start from nothing), and labels every generated position with the
   teacher's greedy token (:mod:`kiln.tasks.compress.draft_data`);
2. keeps a subset of the teacher's layers (every ``keep_every``-th plus the last, or ``layers``), so the draft
   starts from the teacher's own weights;
3. with ``vocab: N``, keeps only the ``N`` tokens the teacher generated most (plus its special tokens) in the
   draft's embedding and head, and writes the map of its ids to the target's (``kiln_draft_vocab.json``) beside
   the weights (:mod:`kiln.tasks.compress.draft_vocab`): the head is otherwise the costliest part of a draft;
4. trains it, by ``objective``:

   * ``ce`` (the default): next-token cross-entropy on those greedy labels
     (:mod:`kiln.tasks.compress.draft_train`). That is the acceptance objective
     (guess the target's greedy token) and needs no teacher forward per step. Loss and top-1 agreement on a
     held-out slice of the generations are stage metrics (``draft_loss``, ``draft_top1``: top-1 predicts the
     acceptance rate).
   * ``kl``: :func:`kiln.tasks.compress.distill.distill` on the generations as text (token-level KL to the
     teacher's full distribution, a teacher forward every step), with ``distill`` params; ``vocab`` then cuts
     the distilled draft. A recipe that sets ``distill`` params and no ``objective`` means ``kl`` (recipes
     written before ``ce`` existed keep their meaning).

It is one stage rather than a corpus stage followed by a training stage because a stage's only output is an
artifact: a replaced ``ctx.train`` would not reach the next stage. Follow it with ``export`` as usual; the
``speculative:`` candidate kind (:mod:`kiln.tasks.optimize.speculative`) exports the draft with its KV cache and
packages its vocabulary map with it.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kiln.errors import ConfigError
from kiln.tasks.compress import draft_data, draft_train
from kiln.tasks.compress.distill import DistillParams, distill
from kiln.tasks.compress.draft_vocab import check_size, choose_vocab, revocabularize
from kiln.tasks.compress.prune import surgery
from kiln.tasks.core.stages import Artifact, StageContext, StageResult
from kiln.tasks.engines.speculative import DraftVocab
from kiln.tasks.models import hf

log = logging.getLogger(__name__)


class DraftParams(BaseModel):
    """Parameters of the ``draft`` stage."""

    model_config = ConfigDict(extra="forbid")

    layers: list[int] | None = Field(None, description="Teacher layers the draft keeps; None: every keep_every-th "
                                                       "layer plus the last.")
    keep_every: int = Field(4, ge=1, description="With layers unset: keep layers 0, k, 2k, … and the last.")
    prompts: int = Field(256, ge=1, description="Training rows whose prefixes the teacher continues.")
    prefixes: int = Field(1, ge=1, le=64, description="Prompts per training row: its first words and later "
                                                      "starts, evenly spaced.")
    open_prompts: int = Field(0, ge=0, description="More prompts of the start token alone, always sampled: the "
                                                   "teacher writes whatever it likes.")
    prompt_tokens: int = Field(16, ge=1, description="Tokens of each training text used as the prompt.")
    new_tokens: int = Field(32, ge=1, le=1024, description="Tokens the teacher generates per prompt.")
    do_sample: bool = Field(False, description="Sample every continuation (seeded): sample_share 1.")
    sample_share: float = Field(0.0, ge=0, le=1, description="Share of the prompts continued by sampling "
                                                             "(seeded); the rest greedily.")
    temperature: float = Field(1.0, gt=0, le=100, description="Sampling temperature.")
    until_eos: bool = Field(True, description="End a continuation at the teacher's end-of-turn token; off: "
                                              "write all new_tokens (as decoding with EOS ignored does).")
    batch_size: int = Field(16, ge=1, le=1024, description="Prompts the teacher continues at once.")
    vocab: int | None = Field(None, ge=2, description="Tokens the draft predicts: the special tokens and the ones "
                                                       "the teacher generated most; None: the whole vocabulary.")
    objective: Literal["ce", "kl"] | None = Field(
        None, description="'ce': next-token cross-entropy on the teacher's greedy tokens; 'kl': the distill stage. "
                          "None: 'ce', or 'kl' when distill params are given.")
    steps: int = Field(300, ge=1, description="Optimizer steps of the ce objective.")
    train_batch: int = Field(8, ge=1, le=1024, description="Generations per ce step.")
    lr: float = Field(3e-4, gt=0, lt=1, description="Peak AdamW learning rate of the ce objective.")
    warmup: float = Field(0.1, ge=0, lt=1, description="Share of the ce steps spent warming up (then linear decay).")
    held_out: float = Field(0.1, gt=0, lt=1, description="Share of the generations held out to measure top-1.")
    check_every: int = Field(0, ge=0, description="Measure held-out top-1 every this many ce steps and keep the "
                                                  "best weights; 0: only at the end.")
    distill: dict[str, Any] = Field(default_factory=dict, description="Parameters of the distill stage run on the "
                                                                      "generations (kl; all but layers, teacher).")

    @field_validator("distill")
    @classmethod
    def _distill_params(cls, value: dict[str, Any]) -> dict[str, Any]:
        taken = sorted({"layers", "teacher"} & set(value))
        if taken:
            raise ValueError(f"{taken} are set by the draft stage itself; use draft's own 'layers'")
        DistillParams.model_validate({**value, "layers": [0]})  # unknown keys and bad values fail here
        return value

    @model_validator(mode="after")
    def _one_objective(self) -> DraftParams:
        if self.objective == "ce" and self.distill:
            raise ValueError("distill params belong to objective 'kl'; the ce objective reads steps, train_batch, "
                             "lr and warmup")
        return self

    @property
    def plan(self) -> draft_data.Plan:
        """How the teacher writes the corpus."""
        return draft_data.Plan(prompt_tokens=self.prompt_tokens, prefixes=self.prefixes,
                               new_tokens=self.new_tokens, sample_share=1.0 if self.do_sample else self.sample_share,
                               temperature=self.temperature, until_eos=self.until_eos,
                               batch_size=self.batch_size, open_prompts=self.open_prompts)

    @property
    def trained_by(self) -> str:
        """The objective in effect (see ``objective``)."""
        return self.objective or ("kl" if self.distill else "ce")


def draft_layers(depth: int, params: DraftParams) -> list[int]:
    """The teacher layers the draft keeps: ``params.layers``, or every ``keep_every``-th plus the last."""
    layers = params.layers if params.layers is not None else sorted({*range(0, depth, params.keep_every), depth - 1})
    if not layers or max(layers) >= depth or min(layers) < 0 or layers != sorted(set(layers)):
        raise ConfigError(f"draft layers {layers} must be distinct, increasing indices of the teacher's "
                          f"{depth} layers (0..{depth - 1})")
    return layers


def draft(artifact: Artifact, params: dict[str, Any], ctx: StageContext) -> StageResult:
    """Train a layer subset of the input model on the input model's own generations (see the module docstring).

    Returns:
        The draft folder (with tokenizer, and ``kiln_draft_vocab.json`` with ``vocab``); metrics:
        ``draft_layers``, ``corpus_rows``, ``params``, ``teacher_params``, ``steps``, ``loss``; with ``vocab``,
        ``vocab`` and ``vocab_coverage``; by ce, ``draft_loss`` / ``draft_top1`` (held out, before and after);
        by kl, the distill stage's.
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
    model_vocab = teacher.get_input_embeddings().num_embeddings
    if cfg.vocab is not None:
        check_size(cfg.vocab, tokenizer, model_vocab)  # before minutes of generation, not after
    teacher_params = hf.count_params(teacher)
    texts = draft_data.prompt_texts(ctx.train["text"].astype(str).head(cfg.prompts).tolist(), cfg.prefixes)
    rows = draft_data.generate(teacher, tokenizer, texts, cfg.plan, ctx.seed)
    del teacher
    if not rows:
        raise ConfigError("the teacher generated no text from the training prompts; check the training split")
    vocab, metrics = None, {}
    if cfg.vocab is not None:
        vocab, metrics = choose_vocab(draft_data.label_tokens(rows), [r.prompt for r in rows], cfg.vocab,
                                      tokenizer, model_vocab)
    log.info("draft: %d teacher generations, keeping layers %s%s, objective %s", len(rows), layers,
             f" and {cfg.vocab} tokens ({metrics['vocab_coverage']:.1%} of those generated)" if vocab else "",
             cfg.trained_by)
    train = _by_kl if cfg.trained_by == "kl" else _by_ce
    out, trained = train(artifact, folder, tokenizer, rows, layers, vocab, cfg, ctx)
    if vocab is not None:
        vocab.write(out)
    metrics |= trained | {"draft_layers": float(len(layers)), "corpus_rows": float(len(rows)),
                          "teacher_params": float(teacher_params)}
    return StageResult(Artifact("hf", out), metrics=metrics)


def _by_ce(artifact: Artifact, folder: Path, tokenizer: Any, rows: list[draft_data.Generation],
           layers: list[int], vocab: DraftVocab | None, cfg: DraftParams, ctx: StageContext
           ) -> tuple[Path, dict[str, float]]:
    # a fresh copy, not the teacher generate ran on: tensors made under inference_mode cannot take gradients
    model = hf.load_model(folder, ctx.task)
    surgery.keep_layers(model, layers)
    if vocab is not None:
        revocabularize(model, vocab)
    model.to(ctx.device)
    train, held = draft_train.split(draft_train.examples(rows, vocab), cfg.held_out, ctx.seed)
    metrics = draft_train.train_ce(model, train, held, steps=cfg.steps, batch_size=cfg.train_batch, lr=cfg.lr,
                                   warmup=cfg.warmup, seed=ctx.seed, device=ctx.device,
                                   check_every=cfg.check_every)
    model.eval()
    out = hf.save_folder(model.to("cpu"), tokenizer, ctx.workdir / "model")  # nothing saved needs CUDA
    return out, metrics | {"params": float(hf.count_params(model))}


def _by_kl(artifact: Artifact, folder: Path, tokenizer: Any, rows: list[draft_data.Generation],
           layers: list[int], vocab: DraftVocab | None, cfg: DraftParams, ctx: StageContext
           ) -> tuple[Path, dict[str, float]]:
    corpus = [tokenizer.decode(row.ids, skip_special_tokens=True) for row in rows]
    corpus = [text for text in corpus if text.strip()]
    if not corpus:
        raise ConfigError("the teacher generated no text from the training prompts; check the training split")
    distill_params = {"max_seq_len": cfg.prompt_tokens + cfg.new_tokens + 8, **cfg.distill, "layers": layers}
    result = distill(artifact, distill_params, dataclasses.replace(ctx, train=pd.DataFrame({"text": corpus})))
    out, metrics = result.artifact.path, dict(result.metrics)
    if vocab is not None:  # KL needs the teacher's whole distribution, so the vocabulary is cut after training
        model = hf.load_model(out, ctx.task)
        revocabularize(model, vocab)
        hf.save_folder(model, tokenizer, out)
        metrics["params"] = float(hf.count_params(model))
    return out, metrics
