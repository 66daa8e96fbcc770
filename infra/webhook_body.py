"""What every webhook route shares: a refusal with an HTTP status, and a body read with a size bound."""

from __future__ import annotations

from typing import Any


class Reject(Exception):
    """An answer other than "started": a status and a message for the sender and the operator's log."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def read_body(request: Any, limit: int) -> bytes:
    """The raw body, or 413 as soon as it is known to exceed ``limit`` (from Content-Length or while reading)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Reject(400, f"Content-Length {declared!r} is not a number")
        if int(declared) > limit:
            raise Reject(413, f"body of {declared} bytes exceeds the limit of {limit} (KILN_WEBHOOK_MAX_BODY)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise Reject(413, f"body exceeds the limit of {limit} bytes (KILN_WEBHOOK_MAX_BODY)")
    return bytes(body)
