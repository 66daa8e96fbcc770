"""One bounded read of a request body, for every HTTP surface Kiln serves (model server, gateway, webhooks).

An oversized body is refused as soon as that is known — from its declared Content-Length before a byte is read,
else the moment the stream passes the limit — so it is never held whole. Each surface says how it refuses
(its error type, status and wording) through ``refuse``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


async def read_limited(request: Any, limit: int, refuse: Callable[[int | None], Exception]) -> bytes:
    """The body of ``request`` (a Starlette request), or ``refuse(size)`` raised past ``limit`` bytes: ``size`` is
    the declared length, or None when the stream passed the limit while being read."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise refuse(int(declared))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise refuse(None)
        chunks.append(chunk)
    return b"".join(chunks)
