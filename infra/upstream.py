"""A pooled async HTTP client for the gateway and the load generator, behind a three-line interface.

Built on aiohttp rather than httpx: on this project's loopback benchmark httpx 0.28's AsyncClient
(httpcore 1.0 pool) fell from ~900 to ~280 requests/s between 8 and 32 concurrent requests, while
aiohttp held ~3,500 (encode/httpx#3215). A gateway must not be the bottleneck it measures, so the
client lives here, where swapping it back is one file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import aiohttp


@dataclass(frozen=True)
class Answer:
    """An HTTP response read in full; header names are lower case."""

    status: int
    headers: dict[str, str]
    content: bytes


@dataclass(frozen=True)
class Failure:
    """No response. ``connect``: the request never left, so it is safe to send elsewhere."""

    kind: Literal["connect", "timeout", "other"]
    message: str

    @property
    def status(self) -> int:
        return 504 if self.kind == "timeout" else 502


class UpstreamClient:
    """Keep-alive connection pool; use as ``async with UpstreamClient(...) as client``."""

    def __init__(self, *, max_connections: int = 256, timeout_s: float = 30.0, keepalive_s: float = 5.0) -> None:
        self.max_connections = max_connections
        self.timeout_s = timeout_s
        # Shorter than the servers' keep-alive (30 s in kiln.infra.server), so the client closes idle
        # connections first and never sends on one the server is closing.
        self.keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> UpstreamClient:
        connector = aiohttp.TCPConnector(limit=self.max_connections, keepalive_timeout=self.keepalive_s)
        self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, url: str, *, headers: dict[str, str] | None = None,
                      body: bytes | None = None, json: object = None) -> Answer | Failure:
        """Send one request; a transport failure is returned as :class:`Failure`, never raised."""
        if self._session is None:
            raise RuntimeError("UpstreamClient is not open; use it as an async context manager")
        for attempt in (1, 2):
            try:
                async with self._session.request(method, url, headers=headers, data=body, json=json) as response:
                    content = await response.read()
                    return Answer(response.status, {k.lower(): v for k, v in response.headers.items()}, content)
            except aiohttp.ServerDisconnectedError as exc:
                # A pooled connection closed under us before any answer: the request was not served; once more.
                if attempt == 2:
                    return Failure("other", f"{exc.__class__.__name__}: {exc}")
            except aiohttp.ClientConnectorError as exc:
                return Failure("connect", f"{exc.__class__.__name__}: {exc}")
            except TimeoutError as exc:
                return Failure("timeout", f"no answer within {self.timeout_s:g} s ({exc.__class__.__name__})")
            except aiohttp.ClientError as exc:
                return Failure("other", f"{exc.__class__.__name__}: {exc}")
        raise AssertionError("unreachable")
