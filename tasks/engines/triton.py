"""A Triton Inference Server model repository from a Kiln engine: ``config.pbtxt`` plus the versioned file.

Layout, as Triton loads it::

    <repo>/<model>/config.pbtxt
    <repo>/<model>/<version>/model.onnx   (+ its external-data files)   platform onnxruntime_onnx
    <repo>/<model>/<version>/model.plan   (+ model.plan.json)           platform tensorrt_plan

Input and output names, types and shapes are read from the engine itself (the ONNX graph; for a plan,
its sidecar metadata or the ONNX it was built from), so the config cannot drift from the model.
:func:`parse_config_pbtxt` reads back the part of protobuf text format these configs use.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from kiln.errors import ArtifactError, ConfigError
from kiln.tasks.engines.base import sha256_file
from kiln.tasks.engines.tensorrt.plan import metadata_path, read_metadata

PLATFORMS = {".onnx": "onnxruntime_onnx", ".plan": "tensorrt_plan"}
_P = onnx.TensorProto
_ONNX_DTYPES = {
    _P.FLOAT: "float32", _P.FLOAT16: "float16", _P.BFLOAT16: "bfloat16", _P.DOUBLE: "float64",
    _P.INT64: "int64", _P.INT32: "int32", _P.INT8: "int8", _P.UINT8: "uint8", _P.BOOL: "bool",
}
TRITON_TYPES = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float64": "TYPE_FP64",
    "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, NumPy-style dtype, dims with -1 for a dynamic axis."""

    name: str
    dtype: str
    dims: tuple[int, ...]


class _Enum(str):
    """A bare identifier in text format (``TYPE_INT64``), as opposed to a quoted string."""


