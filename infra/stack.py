"""The local stack behind ``kiln up``: Prefect server, MLflow server, webhook receiver, registry poller, flows.

Every service runs in its own process group, so stopping it stops what it spawned (MLflow's uvicorn
worker, ...); it logs to ``<home>/stack/logs/<name>.log`` and records itself in ``<home>/stack/<name>.pid``
(pid, start time, URL), so that ``kiln down`` and ``kiln status`` — later, from another process — find
it, and a pid the system has since reused is never taken for it. Services bind to ``settings.host``.

By default the stores are the embedded ones (``<home>/mlflow.db``, ``<home>/artifacts``, Prefect's SQLite
under ``<home>/prefect``), so ``kiln up`` shows what ``kiln demo`` made. With ``database_url`` set, MLflow
and Prefect use two databases on that PostgreSQL server (both keep their migrations in a table called
``alembic_version``, so they cannot share one); with ``s3_bucket`` set, MLflow proxies artifacts to S3.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psutil

from kiln.errors import ConfigError, KilnError
from kiln.settings import Settings

SERVED_DEPLOYMENT = "optimize/kiln-optimize"  # polled by `kiln serve-flows` once the flows are served
Probe = Callable[[float], bool]  # readiness, given the time (epoch s) the service's process started


class StackError(KilnError):
    """A service of the local stack did not start or stop; the message names its log file."""


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


@dataclass(frozen=True)
class State:
    """What ``kiln status`` shows for a service."""

    name: str
    pid: int | None
    url: str | None
    health: str  # healthy | unhealthy | stopped | not installed


# ---------------------------------------------------------------- the services


def services(settings: Settings, config: Path | None = None) -> list[Service]:
    """The stack for ``settings``, in start order (``kiln down`` stops them in reverse)."""
    host, py = settings.host, sys.executable
    prefect_url, mlflow_url = f"http://{host}:{settings.prefect_port}", f"http://{host}:{settings.mlflow_port}"
    webhook_url = f"http://{host}:{settings.webhook_port}"
    api_url = f"{prefect_url}/api"
    env = dict(os.environ) | {
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
    }
    return [
        Service("prefect", [py, "-m", "prefect", "server", "start", "--host", host, "--port",
                            str(settings.prefect_port)], prefect_env, prefect_url, settings.prefect_port,
                "KILN_PREFECT_PORT", http_ok(f"{prefect_url}/api/health"), timeout_s=240),
        Service("mlflow", [py, "-m", "mlflow", "server", "--backend-store-uri", backend, "--artifacts-destination",
                           artifacts, "--host", host, "--port", str(settings.mlflow_port), "--workers", "1"],
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


def database_urls(database_url: str) -> tuple[str, str]:
    """MLflow's URL (the database given) and Prefect's (``<database>_prefect`` on the same server, asyncpg)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(database_url.replace("postgres://", "postgresql://", 1))
    except ArgumentError as exc:
        raise ConfigError(f"KILN_DATABASE_URL is not a database URL ({exc}); write "
                          "postgresql://USER:PASSWORD@HOST:5432/DATABASE") from exc
    if url.get_backend_name() != "postgresql" or not url.database:
        raise ConfigError("KILN_DATABASE_URL must name a PostgreSQL database: postgresql://USER:PASSWORD@HOST:5432/DB")
    query = dict(url.query)
    if "sslmode" in query:  # asyncpg spells libpq's sslmode "ssl"
        query["ssl"] = query.pop("sslmode")
    prefect = url.set(drivername="postgresql+asyncpg", database=f"{url.database}_prefect", query=query)
    mlflow = url.set(drivername="postgresql+psycopg")  # explicit: SQLAlchemy 2.0 would pick psycopg2, 2.1 psycopg
    return mlflow.render_as_string(hide_password=False), prefect.render_as_string(hide_password=False)


def ensure_databases(database_url: str) -> list[str]:
    """Create MLflow's and Prefect's databases on the server when missing; returns the names created."""
    try:
        import psycopg
        from psycopg import sql
    except ImportError as exc:
        raise ConfigError("KILN_DATABASE_URL needs the PostgreSQL driver: pip install 'kiln-mlops[stores]'") from exc
    from sqlalchemy.engine import make_url

    url = make_url(database_urls(database_url)[0])
    names = [url.database, f"{url.database}_prefect"]
    params = {"host": url.host, "port": url.port or 5432, "user": url.username, "password": url.password,
              "dbname": "postgres", "connect_timeout": 10, **dict(url.query)}
    created = []
    try:
        conn = psycopg.connect(autocommit=True, **{k: v for k, v in params.items() if v is not None})
    except psycopg.Error as exc:
        raise ConfigError(f"cannot reach PostgreSQL at {url.host}:{url.port or 5432} as {url.username} "
                          f"({str(exc).strip().splitlines()[0]}); check KILN_DATABASE_URL") from exc
    try:  # autocommit: CREATE DATABASE cannot run in a transaction
        with conn.cursor() as cur:
            for name in names:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                    created.append(name)
    except psycopg.Error as exc:
        raise ConfigError(f"cannot create database(s) {', '.join(names)} ({str(exc).strip().splitlines()[0]}); "
                          f"create them or grant {url.username} CREATEDB") from exc
    finally:
        conn.close()
    return created


