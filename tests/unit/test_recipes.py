import pytest
from transformers import AutoConfig

from kiln.errors import ConfigError
from kiln.tasks.compress.recipes import Recipe, library, resolve_recipes


def _recipe(*stages):
    return Recipe(name="r", stages=[{"stage": s, "params": p} for s, p in stages])


def test_presets_are_valid():
    for recipe in library().values():
        recipe.validate_stages()


def test_bf16_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="bf16 is not supported: ONNX Runtime"):
        _recipe(("export", {}), ("bf16", {})).validate_stages()


def test_unknown_stage_or_recipe_is_named():
    with pytest.raises(ConfigError, match=r"unknown stage\(s\) \['quantise'\]"):
        _recipe(("quantise", {}), ("export", {})).validate_stages()
    with pytest.raises(ConfigError, match=r"unknown recipe\(s\) \['int3'\]"):
        resolve_recipes(["int3"])


@pytest.mark.parametrize(("stage", "params", "field"), [
    ("prune_unstructured", {"sparsity": 1.5}, "sparsity"),
    ("prune_ffn", {"fraction": -0.1}, "fraction"),
    ("distill", {"layers": [2, 1]}, "layers"),
    ("prune_heads", {"remove_per_layer": 1, "colour": "red"}, "unknown key 'colour'"),
])
def test_impossible_parameters_name_the_field(stage, params, field):
    with pytest.raises(ConfigError, match=rf"stage 1 \({stage}\): {field}"):
        _recipe((stage, params), ("export", {})).validate_stages()


def test_parameters_are_checked_against_the_model(tiny_models):
    bert = AutoConfig.from_pretrained(tiny_models["bert"])  # 2 layers, 4 heads
    with pytest.raises(ConfigError, match="the teacher has only 2 layers"):
        _recipe(("distill", {"layers": [0, 2, 4]}), ("export", {})).check_against(bert)
    with pytest.raises(ConfigError, match="layers have 4 heads"):
        _recipe(("prune_heads", {"remove_per_layer": 4}), ("export", {})).check_against(bert)
    with pytest.raises(ConfigError, match="cannot remove 1 of 1 layers"):  # the shape is followed through stages
        _recipe(("distill", {"layers": [0]}), ("prune_layers", {"remove": 1}), ("export", {})).check_against(bert)
    llama = AutoConfig.from_pretrained(tiny_models["llama"])  # 4 query heads in 2 KV groups
    with pytest.raises(ConfigError, match="does not divide evenly over 2 KV groups"):
        _recipe(("prune_heads", {"remove_per_layer": 1}), ("export", {})).check_against(llama)
    _recipe(("prune_heads", {"remove_per_layer": 2}), ("export", {})).check_against(llama)
