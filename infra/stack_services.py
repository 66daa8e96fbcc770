"""What ``kiln up`` runs: the services of the local stack, their environment, and how each says it is ready.

Prefect server, MLflow server, webhook receiver, registry poller and the served flows, bound to
``settings.host``. By default the stores are the embedded ones (``<home>/mlflow.db``, ``<home>/artifacts``,
Prefect's SQLite under ``<home>/prefect``), so ``kiln up`` shows what ``kiln demo`` made. With
``database_url`` set, MLflow and Prefect use two databases on that PostgreSQL server
(:mod:`kiln.infra.stack_databases`); with ``s3_bucket`` set, MLflow proxies artifacts to S3.

Secrets travel in each service's environment, never on its command line (``ps`` shows that to every user):
the database URLs as ``MLFLOW_BACKEND_STORE_URI`` / ``PREFECT_SERVER_DATABASE_CONNECTION_URL``, only to the
server that needs them; S3 keys, webhook secrets and tokens as the variables they were given in.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from kiln.infra.stack_databases import database_urls
from kiln.settings import Settings

SERVED_DEPLOYMENT = "optimize/kiln-optimize"  # polled by `kiln serve-flows` once the flows are served
Probe = Callable[[float], bool]  # readiness, given the time (epoch s) the service's process started


@dataclass(frozen=True)
class Service:
    """One long-running process of the stack."""

    name: str
    argv: list[str]
    env: dict[str, str]
    url: str | None = None  # what a user opens
    port: int | None = None  # the port it binds, checked free before it starts
    setting: str | None = None  # the variable that moves that port
    probe: Probe | None = None  # None: ready once it has stayed up for a few seconds
    timeout_s: float = 120.0
    needs: tuple[str, ...] = ()  # services that must be ready first


def services(settings: Settings, config: Path | None = None) -> list[Service]:
    """The stack for ``settings``, in start order (``kiln down`` stops them in reverse)."""
    host, py = settings.host, sys.executable
    prefect_url, mlflow_url = f"http://{host}:{settings.prefect_port}", f"http://{host}:{settings.mlflow_port}"
    webhook_url = f"http://{host}:{settings.webhook_port}"
    api_url = f"{prefect_url}/api"
    # KILN_DATABASE_URL stays with `kiln up`: each server gets the one URL it needs, nobody else the password.
    env = {k: v for k, v in os.environ.items() if k != "KILN_DATABASE_URL"} | {
        "KILN_HOME": str(settings.home), "KILN_TRACKING_URI": mlflow_url, "MLFLOW_TRACKING_URI": mlflow_url,
        "PREFECT_API_URL": api_url, "KILN_PREFECT_API_URL": api_url, "PYTHONUNBUFFERED": "1",
        "PREFECT_HOME": os.environ.get("PREFECT_HOME", str(settings.home / "prefect")),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    if config is not None:
        env["KILN_CONFIG"] = str(config.resolve())
    if settings.s3_endpoint_url:
        env["MLFLOW_S3_ENDPOINT_URL"] = settings.s3_endpoint_url
    env.setdefault("AWS_DEFAULT_REGION", settings.s3_region)

    prefect_env = dict(env)
    backend = f"sqlite:///{settings.home / 'mlflow.db'}"
    if settings.database_url:
        backend, prefect_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_urls(settings.database_url)
    artifacts = f"s3://{settings.s3_bucket}/mlflow" if settings.s3_bucket else str(settings.artifact_root)
    mlflow_env = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"} | {
        # Registry webhooks to the receiver on loopback (plain http, private address); a stable key, or the
        # webhook secrets stored by one server process cannot be read by the next.
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": env.get("MLFLOW_WEBHOOK_ALLOWED_SCHEMES", "http,https"),
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": env.get("MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS", "true"),
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": env.get("MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY")
        or _webhook_key(settings.home / "stack"),
        # GenAI job runners (seven huey consumers, ~1.5 GB): Kiln runs none of them.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": env.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false"),
        "MLFLOW_BACKEND_STORE_URI": backend,  # `mlflow server` reads it like --backend-store-uri, out of `ps`
    }
    return [
        Service("prefect", [py, "-m", "prefect", "server", "start", "--host", host, "--port",
                            str(settings.prefect_port)], prefect_env, prefect_url, settings.prefect_port,
                "KILN_PREFECT_PORT", http_ok(f"{prefect_url}/api/health"), timeout_s=240),
        Service("mlflow", [py, "-m", "mlflow", "server", "--artifacts-destination", artifacts, "--host", host,
                           "--port", str(settings.mlflow_port), "--workers", "1"],
                mlflow_env, mlflow_url, settings.mlflow_port, "KILN_MLFLOW_PORT", http_ok(f"{mlflow_url}/health"),
                timeout_s=240),
        Service("webhooks",
                [py, "-m", "kiln.infra.webhooks", "--host", host, "--port", str(settings.webhook_port)], env,
                f"{webhook_url}/hooks/", settings.webhook_port, "KILN_WEBHOOK_PORT",
                http_ok(f"{webhook_url}/health")),
        Service("registry-events", [py, "-m", "kiln.infra.registry_events"], env, needs=("prefect", "mlflow")),
        Service("flows", [py, "-m", "kiln", "serve-flows"], env, f"{prefect_url}/deployments",
                probe=deployment_polled(f"{prefect_url}/api", SERVED_DEPLOYMENT), timeout_s=300,
                needs=("prefect", "mlflow")),
    ]


def installed(service: Service) -> bool:
    """False for a ``python -m MODULE`` service whose module is not importable here (not yet written)."""
    if service.argv[1:2] != ["-m"]:
        return True
    return importlib.util.find_spec(service.argv[2]) is not None


def http_ok(url: str) -> Probe:
    """Ready once ``url`` answers 2xx."""
    def probe(_started: float) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=3) as response:
                return 200 <= response.status < 300
        except (OSError, ValueError):
            return False

    return probe


def deployment_polled(api_url: str, deployment: str) -> Probe:
    """Ready once the deployment's runner has polled the server since the process started."""
    def probe(started: float) -> bool:
        try:
            with urllib.request.urlopen(f"{api_url}/deployments/name/{deployment}", timeout=3) as response:
                polled = json.load(response).get("last_polled")
        except (OSError, ValueError):
            return False
        return bool(polled) and datetime.fromisoformat(polled).timestamp() >= started - 1

    return probe


def env_exports(settings: Settings) -> str:
    """Shell lines that point Kiln, MLflow and Prefect clients at the running stack."""
    mlflow_url = f"http://{settings.host}:{settings.mlflow_port}"
    return (f"export PREFECT_API_URL=http://{settings.host}:{settings.prefect_port}/api\n"
            f"export MLFLOW_TRACKING_URI={mlflow_url}\nexport KILN_TRACKING_URI={mlflow_url}\n")


def _webhook_key(folder: Path) -> str:
    path = folder / "webhook-secret.key"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        # Created 0600, not chmod-ed after writing: no moment in which another user could read it.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(base64.urlsafe_b64encode(os.urandom(32)))  # a Fernet key
    return path.read_text().strip()
