"""Latency, throughput and memory of a packaged model, measured the same way for every candidate.

Inputs are real evaluation texts padded to the serving sequence length, so every model sees the same
shapes. Each measurement warms up first, runs for a bounded time, and reports percentiles. Peak memory
is measured in a fresh process (``python -m kiln.tasks.benchmark FOLDER``): the peak resident set while
opening the model and running one throughput batch, minus the process's resident set after imports.
A fresh process matters: in a long-lived one, memory freed by an earlier model is reused by the next
and its growth reads as zero.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from kiln.tasks.engines import EngineOptions
from kiln.tasks.models.predictor import Predictor, size_mb


class BenchConfig(BaseModel):
    """How latency is measured."""

    warmup: int = Field(5, ge=0, description="Untimed runs before measuring.")
    min_runs: int = Field(20, ge=3, description="Runs per measurement, at least.")
    max_seconds: float = Field(3.0, gt=0, description="Stop adding runs after this long.")
    batch_sizes: tuple[int, int] = Field((1, 32), description="Latency batch size and throughput batch size.")


def time_runs(fn: Callable[[], object], config: BenchConfig) -> np.ndarray:
    """Wall-clock milliseconds of repeated ``fn()`` calls after a warm-up."""
    for _ in range(config.warmup):
        fn()
    times: list[float] = []
    deadline = time.perf_counter() + config.max_seconds
    while True:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        enough = len(times) >= config.min_runs and time.perf_counter() >= deadline
        if enough or len(times) >= 10_000:
            break
    return np.asarray(times)


def latency(predictor: Predictor, texts: Sequence[str], config: BenchConfig) -> dict[str, float]:
    """p50/p95/p99 at the latency batch size; p50 and samples/s at the throughput batch size."""
    small, large = config.batch_sizes
    seq = predictor.meta.seq_len
    pool = list(texts) * (1 + large // max(len(texts), 1))
    ids1, mask1 = predictor.encode(pool[:small], pad_to=seq)
    idsN, maskN = predictor.encode(pool[:large], pad_to=seq)
    t1 = time_runs(lambda: predictor.run(ids1, mask1), config)
    tN = time_runs(lambda: predictor.run(idsN, maskN), config)
    return {
        "latency_p50_ms": float(np.percentile(t1, 50)),
        "latency_p95_ms": float(np.percentile(t1, 95)),
        "latency_p99_ms": float(np.percentile(t1, 99)),
        "batch_latency_p50_ms": float(np.percentile(tN, 50)),
        "batch_latency_p95_ms": float(np.percentile(tN, 95)),
        "throughput_per_s": float(large / (np.median(tN) / 1e3)),
    }


def measure(folder: Path, texts: Sequence[str], options: EngineOptions, config: BenchConfig | None = None
            ) -> dict[str, float]:
    """Latency and throughput of the package at ``folder`` here; peak memory in a fresh process; size."""
    config = config or BenchConfig()
    predictor = Predictor(folder, options)
    metrics = latency(predictor, texts, config)
    del predictor
    memory = peak_memory_mb(folder, options, config.batch_sizes[1])
    return metrics | {"peak_memory_mb": memory, "size_mb": size_mb(folder)}


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
