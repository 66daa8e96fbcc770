"""A pooled async HTTP/1.1 client for the gateway and the load generator, behind a three-line interface.

The gateway sits in every request's path, so its client is the smallest thing that does the job: keep-alive
connections per upstream on the running event loop, each request written in one go, responses parsed by
``httptools`` (the C parser uvicorn uses; it decodes chunked bodies too). Under a profiler aiohttp, which it
replaced, was a quarter of the gateway's CPU per request; with this client, uvloop and httptools the gateway's
added p50 on the demo model fell from +1.10 ms to +0.77 ms (``benchmarks/serving_bench.py``, part 3). aiohttp
had replaced httpx, whose pool collapsed under concurrency (encode/httpx#3215). Swapping it is one file.

What a failure means matters to the gateway: :class:`Failure` ``connect`` is a request that never left (safe
to send elsewhere), ``timeout`` one that may still be running, ``other`` a connection that broke before a full
answer came. A pooled connection the server closed while idle is retried once on a fresh one: nothing was
served on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote, urlsplit

import httptools
import orjson

_MAX_CACHED_URLS = 1024
_SAFE = "/?%:@!$&'()*+,;=-._~[]"
_FRAMING = frozenset({"host", "content-length", "transfer-encoding", "connection"})


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


@dataclass(frozen=True)
class _Target:
    """Where a URL goes, parsed once per URL."""

    scheme: str
    host: str
    port: int
    path: bytes  # path and query, as sent on the request line
    authority: bytes  # the Host header


def _target(url: str) -> _Target:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    # Percent-encode what may not stand on a request line (non-ASCII, controls, spaces); escapes already there
    # stay as they are, so a path forwarded as received goes out unchanged.
    return _Target(parts.scheme, parts.hostname, port, quote(path, safe=_SAFE).encode(), parts.netloc.encode())


class _Closed(ConnectionError):
    """The connection closed (or its bytes made no sense) before a full answer arrived."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection: one request at a time, its answer parsed as it arrives."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[Answer] | None = None
        self.closed, self.reusable, self.idle_since = False, True, 0.0
        self._status, self._headers, self._body = 0, {}, []  # type: ignore[var-annotated]
        self._head_only = False

    # ---- asyncio.Protocol --------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(_Closed(f"the upstream's answer is not HTTP/1.1 ({exc})"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._status and "content-length" not in self._headers \
                and "chunked" not in self._headers.get("transfer-encoding", ""):
            self.on_message_complete()  # an answer delimited by the close itself ends here
        self._fail(_Closed("the upstream closed the connection before answering"))

    # ---- httptools callbacks -----------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._status, self._headers, self._body = 0, {}, []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._status = self.parser.get_status_code()
        self.reusable = self.parser.should_keep_alive()
        if self._head_only:  # a HEAD answer has no body, whatever its Content-Length says
            self.reusable = False
            self.on_message_complete()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(Answer(self._status, self._headers, b"".join(self._body)))

    # ---- use ---------------------------------------------------------------------------------------------

    async def exchange(self, request: bytes, *, head_only: bool = False) -> Answer:
        """Send one request and wait for its whole answer."""
        if self.closed or self.transport is None:
            raise _Closed("the connection is closed")
        self.waiter = asyncio.get_running_loop().create_future()
        self._status, self._head_only = 0, head_only
        self.transport.write(request)
        try:
            return await self.waiter
        finally:
            self.waiter = None

    def _fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class UpstreamClient:
    """Keep-alive connection pool; use as ``async with UpstreamClient(...) as client``."""

    def __init__(self, *, max_connections: int = 256, timeout_s: float = 30.0, keepalive_s: float = 5.0) -> None:
        self.max_connections = max_connections
        self.timeout_s = timeout_s
        # Shorter than the servers' keep-alive (30 s in kiln.infra.server), so the client closes idle
        # connections first and never sends on one the server is closing.
        self.keepalive_s = keepalive_s
        self._slots: asyncio.Semaphore | None = None
        self._idle: dict[tuple[str, str, int], deque[_Connection]] = {}
        self._targets: dict[str, _Target] = {}
        self._tls: ssl.SSLContext | None = None

    async def __aenter__(self) -> UpstreamClient:
        self._slots = asyncio.Semaphore(self.max_connections)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for pool in self._idle.values():
            for conn in pool:
                conn.close()
        self._idle.clear()
        self._slots = None

    async def request(self, method: str, url: str, *, headers: dict[str, str] | None = None,
                      body: bytes | None = None, json: object = None) -> Answer | Failure:
        """Send one request; a transport failure is returned as :class:`Failure`, never raised."""
        if self._slots is None:
            raise RuntimeError("UpstreamClient is not open; use it as an async context manager")
        target = self._parse(url)
        headers = dict(headers or {})
        if json is not None:
            body = orjson.dumps(json)
            headers.setdefault("Content-Type", "application/json")
        wire = _request_bytes(method, target, headers, body or b"")
        try:
            async with asyncio.timeout(self.timeout_s), self._slots:  # waiting for a free slot counts too
                return await self._send(target, wire, head_only=method.upper() == "HEAD")
        except TimeoutError as exc:
            return Failure("timeout", f"no answer within {self.timeout_s:g} s ({exc.__class__.__name__})")

    async def _send(self, target: _Target, wire: bytes, *, head_only: bool) -> Answer | Failure:
        for attempt in (1, 2):
            conn, reused = self._pooled(target), True
            if conn is None:
                reused = False
                try:
                    conn = await self._connect(target)
                except OSError as exc:  # refused, unreachable, unknown host, TLS handshake: nothing was sent
                    return Failure("connect", f"{exc.__class__.__name__}: cannot connect to {target.host}:"
                                              f"{target.port}: {exc}")
            try:
                answer = await conn.exchange(wire, head_only=head_only)
            except _Closed as exc:
                conn.close()
                if reused and attempt == 1:
                    continue  # a pooled connection closed under us before any answer: not served; once more
                return Failure("other", f"ServerDisconnectedError: {exc}")
            except BaseException:  # cancelled or timed out mid-exchange: the connection's state is unknown
                conn.close()
                raise
            self._release(target, conn)
            return answer
        raise AssertionError("unreachable")

    def _parse(self, url: str) -> _Target:
        target = self._targets.get(url)
        if target is None:
            target = _target(url)
            if len(self._targets) < _MAX_CACHED_URLS:  # a handful of paths in practice; never unbounded
                self._targets[url] = target
        return target

    def _pooled(self, target: _Target) -> _Connection | None:
        pool = self._idle.get((target.scheme, target.host, target.port))
        now = time.monotonic()
        while pool:
            conn = pool.pop()  # the most recently used: the least likely to have been closed
            if not conn.closed and now - conn.idle_since < self.keepalive_s:
                return conn
            conn.close()
        return None

    async def _connect(self, target: _Target) -> _Connection:
        loop = asyncio.get_running_loop()
        tls = None
        if target.scheme == "https":
            self._tls = self._tls or ssl.create_default_context()
            tls = self._tls
        transport, conn = await loop.create_connection(_Connection, target.host, target.port, ssl=tls)
        sock = transport.get_extra_info("socket")
        if sock is not None:  # one request is one write: never wait for a delayed ACK
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _release(self, target: _Target, conn: _Connection) -> None:
        if conn.closed or not conn.reusable:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.setdefault((target.scheme, target.host, target.port), deque()).append(conn)


def _request_bytes(method: str, target: _Target, headers: dict[str, str], body: bytes) -> bytes:
    """The request line, headers and body as one buffer (one write, one segment on loopback)."""
    lines = [f"{method.upper()} ".encode() + target.path + b" HTTP/1.1", b"Host: " + target.authority]
    for name, value in headers.items():
        if name.lower() in _FRAMING or any(c in name + value for c in "\r\n") or ":" in name:
            continue  # framing is this client's; a header may never carry a line break
        lines.append(f"{name}: {value}".encode("latin-1", errors="replace"))
    if body or method.upper() in ("POST", "PUT", "PATCH"):
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
