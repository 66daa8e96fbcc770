"""This machine's TensorRT and CUDA: imported only when asked, and described as plan metadata records them."""

from __future__ import annotations

from typing import Any

from kiln.errors import ConfigError

INSTALL_HINT = "pip install 'kiln-mlops[tensorrt]' on a CUDA machine"


def import_tensorrt() -> Any:
    """The ``tensorrt`` module; :class:`ConfigError` saying how to install it when it is missing or a stub."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:  # OSError: the wheel is there but libnvinfer is not
        raise ConfigError(f"the TensorRT backend needs the tensorrt package: {INSTALL_HINT}") from exc
    if not hasattr(trt, "Builder"):  # PyPI's source stub imports, but holds no bindings
        raise ConfigError(f"the installed tensorrt package has no bindings: {INSTALL_HINT}")
    return trt


def cuda_torch() -> Any:
    """The ``torch`` module, once it is known to see a CUDA GPU; :class:`ConfigError` otherwise."""
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"TensorRT needs a CUDA GPU; torch {torch.__version__} sees none: {INSTALL_HINT}")
    return torch


def runtime_info() -> dict[str, str]:
    """This machine's TensorRT version, GPU name and compute capability, as plan metadata records them."""
    trt, torch = import_tensorrt(), cuda_torch()
    major, minor = torch.cuda.get_device_capability()
    return {"tensorrt_version": trt.__version__, "gpu_name": torch.cuda.get_device_name(),
            "compute_capability": f"{major}.{minor}"}
