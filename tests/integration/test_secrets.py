"""Secrets stay secret (issue 12): ``kiln up`` on PostgreSQL (with a password) and S3, then a git push retrains
from a repository that needs credentials; afterwards no secret is on any process's command line (sampled
all along, so a short-lived ``git`` counts), in any file under the project (logs, pid files), in MLflow's
params and tags of every run, logged model and version, or in Prefect's flow runs, logs and deployments.

Positive checks keep it honest: the password did reach the MLflow server (in its environment), the worker
did clone with the credentials (the git server saw them), and the retrain did register a version.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import psutil
import pytest
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from kiln.settings import Settings
from kiln.tasks.core import tags as vocab
from kiln.tasks.data.datasets import DatasetSpec
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.onboard import register_folder
from tests.integration.test_retrain import _git, _write_repo
from tests.integration.test_stack import _records, kiln, stack_env  # noqa: F401 - stack_env is a fixture

USER = "ci"


# ── a private repository on a "forge": git's own HTTP backend behind Basic auth ─────────────────────
class _GitHandler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's names
        self._backend()

    def do_POST(self) -> None:  # noqa: N802
        self._backend()

    def _backend(self) -> None:
        server = self.server
        if self.headers.get("Authorization") != server.expected:
            server.refused += 1
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        server.authorized += 1
        path, _, query = self.path.partition("?")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        env = {"PATH": os.environ["PATH"], "GIT_PROJECT_ROOT": str(server.root), "GIT_HTTP_EXPORT_ALL": "1",
               "PATH_INFO": path, "QUERY_STRING": query, "REQUEST_METHOD": self.command, "REMOTE_USER": USER,
               "CONTENT_TYPE": self.headers.get("Content-Type", ""), "CONTENT_LENGTH": str(len(body)),
               "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
               "GIT_PROTOCOL": self.headers.get("Git-Protocol", "")}
        out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True, check=True).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        status, headers = 200, []
        for line in head.decode().splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers.append((name, value.strip()))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class GitServer(ThreadingHTTPServer):
    def __init__(self, root: Path, token: str) -> None:
        super().__init__(("127.0.0.1", 0), _GitHandler)
        self.root = root
        self.expected = "Basic " + base64.b64encode(f"{USER}:{token}".encode()).decode()
        self.authorized = self.refused = 0

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


# ── where secrets could end up ───────────────────────────────────────────────────────────────────────
class CommandLines(threading.Thread):
    """Every process's command line, read every 0.2 s until stopped: what ``ps`` shows any user."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__(daemon=True)
        self.secrets, self.leaks, self.rounds, self.done = secrets, {}, 0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for proc in psutil.process_iter(["pid", "cmdline"]):
                line = " ".join(proc.info["cmdline"] or [])
                if any(secret in line for secret in self.secrets):
                    self.leaks[proc.info["pid"]] = line
            self.rounds += 1
            self.done.wait(0.2)


