"""The chaos suite's harness: real processes, killed from outside at moments observed from outside.

Nothing here hooks into Kiln: a flow runs as a user runs it (the ``kiln`` command in a subprocess), and a
*stage boundary* is whatever another process can see — a finished entry appearing in ``KILN_HOME/cache``, a
version appearing in the registry. The process group is then sent SIGKILL (no handler runs, nothing is
flushed), and the test runs the same command again and compares what it finds.

Every wait is bounded: a harness call that would hang fails the test with what it was waiting for.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KILN = [sys.executable, "-m", "kiln"]  # the `kiln` command, from the interpreter running the tests


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], object], what: str, timeout_s: float = 60.0, every_s: float = 0.05) -> object:
    """``condition()``'s first truthy value, polled every ``every_s``; AssertionError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}"
        time.sleep(every_s)


# ---- processes ---------------------------------------------------------------------------------------------------


class Proc:
    """A subprocess in its own process group, its output in ``log`` (read back when it fails)."""

    def __init__(self, argv: Sequence[str], log: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.argv, self.log = list(argv), log
        with log.open("ab") as out:
            self.popen = subprocess.Popen(self.argv, env=os.environ | (env or {}), cwd=cwd or ROOT, stdout=out,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL the whole group (the flow and anything it started) and reap it."""
        self._signal(signal.SIGKILL)
        self.popen.wait(15)

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``: for clean-up, whatever state the process is in."""
        if self.alive():
            self._signal(signal.SIGTERM)
            try:
                self.popen.wait(grace_s)
                return
            except subprocess.TimeoutExpired:
                pass
        self._signal(signal.SIGKILL)
        self.popen.wait(15)

    def wait(self, timeout_s: float) -> int:
        """The exit code; the group killed and AssertionError with the log's tail after ``timeout_s``."""
        try:
            return self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"{self.argv[:4]} still running after {timeout_s:.0f} s:\n{self.tail()}") from None

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass


def kill_when(proc: Proc, boundary: Callable[[], object], what: str, timeout_s: float = 60.0,
              every_s: float = 0.02) -> object:
    """SIGKILL ``proc`` as soon as ``boundary()`` is truthy; its value. Fails if ``proc`` ends first."""

    def reached() -> object:
        value = boundary()
        if not value and not proc.alive():
            raise AssertionError(f"{proc.argv[:4]} ended ({proc.popen.returncode}) before {what}:\n{proc.tail()}")
        return value

    try:
        value = wait_for(reached, what, timeout_s, every_s=every_s)
    except AssertionError:
        proc.stop()
        raise
    proc.kill()
    return value


def _dead(proc: Proc) -> bool:
    if not proc.alive():
        raise AssertionError(f"{proc.argv[:4]} exited with {proc.popen.returncode}:\n{proc.tail()}")
    return False


# ---- what a boundary looks like from outside ---------------------------------------------------------------------


def finished_stages(cache_dir: Path) -> dict[str, int]:
    """Finished stage-cache entries: key -> mtime (ns) of its ``result.json``. A stage run again replaces its
    folder (a new ``result.json``), so equal stamps before and after a resume mean "reused, not repeated"."""
    if not cache_dir.is_dir():
        return {}
    found = {}
    for entry in cache_dir.iterdir():
        result = entry / "result.json"
        if not entry.name.startswith(".") and result.is_file():
            found[entry.name] = result.stat().st_mtime_ns
    return found


def versions(client, name: str) -> list[str]:  # noqa: ANN001 - an MlflowClient
    try:
        return sorted((str(v.version) for v in client.search_model_versions(f"name='{name}'")), key=int)
    except Exception:  # noqa: BLE001 - the store may be mid-write by the process under test
        return []


# ---- Prefect -----------------------------------------------------------------------------------------------------


def prefect_env() -> dict[str, str]:
    """The session's Prefect test server for a subprocess: its flow runs land where the test can read them."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    return {"PREFECT_API_URL": url} if url else {}


def flow_run_states(flow_name: str, since: datetime | None = None, **params: str) -> list[str]:
    """State types (``RUNNING``, ``CRASHED``, ...) of ``flow_name``'s runs created after ``since`` whose parameters
    have the values given (``model="tiny"``: ``params.model == "tiny"``), oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                     sort=FlowRunSort.START_TIME_ASC)
    return [r.state.type.value if r.state else "NONE" for r in runs if _matches(r, since, params)]


def task_states(flow_name: str, since: datetime | None = None, **params: str) -> dict[str, str]:
    """Task name -> state type of the newest matching flow run's task runs (``{"review": "COMPLETED"}``)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                     sort=FlowRunSort.START_TIME_DESC)
        newest = next((r for r in runs if _matches(r, since, params)), None)
        if newest is None:
            return {}
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[newest.id])))
    return {t.name.rsplit("-", 1)[0]: t.state.type.value if t.state else "NONE" for t in tasks}


def _matches(run, since: datetime | None, wanted: dict[str, str]) -> bool:  # noqa: ANN001 - a Prefect FlowRun
    given = run.parameters.get("params", run.parameters)
    if since is not None and (run.created is None or run.created < since):
        return False
    return isinstance(given, dict) and all(str(given.get(k)) == v for k, v in wanted.items())


def now() -> datetime:
    """A ``since`` for :func:`flow_run_states`: runs created from now on (the Prefect server shares this clock)."""
    return datetime.now(UTC)


# ---- an S3 store of the test's own (SeaweedFS), to stop and start again -----------------------------------------


class OwnSeaweed:
    """``weed mini`` (S3 on loopback) that the test may kill and start again on the same ports and data folder:
    the session's store (:mod:`tests.stores`) is shared, this one is the test's alone. ``start()`` returns False
    where the binary is missing or the server does not come up (the test then skips)."""

    def __init__(self, root: Path) -> None:
        import json
        import uuid

        from tests.stores import weed_binary

        self.root, self.weed = root, weed_binary()
        self.access_key, self.secret_key = "kilnaccess", uuid.uuid4().hex
        (root / "data").mkdir(parents=True, exist_ok=True)
        (root / "creds.json").write_text(json.dumps({"identities": [{
            "name": "kiln", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        ports = {name: free_port() for name in ("master", "volume", "filer", "s3", "admin")}
        self.flags = [f"-{name}.port={port}" for name, port in ports.items()]
        self.flags += [f"-{name}.port.grpc={free_port()}" for name in ports]
        self.endpoint = f"http://127.0.0.1:{ports['s3']}"
        self.proc: Proc | None = None

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": self.endpoint}

    def client(self):  # noqa: ANN201
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key)

    def start(self, timeout_s: float = 60.0) -> bool:
        if self.weed is None:
            return False
        argv = [self.weed, "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-s3.config={self.root / 'creds.json'}", *self.flags, "-webdav=false", "-admin.ui=false",
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false", "-master.volumeSizeLimitMB=64",
                f"-filer.localSocket={self.root / 'filer.sock'}", f"-s3.localSocket={self.root / 's3.sock'}"]
        self.proc = Proc(argv, self.root / "weed.log")
        try:
            wait_for(lambda: self._ready() or _dead(self.proc), "SeaweedFS S3", timeout_s, every_s=0.3)
        except AssertionError:
            self.proc.stop()
            return False
        return True

    def _ready(self) -> bool:
        try:
            self.client().list_buckets()
            return True
        except Exception:  # noqa: BLE001 - not up yet, whatever the client says
            return False

    def objects(self, bucket: str) -> int:
        try:
            return self.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0)
        except Exception:  # noqa: BLE001 - stopped or starting: nothing to count
            return 0

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