def onnx_io(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs (initializers excluded) and outputs declared by an ONNX model's graph."""
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    inputs = [_spec(v, path) for v in graph.input if v.name not in weights]
    return inputs, [_spec(v, path) for v in graph.output]


def _spec(value: onnx.ValueInfoProto, path: Path) -> TensorSpec:
    tensor = value.type.tensor_type
    if tensor.elem_type not in _ONNX_DTYPES:
        raise ArtifactError(f"{path.name}: tensor {value.name} has ONNX type {tensor.elem_type}, which has "
                            "no Triton type here; export with float/int inputs and outputs")
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
    return TensorSpec(value.name, _ONNX_DTYPES[tensor.elem_type], dims)


def plan_io(plan: Path, source_onnx: Path | None = None) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """A plan's inputs and outputs: from the ONNX it was built from if given, else from its metadata."""
    if source_onnx is not None:
        return onnx_io(source_onnx)
    meta = read_metadata(plan)
    def specs(key: str) -> list[TensorSpec]:
        return [TensorSpec(t["name"], t["dtype"], tuple(t["dims"])) for t in meta.get(key, [])]
    if not meta.get("inputs") or not meta.get("outputs"):
        raise ArtifactError(f"{metadata_path(plan)} lists no inputs/outputs; pass source_onnx= or rebuild")
    return specs("inputs"), specs("outputs")


def external_data_files(onnx_path: Path) -> list[Path]:
    """Files holding an ONNX model's external tensors, which must travel with it."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    locations = {entry.value for tensor in _tensors(model.graph)
                 if tensor.data_location == onnx.TensorProto.EXTERNAL
                 for entry in tensor.external_data if entry.key == "location"}
    for location in locations:
        if Path(location).is_absolute() or ".." in Path(location).parts:
            raise ArtifactError(f"{onnx_path.name} points at external data {location!r} outside its folder")
    return [onnx_path.parent / location for location in sorted(locations)]


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):  # If/Loop bodies
                yield from _tensors(sub)


def write_triton_repository(
    engine_path: Path, repo_dir: Path, model_name: str, version: int, *, max_batch_size: int = 0,
    instance_count: int = 1, instance_kind: str | None = None, dynamic_batching: bool = False,
    source_onnx: Path | None = None, checksums: Mapping[str, str] | None = None,
) -> Path:
    """Put ``engine_path`` (``.onnx`` or ``.plan``) into a Triton repository as ``model_name/version``.

    Args:
        engine_path: the ONNX model or TensorRT plan to serve.
        repo_dir: the repository root Triton is started with (``--model-repository``).
        model_name: Triton's name for the model (folder name and ``name`` in the config).
        version: a new version number (>= 1); an existing version is never overwritten.
        max_batch_size: 0 to declare the batch axis in ``dims``; > 0 lets Triton batch requests, and the
            batch axis (which must be dynamic) leaves ``dims``.
        instance_count: model instances Triton runs.
        instance_kind: ``KIND_GPU``, ``KIND_CPU`` or ``KIND_AUTO``; default GPU for plans, AUTO for ONNX.
        dynamic_batching: let Triton merge requests (needs ``max_batch_size`` > 0).
        source_onnx: for a plan, the ONNX it was built from, to read inputs/outputs from.
        checksums: the sha256 of each file of the engine's folder by relative path (a Kiln package's verified
            ``kiln.json``); when given, every file written into the repository must be listed there and match
            it, read back from the repository, or the version folder is removed and :class:`ArtifactError` raised.

    Returns:
        The model's folder, ``repo_dir/model_name``.
    """
    platform = PLATFORMS.get(engine_path.suffix)
    _check_args(engine_path, platform, model_name, version, max_batch_size, instance_count, dynamic_batching,
                instance_kind)
    if platform == "onnxruntime_onnx":
        inputs, outputs = onnx_io(engine_path)
    else:
        inputs, outputs = plan_io(engine_path, source_onnx)
    model_dir = repo_dir / model_name
    version_dir = model_dir / str(version)
    if version_dir.exists():
        raise ConfigError(f"version {version} of {model_name} already exists in {repo_dir}; use a new one")
    kind = _Enum(instance_kind or ("KIND_GPU" if platform == "tensorrt_plan" else "KIND_AUTO"))
    config = {
        "name": model_name,
        "platform": platform,
        "max_batch_size": max_batch_size,
        "input": [_tensor_config(t, max_batch_size) for t in inputs],
        "output": [_tensor_config(t, max_batch_size) for t in outputs],
        "instance_group": [{"count": instance_count, "kind": kind}],
    }
    if dynamic_batching:
        config["dynamic_batching"] = {}
    version_dir.mkdir(parents=True)
    try:
        copied = _copy_engine(engine_path, version_dir, platform)
        if checksums is not None:
            _check_copies(copied, checksums, engine_path.parent)
    except Exception:
        shutil.rmtree(version_dir, ignore_errors=True)  # no half-written or unverified version for Triton to load
        raise
    (model_dir / "config.pbtxt").write_text(render_config_pbtxt(config))
    return model_dir


def _check_copies(copied: dict[str, Path], checksums: Mapping[str, str], source: Path) -> None:
    for name, target in copied.items():
        if name not in checksums:
            raise ArtifactError(f"{source / name} is not listed in the package's checksums; re-register the model")
        if sha256_file(target) != checksums[name]:
            raise ArtifactError(f"{name} copied from {source} does not match its recorded sha256 (changed during "
                                "the export?); export again, or re-register the model")


def _check_args(engine_path: Path, platform: str | None, model_name: str, version: int, max_batch_size: int,
                instance_count: int, dynamic_batching: bool, instance_kind: str | None) -> None:
    if platform is None:
        raise ConfigError(f"{engine_path.name}: Triton export takes a .onnx model or a .plan TensorRT engine")
    if not engine_path.is_file():
        raise ArtifactError(f"no engine at {engine_path}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", model_name) or model_name.startswith("."):
        raise ConfigError(f"model name {model_name!r} must be letters, digits, '_', '-' or '.'")
    if version < 1 or max_batch_size < 0 or instance_count < 1:
        raise ConfigError("need version >= 1, max_batch_size >= 0 and instance_count >= 1")
    if dynamic_batching and max_batch_size == 0:
        raise ConfigError("dynamic_batching needs max_batch_size > 0")
    if instance_kind not in (None, "KIND_GPU", "KIND_CPU", "KIND_AUTO"):
        raise ConfigError(f"instance_kind {instance_kind!r} must be KIND_GPU, KIND_CPU or KIND_AUTO")


def _tensor_config(tensor: TensorSpec, max_batch_size: int) -> dict[str, Any]:
    dims = list(tensor.dims)
    if max_batch_size > 0:
        # Triton adds the batch axis itself when it batches, so dims describe one request's item.
        if not dims or dims[0] != -1:
            raise ConfigError(f"max_batch_size > 0 needs a dynamic batch axis first: {tensor.name} is {dims}")
        dims = dims[1:]
    if tensor.dtype not in TRITON_TYPES:
        raise ArtifactError(f"tensor {tensor.name} has dtype {tensor.dtype}, which has no Triton type here")
    return {"name": tensor.name, "data_type": _Enum(TRITON_TYPES[tensor.dtype]), "dims": dims}


def _copy_engine(engine_path: Path, version_dir: Path, platform: str) -> dict[str, Path]:
    """Copy the engine (and what travels with it) into ``version_dir``; returns source name (relative to the
    engine's folder) → copy."""
    if platform == "tensorrt_plan":
        copied = {engine_path.name: version_dir / "model.plan"}
        if metadata_path(engine_path).is_file():  # Kiln re-checks GPU/TensorRT compatibility from it
            copied[metadata_path(engine_path).name] = version_dir / "model.plan.json"
        for name, target in copied.items():
            shutil.copy2(engine_path.parent / name, target)
        return copied
    # Tensor locations are relative to the model file, so renaming it to model.onnx keeps them valid.
    shutil.copy2(engine_path, version_dir / "model.onnx")
    copied = {engine_path.name: version_dir / "model.onnx"}
    for data in external_data_files(engine_path):
        if not data.is_file():
            raise ArtifactError(f"{engine_path.name} needs external data {data.name}, which is missing")
        target = version_dir / data.relative_to(engine_path.parent)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(data, target)
        copied[data.relative_to(engine_path.parent).as_posix()] = target
    return copied


def render_config_pbtxt(config: dict[str, Any]) -> str:
    """Protobuf text format for a Triton config held as nested dicts, lists and scalars."""
    return "\n".join(_render_fields(config, 0)) + "\n"


def _render_fields(message: dict[str, Any], depth: int) -> Iterator[str]:
    pad = "  " * depth
    for key, value in message.items():
        if isinstance(value, dict):
            yield f"{pad}{key} {{"
            yield from _render_fields(value, depth + 1)
            yield f"{pad}}}"
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            yield f"{pad}{key} ["
            for i, item in enumerate(value):
                yield f"{pad}  {{"
                yield from _render_fields(item, depth + 2)
                yield f"{pad}  }}" + ("," if i < len(value) - 1 else "")
            yield f"{pad}]"
        elif isinstance(value, list):
            yield f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]"
        else:
            yield f"{pad}{key}: {_scalar(value)}"


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, _Enum):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


