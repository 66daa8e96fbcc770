"""The gateway's HTTP/1.1 client against raw loopback servers: framing, keep-alive, and what each failure means."""

from __future__ import annotations

import asyncio
import socket

import pytest

from kiln.infra.upstream import Answer, Failure, UpstreamClient


async def _serve(handler) -> tuple[asyncio.AbstractServer, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def _read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_keep_alive_reuses_one_connection_and_sends_body_and_headers():
    seen: list[tuple[bytes, bytes]] = []
    connections = 0

    async def handler(reader, writer):
        nonlocal connections
        connections += 1
        while True:
            try:
                head, body = await _read_request(reader)
            except asyncio.IncompleteReadError:
                break
            seen.append((head, body))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Kiln-Model-Version: 3\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        writer.close()

    async def main():
        server, url = await _serve(handler)
        async with server, UpstreamClient() as client:
            answers = [await client.request("POST", f"{url}/v2/models/m/infer?x=1", headers={"X-A": "b"},
                                            body=b'{"n": %d}' % i) for i in range(3)]
            answers.append(await client.request("POST", f"{url}/feedback", json={"k": "v"}))
        return answers

    answers = run(main())
    assert [a.status for a in answers] == [200] * 4
    assert answers[0].content == b'{"n": 0}' and answers[2].content == b'{"n": 2}'
    assert answers[0].headers["x-kiln-model-version"] == "3"  # header names lower case
    assert answers[3].content == b'{"k":"v"}'
    assert connections == 1
    head = seen[0][0].decode()
    assert head.startswith("POST /v2/models/m/infer?x=1 HTTP/1.1\r\n")
    assert "X-A: b" in head and "Host: 127.0.0.1:" in head


def test_a_header_with_a_line_break_is_never_sent():
    seen: list[bytes] = []

    async def handler(reader, writer):
        head, _ = await _read_request(reader)
        seen.append(head)
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()
        writer.close()

    async def main():
        server, url = await _serve(handler)
        async with server, UpstreamClient() as client:
            return await client.request("GET", f"{url}/x", headers={"X-Ok": "1", "X-Bad": "a\r\nX-Injected: 1"})

    answer = run(main())
    assert isinstance(answer, Answer) and answer.status == 204
    assert b"X-Ok: 1" in seen[0] and b"X-Injected" not in seen[0]


def test_chunked_and_close_delimited_answers_are_read_whole():
    async def chunked(reader, writer):
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def until_close(reader, writer):
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    async def main():
        out = []
        for handler in (chunked, until_close):
            server, url = await _serve(handler)
            async with server, UpstreamClient() as client:
                out.append(await client.request("GET", f"{url}/"))
        return out

    first, second = run(main())
    assert first.content == b"hello world" and second.content == b"all of it"


def test_a_pooled_connection_closed_while_idle_is_retried_on_a_fresh_one():
    connections = 0

    async def handler(reader, writer):
        nonlocal connections
        connections += 1
        await _read_request(reader)
        # Keep-alive by the protocol, yet closed right after: the next request finds the pooled socket dead.
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    async def main():
        server, url = await _serve(handler)
        async with server, UpstreamClient() as client:
            first = await client.request("GET", f"{url}/")
            await asyncio.sleep(0.1)
            return first, await client.request("GET", f"{url}/")

    first, second = run(main())
    assert first.status == second.status == 200 and connections == 2


def test_failures_say_whether_the_request_left():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]

    async def silent(reader, writer):
        await _read_request(reader)
        await asyncio.sleep(5)

    async def drops(reader, writer):
        await _read_request(reader)
        writer.transport.abort()

    async def main():
        async with UpstreamClient(timeout_s=0.5) as client:
            refused = await client.request("POST", f"http://127.0.0.1:{closed_port}/v2/models/m/infer", body=b"{}")
            server, url = await _serve(silent)
            async with server:
                slow = await client.request("POST", f"{url}/", body=b"{}")
            server, url = await _serve(drops)
            async with server:
                dropped = await client.request("POST", f"{url}/", body=b"{}")
        return refused, slow, dropped

    refused, slow, dropped = run(main())
    assert isinstance(refused, Failure) and refused.kind == "connect" and refused.status == 502
    assert isinstance(slow, Failure) and slow.kind == "timeout" and slow.status == 504
    assert isinstance(dropped, Failure) and dropped.kind == "other" and dropped.status == 502


def test_a_closed_client_refuses_and_a_bad_url_is_named():
    client = UpstreamClient()
    with pytest.raises(RuntimeError, match="not open"):
        run(client.request("GET", "http://127.0.0.1:1/"))

    async def main():
        async with UpstreamClient() as open_client:
            await open_client.request("GET", "ftp://example/")

    with pytest.raises(ValueError, match="not an http"):
        run(main())


def test_paths_go_out_percent_encoded_and_escapes_already_there_unchanged():
    lines: list[bytes] = []

    async def handler(reader, writer):
        while True:
            try:
                head, _ = await _read_request(reader)
            except asyncio.IncompleteReadError:
                break
            lines.append(head.split(b"\r\n", 1)[0])
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
        writer.close()

    async def main():
        server, url = await _serve(handler)
        async with server, UpstreamClient() as client:
            for path in ("/v2/models/\u00e0 b\x1f/ready", "/v2/models/%C3%A0%20b/ready?x=%2F"):
                assert (await client.request("GET", url + path)).status == 200

    run(main())
    assert lines == [b"GET /v2/models/%C3%A0%20b%1F/ready HTTP/1.1", b"GET /v2/models/%C3%A0%20b/ready?x=%2F HTTP/1.1"]
