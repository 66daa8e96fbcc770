"""Recipes: an ordered list of stages with parameters, as data, and the runner that builds them.

A recipe turns the source model into one candidate, e.g. ``int8-dynamic`` = export → int8_dynamic.
Named recipes live in ``presets/recipes.yaml``; a user's YAML file with the same shape works too. The
runner caches every stage (see :mod:`kiln.tasks.core.cache`), so a re-run skips what is done.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from kiln.errors import ConfigError, known_keys, unknown_key, validation_problems
from kiln.tasks.core.cache import StageCache, code_version, make_key
from kiln.tasks.core.device import key_part
from kiln.tasks.core.stages import Artifact, Stage, StageContext, StageResult
from kiln.tasks.presets import PRESETS as _PRESET_DIR
from kiln.yamlfile import read_mapping

log = logging.getLogger(__name__)

PRESETS = _PRESET_DIR / "recipes.yaml"

# Stage name -> "module:function". Imported lazily: a recipe only pays for the stages it uses.
STAGES: dict[str, str] = {
    "export": "kiln.tasks.compress.recipes:export_stage",
    "int8_dynamic": "kiln.tasks.compress.quantization.dynamic:int8_dynamic",
    "prune_heads": "kiln.tasks.compress.prune.stages:prune_heads",
    "prune_ffn": "kiln.tasks.compress.prune.stages:prune_ffn",
    "prune_layers": "kiln.tasks.compress.prune.stages:prune_layers",
    "prune_unstructured": "kiln.tasks.compress.prune.stages:prune_unstructured",
    "distill": "kiln.tasks.compress.distill:distill",
    "prune_vocab": "kiln.tasks.compress.prune.vocab:prune_vocab",
    "int8_static": "kiln.tasks.compress.quantization.static:int8_static",
    "fp16": "kiln.tasks.compress.quantization.dynamic:fp16",
    "weight_only": "kiln.tasks.compress.quantization.dynamic:weight_only",
    "qat": "kiln.tasks.compress.quantization.qat:qat",
    "draft": "kiln.tasks.compress.draft:draft",  # a speculative-decoding draft: layers kept, distilled on generations
}
# Asked for often, deliberately not offered: the reason is the error message.
UNSUPPORTED = {
    "bf16": "bf16 is not supported: ONNX Runtime 1.32 has no bfloat16 kernels for Add, MatMul or "
            "LayerNormalization, and opset-17 Sin/Cos (Llama's rotary embedding) reject bfloat16; use 'fp16' for "
            "GPU engines, or 'int8_static' / 'weight_only' for CPU",
}


# Stage name -> the pydantic model of its parameters ("module:Class"), checked before any work starts.
PARAMS: dict[str, str] = {
    "export": "kiln.tasks.models.export:ExportConfig",
    "int8_dynamic": "kiln.tasks.compress.quantization.dynamic:DynamicInt8Params",
    "prune_heads": "kiln.tasks.compress.prune.stages:HeadPruneParams",
    "prune_ffn": "kiln.tasks.compress.prune.stages:FFNPruneParams",
    "prune_layers": "kiln.tasks.compress.prune.stages:LayerPruneParams",
    "prune_unstructured": "kiln.tasks.compress.prune.stages:UnstructuredParams",
    "distill": "kiln.tasks.compress.distill:DistillParams",
    "prune_vocab": "kiln.tasks.compress.prune.vocab:VocabPruneParams",
    "int8_static": "kiln.tasks.compress.quantization.static:StaticInt8Params",
    "fp16": "kiln.tasks.compress.quantization.dynamic:HalfParams",
    "weight_only": "kiln.tasks.compress.quantization.dynamic:WeightOnlyParams",
    "qat": "kiln.tasks.compress.quantization.qat:QatParams",
    "draft": "kiln.tasks.compress.draft:DraftParams",
}
# Stages that train on ctx.device: off the CPU their cache key names the device (a GPU rounds differently).
TRAINS_ON_DEVICE = frozenset({"distill", "qat", "draft"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # `stage:` for `stages:` is an error, not a recipe without stages


class StageSpec(_Strict):
    """One step of a recipe."""

    stage: str = Field(..., description=f"Stage name, one of: {', '.join(sorted(STAGES))}.")
    params: dict[str, Any] = Field(default_factory=dict, description="The stage's parameters.")


class CascadeParams(_Strict):
    """A small-model-first cascade (:mod:`kiln.tasks.models.cascade`): ``small`` answers, uncertain rows escalate."""

    small: str = Field(..., description="The recipe whose candidate answers first (built, and cached, as usual).")
    large: str = Field("champion", description="What uncertain rows escalate to: 'champion' (the registered "
                                               "champion; the source model when there is none) or a recipe name.")
    max_accuracy_drop: float = Field(0.003, ge=0.0, le=1.0, description=(
        "Validation accuracy may fall at most this far below the large member's (0.003 = 0.3 point); the "
        "threshold is the one that escalates the fewest validation rows within it."))


class SpeculativeParams(_Strict):
    """Speculative decoding (:mod:`kiln.tasks.models.speculative`): a draft proposes tokens, the target checks them."""

    draft: str = Field(..., description="The recipe whose candidate is the draft (e.g. stages draft + export).")
    target: str = Field("champion", description="What decides every token: 'champion' (or the source) or a recipe.")
    lookahead: int = Field(4, ge=1, le=32, description="Tokens the draft proposes per target pass.")


class Recipe(_Strict):
    """A named, ordered list of stages that turns the source model into one candidate (or a cascade of two)."""

    name: str
    description: str = ""
    stages: list[StageSpec] = Field(default_factory=list, description="The stages (every recipe but a cascade).")
    cascade: CascadeParams | None = Field(None, description="Instead of stages: a cascade of two candidates.")
    speculative: SpeculativeParams | None = Field(None, description="Instead of stages: a target with a draft.")
    _file: Path | None = PrivateAttr(None)  # the YAML file it came from, named in errors
    _members: dict[str, Recipe] = PrivateAttr(default_factory=dict)  # a cascade's member recipes, once resolved

    @model_validator(mode="after")
    def _stages_or_cascade(self) -> Recipe:
        if bool(self.stages) + (self.cascade is not None) + (self.speculative is not None) != 1:
            raise ValueError("give either 'stages' (at least one), 'cascade' or 'speculative', only one")
        return self

    @property
    def members(self) -> dict[str, Recipe]:
        """A cascade's member recipes by role (``small``, and ``large`` unless it is the champion)."""
        return self._members

    @property
    def label(self) -> str:
        """``recipe 'int8-dynamic'`` (``in FILE`` when read from a file)."""
        return f"recipe {self.name!r}" + (f" in {self._file}" if self._file else "")

    def validate_stages(self) -> None:
        if self.cascade is not None or self.speculative is not None:
            return  # its members are recipes of their own, validated as such (resolve_recipes)
        for spec in self.stages:
            if spec.stage in UNSUPPORTED:
                raise ConfigError(f"{self.label}: {UNSUPPORTED[spec.stage]}")
        unknown = [s.stage for s in self.stages if s.stage not in STAGES]
        if unknown:
            raise ConfigError(f"{self.label} uses unknown stage(s) {unknown}; known: {sorted(STAGES)}")
        if not any(s.stage == "export" for s in self.stages):
            raise ConfigError(f"{self.label} never exports: add an 'export' stage")
        for i, spec in enumerate(self.stages):
            if spec.stage in PARAMS:
                _parse_params(self.label, i, spec)

    def check_against(self, model_config: Any) -> None:
        """Refuse parameters the model cannot satisfy (more layers than it has, too many heads, …).

        Follows the model's shape through the stages, so ``distill`` to 3 layers then ``prune_layers``
        of 3 is caught too.
        """
        for member in self.members.values():
            member.check_against(model_config)
        shape = _Shape.of(model_config)
        for i, spec in enumerate(self.stages):
            where = f"{self.label}, stage {i + 1} ({spec.stage})"
            if spec.stage in PARAMS:
                shape.apply(spec.stage, _parse_params(self.label, i, spec), where)


