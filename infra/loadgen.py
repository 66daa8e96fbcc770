"""A bounded, loopback-only load generator: replay texts through the gateway, optionally send feedback.

    python -m kiln.infra.loadgen --url http://127.0.0.1:8080 --model sentiment --requests 2000 --concurrency 8 \
        --seconds 60 --feedback

Bounded twice (a request count and a wall-clock limit) and refused for anything but a loopback
address: it exists to exercise a local rollout, not to load someone else's service. With labelled
texts and ``feedback``, it posts each answer's true label to the gateway's ``/feedback``, keyed by the
answer's ``X-Kiln-Request-Id``, so the gateway can score accuracy per upstream.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from kiln.infra.oip import text_request
from kiln.infra.upstream import Failure, UpstreamClient

MAX_REQUESTS = 1_000_000
UPSTREAM_HEADER, REQUEST_ID_HEADER, STICKY_HEADER = "x-kiln-upstream", "x-kiln-request-id", "X-Kiln-Sticky"
TOKEN_ENV = "KILN_GATEWAY_TOKEN"  # the gateway's admin token, also good for /feedback


def check_loopback(url: str) -> str:
    """``url`` without a trailing slash, or ValueError when its host is not a loopback address."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme not in {"http", "https"}:
        raise ValueError(f"{url!r} is not an http(s) URL")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise ValueError(f"refusing to load {host!r}: the load generator only targets loopback (127.0.0.1, ::1, "
                         "localhost)")
    return url.rstrip("/")


@dataclass
class LoadSummary:
    """What happened: counts by status and upstream, latency percentiles (ms), throughput."""

    sent: int = 0
    ok: int = 0
    failed: int = 0  # a status >= 500 or a transport error
    by_status: dict[str, int] = field(default_factory=dict)
    by_upstream: dict[str, int] = field(default_factory=dict)
    transport_errors: dict[str, int] = field(default_factory=dict)
    feedback_sent: int = 0
    feedback_failed: int = 0
    seconds: float = 0.0
    throughput_per_s: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadPlan:
    """What to send.

    Attributes:
        url: gateway (or model server) base URL; loopback only.
        model: model name in ``/v2/models/{model}/infer``.
        texts: replayed in order, round robin.
        labels: true labels aligned with ``texts``, for feedback.
        requests: most requests to send.
        seconds: most wall-clock time to spend; requests not started by then are not sent.
        concurrency: requests in flight at once.
        batch: texts per request.
        feedback: post each answer's true label to ``/feedback``.
        sticky_users: when set, each request carries ``X-Kiln-Sticky: user-<i mod n>``.
        timeout_s: per-request timeout.
        rate_per_s: when set, requests start at this steady rate (open loop) instead of back to back.
        stop: when set, no request starts after it is set (a rollout's traffic that ends with the rollout).
    """

    url: str
    model: str
    texts: Sequence[str]
    labels: Sequence[str] | None = None
    requests: int = 1000
    seconds: float = 60.0
    concurrency: int = 8
    batch: int = 1
    feedback: bool = False
    feedback_token: str | None = None  # bearer credential for /feedback: the gateway's feedback or admin token
    sticky_users: int | None = None
    timeout_s: float = 30.0
    rate_per_s: float | None = None
    stop: threading.Event | None = None

    def check(self) -> None:
        self.url = check_loopback(self.url)
        if not self.texts:
            raise ValueError("no texts to send")
        if not 1 <= self.requests <= MAX_REQUESTS:
            raise ValueError(f"requests must be from 1 to {MAX_REQUESTS}")
        if not 0 < self.seconds <= 3600:
            raise ValueError("seconds must be in (0, 3600]")
        if not 1 <= self.concurrency <= 512 or not 1 <= self.batch <= 1024:
            raise ValueError("concurrency must be 1-512 and batch 1-1024")
        if self.feedback and (self.labels is None or len(self.labels) != len(self.texts)):
            raise ValueError("feedback needs one label per text")
        if self.rate_per_s is not None and not 0 < self.rate_per_s <= 100_000:
            raise ValueError("rate_per_s must be in (0, 100000]")


