"""The gateway's feedback sink: scored feedback rows become durable Parquet files, written off the request path.

``POST /feedback`` (:mod:`kiln.infra.gateway_proxy`) hands each scored request's rows to :meth:`FeedbackSink.add`,
which only appends them to an in-memory buffer. A background task flushes the buffer every ``flush_rows`` rows or
``flush_s`` seconds, and once more when the gateway stops, each flush as new part files (one per model and UTC
day; never rewritten) in the layout :mod:`kiln.tasks.data.feedback` reads::

    <store>/<model name>/date=YYYY-MM-DD/part-<HHMMSS>-<uuid>.parquet

Only the live answer's rows are kept (one per labelled text row): what the client was told, by which version. A
flush that fails (a full disk, S3 down) keeps its rows for the next one, up to ``max_rows`` buffered in all (the
oldest are dropped past it, and counted). Retention is the reader's job (``kiln feedback prune``), never the
gateway's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter

log = logging.getLogger(__name__)


class FeedbackSink:
    """A bounded buffer of feedback rows and the background task that writes it to ``store``.

    Args:
        store: a local folder or ``s3://bucket/prefix`` (see :func:`kiln.tasks.data.feedback.open_store`).
        flush_rows: write as soon as this many rows are buffered.
        flush_s: write at least this often while rows are buffered, seconds.
        max_rows: the most rows held while writes fail; older ones are dropped past it.
        client: the S3 client for an ``s3://`` store (made from the settings by :func:`sink_from_settings`).
    """

    def __init__(self, store: str, *, flush_rows: int = 500, flush_s: float = 10.0, max_rows: int = 100_000,
                 client: Any = None) -> None:
        from kiln.tasks.data.feedback import open_store

        if flush_rows < 1 or not flush_s > 0:
            raise ValueError(f"feedback flush_rows must be >= 1 and flush_s > 0 (got {flush_rows}, {flush_s})")
        self.store = open_store(store).url
        self.flush_rows, self.flush_s, self.max_rows, self.client = flush_rows, flush_s, max_rows, client
        self._rows: deque[dict[str, Any]] = deque()
        self._lock = threading.Lock()  # add() runs on the event loop, flush() in a worker thread
        self._wake, self._stopping = asyncio.Event(), False
        self.written = self.dropped = 0
        self.files: list[str] = []
        self.rows_total = PromCounter("kiln_gateway_feedback_rows_written_total", "Feedback rows written to the "
                                      "feedback store.", registry=None)
        self.dropped_total = PromCounter("kiln_gateway_feedback_rows_dropped_total", "Feedback rows dropped because "
                                         "writes to the feedback store kept failing.", registry=None)
        self._registries: list[CollectorRegistry] = []

    def register(self, registry: CollectorRegistry) -> None:
        """Show the sink's counters in ``registry`` (the gateway's ``/metrics``), once."""
        if not any(r is registry for r in self._registries):
            registry.register(self.rows_total)
            registry.register(self.dropped_total)
            self._registries.append(registry)

    # ---- the request path: buffer only --------------------------------------------------------------------

    def add(self, model: str | None, request_id: str, entry: dict[str, tuple[str, str, list[str]]],
            truth: list[str], texts: list[str] | None) -> int:
        """Buffer the live answer's rows of one scored request; returns how many (0 without its texts)."""
        live = entry.get("live")
        if live is None or texts is None or model is None or len(texts) != len(truth):
            return 0
        role, version, predicted = live
        now = datetime.now(UTC).isoformat()
        rows = [{"model": model, "text": text, "label": label, "predicted": guess, "version": version, "role": role,
                 "source": "live", "request_id": request_id, "row": i, "time": now}
                for i, (text, label, guess) in enumerate(zip(texts, truth, predicted, strict=True))]
        with self._lock:
            self._rows.extend(rows)
            while len(self._rows) > self.max_rows:
                self._rows.popleft()
                self.dropped += 1
                self.dropped_total.inc()
            if len(self._rows) >= self.flush_rows:
                self._wake.set()
        return len(rows)

    # ---- the background writer ----------------------------------------------------------------------------

    def flush(self) -> list[str]:
        """Write every buffered row now (blocking: call it from a thread); returns the files written."""
        import pandas as pd

        from kiln.tasks.data.feedback import write_part

        with self._lock:
            rows, self._rows = list(self._rows), deque()
        if not rows:
            return []
        frame = pd.DataFrame(rows)
        frame["day"] = frame["time"].str[:10]
        written: list[str] = []
        failed: list[dict[str, Any]] = []
        for (model, _), part in frame.groupby(["model", "day"], sort=True):
            try:
                written.append(write_part(self.store, str(model), part, client=self.client))
            except Exception as exc:  # noqa: BLE001 - a failed write must not lose the rows or stop the gateway
                log.warning("could not write %d feedback rows of %s to %s (%s); kept for the next flush",
                            len(part), model, self.store, exc)
                failed.extend(part.drop(columns="day").to_dict("records"))
        with self._lock:  # rows that could not be written go back in front, in their order
            self._rows.extendleft(reversed(failed))
            while len(self._rows) > self.max_rows:
                self._rows.popleft()
                self.dropped += 1
                self.dropped_total.inc()
        self.written += len(rows) - len(failed)
        self.rows_total.inc(len(rows) - len(failed))
        self.files.extend(written)
        return written

    async def run(self) -> None:
        """Flush every ``flush_s`` seconds, or sooner when ``flush_rows`` rows are waiting, until :meth:`running`
        stops it (a flag, not a cancellation: a write in progress always finishes)."""
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_s)
            self._wake.clear()
            if self._rows:
                await asyncio.to_thread(self.flush)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The background writer for as long as the gateway runs, and a last flush when it stops."""
        self._wake, self._stopping = asyncio.Event(), False  # the event is bound to the running loop
        task = asyncio.create_task(self.run(), name="feedback-sink")
        try:
            yield
        finally:
            self._stopping = True
            self._wake.set()
            await task
            await asyncio.to_thread(self.flush)  # rows added while the last write ran


def with_sink(lifespan: Callable[[Any], Any], sink: FeedbackSink | None) -> Callable[[Any], Any]:
    """``lifespan`` (an ASGI app's) wrapped so that ``sink`` writes while the app runs and flushes after it stops."""
    if sink is None:
        return lifespan

    @contextlib.asynccontextmanager
    async def both(app: Any) -> AsyncIterator[None]:
        async with sink.running(), lifespan(app):
            yield

    return both


def sink_from_settings(settings: Any) -> FeedbackSink | None:
    """The sink the settings ask for (``feedback_store``, default ``<KILN_HOME>/feedback``); None when "off"."""
    from kiln.tasks.data.feedback import store_and_client

    store, client = store_and_client(settings)
    if store is None:
        return None
    return FeedbackSink(store, flush_rows=settings.feedback_flush_rows, flush_s=settings.feedback_flush_s,
                        client=client)
