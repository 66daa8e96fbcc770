"""A small dynamic batcher: concurrent requests wait briefly in a queue and run as one engine call.

Engines amortise per-call overhead (Python, tokenization, kernel launch) across rows, so under
concurrency one call of 16 rows is far cheaper than 16 calls of one. A request is never split across
batches; jobs with different keys (e.g. texts vs raw tensors, or different generation parameters) are
never mixed, and wait their turn in arrival order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

RunBatch = Callable[[Hashable, list[Any]], list[Any]]


@dataclass
class _Job:
    key: Hashable
    payload: Any
    size: int
    enqueued: float
    future: asyncio.Future = field(repr=False)


@dataclass
class BatchStats:
    """What the batcher did, for metrics and tests."""

    batches: int = 0
    jobs: int = 0
    rows: int = 0


class Batcher:
    """Collects jobs for up to ``max_wait_ms`` or ``max_batch_size`` rows, then runs them together.

    ``run_batch(key, payloads)`` runs in ``executor`` (give it one worker: engines are not guaranteed
    thread-safe) and must return one result per payload, in order. While a batch runs, new jobs queue
    up, so under load batches fill without waiting at all.
    """

    def __init__(self, run_batch: RunBatch, executor: Executor, *, max_batch_size: int = 32,
                 max_wait_ms: float = 0.0) -> None:
        if max_batch_size < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size must be >= 1 and max_wait_ms >= 0")
        self.run_batch = run_batch
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Job] | None = None
        self._pending: list[_Job] = []
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Start the collecting loop on the running event loop."""
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop(), name="kiln-batcher")

    async def stop(self) -> None:
        """Stop collecting; jobs still queued fail with CancelledError."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for job in self._pending + self._drain():
            if not job.future.done():
                job.future.cancel()

    async def submit(self, key: Hashable, payload: Any, size: int) -> Any:
        """Queue ``payload`` (``size`` rows) and wait for its result."""
        if self._queue is None:
            raise RuntimeError("Batcher.start() was not awaited")
        loop = asyncio.get_running_loop()
        job = _Job(key, payload, size, loop.time(), loop.create_future())
        self._queue.put_nowait(job)
        return await job.future

    def _drain(self) -> list[_Job]:
        jobs = []
        while self._queue is not None and not self._queue.empty():
            jobs.append(self._queue.get_nowait())
        return jobs

    async def _collect(self) -> list[_Job]:
        assert self._queue is not None
        if not self._pending:
            self._pending.append(await self._queue.get())
        head = self._pending[0]
        # The wait counts from the oldest job's arrival: jobs that queued during the last run go at once.
        deadline = head.enqueued + self.max_wait
        loop = asyncio.get_running_loop()
        while True:
            self._pending.extend(self._drain())
            if sum(j.size for j in self._pending if j.key == head.key) >= self.max_batch_size:
                break
            timeout = deadline - loop.time()
            if timeout <= 0:
                break
            try:
                self._pending.append(await asyncio.wait_for(self._queue.get(), timeout))
            except TimeoutError:
                break
        batch, rest, rows = [], [], 0
        for job in self._pending:
            if job.key == head.key and (not batch or rows + job.size <= self.max_batch_size):
                batch.append(job)
                rows += job.size
            else:
                rest.append(job)
        self._pending = rest
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            live = [j for j in batch if not j.future.done()]  # a client that went away needs no answer
            if not live:
                continue
            self.stats.batches += 1
            self.stats.jobs += len(live)
            self.stats.rows += sum(j.size for j in live)
            try:
                results = await loop.run_in_executor(self.executor, self.run_batch, live[0].key,
                                                     [j.payload for j in live])
            except Exception as exc:  # noqa: BLE001 - every waiting request must hear about the failure
                # Faults injected on purpose say so (``quiet``): one line each, not a traceback per batch.
                log.error("batch of %d jobs failed: %s", len(live), exc, exc_info=not getattr(exc, "quiet", False))
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            for job, result in zip(live, results, strict=True):
                if not job.future.done():
                    job.future.set_result(result)
