"""How models are benchmarked (:class:`BenchConfig`), and each package's footprint: peak memory and size.

Latency is timed for every model of a comparison together, in interleaved rounds in one process
(:func:`kiln.tasks.evaluate.latency.measure_interleaved`, configured by :class:`BenchConfig`); gates and
``kiln bench`` judge speed from those samples. Inputs are real evaluation texts padded to the serving
sequence length, so every model sees the same shapes. Peak memory
is measured in a fresh process (``python -m kiln.tasks.evaluate.benchmark FOLDER``): the peak resident set
while opening the model and running one throughput batch, minus the process's resident set after imports.
A fresh process matters: in a long-lived one, memory freed by an earlier model is reused by the next
and its growth reads as zero.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel, Field

from kiln.tasks.engines import EngineOptions
from kiln.tasks.evaluate.cost import CostConfig
from kiln.tasks.models.predictor import Predictor, size_mb


class BenchConfig(BaseModel):
    """How latency is measured."""

    warmup: int = Field(5, ge=0, description="Untimed runs before measuring.")
    min_runs: int = Field(20, ge=3, description="Runs per measurement, at least.")
    max_seconds: float = Field(3.0, gt=0, description="Timed seconds per model and batch size (spread over the "
                                                      "rounds when models are timed together).")
    rounds: int = Field(12, ge=4, description="Interleaved rounds when models are timed together: intervals "
                                              "resample whole rounds, so more rounds give steadier intervals.")
    batch_sizes: tuple[int, int] = Field((1, 32), description="Latency batch size and throughput batch size.")
    cost: CostConfig = Field(default_factory=CostConfig, description=(
        "Latency target, expected load and instance price behind cost_per_million (not part of the timing)."))


def footprint(folder: Path, options: EngineOptions, config: BenchConfig) -> dict[str, float]:
    """Peak memory of the package at ``folder`` (a fresh process, one throughput batch) and its size on disk."""
    return {"peak_memory_mb": peak_memory_mb(folder, options, config.batch_sizes[1]), "size_mb": size_mb(folder)}


def peak_memory_mb(folder: Path, options: EngineOptions, batch: int) -> float:
    """Peak RSS growth of a fresh process that opens ``folder`` and runs one batch (see module docstring)."""
    cmd = [sys.executable, "-m", "kiln.tasks.evaluate.benchmark", str(folder), options.model_dump_json(), str(batch)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed for {folder}: {out.stderr.strip().splitlines()[-1:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_memory_mb"])


def _probe(folder: Path, options: EngineOptions, batch: int) -> float:
    # Two readings, the larger wins: the growth of the high-water mark (ru_maxrss, KiB on Linux) catches
    # transient peaks inside the run; the growth of the current RSS covers the case where an import-time
    # peak was already higher than anything the model needs.
    import psutil

    process = psutil.Process()
    peak_before, rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, process.memory_info().rss
    predictor = Predictor(folder, options)
    ids, mask = predictor.encode(["a short text to measure memory with"] * batch, pad_to=predictor.meta.seq_len)
    predictor.run(ids, mask)
    peak_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) * 1024
    return max(peak_growth, process.memory_info().rss - rss_before) / 1e6


if __name__ == "__main__":
    import onnxruntime  # noqa: F401 - imported before the baseline so runtime libraries are not counted
    import torch  # noqa: F401
    import transformers  # noqa: F401

    opts = EngineOptions.model_validate_json(sys.argv[2])
    print(json.dumps({"peak_memory_mb": _probe(Path(sys.argv[1]), opts, int(sys.argv[3]))}))
