"""The one shape every compression stage has, so that recipes compose them without special cases.

A stage takes the artifact the previous stage produced (a Hugging Face folder or an ONNX file), its
parameters, and a context (task, data, work folder); it returns a new artifact plus what it measured:

    stage(artifact, params, ctx) -> StageResult

Stages never touch MLflow or Prefect: the recipe runner logs and caches around them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd

TaskType = Literal["sequence-classification", "causal-lm"]
ArtifactKind = Literal["hf", "onnx"]


@dataclass(frozen=True)
class Artifact:
    """A model on disk: a Hugging Face folder (``hf``) or an ONNX file (``onnx``)."""

    kind: ArtifactKind
    path: Path


@dataclass
class StageContext:
    """What a stage may use besides its input artifact.

    Attributes:
        task: sequence-classification or causal-lm.
        workdir: an empty folder owned by this stage; write outputs here.
        tokenizer_dir: folder of the tokenizer shared by every artifact of a recipe.
        train: training split (``text`` and, for classifiers, ``label`` columns) for calibration,
            recovery fine-tuning and distillation.
        labels: class names in id order (classifiers only).
        source_dir: the registered source model's folder (a distillation teacher: ``teacher: source``).
        validation: held-out split for stages that check their own quality (e.g. accuracy-aware
            quantization fallback); never the split candidates are gated on.
        seq_len: sequence length used for calibration and serving.
        seed: seed for anything random.
        threads: CPU threads a stage may use.
        device: torch device training stages (distill, qat) run on: ``cpu`` or ``cuda:N``, already
            resolved (:func:`kiln.tasks.core.device.resolve_device`); outputs are saved from the CPU either way.
        progress: optional ``(stage, step, metrics)`` callback a training stage calls as it goes (distill: every
            ``eval_every`` steps, ``{"kl": ...}``), e.g. to stop a search trial early: an exception it raises
            propagates out of the stage, which then writes no output. Not part of any cache key.
    """

    task: TaskType
    workdir: Path
    tokenizer_dir: Path
    train: pd.DataFrame
    labels: tuple[str, ...] = ()
    validation: pd.DataFrame | None = None
    source_dir: Path | None = None
    seq_len: int = 64
    seed: int = 0
    threads: int = 2
    device: str = "cpu"
    progress: Callable[[str, int, dict[str, float]], None] | None = None


@dataclass
class StageResult:
    """A stage's output artifact, what it measured, and a precision label for the engine it leads to."""

    artifact: Artifact
    metrics: dict[str, float] = field(default_factory=dict)
    precision: str | None = None


Stage = Callable[[Artifact, dict[str, Any], StageContext], StageResult]
