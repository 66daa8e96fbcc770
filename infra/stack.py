"""The local stack behind ``kiln up``: starting, watching and stopping its services' processes.

Every service (:mod:`kiln.infra.stack_services` says which) runs in its own process group, so stopping it
stops what it spawned (MLflow's uvicorn worker, ...); it logs to ``<home>/stack/logs/<name>.log`` and records
itself in ``<home>/stack/<name>.pid`` (pid, start time, URL), so that ``kiln down`` and ``kiln status`` —
later, from another process — find it, and a pid the system has since reused is never taken for it.
Services start in waves: a service waits until the ones it needs answer their readiness probe.

Secrets reach a service through its environment only; the command line recorded in its pid file and log
header, and whatever of another process or a log is quoted in a message, pass through
:func:`kiln.credentials.redact_text` all the same. The folder is the owner's alone (0700).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from kiln.credentials import redact_text
from kiln.errors import ConfigError, KilnError
from kiln.infra.stack_services import Service, installed, services
from kiln.settings import Settings


class StackError(KilnError):
    """A service of the local stack did not start or stop; the message names its log file."""


@dataclass(frozen=True)
class State:
    """What ``kiln status`` shows for a service."""

    name: str
    pid: int | None
    url: str | None
    health: str  # healthy | unhealthy | stopped | not installed


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
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        log.parent.mkdir(mode=0o700, exist_ok=True)
        argv = [redact_text(arg) for arg in svc.argv]
        with log.open("ab") as fh:
            fh.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
            offset = fh.tell()
            proc = subprocess.Popen(svc.argv, env=svc.env, stdin=subprocess.DEVNULL, stdout=fh,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self._procs[svc.name] = proc
        record = {"pid": proc.pid, "create_time": psutil.Process(proc.pid).create_time(), "started_at": time.time(),
                  "url": svc.url, "port": svc.port, "log": str(log), "log_offset": offset, "argv": argv}
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
        return "\n".join("    " + redact_text(line) for line in text.strip().splitlines()[-lines:])

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
    """True when a server could listen on ``host:port`` now."""
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
                return f" by pid {conn.pid} ({redact_text(' '.join(psutil.Process(conn.pid).cmdline()))[:80]})"
    except (psutil.Error, OSError):
        pass
    return ""


def for_settings(settings: Settings, config: Path | None = None) -> Stack:
    """The local stack for ``settings``, its pid files and logs under ``<home>/stack``."""
    return Stack(settings.home / "stack", services(settings, config), settings.host)
