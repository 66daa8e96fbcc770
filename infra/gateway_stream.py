"""The gateway's streamed answers: ``POST .../generate_stream`` relayed event by event, as the model server writes them.

The pooled client (:mod:`kiln.infra.upstream`) reads whole answers, which would hold back a stream's first token
until its last; so a stream gets a connection of its own, its answer relayed chunk by chunk as it arrives, and
closed at the end. Closing it is also how the upstream learns that a client went away: the model server stops
decoding at its next step (:mod:`kiln.infra.oip_generate`), so an abandoned stream costs no engine time.

Routing is :meth:`~kiln.infra.gateway_proxy.Gateway.route`'s (weight, sticky key), and an upstream that cannot be
reached is replaced by the other one, as for ``/infer``. Each stream is canary evidence on the side that answered:
``kiln_gateway_requests_total`` by status (499 when the client left first; those are not counted in the window), and
in the analysis window its time to first token stands for its latency, the measure of a streamed answer a user
feels. ``kiln_gateway_stream_ttft_seconds``, ``kiln_gateway_stream_tokens_total`` (the model server's count, from its
last event) and ``kiln_gateway_streams_active`` add what only streams have. Streams are not mirrored in shadow mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools
from prometheus_client import Counter, Gauge, Histogram
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from kiln.infra.gateway_proxy import REQUEST_ID_HEADER, UPSTREAM_HEADER, Gateway, error_response
from kiln.infra.gateway_stats import CHALLENGER, CHAMPION

_PASS_BACK = {"content-type", "x-kiln-model-version", "cache-control"}
_TAIL = 4096  # bytes of the stream kept to read the last event's token count
CLIENT_CLOSED = 499  # nginx's "client closed request"


class StreamMetrics:
    """What only streams have, in the gateway's registry."""

    def __init__(self, registry: object) -> None:
        self.ttft = Histogram("kiln_gateway_stream_ttft_seconds", "Time to first token of generate_stream answers "
                              "(request in to first event out), by upstream.", ["role", "version"],
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=registry)
        self.tokens = Counter("kiln_gateway_stream_tokens_total", "Tokens streamed, by upstream (the model server's "
                              "count in each stream's last event).", ["role", "version"], registry=registry)
        self.active = Gauge("kiln_gateway_streams_active", "Streams being relayed now.", registry=registry)


class _Upstream(asyncio.Protocol):
    """One streamed HTTP/1.1 exchange: the head is awaited, then body chunks are taken as they arrive."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status, self.headers = 0, {}  # type: ignore[var-annotated]
        self.head: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.chunks: asyncio.Queue[bytes | Exception | None] = asyncio.Queue()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"the upstream's answer is not HTTP/1.1 ({exc})"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError("the upstream closed the connection mid-answer"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.put_nowait(bytes(body))

    def on_message_complete(self) -> None:
        self.chunks.put_nowait(None)

    def _fail(self, exc: Exception) -> None:
        if not self.head.done():
            self.head.set_exception(exc)
        self.chunks.put_nowait(exc)  # after a complete message this is never read

    def close(self) -> None:
        if not self.head.done():  # nobody waits for it any more
            self.head.cancel()
        if self.transport is not None:
            self.transport.close()


async def _open(url: str, path: str, headers: dict[str, str], body: bytes, timeout_s: float) -> _Upstream:
    """Send the request on a fresh connection and wait for the answer's head (OSError: never reached)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https" else 80)
    loop = asyncio.get_running_loop()
    _, conn = await asyncio.wait_for(loop.create_connection(_Upstream, host, port,
                                                            ssl=parts.scheme == "https" or None), timeout_s)
    lines = [f"POST {parts.path.rstrip('/')}{path} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close",
             f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items() if k.lower() not in ("host", "content-length", "connection")
              and not any(c in k + v for c in "\r\n")]
    assert conn.transport is not None
    conn.transport.write("\r\n".join(lines).encode("latin-1", errors="replace") + b"\r\n\r\n" + body)
    try:
        await asyncio.wait_for(asyncio.shield(conn.head), timeout_s)
    except BaseException:
        conn.close()
        raise
    return conn


