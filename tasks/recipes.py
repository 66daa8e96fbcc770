"""Recipes: an ordered list of stages with parameters, as data, and the runner that builds them.

A recipe turns the source model into one candidate, e.g. ``int8-dynamic`` = export → int8_dynamic.
Named recipes live in ``presets/recipes.yaml``; a user's YAML file with the same shape works too. The
runner caches every stage (see :mod:`tasks.cache`), so a re-run skips what is done.
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError

from kiln.errors import ConfigError
from tasks.cache import StageCache, code_version, make_key
from tasks.stages import Artifact, Stage, StageContext, StageResult

log = logging.getLogger(__name__)
PRESETS = Path(__file__).parent / "presets" / "recipes.yaml"

# Stage name -> "module:function". Imported lazily: a recipe only pays for the stages it uses.
STAGES: dict[str, str] = {
    "export": "tasks.recipes:export_stage",
    "int8_dynamic": "tasks.quantize:int8_dynamic",
    "prune_heads": "tasks.prune:prune_heads",
    "prune_ffn": "tasks.prune:prune_ffn",
    "prune_layers": "tasks.prune:prune_layers",
    "prune_unstructured": "tasks.prune:prune_unstructured",
    "distill": "tasks.distill:distill",
}


class StageSpec(BaseModel):
    """One step of a recipe."""

    stage: str = Field(..., description=f"Stage name, one of: {', '.join(sorted(STAGES))}.")
    params: dict[str, Any] = Field(default_factory=dict, description="The stage's parameters.")


class Recipe(BaseModel):
    """A named, ordered list of stages that turns the source model into one candidate."""

    name: str
    description: str = ""
    stages: list[StageSpec] = Field(..., min_length=1)

    def validate_stages(self) -> None:
        unknown = [s.stage for s in self.stages if s.stage not in STAGES]
        if unknown:
            raise ConfigError(f"recipe {self.name!r} uses unknown stage(s) {unknown}; known: {sorted(STAGES)}")
        if not any(s.stage == "export" for s in self.stages):
            raise ConfigError(f"recipe {self.name!r} never exports: add an 'export' stage")


def library(path: Path = PRESETS) -> dict[str, Recipe]:
    """Named recipes from a YAML file (default: the shipped presets)."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read recipe file {path}: {exc}") from exc
    try:
        return {name: Recipe(name=name, **body) for name, body in raw.items()}
    except (ValidationError, TypeError) as exc:
        raise ConfigError(f"recipe file {path} is invalid: {exc}") from exc


def resolve_recipes(names: list[str], extra: Path | None = None) -> list[Recipe]:
    """Recipes by name from the presets (and an optional user file); unknown names are an error."""
    known = library() | (library(extra) if extra else {})
    missing = [n for n in names if n not in known]
    if missing:
        raise ConfigError(f"unknown recipe(s) {missing}; known: {sorted(known)} (see `kiln recipes`)")
    if not names:
        raise ConfigError("no recipes given; pass at least one, e.g. --recipes onnx-fp32,int8-dynamic")
    recipes = [known[n] for n in names]
    for recipe in recipes:
        recipe.validate_stages()
    return recipes


def stage_function(name: str) -> Stage:
    module, func = STAGES[name].split(":")
    return getattr(importlib.import_module(module), func)


def export_stage(artifact: Artifact, params: dict[str, Any], ctx: StageContext) -> StageResult:
    """Hugging Face folder → ONNX graph (fp32), checked after export."""
    from tasks.export import ExportConfig, export_onnx
    from tasks.hf_model import load_model

    if artifact.kind != "hf":
        raise ConfigError("export needs a Hugging Face model; it must come before quantization stages")
    model = load_model(artifact.path, ctx.task)
    path = export_onnx(model, ctx.workdir / "model.onnx", ExportConfig(**params))
    return StageResult(Artifact("onnx", path), precision="fp32")


@dataclass
class StageRecord:
    """What one stage did, for logging: parameters, duration, cache hit, metrics."""

    stage: str
    params: dict[str, Any]
    seconds: float
    cached: bool
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class BuiltCandidate:
    recipe: Recipe
    artifact: Artifact
    precision: str
    key: str
    records: list[StageRecord]


def build(recipe: Recipe, source: Artifact, source_key: str, make_ctx: Any, cache: StageCache) -> BuiltCandidate:
    """Run ``recipe``'s stages from ``source``, each cached under a key chained from the previous one.

    Args:
        make_ctx: ``workdir -> StageContext`` (the runner owns work folders).
    """
    artifact, precision, key, records = source, "fp32", source_key, []
    for spec in recipe.stages:
        fn = stage_function(spec.stage)
        key = make_key(key, spec.stage, spec.params, code_version(fn))
        started = time.perf_counter()

        def run(workdir: Path, fn: Stage = fn, spec: StageSpec = spec, artifact: Artifact = artifact) -> dict:
            result = fn(artifact, spec.params, make_ctx(workdir))
            return {"kind": result.artifact.kind, "path": str(result.artifact.path.relative_to(workdir)),
                    "precision": result.precision, "metrics": result.metrics}

        result, cached = cache.run(key, run)
        artifact = Artifact(result["kind"], cache.folder(key) / result["path"])
        precision = result["precision"] or precision
        records.append(StageRecord(spec.stage, spec.params, time.perf_counter() - started, cached, result["metrics"]))
        log.info("recipe %s: stage %s %s in %.1fs", recipe.name, spec.stage, "cached" if cached else "done",
                 records[-1].seconds)
    return BuiltCandidate(recipe, artifact, precision, key, records)
