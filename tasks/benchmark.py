"""Latency, throughput and memory of a packaged model, measured the same way for every candidate.

Inputs are real evaluation texts padded to the serving sequence length, so every model sees the same
shapes. Each measurement warms up first, runs for a bounded time, and reports percentiles. Peak memory
is the resident-set growth from before the model is opened until the measurement ends, sampled by a
background thread (it sees allocations of native runtimes that ``tracemalloc`` cannot).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import psutil
from pydantic import BaseModel, Field

from tasks.engines import EngineOptions
from tasks.predictor import Predictor, size_mb


class BenchConfig(BaseModel):
    """How latency is measured."""

    warmup: int = Field(5, ge=0, description="Untimed runs before measuring.")
    min_runs: int = Field(20, ge=3, description="Runs per measurement, at least.")
    max_seconds: float = Field(3.0, gt=0, description="Stop adding runs after this long.")
    batch_sizes: tuple[int, int] = Field((1, 32), description="Latency batch size and throughput batch size.")


class RssSampler:
    """Peak resident-set size of this process while the block runs."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 1e6


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
    """Open the package at ``folder`` and measure latency, throughput, peak memory and size."""
    config = config or BenchConfig()
    with RssSampler() as rss:
        predictor = Predictor(folder, options)
        metrics = latency(predictor, texts, config)
    return metrics | {"peak_memory_mb": rss.growth_mb, "size_mb": size_mb(folder)}
