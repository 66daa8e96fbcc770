"""Where training stages run: the ``device`` setting (``auto``, ``cpu``, ``cuda``, ``cuda:N``) made concrete.

Fine-tuning, distillation and QAT move their models and batches to :func:`resolve_device`'s answer and
bring the model back to the CPU before saving, so that nothing handed on (Hugging Face folders, hence
ONNX graphs) depends on CUDA, and checkpoints load onto the CPU first. On the CPU nothing changes: the
same seed gives the same weights as before devices existed, and the stage cache key gains a device part
only off the CPU (:func:`key_part`), because a GPU's kernels round differently from the CPU's.

torch is imported inside the functions: settings validation and ``kiln --help`` stay quick.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from kiln.errors import ConfigError

DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
"""What the setting accepts (kiln/settings.py checks the same at the edge)."""


def resolve_device(requested: str = "auto") -> str:
    """The torch device a training stage uses: ``cpu`` or ``cuda:N``.

    Args:
        requested: ``auto`` (CUDA when torch sees a GPU, else the CPU), ``cpu``, ``cuda`` (= ``cuda:0``)
            or ``cuda:N``.

    Raises:
        ConfigError: an unknown name, or CUDA asked for where there is none (naming ``KILN_DEVICE``).
    """
    requested = requested.strip().lower()
    if not DEVICE.fullmatch(requested):
        raise ConfigError(f"KILN_DEVICE={requested!r}: use auto, cpu, cuda or cuda:N (e.g. cuda:0)")
    if requested == "cpu":
        return "cpu"
    import torch

    available = torch.cuda.is_available()
    if requested == "auto":
        return "cuda:0" if available else "cpu"
    index, count = int(requested.partition(":")[2] or 0), torch.cuda.device_count() if available else 0
    if index >= count:
        raise ConfigError(f"KILN_DEVICE={requested} but torch {torch.__version__} sees {count} CUDA GPU(s) here; "
                          "set KILN_DEVICE=auto or cpu")
    return f"cuda:{index}"


def key_part(device: str) -> tuple[str, ...]:
    """What a training stage's cache key adds for ``device``: nothing on the CPU (keys stay as they were)."""
    return () if device == "cpu" else (device.partition(":")[0],)  # any CUDA GPU index computes the same


def to_device(batch: Mapping[str, Any], device: str) -> dict[str, Any]:
    """``batch`` with its tensors on ``device`` (the same objects when that is the CPU)."""
    if device == "cpu":
        return dict(batch)
    return {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}