_TOKENS = re.compile(r"""
    (?P<space>\s+|\#[^\n]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<number>[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?)
  | (?P<ident>[A-Za-z_][\w.]*)
  | (?P<punct>[{}\[\]<>:,;])
""", re.VERBOSE)


def parse_config_pbtxt(text: str) -> dict[str, Any]:
    """Parse the protobuf text format of a Triton ``config.pbtxt`` into nested dicts.

    Messages become dicts, ``[...]`` lists become lists, a field given more than once becomes a list,
    strings are unquoted, numbers become int or float, ``true``/``false`` bools, and enum values (such
    as ``TYPE_INT64``) stay as plain strings. Enough for Triton configs, not a general protobuf parser.

    Raises:
        ConfigError: the text is not valid text format, naming the line.
    """
    return _Parser(text).message(end=None)


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens: list[tuple[str, str, int]] = []
        pos = 0
        while pos < len(text):
            match = _TOKENS.match(text, pos)
            line = text.count("\n", 0, pos) + 1
            if match is None:
                raise ConfigError(f"config.pbtxt line {line}: unexpected {text[pos]!r}")
            if match.lastgroup != "space":
                self.tokens.append((match.lastgroup, match.group(), line))
            pos = match.end()
        self.i = 0

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, expected: str | None = None) -> tuple[str, str, int]:
        token = self.peek()
        if token is None or (expected is not None and token[1] != expected):
            where = f"line {token[2]}" if token else "end of text"
            found = f"{token[1]!r}" if token else "nothing"
            raise ConfigError(f"config.pbtxt {where}: expected {expected or 'a value'}, found {found}")
        self.i += 1
        return token

    def message(self, end: str | None) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        while (token := self.peek()) is not None and token[1] != end:
            kind, key, line = self.take()
            if kind != "ident":
                raise ConfigError(f"config.pbtxt line {line}: expected a field name, found {key!r}")
            if self.peek() and self.peek()[1] == ":":
                self.take(":")
            value, is_list = self.value()
            if key in fields:
                old = fields[key] if isinstance(fields[key], list) else [fields[key]]
                fields[key] = old + (value if is_list else [value])
            else:
                fields[key] = value
            if self.peek() and self.peek()[1] in (",", ";"):
                self.take()
        if end is not None:
            self.take(end)
        return fields

    def value(self) -> tuple[Any, bool]:
        kind, text, _ = self.take()
        if text in ("{", "<"):
            return self.message("}" if text == "{" else ">"), False
        if text == "[":
            items = []
            while self.peek() and self.peek()[1] != "]":
                items.append(self.value()[0])
                if self.peek() and self.peek()[1] == ",":
                    self.take(",")
            self.take("]")
            return items, True
        return self.scalar(kind, text), False

    @staticmethod
    def scalar(kind: str, text: str) -> Any:
        if kind == "string":
            return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), text[1:-1])
        if kind == "number":
            return float(text) if any(c in text for c in ".eE") else int(text)
        if kind == "ident":
            return {"true": True, "false": False}.get(text, text)
        raise ConfigError(f"config.pbtxt: unexpected {text!r} where a value belongs")
