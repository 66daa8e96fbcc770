"""Engines in the flow: a broken engine is stopped by parity; Triton export of a registered version;
the TensorRT packaging path with a stand-in builder (the real one cannot be installed here)."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from kiln.cli.app import app
from kiln.flows.optimize import OptimizeParams, optimize
from kiln.tasks.compress import recipes
from kiln.tasks.core.stages import Artifact, StageResult
from kiln.tasks.engines.triton import onnx_io, parse_config_pbtxt
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.onboard import register_folder


def break_engine(artifact, params, ctx):
    """A deliberately wrong engine: the classifier head's weights are permuted."""
    model = onnx.load(str(artifact.path))
    for init in model.graph.initializer:
        if "classifier" in init.name and "weight" in init.name:
            w = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(w[::-1].copy() if w.shape[0] == 3 else w[:, ::-1].copy(),
                                                  init.name))
    out = ctx.workdir / "model.onnx"
    onnx.save(model, str(out))
    return StageResult(Artifact("onnx", out), precision="fp32")


def test_a_broken_engine_is_rejected_by_parity(settings, tiny_models, tiny_spec, tmp_path, monkeypatch):
    monkeypatch.setitem(recipes.STAGES, "break_engine", f"{__name__}:break_engine")
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("broken:\n  stages: [{stage: export}, {stage: break_engine}]\n")
    client = registry.connect(settings)
    register_folder(client, settings, tiny_models["bert"], "tiny", "sequence-classification", tiny_spec)
    summary = optimize(OptimizeParams(model="tiny", recipes=["onnx-fp32", "broken"],
                                      recipe_file=str(recipe_file)))
    broken = summary["candidates"]["broken"]
    assert not broken["passed"]
    assert any(r.startswith("parity_max_abs") and "FAILED" in r for r in broken["reasons"])
    assert summary["registered"]["recipe"] == "onnx-fp32"


def test_triton_repository_for_a_registered_version(settings, tiny_models, tiny_spec, tmp_path, monkeypatch):
    client = registry.connect(settings)
    register_folder(client, settings, tiny_models["bert"], "tiny", "sequence-classification", tiny_spec)
    optimize(OptimizeParams(model="tiny", recipes=["onnx-fp32"]))
    repo = tmp_path / "triton"
    result = CliRunner().invoke(app, ["export-triton", "tiny@challenger", "--repo", str(repo)])
    assert result.exit_code == 0, result.output
    config = parse_config_pbtxt((repo / "tiny" / "config.pbtxt").read_text())
    model_file = repo / "tiny" / "2" / "model.onnx"
    inputs, outputs = onnx_io(model_file)
    assert config["platform"] == "onnxruntime_onnx"
    assert [i["name"] for i in config["input"]] == [i.name for i in inputs] == ["input_ids", "attention_mask"]
    assert config["output"][0]["dims"] == [-1, 3]
    source = CliRunner().invoke(app, ["export-triton", "tiny@champion", "--repo", str(repo)])
    assert source.exit_code == 2 and "not an engine" in source.output


def test_tensorrt_backend_packages_a_plan_beside_the_onnx_graph(settings, tiny_models, tiny_spec, monkeypatch):
    """`--backend tensorrt` builds a plan into each package; the build itself is a stand-in here."""
    import kiln.tasks.engines.tensorrt.build as trt_mod
    from kiln.tasks.core.cache import StageCache
    from kiln.tasks.data.datasets import load_splits
    from kiln.tasks.models.predictor import PackageMeta
    from kiln.tasks.optimize.candidates import package_candidate, resolve_source, stage_context_factory

    def fake_build(onnx_path: Path, out_dir: Path, config) -> Path:
        plan = out_dir / "model.plan"
        plan.write_bytes(b"plan for " + onnx_path.name.encode())
        (out_dir / "model.plan.json").write_text(json.dumps({"profiles": trt_mod.optimization_profile(config)}))
        return plan

    monkeypatch.setattr(trt_mod, "build_engine", fake_build)
    client = registry.connect(settings)
    register_folder(client, settings, tiny_models["bert"], "tiny", "sequence-classification", tiny_spec)
    source = resolve_source(client, registry.ModelRef.parse("tiny"), settings.home / "downloads")
    splits = load_splits(source.data)
    cache = StageCache(settings.cache_dir)
    built = recipes.build(recipes.resolve_recipes(["onnx-fp32"])[0], Artifact("hf", source.folder), source.key,
                          stage_context_factory(source, splits, settings, 64), cache)
    folder = package_candidate(built, source, cache, 64, backend="tensorrt")
    meta = PackageMeta.read(folder)
    assert meta.engine["backend"] == "tensorrt"
    assert {"model.onnx", "model.plan"} <= set(meta.sha256)
    from kiln.errors import KilnError
    from kiln.tasks.engines import EngineOptions
    from kiln.tasks.models.predictor import Predictor

    with pytest.raises(KilnError, match="TensorRT|tensorrt"):
        Predictor(folder, EngineOptions(backend="tensorrt"))  # no CUDA/TensorRT here: refused clearly
    # Opened without options (as the MLflow pyfunc does), the package falls back to its ONNX graph here.
    assert Predictor(folder).engine.backend == "onnxruntime"
