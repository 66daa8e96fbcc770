"""What a compression search may try, and how one trial's choices become a recipe (data, like any other).

Exists so that the search never writes stage code of its own: a trial is an ordinary :class:`Recipe` built by
the same cached stages as a hand-written one. The stages come in one fixed order, the most shared first:

    distill {layers, steps} ─► prune_heads ─► prune_ffn ─► distill {teacher: source} ─► prune_vocab ─► export ─► int8

so trials that keep the same layers for the same number of steps reuse one distillation (the expensive part)
from the stage cache, and only what follows it is built again.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kiln.errors import ConfigError
from kiln.tasks.compress.recipes import Recipe, StageSpec

LayerChoice = Literal["spread", "first", "chosen"]
Quantization = Literal["int8_dynamic", "int8_static"]


class Suggester(Protocol):
    """The part of ``optuna.Trial`` a space uses (a fake in tests)."""

    def suggest_int(self, name: str, low: int, high: int) -> int: ...
    def suggest_categorical(self, name: str, choices: list[Any]) -> Any: ...


class SearchSpace(BaseModel):
    """The choices a search explores; a named preset or a user's own (``--space FILE``-shaped dict)."""

    model_config = ConfigDict(extra="forbid")

    layers: tuple[int, int] = Field((2, 4), description="Fewest and most teacher layers the student keeps "
                                                        "(clamped to the teacher's own count).")
    layer_choice: list[LayerChoice] = Field(["spread", "first", "chosen"], description=(
        "Which layers: 'spread' evenly over the teacher, the 'first' k, or 'chosen' per trial."))
    heads_removed: list[float] = Field([0.0, 0.25, 0.5], description="Share of attention heads removed per layer.")
    ffn_removed: list[float] = Field([0.0, 0.25, 0.5], description="Share of FFN channels removed per layer.")
    vocab: list[bool] = Field([False, True], description="Prune the vocabulary to the training corpus, or not.")
    distill_steps: list[int] = Field([300, 600, 900], description="Distillation steps of the student.")
    recovery_share: float = Field(0.34, gt=0, le=1, description="Steps of the distillation after pruning, as a "
                                                                "share of distill_steps.")
    quantization: list[Quantization] = Field(["int8_dynamic", "int8_static"], description="The engine's INT8 form.")
    batch_size: int = Field(32, ge=1, le=1024, description="Distillation batch size.")
    # Peak 3e-4 with a 6 % warm-up and linear decay reached a lower KL to the teacher in 400 steps (0.071) than the
    # hand-written recipes' constant 1e-4 in 600 (0.125) on the demo classifier: trials are short, so it matters.
    lr: float = Field(3e-4, gt=0, lt=1, description="Distillation peak learning rate (6 % warm-up, linear decay).")
    # 2,048 rows: on the demo model a 512-row sample put every trial ~3 points above its test accuracy and
    # ranked students one point apart by chance; scoring 2,048 rows costs a small INT8 engine about a second.
    eval_rows: int = Field(2048, ge=8, description="Validation rows a trial's quality is measured on.")
    front_cap: int = Field(4, ge=1, le=32, description="Most front members passed on to the gate as candidates.")
    start: list[dict[str, Any]] = Field([], description=(
        "Points tried first when a study is new (Optuna enqueue_trial: parameter name -> value), e.g. a "
        "hand-written recipe's choices; the sampler takes over after them."))

    @model_validator(mode="after")
    def _sane(self) -> SearchSpace:
        lo, hi = self.layers
        if lo < 1 or hi < lo:
            raise ValueError(f"layers must be (fewest, most) with 1 <= fewest <= most, not {self.layers}")
        for name in ("layer_choice", "heads_removed", "ffn_removed", "vocab", "distill_steps", "quantization"):
            if not getattr(self, name):
                raise ValueError(f"{name} offers nothing to choose; give at least one value")
        if any(not 0 <= f < 1 for f in self.heads_removed + self.ffn_removed):
            raise ValueError("heads_removed and ffn_removed are shares in [0, 1)")
        return self


# Named spaces. "default" is sized for a 6-layer DistilBERT-class classifier on 2 cores (a trial is minutes);
# "quick" is a smoke test (a few distillation steps), used by the tests on tiny models.
PRESETS: dict[str, dict[str, Any]] = {
    # 20 minutes on 2 cores fit a few 6-layer → 2-4-layer distillations. The first trials share one 800-step
    # 2-layer distillation (the stage cache builds it once) and differ only in what is pruned after it: on the
    # demo model a 3-layer student matched its teacher's accuracy in 600 steps, and 2 layers with a quarter of
    # the heads and FFN channels removed is about where 4x the 6-layer INT8 engine's speed lies.
    "default": {"distill_steps": [400, 800], "start": [
        {"layers": 2, "layer_choice": "spread", "distill_steps": 800, "heads_removed": 0.25, "ffn_removed": 0.25,
         "vocab": True, "quantization": "int8_dynamic"},
        {"layers": 2, "layer_choice": "spread", "distill_steps": 800, "heads_removed": 0.0, "ffn_removed": 0.5,
         "vocab": True, "quantization": "int8_dynamic"},
        {"layers": 2, "layer_choice": "spread", "distill_steps": 800, "heads_removed": 0.5, "ffn_removed": 0.5,
         "vocab": True, "quantization": "int8_dynamic"}]},
    "wide": {"layers": (1, 6), "distill_steps": [200, 400, 800, 1200], "heads_removed": [0.0, 0.25, 0.5, 0.75],
             "ffn_removed": [0.0, 0.25, 0.5, 0.75]},
    "quick": {"layers": (1, 2), "distill_steps": [2], "heads_removed": [0.0], "ffn_removed": [0.0],
              "quantization": ["int8_dynamic"], "batch_size": 8, "eval_rows": 64, "front_cap": 1},
}


