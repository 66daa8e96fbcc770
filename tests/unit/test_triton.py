"""Triton model repositories written from real exported tiny models, checked against the ONNX graphs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from kiln.errors import ArtifactError, ConfigError
from kiln.tasks.engines.base import sha256_file
from kiln.tasks.engines.tensorrt.plan import METADATA_FORMAT
from kiln.tasks.engines.triton import TRITON_TYPES, parse_config_pbtxt, write_triton_repository
from kiln.tasks.models.export import export_onnx
from tests.tiny import save_tiny

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "what a good film", "rain again today"] * 3
ONNX_TRITON = {onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.FLOAT: "TYPE_FP32",
               onnx.TensorProto.FLOAT16: "TYPE_FP16"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny BERT classifier and a tiny GPT-2, each exported to ONNX."""
    root = tmp_path_factory.mktemp("models")
    bert = save_tiny("bert", TEXTS, root / "bert", labels=("neg", "neu", "pos"))
    gpt2 = save_tiny("gpt2", TEXTS, root / "gpt2")
    return {
        "bert": export_onnx(AutoModelForSequenceClassification.from_pretrained(bert), root / "bert.onnx"),
        "gpt2": export_onnx(AutoModelForCausalLM.from_pretrained(gpt2), root / "gpt2.onnx"),
    }


def _graph_io(path: Path) -> list[tuple[str, str, list[int]]]:
    graph = onnx.load(str(path)).graph
    return [(v.name, ONNX_TRITON[v.type.tensor_type.elem_type],
             [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim])
            for v in list(graph.input) + list(graph.output)]


def _config_io(config: dict) -> list[tuple[str, str, list[int]]]:
    return [(t["name"], t["data_type"], t["dims"]) for t in config["input"] + config["output"]]


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_onnx_repository_matches_graph(exported: dict[str, Path], tmp_path: Path, family: str) -> None:
    model_dir = write_triton_repository(exported[family], tmp_path / "repo", f"tiny-{family}", 3)

    assert model_dir == tmp_path / "repo" / f"tiny-{family}"
    assert sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*")) == [
        "3", "3/model.onnx", "config.pbtxt"]
    config = parse_config_pbtxt((model_dir / "config.pbtxt").read_text())
    assert config["name"] == f"tiny-{family}"
    assert config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] == 0
    assert _config_io(config) == _graph_io(exported[family])
    assert config["instance_group"] == [{"count": 1, "kind": "KIND_AUTO"}]


def test_dims_are_what_each_task_exports(exported: dict[str, Path], tmp_path: Path) -> None:
    bert = parse_config_pbtxt((write_triton_repository(exported["bert"], tmp_path, "b", 1) / "config.pbtxt")
                              .read_text())
    gpt2 = parse_config_pbtxt((write_triton_repository(exported["gpt2"], tmp_path, "g", 1) / "config.pbtxt")
                              .read_text())

    assert bert["input"][0] == {"name": "input_ids", "data_type": "TYPE_INT64", "dims": [-1, -1]}
    assert bert["output"][0]["dims"] == [-1, 3]  # batch, classes
    assert gpt2["output"][0]["data_type"] == "TYPE_FP32"
    assert gpt2["output"][0]["dims"][:2] == [-1, -1]  # batch, sequence, vocab


def test_batching_moves_batch_axis_out_of_dims(exported: dict[str, Path], tmp_path: Path) -> None:
    model_dir = write_triton_repository(exported["bert"], tmp_path, "b", 1, max_batch_size=32,
                                        dynamic_batching=True, instance_count=2, instance_kind="KIND_CPU")
    config = parse_config_pbtxt((model_dir / "config.pbtxt").read_text())

    assert config["max_batch_size"] == 32
    assert [t["dims"] for t in config["input"]] == [[-1], [-1]]
    assert config["output"][0]["dims"] == [3]
    assert config["dynamic_batching"] == {}
    assert config["instance_group"] == [{"count": 2, "kind": "KIND_CPU"}]


def test_external_data_travels_and_still_runs(exported: dict[str, Path], tmp_path: Path) -> None:
    source = tmp_path / "src" / "big.onnx"
    source.parent.mkdir()
    onnx.save_model(onnx.load(str(exported["bert"])), str(source), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="big.onnx.data", size_threshold=0)

    version_dir = write_triton_repository(source, tmp_path / "repo", "big", 1) / "1"

    assert sorted(p.name for p in version_dir.iterdir()) == ["big.onnx.data", "model.onnx"]
    session = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([[2, 5, 6, 3]], dtype=np.int64)
    assert session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0].shape == (1, 3)