def files_holding(root: Path, secrets: list[str]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{path}: {s[:6]}…" for s in secrets if s.encode() in data]
    return found


def _text(entity: object) -> str:
    """An MLflow entity with everything it holds (nested entities too), as JSON."""
    return json.dumps(entity, default=lambda o: getattr(o, "__dict__", None) or str(o), sort_keys=True)


def mlflow_records(client: MlflowClient) -> dict[str, list[str]]:
    """Every experiment, run (params, tags), logged model, registered model, version and webhook, as text."""
    experiments = client.search_experiments(view_type=ViewType.ALL)
    ids = [e.experiment_id for e in experiments]
    runs = client.search_runs(ids, run_view_type=ViewType.ALL, max_results=1000)
    assert [r for r in runs if r.data.params] and [r for r in runs if r.data.tags]  # there was something to read
    models = client.search_registered_models()
    versions = [v for m in models for v in client.search_model_versions(f"name = '{m.name}'")]
    records = {"experiments": experiments, "runs": runs, "logged models": client.search_logged_models(ids),
               "registered models": models, "versions": versions, "webhooks": client.list_webhooks()}
    return {kind: [_text(e) for e in entities] for kind, entities in records.items()}


def prefect_records(api: str) -> dict[str, list[str]]:
    """Every flow run (parameters), task run, log line, deployment, artifact, variable and block in Prefect."""
    out = {}
    with httpx.Client(base_url=api, timeout=30) as http:
        for kind in ("flow_runs", "task_runs", "logs", "deployments", "artifacts", "variables", "block_documents"):
            rows, offset = [], 0
            while True:
                page = http.post(f"/{kind}/filter", json={"limit": 200, "offset": offset})
                page.raise_for_status()
                rows += page.json()
                if len(page.json()) < 200:
                    break
                offset += 200
            out[kind] = [json.dumps(row) for row in rows]
    return out


def wait_final(api: str, flow_run_id: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        run = httpx.get(f"{api}/flow_runs/{flow_run_id}", timeout=30).json()
        if run["state"] and run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        assert time.monotonic() < deadline, f"flow run {flow_run_id} still {run['state']} after {timeout_s:.0f}s"
        time.sleep(2)


def push(webhook_url: str, secret: str, sha: str) -> httpx.Response:
    body = json.dumps({"ref": "refs/heads/main", "before": "0" * 40, "after": sha,
                       "repository": {"full_name": "acme/models"}, "head_commit": {"id": sha}}).encode()
    headers = {"Content-Type": "application/json", "X-GitHub-Event": "push", "X-GitHub-Delivery": str(uuid.uuid4()),
               "X-Hub-Signature-256": "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()}
    return httpx.post(f"{webhook_url}/hooks/github", content=body, headers=headers, timeout=60)


# ── the test ─────────────────────────────────────────────────────────────────────────────────────────
@pytest.fixture
def private_repo(tmp_path):
    """A bare repository with a training config, served over HTTP to ``ci:<token>`` only."""
    token = f"repo-token-{uuid.uuid4().hex}"
    root, work = tmp_path / "forge", tmp_path / "work"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(root / "models.git")], check=True)
    # Partial clones, as GitHub serves them: the worker's lazy blob fetch needs the credentials too.
    _git(root / "models.git", "config", "uploadpack.allowFilter", "true")
    _git(tmp_path, "clone", "-q", str(root / "models.git"), str(work))
    _write_repo(work, "tiny-retrained")
    _git(work, "add", ".")
    _git(work, "commit", "-qm", "reviews and a training config")
    _git(work, "push", "-q", "origin", "HEAD:main")
    server = GitServer(root, token)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, token, _git(work, "rev-parse", "HEAD")
    finally:
        server.shutdown()
        server.server_close()


def test_no_secret_leaves_settings_for_argv_logs_files_mlflow_or_prefect(stack_env, postgres, seaweedfs,  # noqa: F811
                                                                          tiny_models, private_repo, tmp_path,
                                                                          monkeypatch):
    git, token, sha = private_repo
    monkeypatch.chdir(tmp_path)
    password, webhook_secret = f"db-pw-{uuid.uuid4().hex}", f"hook-{uuid.uuid4().hex}"
    others = {"KILN_GATEWAY_TOKEN": f"gw-{uuid.uuid4().hex}", "KILN_MLFLOW_WEBHOOK_SECRET": f"mh-{uuid.uuid4().hex}"}
    secrets = [password, token, webhook_secret, seaweedfs.secret_key, *others.values()]
    public_url = git.url("models.git")
    # The test cluster trusts loopback, so any password connects: the check is where this one travels.
    database_url = f"postgresql://{postgres.user}:{password}@{postgres.host}:{postgres.port}/kiln_secrets"
    bucket = seaweedfs.create_bucket()
    env = stack_env | seaweedfs.env() | others | {
        "KILN_DATABASE_URL": database_url, "KILN_S3_BUCKET": bucket, "KILN_S3_ENDPOINT_URL": seaweedfs.endpoint,
        "KILN_REPO": public_url.replace("http://", f"http://{USER}:{token}@"), "KILN_WEBHOOK_SECRET": webhook_secret,
        "KILN_WEBHOOK_REPOSITORY": "acme/models", "KILN_BENCH_SECONDS": "0.2",
        "KILN_TRAIN_MODELS": "tiny-retrained"}  # a new name: a pushed config may create only listed ones
    mlflow_url, api = (f"http://127.0.0.1:{env['KILN_MLFLOW_PORT']}",
                       f"http://127.0.0.1:{env['KILN_PREFECT_PORT']}/api")
    outputs = []
    up = kiln(env, "up")
    outputs.append(up.stdout + up.stderr)
    sampler = CommandLines(secrets)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        mlflow_pid = _records(env)["mlflow"]["pid"]
        assert psutil.Process(mlflow_pid).environ()["MLFLOW_BACKEND_STORE_URI"].endswith(
            f":{password}@{postgres.host}:{postgres.port}/kiln_secrets")  # it got there, by the environment
        client_settings = Settings(home=tmp_path / "client", tracking_uri=mlflow_url)
        client = registry.connect(client_settings)  # also MLflow's fluent API, which registering uses
        register_folder(client, client_settings, tiny_models["bert"], "tiny", "sequence-classification",
                        DatasetSpec(limit=50))

        # A user passing credentials on the command line is refused: the flow run would store them.
        refused = kiln(env | {"PREFECT_API_URL": api}, "trigger", "retrain", "--sha", sha, "--repo", env["KILN_REPO"])
        outputs.append(refused.stdout + refused.stderr)
        assert refused.returncode == 2 and "KILN_REPO_TOKEN" in outputs[-1], outputs[-1]

        sampler.start()
        answer = push(f"http://127.0.0.1:{env['KILN_WEBHOOK_PORT']}", webhook_secret, sha)
        assert answer.status_code == 202, answer.text
        run = wait_final(api, answer.json()["flow_run_id"], timeout_s=600)
        assert run["state"]["type"] == "COMPLETED", run["state"]
        assert run["parameters"]["params"]["repo"] == public_url
        assert git.authorized > 0  # the worker cloned with the credentials KILN_REPO gave it
        version = client.get_model_version("tiny-retrained", "1")
        assert version.tags[vocab.GIT_REPO] == public_url and version.tags[vocab.GIT_SHA] == sha

        records = mlflow_records(client) | prefect_records(api)
        # What was read holds what was recorded: the repository (without credentials), the flow's log lines.
        assert [r for r in records["versions"] if public_url in r] and [r for r in records["flow_runs"]
                                                                        if public_url in r]
        assert [r for r in records["logs"] if "registered tiny-retrained v1" in r], records["logs"][-5:]
        leaks = {where: [r for r in rows if any(s in r for s in secrets)] for where, rows in records.items()}
        assert not {where: found for where, found in leaks.items() if found}
    finally:
        down = kiln(env, "down")
        sampler.done.set()
        if sampler.is_alive():
            sampler.join()
    outputs.append(down.stdout + down.stderr)
    assert sampler.rounds > 10 and not sampler.leaks, sampler.leaks
    assert (Path(env["KILN_HOME"]) / "stack" / "logs" / "mlflow.log").stat().st_size > 0
    assert not files_holding(tmp_path, secrets)  # logs, pid files, env.sh, checkouts, caches, artifacts
    assert not [out for out in outputs if any(s in out for s in secrets)]
