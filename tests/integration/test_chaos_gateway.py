"""Chaos, serving: a model server killed with SIGKILL under steady load costs no client request through the gateway.

Two real model servers (the model server's own code over a stand-in engine, each its own process on loopback) sit
behind a gateway at a 50 % split; a few client threads keep requests flowing while one server is killed. Requests
the gateway sent to the dead server (refused connections, or connections dropped before an answer) are answered
by the other upstream, counted as the dead side's errors and as fallbacks; the clients see only 200s.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from kiln.infra.background import serving
from kiln.infra.gateway import create_app as gateway_app
from kiln.infra.gateway_proxy import Gateway, Upstream

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "chaos-gateway-token"
ROLES = ("champion", "challenger")
BODY = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["great day"]}]}
SERVE = """
import sys, uvicorn
from kiln.infra.server import create_app
from tests.fakes import FastFake
app = create_app({"tiny": FastFake("positive")})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="error", timeout_keep_alive=30)
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_ready(url: str, process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the model server for {url} exited with {process.returncode}"
        try:
            if httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"the model server at {url} was not ready within {timeout_s:g} s")


class Load:
    """Client threads sending infer requests through the gateway until stopped; every non-200 is a failure."""

    def __init__(self, url: str, threads: int = 4) -> None:
        self.url, self.done, self.failures = url, Counter(), []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=15) as client:
            while not self._stop.is_set():
                try:
                    answer = client.post("/v2/models/tiny/infer", json=BODY)
                    self.done[answer.headers.get("x-kiln-upstream")] += 1
                    if answer.status_code != 200:
                        self.failures.append(f"{answer.status_code}: {answer.text[:200]}")
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))

    def total(self) -> int:
        return sum(self.done.values())

    def wait_for(self, count: int, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.total() < count:
            assert time.monotonic() < deadline, f"only {self.total()} requests answered in {timeout_s:g} s"
            time.sleep(0.01)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(20)


@pytest.mark.parametrize("killed", ROLES)
def test_a_model_server_killed_under_load_costs_no_client_request(killed):
    ports = {role: _free_port() for role in ROLES}
    servers = {role: subprocess.Popen([sys.executable, "-c", SERVE, str(port)], cwd=ROOT, start_new_session=True)
               for role, port in ports.items()}
    urls = {role: f"http://127.0.0.1:{port}" for role, port in ports.items()}
    try:
        for role in ROLES:
            _wait_ready(urls[role], servers[role])
        gateway = Gateway(Upstream(urls["champion"]), Upstream(urls["challenger"]), TOKEN, weight=50, timeout_s=10,
                          poll_s=0.5)
        with serving(gateway_app(gateway)) as front, Load(front.url) as load:
            load.wait_for(200)
            servers[killed].send_signal(signal.SIGKILL)
            servers[killed].wait(10)
            at_kill = load.total()
            load.wait_for(at_kill + 300)  # well past the kill: every request meets the dead server or its absence
        assert load.failures == [], f"{len(load.failures)} client requests failed, e.g. {load.failures[:3]}"
        window = gateway.state()["window"]
        survivor = next(role for role in ROLES if role != killed)
        assert window[killed]["errors"] >= 1  # counted against the side that failed...
        assert window[survivor]["errors"] == 0 and window[survivor]["requests"] >= 150  # ...answered by the other
        assert gateway.metrics.registry.get_sample_value("kiln_gateway_fallbacks_total") == window[killed]["errors"]
    finally:
        for process in servers.values():
            if process.poll() is None:
                process.kill()
            process.wait(10)