class StreamRelay:
    """``POST /v2/models/{name}[/versions/{v}]/generate_stream`` on a :class:`Gateway`."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.metrics = StreamMetrics(gateway.metrics.registry)

    async def handle(self, request: Request) -> Response:
        gw = self.gateway
        routed = await gw.route(request)
        if isinstance(routed, Response):
            return routed
        role, started = routed.role, time.perf_counter()
        conn, problem = None, ""
        for attempt in (1, 2):
            try:
                conn = await _open(gw.upstreams[role].url, routed.path, routed.headers, routed.body, gw.timeout_s)
                break
            except (OSError, ConnectionError, TimeoutError) as exc:
                problem = f"{exc.__class__.__name__}: {exc}"
                self._count(role, 504 if isinstance(exc, TimeoutError) else 502, time.perf_counter() - started)
                if isinstance(exc, TimeoutError) or attempt == 2:  # a timeout may still be running: not resent
                    break
                gw.metrics.fallbacks.inc()
                role = CHAMPION if role == CHALLENGER else CHALLENGER
        extra = {UPSTREAM_HEADER: role, REQUEST_ID_HEADER: routed.request_id}
        if conn is None:
            return error_response(f"upstream {role} failed: {problem}"[:300], 502, extra)
        passed = {k: v for k, v in conn.headers.items() if k in _PASS_BACK} | extra
        if conn.status != 200:  # refused before any decoding (a budget, a classifier): one JSON body, relayed whole
            content = await self._drain(conn)
            self._count(role, conn.status, time.perf_counter() - started)
            return Response(content, status_code=conn.status, headers=passed)
        return StreamingResponse(self._relay(conn, role, started), headers=passed)

    async def _drain(self, conn: _Upstream) -> bytes:
        parts = []
        try:
            async with asyncio.timeout(self.gateway.timeout_s):
                while isinstance(chunk := await conn.chunks.get(), bytes):
                    parts.append(chunk)
        except TimeoutError:
            pass
        finally:
            conn.close()
        return b"".join(parts)

    async def _relay(self, conn: _Upstream, role: str, started: float) -> AsyncIterator[bytes]:
        label = self.gateway.upstreams[role].label
        ttft, tail, status = None, b"", CLIENT_CLOSED
        self.metrics.active.inc()
        try:
            while True:
                async with asyncio.timeout(self.gateway.timeout_s):  # between two events, as for a whole answer
                    chunk = await conn.chunks.get()
                if chunk is None:
                    break
                if isinstance(chunk, Exception):
                    status = 502
                    yield b"data: " + json.dumps({"error": f"upstream {role} broke the stream: {chunk}"}).encode() \
                        + b"\n\n"
                    return
                if ttft is None:
                    ttft = time.perf_counter() - started
                    self.metrics.ttft.labels(role, label).observe(ttft)
                tail = (tail + chunk)[-_TAIL:]
                yield chunk
            status = 200
        except TimeoutError:
            status = 504
            yield b'data: {"error": "the upstream sent nothing for too long"}\n\n'
        finally:
            conn.close()  # the model server sees the connection go, and stops decoding
            self.metrics.active.dec()
            self._count(role, status, ttft if ttft is not None else time.perf_counter() - started)
            if status == 200:
                self.metrics.tokens.labels(role, label).inc(_output_tokens(tail))

    def _count(self, role: str, status: int, seconds: float) -> None:
        """As :meth:`Gateway._send` counts an answer; a stream the client left is counted, not judged."""
        gw, label = self.gateway, self.gateway.upstreams[role].label
        gw.metrics.requests.labels(role, label, str(status)).inc()
        if status == CLIENT_CLOSED:
            return
        if status < 500:
            gw.metrics.duration.labels(role, label).observe(seconds)
        gw.window.live[role].record(status, seconds)


def _output_tokens(tail: bytes) -> int:
    """The ``output_tokens`` of the last event in ``tail`` (0 when it has none)."""
    last = tail.rstrip().rsplit(b"data: ", 1)[-1]
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        return int(json.loads(last).get("output_tokens", 0))
    return 0