def _parse_params(label: str, index: int, spec: StageSpec) -> BaseModel:
    """The stage's params model; a key it does not have is an error (whether or not the model forbids extras)."""
    module, cls = PARAMS[spec.stage].split(":")
    model = getattr(importlib.import_module(module), cls)
    where = f"{label}, stage {index + 1} ({spec.stage})"
    known = known_keys(model)
    unknown = [unknown_key(key, known) for key in spec.params if key not in known]
    if unknown:
        raise ConfigError(f"{where}: {'; '.join(unknown)}")
    try:
        return model.model_validate(spec.params)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {validation_problems(exc, 'params', model=model)}") from exc


@dataclass
class _Shape:
    """Layer and head counts of the model as a recipe's stages change it."""

    layers: int
    heads: int
    kv_heads: int

    @classmethod
    def of(cls, config: Any) -> _Shape:
        layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
        heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 0)
        return cls(layers, heads, getattr(config, "num_key_value_heads", None) or heads)

    def apply(self, stage: str, p: Any, where: str) -> None:
        if stage == "distill" and p.layers is not None:
            if max(p.layers) >= self.layers:
                raise ConfigError(f"{where}: layers {p.layers} — the teacher has only {self.layers} layers "
                                  f"(indices 0..{self.layers - 1})")
            self.layers = len(p.layers)
        elif stage == "draft":  # keeps p.layers, or every keep_every-th layer and the last
            keep = p.layers or sorted({*range(0, self.layers, p.keep_every), self.layers - 1})
            if max(keep) >= self.layers:
                raise ConfigError(f"{where}: layers {keep} — the teacher has only {self.layers} layers")
            self.layers = len(keep)
        elif stage == "prune_layers":
            drop = p.layers if p.layers is not None else list(range(p.remove))
            if len(drop) >= self.layers or any(i >= self.layers for i in drop):
                raise ConfigError(f"{where}: cannot remove {drop if p.layers else p.remove} of {self.layers} layers")
            self.layers -= len(drop)
        elif stage == "prune_heads":
            units = self.kv_heads if p.gqa == "groups" else self.heads
            if p.remove_per_layer >= units:
                raise ConfigError(f"{where}: remove_per_layer={p.remove_per_layer} but layers have {units} "
                                  f"{'KV groups' if p.gqa == 'groups' else 'heads'}")
            if p.gqa == "queries" and self.kv_heads != self.heads and p.remove_per_layer % self.kv_heads:
                raise ConfigError(f"{where}: remove_per_layer={p.remove_per_layer} does not divide evenly over "
                                  f"{self.kv_heads} KV groups; use a multiple of {self.kv_heads} or gqa: groups")
            removed_groups = p.remove_per_layer if p.gqa == "groups" else 0
            per_group = self.heads // max(self.kv_heads, 1)
            self.heads -= p.remove_per_layer * (per_group if p.gqa == "groups" else 1)
            self.kv_heads -= removed_groups