class _Run:
    def __init__(self, plan: LoadPlan) -> None:
        self.plan = plan
        self.summary = LoadSummary()
        self.latencies: list[float] = []
        self.status: Counter = Counter()
        self.upstream: Counter = Counter()
        self.transport: Counter = Counter()
        self.next_index = 0
        self.deadline = 0.0
        self.started = 0.0

    def _claim(self) -> int | None:
        # Single event loop: claiming an index is atomic without a lock.
        stopped = self.plan.stop is not None and self.plan.stop.is_set()
        if stopped or self.next_index >= self.plan.requests or time.monotonic() >= self.deadline:
            return None
        self.next_index += 1
        return self.next_index - 1

    async def worker(self, client: UpstreamClient) -> None:
        while (i := self._claim()) is not None:
            if self.plan.rate_per_s:
                due = self.started + i / self.plan.rate_per_s
                if (wait := due - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                if self.plan.stop is not None and self.plan.stop.is_set():
                    return
            await self.one(client, i)

    async def one(self, client: UpstreamClient, i: int) -> None:
        plan, n = self.plan, len(self.plan.texts)
        rows = [(i * plan.batch + k) % n for k in range(plan.batch)]
        headers = {STICKY_HEADER: f"user-{i % plan.sticky_users}"} if plan.sticky_users else {}
        started = time.perf_counter()
        self.summary.sent += 1
        answer = await client.request("POST", f"{plan.url}/v2/models/{plan.model}/infer", headers=headers,
                                      json=text_request([plan.texts[r] for r in rows]))
        if isinstance(answer, Failure):
            self.transport[answer.kind] += 1
            self.summary.failed += 1
            return
        self.latencies.append((time.perf_counter() - started) * 1000)
        self.status[str(answer.status)] += 1
        self.upstream[answer.headers.get(UPSTREAM_HEADER, "direct")] += 1
        if answer.status >= 500:
            self.summary.failed += 1
            return
        if answer.status == 200:
            self.summary.ok += 1
            request_id = answer.headers.get(REQUEST_ID_HEADER)
            if plan.feedback and request_id and plan.labels is not None:
                await self.send_feedback(client, request_id, [plan.labels[r] for r in rows])

    async def send_feedback(self, client: UpstreamClient, request_id: str, labels: list[str]) -> None:
        auth = {"Authorization": f"Bearer {self.plan.feedback_token}"} if self.plan.feedback_token else None
        answer = await client.request("POST", f"{self.plan.url}/feedback", headers=auth,
                                      json={"request_id": request_id, "labels": labels})
        ok = answer.status == 200
        self.summary.feedback_sent += ok
        self.summary.feedback_failed += not ok

    def finish(self, seconds: float) -> LoadSummary:
        s = self.summary
        s.by_status, s.by_upstream, s.transport_errors = dict(self.status), dict(self.upstream), dict(self.transport)
        s.seconds = round(seconds, 3)
        s.throughput_per_s = round(s.sent / seconds, 2) if seconds > 0 else 0.0
        if self.latencies:
            p = np.percentile(self.latencies, [50, 90, 95, 99])
            s.latency_ms = {"p50": round(float(p[0]), 3), "p90": round(float(p[1]), 3), "p95": round(float(p[2]), 3),
                            "p99": round(float(p[3]), 3), "mean": round(float(np.mean(self.latencies)), 3)}
        return s


async def run_load(plan: LoadPlan) -> LoadSummary:
    """Send ``plan``'s requests with ``plan.concurrency`` workers; returns the summary."""
    plan.check()
    run = _Run(plan)
    started = time.monotonic()
    run.started, run.deadline = started, started + plan.seconds
    async with UpstreamClient(max_connections=plan.concurrency, timeout_s=plan.timeout_s) as client:
        await asyncio.gather(*(run.worker(client) for _ in range(plan.concurrency)))
    return run.finish(time.monotonic() - started)


def generate_load(plan: LoadPlan) -> LoadSummary:
    """:func:`run_load` for synchronous callers (its own event loop)."""
    return asyncio.run(run_load(plan))


def _texts(args: argparse.Namespace) -> tuple[list[str], list[str] | None]:
    if args.texts:
        lines = Path(args.texts).read_text(encoding="utf-8").splitlines()
        return [line.strip() for line in lines if line.strip()], None
    from kiln.tasks.data.datasets import DatasetSpec, load_splits

    test = load_splits(DatasetSpec(limit=args.limit)).test  # the evaluation split: texts the gate judged on
    # Shuffled (seeded): the split keeps the file's order, and a file grouped by class would look like drift.
    test = test.sample(frac=1.0, random_state=0)
    labels = test["label"].astype(str).tolist() if "label" in test.columns else None
    return test["text"].astype(str).tolist(), labels


def main(argv: list[str] | None = None) -> None:
    """Command line entry point; prints the summary as JSON."""
    parser = argparse.ArgumentParser(description="Replay texts through a local Kiln gateway (loopback only)")
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--model", required=True, help="model name in /v2/models/NAME/infer")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1, help="texts per request")
    parser.add_argument("--feedback", action="store_true", help="post true labels to /feedback, with "
                        "$KILN_GATEWAY_FEEDBACK_TOKEN (else $KILN_GATEWAY_TOKEN) as bearer token")
    parser.add_argument("--sticky-users", type=int, help="spread requests over N sticky user ids")
    parser.add_argument("--texts", help="a file of texts, one per line (default: the evaluation split)")
    parser.add_argument("--limit", type=int, default=None, help="dataset row limit when reading the split")
    args = parser.parse_args(argv)
    texts, labels = _texts(args)
    plan = LoadPlan(args.url, args.model, texts, labels, requests=args.requests, seconds=args.seconds,
                    concurrency=args.concurrency, batch=args.batch, feedback=args.feedback,
                    feedback_token=os.environ.get("KILN_GATEWAY_FEEDBACK_TOKEN") or os.environ.get(TOKEN_ENV),
                    sticky_users=args.sticky_users)
    try:
        summary = generate_load(plan)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    print(json.dumps(summary.to_dict(), indent=2))


if __name__ == "__main__":
    main()
