"""A real Prometheus on loopback for the session: scrapes whatever a test points it at, every second.

Debian's ``prometheus`` package (``infra/ci/services.sh`` installs it); tests that ask for the ``prometheus``
fixture skip, saying so, where the binary is missing. The servers a test starts have random ports, so the
scrape targets are a file (``file_sd_configs``) that :meth:`Prometheus.scrape` rewrites; Prometheus notices the
change at once. Each call labels its targets ``stack=<id>``, so queries can keep one test's series apart
from an earlier one's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.stores import _stop_group, _wait, free_port

SCRAPE_INTERVAL = "1s"
CONFIG = """\
global:
  scrape_interval: {interval}
  scrape_timeout: {interval}
  evaluation_interval: {interval}
scrape_configs:
  - job_name: kiln
    file_sd_configs:
      - files: ["{targets}"]
        refresh_interval: {interval}
"""


@dataclass
class Prometheus:
    url: str
    targets_file: Path

    def scrape(self, urls: list[str], timeout_s: float = 15.0) -> str:
        """Scrape ``urls`` (base URLs; their ``/metrics``) from now on, instead of earlier targets; waits until
        every one has been scraped once. Returns the selector that matches only their series."""
        stack = uuid.uuid4().hex[:8]
        hosts = [u.split("://", 1)[-1].rstrip("/") for u in urls]
        tmp = self.targets_file.with_suffix(".tmp")
        tmp.write_text(json.dumps([{"targets": hosts, "labels": {"stack": stack}}]))
        tmp.replace(self.targets_file)  # atomic: Prometheus never reads half a file
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"{self.url}/api/v1/targets?state=active", timeout=5) as answer:
                active = json.load(answer)["data"]["activeTargets"]
            up = {t["labels"]["instance"] for t in active
                  if t["labels"].get("stack") == stack and t["health"] == "up"}
            if up >= set(hosts):
                return f'stack="{stack}"'
            time.sleep(0.2)
        raise RuntimeError(f"Prometheus did not scrape {hosts} within {timeout_s:g} s: {active}")


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


@pytest.fixture(scope="session")
def prometheus():
    """``prometheus`` on a free loopback port with a temp config and storage; stopped and removed after."""
    binary = prometheus_binary()
    if binary is None:
        pytest.skip("Prometheus is not installed (Debian's prometheus package); run infra/ci/services.sh")
    root = Path(tempfile.mkdtemp(prefix="kiln-prometheus-"))
    targets = root / "targets.json"
    targets.write_text("[]")
    (root / "prometheus.yml").write_text(CONFIG.format(interval=SCRAPE_INTERVAL, targets=targets))
    port = free_port()
    log = root / "prometheus.log"
    argv = [binary, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h", "--log.level=warn"]
    with log.open("wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    server = Prometheus(f"http://127.0.0.1:{port}", targets)
    try:
        _wait(lambda: urllib.request.urlopen(f"{server.url}/-/ready", timeout=2).status == 200, "Prometheus", 60, log)
        yield server
    finally:
        _stop_group(proc)
        shutil.rmtree(root, ignore_errors=True)