def _webhook_key(folder: Path) -> str:
    path = folder / "webhook-secret.key"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.urlsafe_b64encode(os.urandom(32)))  # a Fernet key
        path.chmod(0o600)
    return path.read_text().strip()


# ---------------------------------------------------------------- processes


class Stack:
    """Start, stop and inspect ``services`` whose pid files and logs live in ``root``."""

    def __init__(self, root: Path, services: list[Service], host: str = "127.0.0.1") -> None:
        self.root, self.services, self.host = root, services, host
        self._procs: dict[str, subprocess.Popen] = {}

    def log_path(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def pid_path(self, name: str) -> Path:
        return self.root / f"{name}.pid"

    # ---- queries

    def record(self, name: str) -> dict | None:
        try:
            return json.loads(self.pid_path(name).read_text())
        except (OSError, ValueError):
            return None

    def running(self, name: str) -> dict | None:
        """The pid record of ``name`` when its process is alive (and is the one recorded)."""
        rec = self.record(name)
        if rec is None:
            return None
        try:
            proc = psutil.Process(rec["pid"])
            same = abs(proc.create_time() - rec["create_time"]) < 0.5
            return rec if same and proc.status() != psutil.STATUS_ZOMBIE else None
        except psutil.Error:
            return None

    def status(self) -> list[State]:
        states = []
        for svc in self.services:
            rec = self.running(svc.name)
            if rec is None:
                states.append(State(svc.name, None, svc.url, "stopped" if installed(svc) else "not installed"))
                continue
            ok = svc.probe(rec["started_at"]) if svc.probe else True
            states.append(State(svc.name, rec["pid"], rec.get("url"), "healthy" if ok else "unhealthy"))
        return states

    # ---- up

    def up(self, progress: Callable[[str], None] = lambda _: None,
           before_start: Callable[[], None] | None = None) -> list[State]:
        """Start every installed service not already running, in waves of services whose needs are ready.

        Refuses before starting anything when a port is taken; on a failed start, stops what it started.
        """
        todo = []
        for svc in self.services:
            if self.running(svc.name):
                progress(f"{svc.name} is already running")
            elif not installed(svc):
                progress(f"{svc.name}: {svc.argv[2]} is not installed; not started")
            else:
                self.stop(svc.name)  # leftovers of a crashed group, if any
                todo.append(svc)
        self.check_ports(todo)
        if todo and before_start:
            before_start()
        started: list[str] = []
        try:
            while todo:
                pending = {s.name for s in todo}
                wave = [s for s in todo if not pending & set(s.needs)]
                for svc in wave:
                    self._spawn(svc)
                    started.append(svc.name)
                self._wait(wave, progress)
                todo = [s for s in todo if s not in wave]
        except BaseException:
            for name in reversed(started):
                self.stop(name)
            raise
        return self.status()

    def check_ports(self, services: list[Service]) -> None:
        taken: dict[int, str] = {}
        for svc in services:
            if svc.port is None:
                continue
            if svc.port in taken:
                raise ConfigError(f"{svc.setting} and {taken[svc.port]} are both {svc.port}; give each service its "
                                  "own port")
            taken[svc.port] = svc.setting or svc.name
            if not port_free(self.host, svc.port):
                raise ConfigError(f"port {svc.port} on {self.host} (for {svc.name}) is already taken"
                                  f"{_holder(svc.port)}; stop what holds it or set {svc.setting} to a free port")

    def _spawn(self, svc: Service) -> None:
        log = self.log_path(svc.name)
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as fh:
            fh.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(svc.argv)}\n".encode())
            offset = fh.tell()
            proc = subprocess.Popen(svc.argv, env=svc.env, stdin=subprocess.DEVNULL, stdout=fh,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self._procs[svc.name] = proc
        record = {"pid": proc.pid, "create_time": psutil.Process(proc.pid).create_time(), "started_at": time.time(),
                  "url": svc.url, "port": svc.port, "log": str(log), "log_offset": offset, "argv": svc.argv}
        self.pid_path(svc.name).write_text(json.dumps(record))

    def _wait(self, wave: list[Service], progress: Callable[[str], None]) -> None:
        t0 = time.monotonic()
        waiting = list(wave)
        progress(f"starting {', '.join(s.name for s in waiting)} …")
        while waiting:
            for svc in list(waiting):
                rec, code = self.record(svc.name), self._procs[svc.name].poll()
                if code is not None:
                    raise StackError(f"{svc.name} exited with status {code} while starting; see "
                                     f"{self.log_path(svc.name)}:\n{self.tail(svc.name)}")
                elapsed = time.monotonic() - t0
                ready = svc.probe(rec["started_at"]) if svc.probe else elapsed > 3
                if ready:
                    waiting.remove(svc)
                    progress(f"{svc.name} ready after {elapsed:.0f} s")
                elif elapsed > svc.timeout_s:
                    raise StackError(f"{svc.name} did not become healthy within {svc.timeout_s:.0f} s; see "
                                     f"{self.log_path(svc.name)}:\n{self.tail(svc.name)}")
            time.sleep(0.5)

    def tail(self, name: str, lines: int = 20) -> str:
        """The last lines ``name`` logged since its latest start."""
        rec = self.record(name) or {}
        try:
            with self.log_path(name).open("rb") as fh:
                fh.seek(rec.get("log_offset", 0))
                text = fh.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join("    " + line for line in text.strip().splitlines()[-lines:])

    # ---- down

    def down(self, progress: Callable[[str], None] = lambda _: None) -> list[str]:
        """Stop every recorded service, last started first; returns the names that were running."""
        known = [s.name for s in self.services]
        extra = sorted(p.stem for p in self.root.glob("*.pid") if p.stem not in known)  # from another config
        stopped, failures = [], []
        for name in reversed(known + extra):
            try:
                if self.stop(name):
                    progress(f"stopped {name}")
                    stopped.append(name)
            except StackError as exc:  # stop the others all the same
                failures.append(str(exc))
        if failures:
            raise StackError("; ".join(failures))
        return stopped

    def stop(self, name: str, grace_s: float = 20.0) -> bool:
        """SIGTERM the service's process group, SIGKILL what is left after ``grace_s``; remove its pid file."""
        rec = self.record(name)
        if rec is None:
            return False
        members = _group(rec)
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            if not members:
                break
            for proc in members:
                try:
                    proc.send_signal(sig)
                except psutil.Error:
                    pass
            deadline = time.monotonic() + wait_s
            while members and time.monotonic() < deadline:
                self._reap(name)
                time.sleep(0.2)
                members = _group(rec)
        if members:
            raise StackError(f"{name} (pids {', '.join(str(p.pid) for p in members)}) survived SIGKILL; "
                             f"see {self.log_path(name)}")
        self._reap(name)
        self.pid_path(name).unlink(missing_ok=True)
        return True

    def _reap(self, name: str) -> None:
        proc = self._procs.get(name)
        if proc is not None:
            proc.poll()  # a child of this process that exited stays a zombie until waited for


def _group(rec: dict) -> list[psutil.Process]:
    """Live processes of the recorded process group (started no earlier than its leader: pids get reused)."""
    out = []
    for proc in psutil.process_iter(["create_time", "status"]):
        try:
            if (os.getpgid(proc.pid) == rec["pid"] and proc.info["status"] != psutil.STATUS_ZOMBIE
                    and proc.info["create_time"] >= rec["create_time"] - 0.5):
                out.append(proc)
        except (OSError, psutil.Error):
            continue
    return out


def port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free to listen on
        try:
            sock.bind((host, port))
            return True
        except OSError:
            return False


def _holder(port: int) -> str:
    try:
        for conn in psutil.net_connections("tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                return f" by pid {conn.pid} ({' '.join(psutil.Process(conn.pid).cmdline())[:80]})"
    except (psutil.Error, OSError):
        pass
    return ""


def env_exports(settings: Settings) -> str:
    """Shell lines that point Kiln, MLflow and Prefect clients at the running stack."""
    mlflow_url = f"http://{settings.host}:{settings.mlflow_port}"
    return (f"export PREFECT_API_URL=http://{settings.host}:{settings.prefect_port}/api\n"
            f"export MLFLOW_TRACKING_URI={mlflow_url}\nexport KILN_TRACKING_URI={mlflow_url}\n")


def for_settings(settings: Settings, config: Path | None = None) -> Stack:
    return Stack(settings.home / "stack", services(settings, config), settings.host)
