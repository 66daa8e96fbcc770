"""``kiln up | status | down`` as a user runs them: real servers on free loopback ports, a project folder in tmp."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from kiln.errors import ConfigError
from kiln.infra.stack import Stack, StackError
from kiln.infra.stack_databases import database_urls
from kiln.infra.stack_services import Service, http_ok
from tests.stores import free_port

ROOT = Path(__file__).resolve().parents[2]
SERVICES = {"prefect", "mlflow", "webhooks", "registry-events", "flows"}


@pytest.fixture
def stack_env(tmp_path) -> dict[str, str]:
    """A user's environment: this checkout's code, a fresh project folder, every port free."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KILN_", "PREFECT_", "MLFLOW_"))}
    return env | {
        "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "KILN_HOME": str(tmp_path / ".kiln"), "KILN_PREFECT_PORT": str(free_port()),
        "KILN_MLFLOW_PORT": str(free_port()), "KILN_WEBHOOK_PORT": str(free_port()),
        "COLUMNS": "200",  # rich wraps tables at 80 columns when stdout is not a terminal
    }


def kiln(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kiln", *args], env=env, cwd=Path(env["KILN_HOME"]).parent,
                          capture_output=True, text=True, timeout=timeout)


def _records(env: dict[str, str]) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (Path(env["KILN_HOME"]) / "stack").glob("*.pid")}


def _group_pids(pgid: int) -> set[int]:
    found = set()
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                found.add(proc.pid)
        except OSError:
            continue
    return found


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return False
    except ConnectionRefusedError:
        return True


def test_up_twice_then_down_twice_leaves_no_process_or_port_behind(stack_env):
    ports = {name: int(stack_env[f"KILN_{name.upper()}_PORT"]) for name in ("prefect", "mlflow", "webhook")}
    up = kiln(stack_env, "up")
    assert up.returncode == 0, up.stdout + up.stderr
    records = _records(stack_env)
    assert set(records) == SERVICES
    pids = set().union(*(_group_pids(rec["pid"]) for rec in records.values()))
    assert len(pids) >= len(SERVICES)
    for url in (f"http://127.0.0.1:{ports['prefect']}", f"http://127.0.0.1:{ports['mlflow']}",
                f"http://127.0.0.1:{ports['webhook']}/hooks/"):
        assert url in up.stdout
    assert f"export PREFECT_API_URL=http://127.0.0.1:{ports['prefect']}/api" in up.stdout
    env_file = Path(stack_env["KILN_HOME"]) / "stack" / "env.sh"
    assert f"KILN_TRACKING_URI=http://127.0.0.1:{ports['mlflow']}" in env_file.read_text()
    # The default stores are the embedded ones: what `kiln demo` wrote is what the UI shows.
    assert (Path(stack_env["KILN_HOME"]) / "mlflow.db").is_file()

    status = kiln(stack_env, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.count("healthy") == len(SERVICES)

    again = kiln(stack_env, "up")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("already running") == len(SERVICES)
    assert {k: r["pid"] for k, r in _records(stack_env).items()} == {k: r["pid"] for k, r in records.items()}

    first, second = kiln(stack_env, "down"), kiln(stack_env, "down")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "stack stopped" in first.stdout and "nothing was running" in second.stdout
    assert first.stdout.index("stopped flows") < first.stdout.index("stopped mlflow") < first.stdout.index(
        "stopped prefect")  # reverse start order
    assert _records(stack_env) == {}
    assert [pid for pid in pids if not _gone(pid)] == []
    assert all(_refused(port) for port in ports.values())
    assert kiln(stack_env, "status").returncode == 3


def test_up_on_postgresql_and_s3(stack_env, postgres, seaweedfs):
    """The configured stores: Prefect and MLflow on PostgreSQL (two databases), MLflow's artifacts in S3."""
    bucket = f"kiln-up-{os.getpid()}"
    env = stack_env | seaweedfs.env() | {"KILN_DATABASE_URL": postgres.url("kiln_up"), "KILN_S3_BUCKET": bucket,
                                        "KILN_S3_ENDPOINT_URL": seaweedfs.endpoint}
    up = kiln(env, "up")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "created database kiln_up" in up.stdout and "created database kiln_up_prefect" in up.stdout
        assert f"created bucket s3://{bucket}" in up.stdout
        assert kiln(env, "status").returncode == 0

        with postgres.connect("kiln_up_prefect") as conn:
            served = conn.execute("SELECT name FROM deployment").fetchall()
        assert ("kiln-optimize",) in served
        client = MlflowClient(f"http://127.0.0.1:{env['KILN_MLFLOW_PORT']}")
        run = client.create_run(client.create_experiment("s3-check"))
        client.log_text(run.info.run_id, "proxied to S3", "hello.txt")
        keys = [o["Key"] for o in seaweedfs.client().list_objects_v2(Bucket=bucket).get("Contents", [])]
        assert [k for k in keys if k.startswith("mlflow/") and k.endswith("/hello.txt")], keys
        with postgres.connect("kiln_up") as conn:
            assert conn.execute("SELECT count(*) FROM runs").fetchone() == (1,)
    finally:
        down = kiln(env, "down")
    assert down.returncode == 0, down.stderr
    assert _records(env) == {}


def test_up_refuses_a_taken_port_before_starting_anything(stack_env):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", int(stack_env["KILN_MLFLOW_PORT"])))
        squatter.listen()
        up = kiln(stack_env, "up", timeout=120)
    assert up.returncode == 2, up.stdout + up.stderr
    assert f"port {stack_env['KILN_MLFLOW_PORT']}" in up.stderr and "KILN_MLFLOW_PORT" in up.stderr
    assert f"pid {os.getpid()}" in up.stderr  # who holds it
    assert _records(stack_env) == {}
    assert _refused(int(stack_env["KILN_PREFECT_PORT"]))


def test_a_failed_start_names_its_log_and_stops_what_was_started(tmp_path):
    web = free_port()
    stack = Stack(tmp_path / "stack", [
        Service("web", [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(web)], dict(os.environ),
                port=web, setting="WEB_PORT", probe=http_ok(f"http://127.0.0.1:{web}/"), timeout_s=30),
        Service("broken", [sys.executable, "-c", "import sys; print('no database'); sys.exit(4)"], dict(os.environ),
                needs=("web",)),
    ])
    with pytest.raises(StackError, match=r"(?s)broken exited with status 4 .*broken\.log.*no database"):
        stack.up()
    assert list((tmp_path / "stack").glob("*.pid")) == []
    assert _refused(web)
    assert stack.down() == []


def test_database_url_becomes_two_databases_one_per_server():
    mlflow_url, prefect_url = database_urls("postgres://kiln:s%40cret@db.internal:5433/kiln?sslmode=require")
    assert mlflow_url == "postgresql+psycopg://kiln:s%40cret@db.internal:5433/kiln?sslmode=require"
    assert prefect_url == "postgresql+asyncpg://kiln:s%40cret@db.internal:5433/kiln_prefect?ssl=require"
    with pytest.raises(ConfigError, match="must name a PostgreSQL database"):
        database_urls("mysql://kiln@db/kiln")
