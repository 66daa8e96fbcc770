"""ONNX Runtime backend: fp32, INT8 (dynamic and Q/DQ static) and FP16 graphs on CPU or CUDA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from kiln.errors import ArtifactError
from kiln.tasks.engines.base import EngineOptions

_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class OnnxRuntimeEngine:
    """An ``InferenceSession`` with fixed threads, so latency figures are comparable across runs."""

    backend = "onnxruntime"

    def __init__(self, path: Path, options: EngineOptions | None = None) -> None:
        self.options = options or EngineOptions()
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.options.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = _LEVELS[self.options.graph_optimization]
        if not self.options.spin:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        elif not self.options.spin_between_runs:  # spin inside a run, go quiet when it ends
            so.add_session_config_entry("session.force_spinning_stop", "1")
        providers = ["CPUExecutionProvider"]
        if self.options.use_cuda and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped Fail/InvalidGraph errors
            raise ArtifactError(f"cannot load ONNX engine {path}: {str(exc).splitlines()[0][:200]}") from exc
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64)}
        return self.session.run(None, {k: v for k, v in feeds.items() if k in self.input_names})[0]

    def describe(self) -> dict[str, str]:
        return {
            "backend": self.backend,
            "providers": ",".join(self.session.get_providers()),
            "threads": str(self.options.threads),
            "graph_optimization": self.options.graph_optimization,
            "spin": "off" if not self.options.spin else "in runs" if not self.options.spin_between_runs else "on",
            "onnxruntime_version": ort.__version__,
        }