def library(path: Path = PRESETS) -> dict[str, Recipe]:
    """Named recipes from a YAML file (default: the shipped presets)."""
    raw = read_mapping(path, "recipe file", "a mapping of recipe names to {description: ..., stages: [...]}")
    recipes = {}
    for name, body in raw.items():
        if not isinstance(body, dict) or "name" in body:
            raise ConfigError(f"recipe file {path}: recipe {name!r} must be a mapping with 'stages' (and "
                              "optionally 'description'); its name is its key")
        try:
            recipe = Recipe.model_validate({**body, "name": str(name)})
        except ValidationError as exc:
            problems = validation_problems(exc, model=Recipe)
            raise ConfigError(f"recipe file {path} is invalid: recipe {name!r}: {problems}") from exc
        recipe._file = None if path == PRESETS else path  # Kiln's own presets need no file name
        recipes[str(name)] = recipe
    return recipes


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
        if recipe.cascade is not None or recipe.speculative is not None:
            recipe._members = _cascade_members(recipe, known)
    return recipes


def _cascade_members(recipe: Recipe, known: dict[str, Recipe]) -> dict[str, Recipe]:
    """The recipes a cascade (or speculative recipe) names, validated; 'champion' as a member is not a recipe."""
    c, s = recipe.cascade, recipe.speculative
    kind, champion_role = ("cascade", "large") if c is not None else ("speculative", "target")
    roles = {"small": c.small, "large": c.large} if c is not None else {"draft": s.draft, "target": s.target}
    members = {}
    for role, name in roles.items():
        if role == champion_role and name == "champion":
            continue
        if name not in known:
            raise ConfigError(f"{recipe.label}: {kind} {role} {name!r} is not a recipe; known: {sorted(known)}"
                              + (" or 'champion'" if role == champion_role else ""))
        if not known[name].stages:
            itself = "cascade" if known[name].cascade is not None else "speculative recipe"
            raise ConfigError(f"{recipe.label}: {kind} {role} {name!r} is itself a {itself}; name a recipe with stages")
        known[name].validate_stages()
        members[role] = known[name]
    return members


def recipes_for(names: list[str], extra: Path | None, model_dir: Path) -> list[Recipe]:
    """Named recipes, each checked against the model in ``model_dir`` before any work starts."""
    from transformers import AutoConfig

    chosen = resolve_recipes(names, extra)
    model_config = AutoConfig.from_pretrained(str(model_dir))
    for recipe in chosen:
        recipe.check_against(model_config)
    return chosen


