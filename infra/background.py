"""Run an ASGI app with uvicorn on loopback in a background thread (tests, benchmarks, the local stack).

The socket is bound before uvicorn starts, on port 0 unless a port is given, so two servers never race
for a "free" port.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn


class BackgroundServer:
    """An ASGI app served by uvicorn in a daemon thread; ``url`` is its base address."""

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # asyncio only disables Nagle on sockets it creates itself (proto IPPROTO_TCP); without this, each
        # response written in two parts waits ~40 ms for the client's delayed ACK. Accepted sockets inherit it.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        # Keep-alive longer than any client pool's idle time: a server closing a pooled connection just as
        # a client reuses it is a spurious failure that has nothing to do with what is being tested.
        config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_keep_alive=30,
                                access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name=f"uvicorn-{self.port}")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> BackgroundServer:
        """Start serving; returns once the app's startup (lifespan) has finished."""
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server on {self.url} did not start within {timeout_s:.0f}s")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask uvicorn to finish in-flight requests and exit, then close the socket."""
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout_s)
        if self.thread.is_alive():  # in-flight work did not finish in time; stop waiting for it
            self.server.force_exit = True
            self.thread.join(timeout_s)
        self.sock.close()


@contextmanager
def serving(app: Any, **kwargs: Any) -> Iterator[BackgroundServer]:
    """``with serving(app) as server: httpx.get(server.url + ...)``; always shuts the server down."""
    server = BackgroundServer(app, **kwargs)
    server.start()
    try:
        yield server
    finally:
        server.stop()
