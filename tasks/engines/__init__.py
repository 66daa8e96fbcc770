"""Inference engines behind one small interface (``Engine.run(input_ids, attention_mask) -> logits``).

- ``base``: the :class:`Engine` protocol, :class:`EngineOptions`, file hashing;
- ``onnxruntime``: :class:`OnnxRuntimeEngine` (CPU, or CUDA when present);
- ``tensorrt``: the TensorRT backend, a package of its own: ``build`` (ONNX graph → plan), ``runtime``
  (:class:`~kiln.tasks.engines.tensorrt.runtime.TensorRTEngine`), ``plan`` (sidecar metadata and
  compatibility checks), ``machine`` (optional ``tensorrt``/CUDA imports, what this machine has);
- ``triton``: a Triton Inference Server model repository from Kiln's engines.

``load_engine`` picks the backend: ``onnxruntime``, ``tensorrt``, or ``auto`` (TensorRT when a CUDA GPU
and the ``tensorrt`` package are present, else ONNX Runtime).

May import only ``kiln.tasks.core`` and the bottom-layer modules (``kiln.errors``, ``kiln.settings``, ...);
never the packages above it (models, evaluate, ...), nor flows, infra or the CLI.
"""

from __future__ import annotations

from pathlib import Path

from kiln.tasks.engines.base import Engine, EngineOptions
from kiln.tasks.engines.onnxruntime import OnnxRuntimeEngine

__all__ = ["Engine", "EngineOptions", "OnnxRuntimeEngine", "engine_versions", "load_engine", "resolve_backend"]


def engine_versions() -> dict[str, str]:
    """Versions of the engine builders installed here, recorded on every candidate."""
    import onnxruntime

    versions = {"onnxruntime_version": onnxruntime.__version__}
    try:
        import tensorrt

        versions["tensorrt_version"] = tensorrt.__version__
    except ImportError:
        pass
    return versions


def resolve_backend(requested: str) -> str:
    """Turn ``auto`` into a concrete backend name for this machine."""
    if requested != "auto":
        return requested
    try:
        import tensorrt  # noqa: F401
        import torch

        return "tensorrt" if torch.cuda.is_available() else "onnxruntime"
    except ImportError:
        return "onnxruntime"


def load_engine(path: Path, options: EngineOptions | None = None) -> Engine:
    """Open the engine at ``path`` with the backend named in ``options`` (default ONNX Runtime)."""
    options = options or EngineOptions()
    backend = resolve_backend(options.backend)
    if backend == "onnxruntime":
        return OnnxRuntimeEngine(path, options)
    if backend == "tensorrt":
        from kiln.tasks.engines.tensorrt.runtime import TensorRTEngine  # optional extra

        return TensorRTEngine(path, options)
    raise ValueError(f"unknown engine backend {backend!r}")
