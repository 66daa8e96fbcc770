"""The TensorRT backend's plain-Python logic, without a GPU or the tensorrt package.

Shapes, plan compatibility and error messages are pure functions; the build itself runs against a small
stand-in for the ``tensorrt`` module that records what Kiln asked of it.
"""

from __future__ import annotations

import hashlib
import json
import sys
import types
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import TensorProto, helper
from pydantic import ValidationError

from kiln.errors import ArtifactError, ConfigError, ExportError
from kiln.tasks.engines import EngineOptions, load_engine
from kiln.tasks.engines.tensorrt import machine as trt_machine
from kiln.tasks.engines.tensorrt.build import (
    TensorRTBuildConfig,
    build_engine,
    graph_precision,
    optimization_profile,
)
from kiln.tasks.engines.tensorrt.machine import INSTALL_HINT
from kiln.tasks.engines.tensorrt.plan import METADATA_FORMAT, check_plan_compatible, check_shape_in_profile
from kiln.tasks.engines.tensorrt.runtime import TensorRTEngine

A100 = {"tensorrt_version": "10.3.0.26", "gpu_name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}
H100 = {"tensorrt_version": "10.3.0.26", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
PLAN = b"serialized engine bytes"


def _metadata(where: dict[str, str] = A100, plan: bytes = PLAN, **extra: Any) -> dict[str, Any]:
    return {"format": METADATA_FORMAT, **where, "plan_sha256": hashlib.sha256(plan).hexdigest(),
            "hardware_compatibility": "none", "version_compatible": False, "precision": "fp32",
            "profiles": [{"input_ids": {"min": [1, 1], "opt": [32, 64], "max": [32, 64]}}], **extra}


def _runtime(where: dict[str, str] = A100, plan: bytes = PLAN, **changes: str) -> dict[str, str]:
    return {**where, "plan_sha256": hashlib.sha256(plan).hexdigest(), **changes}


def _write_plan(folder: Path, metadata: dict[str, Any], plan: bytes = PLAN) -> Path:
    (folder / "model.plan").write_bytes(plan)
    (folder / "model.plan.json").write_text(json.dumps(metadata))
    return folder / "model.plan"


def _onnx(path: Path, op: str = "Identity", to: int = TensorProto.FLOAT) -> Path:
    if op == "Cast":
        node = helper.make_node("Cast", ["x"], ["y"], to=to)
    elif op == "QuantizeLinear":
        node = helper.make_node("QuantizeLinear", ["x", "scale"], ["y"])
    else:
        node = helper.make_node(op, ["x"], ["y"])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[helper.make_tensor("scale", TensorProto.FLOAT, [], [0.1])] if "Quant" in op else [],
    )
    onnx.save(helper.make_model(graph), str(path))
    return path


# --- shapes -------------------------------------------------------------------------------------------------

def test_profile_for_serving_covers_every_input_in_order() -> None:
    profile = optimization_profile(TensorRTBuildConfig.for_serving(seq_len=128, batch_sizes=(1, 16)))

    assert set(profile) == {"input_ids", "attention_mask"}
    low, opt, high = profile["input_ids"]
    assert (low, opt, high) == ((1, 1), (16, 128), (16, 128))
    assert all(lo <= o <= hi for lo, o, hi in zip(low, opt, high, strict=True))


@pytest.mark.parametrize("fields", [
    {"opt_batch": 64, "max_batch": 32},
    {"min_seq": 65, "opt_seq": 64},
    {"min_batch": 0},
    {"workspace_mb": 1},
    {"hardware_compatibility": "turing_plus"},
    {"fp16": True},  # precision comes from the ONNX graph, not a flag
])
def test_bad_build_configs_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        TensorRTBuildConfig(**fields)


def test_shapes_outside_the_profile_are_refused_with_the_range() -> None:
    profiles = _metadata()["profiles"]
    check_shape_in_profile(profiles, "input_ids", (32, 64))
    check_shape_in_profile(profiles, "token_type_ids", (999, 999))  # not profiled: TensorRT decides
    with pytest.raises(ConfigError, match=r"\[33, 8\].*\[1, 1\] to \[32, 64\]"):
        check_shape_in_profile(profiles, "input_ids", (33, 8))


# --- compatibility ------------------------------------------------------------------------------------------

def test_same_machine_is_compatible() -> None:
    check_plan_compatible(_metadata(), _runtime())


def test_other_tensorrt_version_is_refused_naming_both() -> None:
    with pytest.raises(ArtifactError) as err:
        check_plan_compatible(_metadata(), _runtime(tensorrt_version="10.8.0.43"))
    message = str(err.value)
    assert "10.3" in message and "10.8" in message
    assert "rebuild the plan" in message and "this GPU with this TensorRT version" in message


def test_other_patch_release_is_accepted() -> None:
    check_plan_compatible(_metadata(), _runtime(tensorrt_version="10.3.1.2"))


@pytest.mark.parametrize("runtime", [
    _runtime(H100),  # other compute capability
    _runtime(gpu_name="NVIDIA A100-PCIE-40GB"),  # same compute capability, other model
])
def test_other_gpu_is_refused(runtime: dict[str, str]) -> None:
    with pytest.raises(ArtifactError, match=f"{runtime['gpu_name']}.*rebuild"):
        check_plan_compatible(_metadata(), runtime)


def test_hardware_compatible_plans_travel_within_their_level() -> None:
    check_plan_compatible(_metadata(hardware_compatibility="ampere_plus"), _runtime(H100))
    check_plan_compatible(_metadata(hardware_compatibility="same_compute_capability"),
                          _runtime(gpu_name="NVIDIA A100-PCIE-40GB"))
    with pytest.raises(ArtifactError, match="Ampere or newer"):
        check_plan_compatible(_metadata(hardware_compatibility="ampere_plus"),
                              _runtime(gpu_name="Tesla T4", compute_capability="7.5"))
    with pytest.raises(ArtifactError, match="compute capability 8.0"):
        check_plan_compatible(_metadata(hardware_compatibility="same_compute_capability"), _runtime(H100))


def test_version_compatible_plans_run_on_later_releases_of_their_major_only() -> None:
    check_plan_compatible(_metadata(version_compatible=True), _runtime(tensorrt_version="10.8.0.43"))
    for older_or_next_major in ("10.1.0.27", "11.0.0.1"):
        runtime = _runtime(tensorrt_version=older_or_next_major)
        with pytest.raises(ArtifactError, match="version-compatible"):
            check_plan_compatible(_metadata(version_compatible=True), runtime)


def test_checksum_mismatch_is_refused() -> None:
    with pytest.raises(ArtifactError, match="sha256.*damaged or replaced"):
        check_plan_compatible(_metadata(), _runtime(plan=b"something else"))
    with pytest.raises(ArtifactError, match="no plan_sha256"):
        check_plan_compatible({**_metadata(), "plan_sha256": ""}, _runtime())


def test_every_problem_is_named_at_once() -> None:
    with pytest.raises(ArtifactError) as err:
        check_plan_compatible(_metadata(), _runtime(H100, plan=b"x", tensorrt_version="11.1.0.5"))
    message = str(err.value)
    assert "sha256" in message and "11.1" in message and "compute capability" in message


# --- missing tensorrt ---------------------------------------------------------------------------------------

@pytest.fixture
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt raises ImportError


def test_missing_tensorrt_says_how_to_install(no_tensorrt: None, tmp_path: Path) -> None:
    assert "pip install 'kiln-mlops[tensorrt]' on a CUDA machine" in INSTALL_HINT
    with pytest.raises(ConfigError, match=r"kiln-mlops\[tensorrt\]"):
        build_engine(_onnx(tmp_path / "m.onnx"), tmp_path / "out")
    plan = _write_plan(tmp_path, _metadata())
    with pytest.raises(ConfigError, match=r"kiln-mlops\[tensorrt\]"):
        load_engine(plan, EngineOptions(backend="tensorrt"))


def test_stub_tensorrt_package_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    with pytest.raises(ConfigError, match="no bindings"):
        trt_machine.runtime_info()


def test_missing_onnx_is_an_artifact_error(no_tensorrt: None, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="export the model first"):
        build_engine(tmp_path / "absent.onnx", tmp_path)


# --- engine opening -----------------------------------------------------------------------------------------

@pytest.fixture
def on_h100(monkeypatch: pytest.MonkeyPatch) -> None:
    """This 'machine' is an H100 with TensorRT 10.3, and deserialising anything fails the test."""
    monkeypatch.setattr(trt_machine, "runtime_info", lambda: dict(H100))

    def forbidden() -> None:
        raise AssertionError("TensorRT was reached before the plan was checked")

    monkeypatch.setattr(trt_machine, "import_tensorrt", forbidden)


def test_foreign_plan_is_refused_before_deserialising(on_h100: None, tmp_path: Path) -> None:
    plan = _write_plan(tmp_path, _metadata(A100))
    with pytest.raises(ArtifactError, match="NVIDIA A100.*NVIDIA H100"):
        TensorRTEngine(plan, EngineOptions(backend="tensorrt"))


def test_tampered_plan_is_refused_before_deserialising(on_h100: None, tmp_path: Path) -> None:
    _write_plan(tmp_path, _metadata(H100), plan=b"replaced bytes")
    with pytest.raises(ArtifactError, match="sha256"):
        TensorRTEngine(tmp_path)  # a folder holding model.plan works too


def test_plan_without_metadata_is_refused(on_h100: None, tmp_path: Path) -> None:
    (tmp_path / "model.plan").write_bytes(PLAN)
    with pytest.raises(ArtifactError, match="no model.plan.json"):
        TensorRTEngine(tmp_path / "model.plan")
    (tmp_path / "model.plan.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable"):
        TensorRTEngine(tmp_path / "model.plan")


# --- precision label ----------------------------------------------------------------------------------------

def test_precision_is_read_from_the_graph(tmp_path: Path) -> None:
    assert graph_precision(_onnx(tmp_path / "a.onnx")) == "fp32"
    assert graph_precision(_onnx(tmp_path / "b.onnx", "Cast", TensorProto.FLOAT16)) == "fp16"
    assert graph_precision(_onnx(tmp_path / "c.onnx", "QuantizeLinear")) == "int8"


# --- the build, against a stand-in tensorrt -----------------------------------------------------------------

class _DType:
    def __init__(self, name: str) -> None:
        self.name = name

    def __str__(self) -> str:
        return f"DataType.{self.name}"


class _Tensor:
    def __init__(self, name: str, dtype: str, shape: tuple[int, ...]) -> None:
        self.name, self.dtype, self.shape = name, _DType(dtype), shape


class _Error:
    def desc(self) -> str:
        return "Unsupported operator"

    def node(self) -> int:
        return 7

    def node_name(self) -> str:
        return "/attn/Foo_3"

    def node_operator(self) -> str:
        return "FooOp"


def _fake_tensorrt(version: str, calls: list[tuple], parse_ok: bool = True) -> types.ModuleType:
    """Just enough of the tensorrt module for build_engine, recording every call that matters."""
    ns = types.SimpleNamespace
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.NetworkDefinitionCreationFlag = ns(STRONGLY_TYPED=1)
    trt.MemoryPoolType = ns(WORKSPACE="WORKSPACE")
    trt.BuilderFlag = ns(SPARSE_WEIGHTS="SPARSE_WEIGHTS", TF32="TF32", VERSION_COMPATIBLE="VERSION")
    trt.HardwareCompatibilityLevel = ns(AMPERE_PLUS="AMPERE_PLUS")
    inputs = [_Tensor("input_ids", "INT64", (-1, -1)), _Tensor("attention_mask", "INT64", (-1, -1))]
    network = ns(num_inputs=2, get_input=inputs.__getitem__, num_outputs=1,
                 get_output=lambda i: _Tensor("logits", "FLOAT", (-1, 3)))
    cache = ns(serialize=lambda: b"timings")
    config = ns(
        set_memory_pool_limit=lambda pool, size: calls.append(("pool", pool, size)),
        add_optimization_profile=lambda profile: calls.append(("profile",)),
        set_flag=lambda flag: calls.append(("flag", flag)),
        clear_flag=lambda flag: calls.append(("clear", flag)),
        create_timing_cache=lambda blob: calls.append(("cache", blob)) or cache,
        set_timing_cache=lambda c, ignore: True,
        get_timing_cache=lambda: cache,
    )
    trt.Builder = lambda logger: ns(
        create_network=lambda flags: calls.append(("network", flags)) or network,
        create_builder_config=lambda: config,
        create_optimization_profile=lambda: ns(set_shape=lambda *args: calls.append(("shape", *args))),
        build_serialized_network=lambda net, cfg: PLAN,
    )
    trt.OnnxParser = lambda net, logger: ns(parse_from_file=lambda path: parse_ok,
                                            num_errors=0 if parse_ok else 2, get_error=lambda i: _Error())
    return trt


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> Any:
    def install(version: str = "10.3.0.26", parse_ok: bool = True) -> list[tuple]:
        calls: list[tuple] = []
        monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(version, calls, parse_ok))
        monkeypatch.setattr(trt_machine, "runtime_info", lambda: {**H100, "tensorrt_version": version})
        return calls
    return install