def space_named(name: str) -> SearchSpace:
    """The preset ``name``; an unknown name is a one-line :class:`ConfigError`."""
    if name not in PRESETS:
        raise ConfigError(f"unknown search space {name!r}; known: {sorted(PRESETS)}")
    return SearchSpace.model_validate(PRESETS[name])


@dataclass(frozen=True)
class Shape:
    """The teacher's dimensions the space is fitted to."""

    layers: int
    heads: int

    @classmethod
    def of(cls, config: Any) -> Shape:
        layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
        heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 0)
        if not layers or not heads:
            raise ConfigError("search needs a transformer with layers and attention heads in its config")
        return cls(int(layers), int(heads))


def kept_layers(total: int, k: int, how: str) -> list[int]:
    """``k`` of ``total`` teacher layers: the first ``k``, or spread evenly (always including layer 0)."""
    if how == "first":
        return list(range(k))
    if k == 1:
        return [0]
    return sorted({round(i * (total - 1) / (k - 1)) for i in range(k)}) if k < total else list(range(total))


def suggest_recipe(trial: Suggester, space: SearchSpace, shape: Shape, name: str) -> Recipe:
    """One trial's recipe: every choice asked of ``trial`` (Optuna's sampler), turned into stages."""
    lo, hi = min(space.layers[0], shape.layers), min(space.layers[1], shape.layers)
    k = trial.suggest_int("layers", lo, hi)
    how = trial.suggest_categorical("layer_choice", list(space.layer_choice))
    if how == "chosen" and 1 < k < shape.layers:  # one categorical per k: Optuna's choices must not change
        options = [",".join(map(str, c)) for c in itertools.combinations(range(shape.layers), k)]
        layers = [int(i) for i in trial.suggest_categorical(f"layers_{k}", options).split(",")]
    else:
        layers = kept_layers(shape.layers, k, "first" if how == "first" else "spread")
    steps = trial.suggest_categorical("distill_steps", list(space.distill_steps))
    heads = round(trial.suggest_categorical("heads_removed", list(space.heads_removed)) * shape.heads)
    heads = min(heads, shape.heads - 1)
    ffn = trial.suggest_categorical("ffn_removed", list(space.ffn_removed))
    vocab = trial.suggest_categorical("vocab", list(space.vocab))
    quant = trial.suggest_categorical("quantization", list(space.quantization))
    return recipe_from(name, layers=layers, steps=steps, heads=heads, ffn=ffn, vocab=vocab, quant=quant,
                       space=space)


def recipe_from(name: str, *, layers: list[int], steps: int, heads: int, ffn: float, vocab: bool, quant: str,
                space: SearchSpace) -> Recipe:
    """The recipe of one point of the space (see the module docstring for the order of its stages)."""
    # KL reported every 20 steps (~3 % more work): what early stopping judges, and how often the deadline is checked
    train = {"max_steps": steps, "batch_size": space.batch_size, "lr": space.lr, "warmup": 0.06, "schedule": "linear",
             "eval_every": 20}
    stages = [StageSpec(stage="distill", params={"layers": layers, **train})]
    if heads:
        stages.append(StageSpec(stage="prune_heads", params={"remove_per_layer": heads, "importance": "taylor"}))
    if ffn:
        stages.append(StageSpec(stage="prune_ffn", params={"fraction": ffn, "importance": "activation"}))
    if heads or ffn:  # pruning loses accuracy; a short distillation from the source wins it back
        recovery = max(1, round(steps * space.recovery_share))
        stages.append(StageSpec(stage="distill", params={"teacher": "source", **train, "max_steps": recovery}))
    if vocab:
        stages.append(StageSpec(stage="prune_vocab", params={"min_count": 2}))
    stages += [StageSpec(stage="export"), StageSpec(stage=quant)]
    description = (f"search: layers {layers}, {steps} steps, -{heads} heads/layer, -{ffn:.0%} FFN, "
                   f"vocab {'pruned' if vocab else 'kept'}, {quant}")
    recipe = Recipe(name=name, description=description, stages=stages)
    recipe.validate_stages()
    return recipe


def recipe_yaml(recipes: list[Recipe]) -> dict[str, Any]:
    """Recipes in the shape of a recipe file (``kiln optimize --recipe-file``): name → {description, stages}."""
    return {r.name: {"description": r.description,
                     "stages": [{"stage": s.stage, **({"params": s.params} if s.params else {})} for s in r.stages]}
            for r in recipes}