def stage_function(name: str) -> Stage:
    module, func = STAGES[name].split(":")
    return getattr(importlib.import_module(module), func)


def export_stage(artifact: Artifact, params: dict[str, Any], ctx: StageContext) -> StageResult:
    """Hugging Face folder → ONNX graph (fp32), checked after export; a causal LM with its KV cache by default."""
    from kiln.tasks.models.export import ExportConfig, export_folder

    if artifact.kind != "hf":
        raise ConfigError("export needs a Hugging Face model; it must come before quantization stages")
    config = ExportConfig(**params)
    path = export_folder(artifact.path, ctx.task, ctx.workdir / "model.onnx", config)
    return StageResult(Artifact("onnx", path), precision="fp32",
                       metrics={"kv_cache": float(config.with_past(ctx.task == "causal-lm"))})


def artifact_stats(artifact: Artifact) -> dict[str, float]:
    """Size on disk (MB) and parameter count of a stage's output, read from the files, not a loaded model."""
    if artifact.kind == "onnx":
        import onnx

        graph = onnx.load(str(artifact.path), load_external_data=False).graph
        files = [artifact.path, *artifact.path.parent.glob(artifact.path.name + ".data")]
        params = sum(int(np.prod(t.dims)) for t in graph.initializer)
    else:
        from safetensors import safe_open

        files = sorted(artifact.path.glob("*.safetensors"))
        params = 0
        for path in files:
            with safe_open(str(path), "np") as handle:
                params += sum(int(np.prod(handle.get_slice(k).get_shape())) for k in handle.keys())
    return {"size_mb": sum(f.stat().st_size for f in files) / 1e6, "params": float(params)}


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
    tokenizer_dir: Path


def build(recipe: Recipe, source: Artifact, source_key: str, make_ctx: Any, cache: StageCache,
          assess: Callable[[Artifact, StageContext], dict[str, float]] | None = None) -> BuiltCandidate:
    """Run ``recipe``'s stages from ``source``, each cached under a key chained from the previous one.

    Args:
        make_ctx: ``workdir -> StageContext`` (the runner owns work folders).
        assess: optional quality check of each stage's output (cached with it), e.g.
            :func:`kiln.tasks.evaluate.quality.assess_artifact`.
    """
    artifact, precision, key, records = source, "fp32", source_key, []
    # The tokenizer travels with the model: a stage may rewrite it (prune_vocab), and every later stage,
    # the quality check and the package must then use the new one.
    first = make_ctx(source.path)
    tokenizer_dir = first.tokenizer_dir
    for spec in recipe.stages:
        fn = stage_function(spec.stage)
        device = key_part(first.device) if spec.stage in TRAINS_ON_DEVICE else ()
        key = make_key(key, spec.stage, spec.params, code_version(fn), *device)
        started = time.perf_counter()

        def run(workdir: Path, fn: Stage = fn, spec: StageSpec = spec, artifact: Artifact = artifact,
                tokenizer_dir: Path = tokenizer_dir) -> dict:
            ctx = make_ctx(workdir)
            ctx.tokenizer_dir = tokenizer_dir
            started = time.perf_counter()
            result = fn(artifact, spec.params, ctx)
            metrics = {"seconds": time.perf_counter() - started} | artifact_stats(result.artifact) | result.metrics
            if assess is not None:
                ctx.tokenizer_dir = _tokenizer_of(result.artifact, tokenizer_dir)
                metrics |= assess(result.artifact, ctx)
            return {"kind": result.artifact.kind, "path": str(result.artifact.path.relative_to(workdir)),
                    "precision": result.precision, "metrics": metrics}

        result, cached = cache.run(key, run)
        artifact = Artifact(result["kind"], cache.folder(key) / result["path"])
        tokenizer_dir = _tokenizer_of(artifact, tokenizer_dir)
        precision = result["precision"] or precision
        records.append(StageRecord(spec.stage, spec.params, time.perf_counter() - started, cached, result["metrics"]))
        log.info("recipe %s: stage %s %s in %.1fs", recipe.name, spec.stage, "cached" if cached else "done",
                 records[-1].seconds)
    return BuiltCandidate(recipe, artifact, precision, key, records, tokenizer_dir)


def _tokenizer_of(artifact: Artifact, current: Path) -> Path:
    """The tokenizer that goes with ``artifact``: its own when the stage wrote one, else ``current``."""
    folder = artifact.path
    if artifact.kind == "hf" and ((folder / "tokenizer.json").is_file() or (folder / "vocab.txt").is_file()):
        return folder
    return current
