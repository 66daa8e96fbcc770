"""Running a TensorRT plan: deserialise it once its metadata fits this machine, feed it torch CUDA tensors.

The execution context, the input shapes and tensor addresses, and the output copied back to the host: one
batch per :meth:`TensorRTEngine.run`, on one CUDA stream.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import ArtifactError, ConfigError
from kiln.tasks.engines.base import EngineOptions
from kiln.tasks.engines.tensorrt import machine
from kiln.tasks.engines.tensorrt.plan import (
    DTYPES,
    PLAN_FILE,
    check_plan_compatible,
    check_shape_in_profile,
    read_metadata,
)


class TensorRTEngine:
    """A deserialised plan run on torch CUDA tensors; metadata is checked before deserialisation."""

    backend = "tensorrt"

    def __init__(self, path: Path, options: EngineOptions | None = None) -> None:
        self.options = options or EngineOptions(backend="tensorrt")
        self.path = path / PLAN_FILE if path.is_dir() else path
        self.metadata = read_metadata(self.path)
        plan = self.path.read_bytes()
        self.runtime = {**machine.runtime_info(), "plan_sha256": hashlib.sha256(plan).hexdigest()}
        check_plan_compatible(self.metadata, self.runtime)
        trt, self._torch = machine.import_tensorrt(), machine.cuda_torch()
        self._trt_runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        if self.metadata.get("version_compatible") and hasattr(self._trt_runtime, "engine_host_code_allowed"):
            self._trt_runtime.engine_host_code_allowed = True  # version-compatible plans embed their runtime
        self.engine = self._trt_runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise ArtifactError(f"TensorRT {trt.__version__} cannot load {self.path}; rebuild the plan")
        self.context = self.engine.create_execution_context()
        self.stream = self._torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in self.inputs]
        self.output = "logits" if "logits" in outputs else outputs[0]
        self._dtypes = {n: self._torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}

    def _torch_dtype(self, trt_dtype: Any) -> Any:
        kind = DTYPES.get(str(trt_dtype).rsplit(".", 1)[-1])
        if kind is None:
            raise ArtifactError(f"plan {self.path} has a tensor of type {trt_dtype} Kiln cannot feed")
        return getattr(self._torch, kind)

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Logits for a batch, computed on the GPU; inputs and output are NumPy arrays on the host."""
        torch, feeds = self._torch, {"input_ids": input_ids, "attention_mask": attention_mask}
        tensors = {}
        with torch.cuda.stream(self.stream):  # copies and the engine share one stream, so they stay ordered
            for name in self.inputs:
                if name not in feeds:
                    raise ArtifactError(f"plan {self.path} expects an input {name!r} Kiln does not produce")
                check_shape_in_profile(self.metadata.get("profiles", []), name, tuple(feeds[name].shape))
                host = torch.from_numpy(np.ascontiguousarray(feeds[name]))
                tensors[name] = host.to("cuda", self._dtypes[name])
                if self.context.set_input_shape(name, tuple(tensors[name].shape)) is False:
                    raise ConfigError(f"TensorRT refused shape {tuple(tensors[name].shape)} for input {name}")
                self.context.set_tensor_address(name, tensors[name].data_ptr())
            for name in set(self._dtypes) - set(self.inputs):
                shape = tuple(self.context.get_tensor_shape(name))
                tensors[name] = torch.empty(shape, dtype=self._dtypes[name], device="cuda")
                self.context.set_tensor_address(name, tensors[name].data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise ArtifactError(f"TensorRT failed to run {self.path}; its log above says why")
        self.stream.synchronize()
        return tensors[self.output].float().cpu().numpy()

    def describe(self) -> dict[str, str]:
        """Backend, versions, GPU and precision, for tags."""
        return {
            "backend": self.backend,
            "tensorrt_version": self.runtime["tensorrt_version"],
            "gpu": self.runtime["gpu_name"],
            "compute_capability": self.runtime["compute_capability"],
            "precision": str(self.metadata.get("precision", "?")),
            "plan_sha256": self.runtime["plan_sha256"],
        }
