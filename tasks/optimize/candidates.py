"""The optimize pipeline's steps as plain functions: resolve the source, evaluate, gate, register.

``flows/optimize.py`` wires these in order as Prefect tasks; each is usable (and tested) on its own.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from kiln.errors import ArtifactError, ModelNotFoundError
from kiln.settings import Settings
from kiln.tasks.compress.recipes import BuiltCandidate
from kiln.tasks.core import tags as vocab
from kiln.tasks.core.cache import StageCache, code_version, make_key
from kiln.tasks.core.device import resolve_device
from kiln.tasks.core.stages import StageContext
from kiln.tasks.data.datasets import DatasetSpec, Splits
from kiln.tasks.engines import EngineOptions
from kiln.tasks.evaluate import decoding
from kiln.tasks.evaluate.benchmark import BenchConfig, footprint
from kiln.tasks.evaluate.evidence import Interval, LatencySamples, RowEvidence
from kiln.tasks.evaluate.gate import GateDecision, Measured
from kiln.tasks.evaluate.policy import Policy
from kiln.tasks.evaluate.quality import Outputs, quality
from kiln.tasks.models.predictor import PackageMeta, Predictor, add_tensorrt_plan, package
from kiln.tasks.models.speculative import measure_speculation
from kiln.tasks.registry import client as registry

log = logging.getLogger(__name__)


@dataclass
class Source:
    """The registered model version that candidates are built from (a Hugging Face package)."""

    version: ModelVersion
    folder: Path
    meta: PackageMeta
    data: DatasetSpec
    key: str


@dataclass
class Evaluated:
    """A model measured on the evaluation rows: quality, parity, size and memory, with the evidence behind them
    (per-row outcomes; latency samples once :func:`kiln.tasks.optimize.judging.time_together` has run)."""

    name: str
    folder: Path
    precision: str
    metrics: dict[str, float]
    key: str
    stages: list[dict[str, Any]] = field(default_factory=list)
    decision: GateDecision | None = None
    rows: RowEvidence | None = None
    latency: LatencySamples | None = None
    labels: int = 0
    intervals: dict[str, Interval] = field(default_factory=dict)  # beside each shown number (95 %)

    def measured(self) -> Measured:
        """What the gate judges."""
        return Measured(self.metrics, self.rows, self.latency, self.labels)


def resolve_source(client: MlflowClient, ref: registry.ModelRef, downloads: Path,
                   data: DatasetSpec | None = None) -> Source:
    """Resolve ``ref``; when it names an engine, follow ``kiln.parent_version`` back to the HF source."""
    version = registry.resolve(client, ref)
    seen = set()
    while True:
        folder = registry.fetch_package(client, version, downloads)
        meta = PackageMeta.read(folder)
        if meta.format == "hf":
            break
        parent = version.tags.get(vocab.PARENT_VERSION)
        if not parent or parent in seen:
            raise ArtifactError(f"{version.name} v{version.version} is an engine without a source model; "
                                "optimize the Hugging Face version it was built from")
        seen.add(parent)
        version = registry.resolve(client, registry.ModelRef(version.name, version=parent))
    spec = data or _recorded_dataset(version)
    key = make_key(version.name, version.version, version.run_id, meta.sha256)
    return Source(version, folder, meta, spec, key)


def _recorded_dataset(version: ModelVersion) -> DatasetSpec:
    raw = version.tags.get(vocab.DATASET)
    if not raw:
        raise ModelNotFoundError(f"{version.name} v{version.version} records no dataset (tag {vocab.DATASET}); "
                                 "pass one with --data FILE --text-column ... --label-column ...")
    return DatasetSpec(**json.loads(raw))


def stage_context_factory(source: Source, splits: Splits, settings: Settings, seq_len: int
                          ) -> Callable[[Path], StageContext]:
    """``workdir -> StageContext`` for the recipe runner: the same data and knobs for every stage."""
    device = resolve_device(settings.device)

    def make(workdir: Path) -> StageContext:
        return StageContext(task=source.meta.task, workdir=workdir, tokenizer_dir=source.folder,
                            train=splits.train, validation=splits.validation, labels=splits.labels,
                            source_dir=source.folder, seq_len=seq_len, seed=settings.seed,
                            threads=settings.threads, device=device)

    return make


def package_candidate(built: BuiltCandidate, source: Source, cache: StageCache, seq_len: int,
                      backend: str = "onnxruntime") -> Path:
    """The candidate's Kiln package (engine + tokenizer + checksums), made once per backend."""
    if source.meta.task == "causal-lm":  # scored on the same tokens as its source: perplexity and parity compare
        seq_len = source.meta.seq_len  # (a GGUF import is registered at 256, the flow's default is 64)
    # "m2": packages whose kiln.json lists every file; a cached older one (weights only) would be refused.
    folder = cache.folder(built.key) / f"package-{backend}-seq{seq_len}-m2"
    if (folder / "kiln.json").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)  # left by a version of Kiln that wrote packages in place
    # Built aside and renamed into place: a run killed mid-write leaves a stray folder, never a half package
    # (an empty kiln.json) that the next run would take for a finished one.
    work = folder.with_name(f".{folder.name}.{os.getpid()}.partial")
    shutil.rmtree(work, ignore_errors=True)
    meta = PackageMeta(format="onnx", task=source.meta.task, labels=list(source.meta.labels),
                       seq_len=seq_len, precision=built.precision, recipe=built.recipe.name)
    package(built.artifact, built.tokenizer_dir, work, meta)
    if backend == "tensorrt":
        add_tensorrt_plan(work)
    try:
        os.replace(work, folder)
    except OSError:  # another run finished the same package first: theirs is as good
        shutil.rmtree(work, ignore_errors=True)
    return folder


