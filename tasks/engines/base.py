"""The engine interface: token ids and attention mask in, logits out, as NumPy arrays."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from pydantic import BaseModel, Field


class EngineOptions(BaseModel):
    """How an engine is opened; recorded with every candidate."""

    backend: Literal["auto", "onnxruntime", "tensorrt"] = Field(
        "onnxruntime", description="Engine backend; 'auto' picks TensorRT on a CUDA GPU with TensorRT installed."
    )
    threads: int = Field(2, ge=1, description="Intra-op threads (CPU backends).")
    graph_optimization: Literal["disable", "basic", "extended", "all"] = Field(
        "all", description="ONNX Runtime graph optimisation level."
    )
    use_cuda: bool = Field(False, description="Use ONNX Runtime's CUDA execution provider when available.")
    # Spinning keeps a lone session's threads hot between runs (~10 % faster decoding on SmolLM2); two sessions
    # taking turns, a speculative target and its draft, then fight each other's spinning threads. Measured on
    # 2 cores (SmolLM2 target, 3-token pass, taking turns with a 4-layer draft): 54 ms spinning throughout,
    # 35 ms never spinning, 31 ms spinning only inside a run (and the draft 4.4 ms vs 5.8 ms never spinning).
    spin: bool = Field(True, description="Let ONNX Runtime's intra-op threads spin while they wait for work (CPU).")
    spin_between_runs: bool = Field(True, description="Keep spinning after a run ends (a lone session's fastest); "
                                                      "off for sessions that take turns on the same cores.")


class Engine(Protocol):
    """A loaded engine. ``run`` is thread-compatible but not guaranteed thread-safe."""

    backend: str

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Logits for a batch: ``[batch, classes]`` or ``[batch, seq, vocab]``."""
        ...

    def describe(self) -> dict[str, str]:
        """Backend, providers and options, for tags."""
        ...


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (engines and weights can be gigabytes)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
