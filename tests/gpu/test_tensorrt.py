"""TensorRT end to end on a CUDA GPU: build plans from tiny exported models, compare them with ONNX Runtime.

Skipped, not failed, where the tensorrt package or a CUDA GPU is missing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

pytestmark = pytest.mark.gpu
trt = pytest.importorskip("tensorrt")
torch = pytest.importorskip("torch")
if not hasattr(trt, "Builder") or not torch.cuda.is_available():
    pytest.skip("needs TensorRT bindings and a CUDA GPU", allow_module_level=True)

from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification  # noqa: E402

from kiln.errors import ConfigError  # noqa: E402
from kiln.tasks.engines import EngineOptions, OnnxRuntimeEngine, load_engine  # noqa: E402
from kiln.tasks.engines.tensorrt.build import TensorRTBuildConfig, build_engine  # noqa: E402
from kiln.tasks.engines.tensorrt.machine import runtime_info  # noqa: E402
from kiln.tasks.engines.tensorrt.plan import check_plan_compatible, read_metadata  # noqa: E402
from kiln.tasks.models.export import export_onnx  # noqa: E402
from tests.tiny import save_tiny  # noqa: E402

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "what a good film", "rain again today"] * 3
SEQ = 16


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    bert = save_tiny("bert", TEXTS, root / "bert", labels=("neg", "neu", "pos"))
    gpt2 = save_tiny("gpt2", TEXTS, root / "gpt2")
    return {
        "bert": export_onnx(AutoModelForSequenceClassification.from_pretrained(bert), root / "bert.onnx"),
        "gpt2": export_onnx(AutoModelForCausalLM.from_pretrained(gpt2), root / "gpt2.onnx"),
    }


def _config(tmp_path: Path, **overrides: object) -> TensorRTBuildConfig:
    # TF32 off so FP32 TensorRT and ONNX Runtime on the CPU agree to ~1e-5, not TF32's ~1e-3.
    return TensorRTBuildConfig.for_serving(SEQ, (1, 4), workspace_mb=256, tf32=False,
                                           timing_cache=tmp_path / "timing.cache", **overrides)


def _batch(vocab: int = 40) -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.default_rng(0).integers(5, vocab, size=(3, 10), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, -4:] = 0  # one padded row, so the mask path runs
    return ids, mask


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_fp32_plan_matches_onnx_runtime(exported: dict[str, Path], tmp_path: Path, family: str) -> None:
    plan = build_engine(exported[family], tmp_path / "plan", _config(tmp_path))
    engine = load_engine(plan, EngineOptions(backend="tensorrt"))
    ids, mask = _batch()

    got = engine.run(ids, mask)
    want = OnnxRuntimeEngine(exported[family]).run(ids, mask)

    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-3)
    assert engine.describe()["gpu"] == torch.cuda.get_device_name()
    assert (tmp_path / "timing.cache").stat().st_size > 0


def test_fp16_graph_builds_an_fp16_plan(exported: dict[str, Path], tmp_path: Path) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    fp16 = tmp_path / "fp16.onnx"
    onnx.save(convert_float_to_float16(onnx.load(str(exported["bert"])), keep_io_types=True), str(fp16))
    plan = build_engine(fp16, tmp_path / "plan", _config(tmp_path))
    ids, mask = _batch()

    got = load_engine(plan, EngineOptions(backend="tensorrt")).run(ids, mask)

    assert read_metadata(plan)["precision"] == "fp16"
    np.testing.assert_allclose(got, OnnxRuntimeEngine(exported["bert"]).run(ids, mask), atol=5e-2)


def test_plan_metadata_describes_this_machine(exported: dict[str, Path], tmp_path: Path) -> None:
    plan = build_engine(exported["bert"], tmp_path / "plan", _config(tmp_path))
    meta = read_metadata(plan)

    check_plan_compatible(meta, {**runtime_info(), "plan_sha256": meta["plan_sha256"]})
    assert [t["name"] for t in meta["inputs"]] == ["input_ids", "attention_mask"]
    assert meta["outputs"][0]["dims"] == [-1, 3]


def test_shapes_outside_the_profile_are_refused(exported: dict[str, Path], tmp_path: Path) -> None:
    engine = load_engine(build_engine(exported["bert"], tmp_path / "plan", _config(tmp_path)),
                         EngineOptions(backend="tensorrt"))
    ids = np.ones((8, SEQ), dtype=np.int64)  # batch 8 > max_batch 4
    with pytest.raises(ConfigError, match="outside the TensorRT plan's profile"):
        engine.run(ids, np.ones_like(ids))