def test_plan_reads_io_from_metadata_or_source_onnx(exported: dict[str, Path], tmp_path: Path) -> None:
    plan = tmp_path / "engine" / "model.plan"
    plan.parent.mkdir()
    plan.write_bytes(b"not a real plan")
    io = {"inputs": [{"name": "input_ids", "dtype": "int64", "dims": [-1, -1]},
                     {"name": "attention_mask", "dtype": "int64", "dims": [-1, -1]}],
          "outputs": [{"name": "logits", "dtype": "float16", "dims": [-1, 3]}]}
    (tmp_path / "engine" / "model.plan.json").write_text(json.dumps({"format": METADATA_FORMAT, **io}))

    from_meta = write_triton_repository(plan, tmp_path / "repo", "trt", 1)
    from_onnx = write_triton_repository(plan, tmp_path / "repo", "trt-onnx", 1, source_onnx=exported["bert"])

    meta_config = parse_config_pbtxt((from_meta / "config.pbtxt").read_text())
    assert meta_config["platform"] == "tensorrt_plan"
    assert meta_config["output"] == [{"name": "logits", "data_type": "TYPE_FP16", "dims": [-1, 3]}]
    assert meta_config["instance_group"][0]["kind"] == "KIND_GPU"
    assert sorted(p.name for p in (from_meta / "1").iterdir()) == ["model.plan", "model.plan.json"]
    onnx_config = parse_config_pbtxt((from_onnx / "config.pbtxt").read_text())
    assert _config_io(onnx_config) == _graph_io(exported["bert"])


def test_every_exported_file_is_checked_against_the_package_checksums(exported: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    """A Kiln package's verified kiln.json checksums travel with the export: a file that does not match them, or
    that they do not list, leaves no version folder for Triton to load."""
    source = tmp_path / "src" / "model.onnx"
    source.parent.mkdir()
    onnx.save_model(onnx.load(str(exported["bert"])), str(source), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    sums = {name: sha256_file(source.parent / name) for name in ("model.onnx", "model.onnx.data")}

    assert (write_triton_repository(source, tmp_path / "repo", "ok", 1, checksums=sums) / "1").is_dir()
    with pytest.raises(ArtifactError, match=r"model.onnx.data copied from .* does not match its recorded sha256"):
        write_triton_repository(source, tmp_path / "repo", "bad", 1, checksums=sums | {"model.onnx.data": "0" * 64})
    assert not (tmp_path / "repo" / "bad" / "1").exists()
    with pytest.raises(ArtifactError, match="model.onnx.data is not listed in the package's checksums"):
        write_triton_repository(source, tmp_path / "repo", "unlisted", 1, checksums={"model.onnx": sums["model.onnx"]})
    assert not (tmp_path / "repo" / "unlisted" / "1").exists()


def test_refuses_bad_requests(exported: dict[str, Path], tmp_path: Path) -> None:
    write_triton_repository(exported["bert"], tmp_path, "m", 1)
    with pytest.raises(ConfigError, match="already exists"):
        write_triton_repository(exported["bert"], tmp_path, "m", 1)
    with pytest.raises(ConfigError, match="model name"):
        write_triton_repository(exported["bert"], tmp_path, "a/b", 1)
    with pytest.raises(ConfigError, match="dynamic_batching"):
        write_triton_repository(exported["bert"], tmp_path, "m", 2, dynamic_batching=True)
    with pytest.raises(ConfigError, match=".onnx model or a .plan"):
        write_triton_repository(tmp_path / "model.pt", tmp_path, "m", 2)
    with pytest.raises(ArtifactError, match="no engine"):
        write_triton_repository(tmp_path / "missing.onnx", tmp_path, "m", 2)


def test_parser_reads_text_format() -> None:
    text = """
    # a comment
    name: "m\\"x"
    max_batch_size: 8
    input [ { name: "a" data_type: TYPE_FP16 dims: [ -1, 4 ] }, { name: "b", dims: [ 2 ] } ]
    parameters { key: "k" value: { string_value: "v" } }
    parameters < key: 'j' >
    version_policy: { latest { num_versions: 2 } }
    optimization { cuda { graphs: true } }
    scale: 1.5e-3
    """
    config = parse_config_pbtxt(text)

    assert config["name"] == 'm"x'
    assert config["max_batch_size"] == 8
    assert config["input"] == [{"name": "a", "data_type": "TYPE_FP16", "dims": [-1, 4]},
                               {"name": "b", "dims": [2]}]
    assert config["parameters"] == [{"key": "k", "value": {"string_value": "v"}}, {"key": "j"}]
    assert config["version_policy"] == {"latest": {"num_versions": 2}}
    assert config["optimization"]["cuda"]["graphs"] is True
    assert config["scale"] == pytest.approx(1.5e-3)


@pytest.mark.parametrize("text", ["name: ", "input [ { name: 1 ", "name: @", "{ }"])
def test_parser_names_what_is_wrong(text: str) -> None:
    with pytest.raises(ConfigError, match="config.pbtxt"):
        parse_config_pbtxt(text)


def test_every_recorded_dtype_has_a_triton_type() -> None:
    assert set(TRITON_TYPES.values()) >= {"TYPE_INT64", "TYPE_FP32", "TYPE_FP16"}