def eval_frame(splits: Splits, limit: int | None, seed: int) -> pd.DataFrame:
    """The split candidates are judged on (test), optionally a seeded sample of it."""
    frame = splits.test
    if limit is not None and len(frame) > limit:
        frame = frame.sample(n=limit, random_state=seed).reset_index(drop=True)
    return frame


def _save_outputs(path: Path, outputs: Outputs) -> None:
    arrays = {}
    for i, (lg, m, ids) in enumerate(zip(outputs.logits, outputs.masks, outputs.ids, strict=True)):
        arrays |= {f"l{i}": lg, f"m{i}": m, f"i{i}": ids}
    if outputs.continuations is not None:
        arrays["continuations"] = np.array(outputs.continuations, dtype=np.str_)
    np.savez(path, **arrays)


def _load_outputs(path: Path) -> Outputs:
    data = np.load(path)
    n = len(data.files) // 3
    texts = data["continuations"].tolist() if "continuations" in data.files else None
    return Outputs([data[f"l{i}"] for i in range(n)], [data[f"m{i}"] for i in range(n)],
                   [data[f"i{i}"] for i in range(n)], texts)


def evaluate_candidate(name: str, folder: Path, precision: str, key: str, frame: pd.DataFrame, cache: StageCache,
                       options: EngineOptions, bench: BenchConfig, reference: Outputs | None = None,
                       keep_outputs: bool = False) -> tuple[Evaluated, Outputs | None]:
    """Quality (+ parity with ``reference``) with per-row outcomes, memory and size of the package at ``folder``.

    Cached by the package's key, the evaluation rows, the engine options and the code version, so a re-run
    does not evaluate again; ``keep_outputs`` stores the logits for use as a parity reference. Latency is not
    measured here: candidates are timed together, in interleaved rounds (:mod:`kiln.tasks.optimize.judging`).
    """
    eval_key = make_key("evaluate", key, pd.util.hash_pandas_object(frame, index=False).sum(),
                        options.model_dump(), reference is not None, code_version(quality),
                        code_version(decoding.decode_prompts))

    def run(workdir: Path) -> dict[str, Any]:
        predictor = Predictor(folder, options)
        metrics, outputs, rows = quality(predictor, frame, reference=reference, desc=f"evaluate {name}")
        if predictor.meta.task == "causal-lm":  # the prompt set decoded greedily at batch 1, serially, timed
            decoded = decoding.decode_prompts(predictor)
            outputs.continuations = decoded.texts
            metrics |= decoding.generation_metrics(decoded, reference.continuations if reference else None)
        if getattr(predictor, "is_cascade", False):  # the share of evaluation rows its small member passed on
            metrics["escalation_rate"] = predictor.stats.escalation_rate
        if getattr(predictor, "is_speculative", False):  # its draft's acceptance and speed-up (batch 1, serial)
            metrics |= measure_speculation(predictor, frame["text"].astype(str).tolist())
        del predictor
        rows.save(workdir / "rows.npz")
        if keep_outputs:
            _save_outputs(workdir / "outputs.npz", outputs)
        return {"metrics": metrics}

    result, cached = cache.run(eval_key, run)
    if cached:
        log.info("evaluation of %s reused from cache", name)
    outputs_path = cache.folder(eval_key) / "outputs.npz"
    outputs = _load_outputs(outputs_path) if keep_outputs and outputs_path.exists() else None
    metrics = result["metrics"] | _footprint(key, folder, cache, options, bench)
    rows = RowEvidence.load(cache.folder(eval_key) / "rows.npz")
    labels = len(PackageMeta.read(folder).labels)
    return Evaluated(name, folder, precision, metrics, key, rows=rows, labels=labels), outputs


def _footprint(key: str, folder: Path, cache: StageCache, options: EngineOptions, bench: BenchConfig
               ) -> dict[str, float]:
    """Size and peak memory of the package (cached by package, not by rows: they do not depend on them)."""
    fp_key = make_key("footprint", key, options.model_dump(), bench.batch_sizes, code_version(footprint))
    result, _ = cache.run(fp_key, lambda _workdir: {"metrics": footprint(folder, options, bench)})
    return result["metrics"]


def baseline_for(policy: Policy, source: Evaluated, champion: Evaluated | None) -> tuple[Evaluated | None, str]:
    """What relative clauses compare with: the champion, or per policy the source when there is none."""
    if champion is not None:
        return champion, "champion"
    if policy.when_no_champion == "source":
        return source, "source (no champion yet)"
    return None, "none"


def git_commit() -> str:
    """The commit of the working directory's repository, or ``unknown`` outside one."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
