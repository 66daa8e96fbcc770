"""Is this delivery really from MLflow, and is it new? Signature, timestamp and delivery-id checks.

MLflow (3.3+) signs each webhook delivery ``X-MLflow-Signature: v1,<base64 HMAC-SHA256 of
"{delivery_id}.{timestamp}.{body}">`` (see ``mlflow/webhooks/delivery.py``, which follows Standard
Webhooks); a delivery older than the replay window, or one already handled within it, is not acted on twice.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import threading
import time
from collections import OrderedDict
from typing import Any

from kiln.infra.webhook_body import Reject

WINDOW_S = 300  # Standard Webhooks' replay tolerance; MLflow signs with int(time.time()) at send time
WebhookRefused = Reject  # the receiver's refusal: a status and a message


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """``X-MLflow-Signature`` for a body, exactly as ``mlflow.webhooks.delivery`` computes it."""
    digest = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(secret: str, headers: Any, body: bytes, *, now: float | None = None, window_s: float = WINDOW_S) -> str:
    """Check signature and timestamp; returns the delivery id or raises :class:`WebhookRefused`."""
    delivery_id = headers.get("x-mlflow-delivery-id", "")
    timestamp = headers.get("x-mlflow-timestamp", "")
    signature = headers.get("x-mlflow-signature", "")
    missing = [h for h, v in (("X-MLflow-Delivery-Id", delivery_id), ("X-MLflow-Timestamp", timestamp),
                              ("X-MLflow-Signature", signature)) if not v]
    if missing:
        raise WebhookRefused(400, f"missing header(s) {', '.join(missing)}; is this an MLflow webhook with a secret?")
    expected = sign(secret, delivery_id, timestamp, body).encode()
    # Standard Webhooks allow several space-separated signatures (key rotation); MLflow sends one. Compared as
    # bytes: compare_digest refuses (TypeError) a str with non-ASCII characters, which a header may carry.
    if not any(hmac.compare_digest(expected, s.encode("utf-8", "replace")) for s in signature.split()):
        raise WebhookRefused(401, "X-MLflow-Signature does not match; the webhook's secret must equal "
                                  "KILN_MLFLOW_WEBHOOK_SECRET")
    try:
        age = (time.time() if now is None else now) - int(timestamp)
    except ValueError:
        raise WebhookRefused(400, f"X-MLflow-Timestamp {timestamp!r} is not a Unix time in seconds") from None
    if abs(age) > window_s:
        when = f"{age:.0f} s old" if age > 0 else f"{-age:.0f} s in the future"
        raise WebhookRefused(401, f"delivery timestamp is {when}; only {window_s:.0f} s either way are accepted "
                                  "(a replayed delivery, or MLflow's and Kiln's clocks disagree)")
    return delivery_id


class Deliveries:
    """Delivery ids handled within the replay window; older ones are refused by their timestamp anyway."""

    def __init__(self, ttl_s: float = 2 * WINDOW_S, max_size: int = 10_000) -> None:
        self.ttl_s, self.max_size = ttl_s, max_size
        self.done: OrderedDict[str, float] = OrderedDict()
        self.in_flight: set[str] = set()
        self.lock = threading.Lock()

    def claim(self, delivery_id: str) -> str:
        """``new`` (handle it), ``done`` (handled already) or ``busy`` (being handled: MLflow gave up waiting)."""
        with self.lock:
            now = time.monotonic()
            while self.done and (len(self.done) > self.max_size or next(iter(self.done.values())) < now - self.ttl_s):
                self.done.popitem(last=False)
            if delivery_id in self.done:
                return "done"
            if delivery_id in self.in_flight:
                return "busy"
            self.in_flight.add(delivery_id)
            return "new"

    def finish(self, delivery_id: str, *, ok: bool) -> None:
        """Release a claimed delivery; ``ok`` remembers it as handled, otherwise a redelivery may try again."""
        with self.lock:
            self.in_flight.discard(delivery_id)
            if ok:
                self.done[delivery_id] = time.monotonic()