def test_build_writes_plan_metadata_and_timing_cache(fake_trt: Any, tmp_path: Path) -> None:
    calls = fake_trt("10.3.0.26")
    onnx_path = _onnx(tmp_path / "m.onnx")
    (tmp_path / "timing.cache").write_bytes(b"old timings")
    config = TensorRTBuildConfig.for_serving(64, workspace_mb=256, sparse_weights=True, tf32=False,
                                             timing_cache=tmp_path / "timing.cache")

    plan = build_engine(onnx_path, tmp_path / "out", config)

    assert plan.read_bytes() == PLAN
    assert ("network", 1 << 1) in calls  # 10.x: STRONGLY_TYPED asked for
    assert ("pool", "WORKSPACE", 256 * 1024**2) in calls
    assert ("shape", "input_ids", (1, 1), (32, 64), (32, 64)) in calls
    assert ("flag", "SPARSE_WEIGHTS") in calls and ("clear", "TF32") in calls
    assert ("cache", b"old timings") in calls
    assert (tmp_path / "timing.cache").read_bytes() == b"timings"
    meta = json.loads((tmp_path / "out" / "model.plan.json").read_text())
    assert meta["plan_sha256"] == hashlib.sha256(PLAN).hexdigest()
    assert meta["onnx_sha256"] == hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    assert (meta["gpu_name"], meta["compute_capability"]) == (H100["gpu_name"], "9.0")
    assert meta["precision"] == "fp32"
    assert meta["outputs"] == [{"name": "logits", "dtype": "float32", "dims": [-1, 3]}]
    assert meta["profiles"][0]["attention_mask"] == {"min": [1, 1], "opt": [32, 64], "max": [32, 64]}
    check_plan_compatible(meta, _runtime(H100))  # what it wrote, it accepts on the same machine


def test_tensorrt_11_networks_get_no_flags(fake_trt: Any, tmp_path: Path) -> None:
    calls = fake_trt("11.4.0.106")
    build_engine(_onnx(tmp_path / "m.onnx"), tmp_path / "out")
    assert ("network", 0) in calls  # always strongly typed; the flag is deprecated there


def test_parser_errors_name_node_and_operator(fake_trt: Any, tmp_path: Path) -> None:
    fake_trt(parse_ok=False)
    with pytest.raises(ExportError, match=r"node /attn/Foo_3 \(operator FooOp\): Unsupported operator"):
        build_engine(_onnx(tmp_path / "m.onnx"), tmp_path / "out")
