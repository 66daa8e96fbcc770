"""Where a flow's tasks run, and the one place timings are taken one at a time.

Candidate builds and search trials are independent CPU-heavy work: they fan out on a Prefect task runner
(threads in one process by default, or a Dask cluster: local worker processes, or an existing scheduler such
as one on Kubernetes). Latency benchmarks must not: two models timed at the same moment on the same cores
slow each other down and the comparison the gate makes is no longer fair. :func:`serial_section` is the
lock every timed section takes, so at most one runs at a time across all workers.

``prefect-dask`` is optional (``pip install 'kiln-mlops[fanout]'``); it is imported only when asked for.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from kiln.errors import ConfigError
from kiln.settings import Settings, load_settings

LATENCY_LOCK = "kiln-latency"  # the name every latency benchmark serializes on
_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


def task_runner(settings: Settings) -> TaskRunner:
    """The task runner the settings ask for: ``thread`` (default, one worker thread) or ``dask``.

    With ``dask``, ``dask_address`` names an existing scheduler (``tcp://host:8786``); without it a temporary
    local cluster of ``dask_workers`` single-threaded worker processes is started for the flow run and closed
    after it. Raises :class:`ConfigError` when ``dask`` is asked for and ``prefect-dask`` is not installed.
    """
    if settings.task_runner == "thread":
        # One thread: submitted tasks run one at a time, in order, as before fan-out existed. Training stages
        # seed torch's process-global generator, so two builds training at once in one process would draw
        # from it interleaved and results would no longer repeat; worker processes (Dask) each have their own.
        return ThreadPoolTaskRunner(max_workers=1)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:
        raise ConfigError("task_runner is 'dask' but prefect-dask is not installed; "
                          "pip install 'kiln-mlops[fanout]' or set KILN_TASK_RUNNER=thread") from exc
    if settings.dask_address:
        return DaskTaskRunner(address=settings.dask_address)
    # One thread per worker process: builds are CPU-bound Python (the GIL); processes are what run in parallel.
    cluster = {"n_workers": settings.dask_workers, "threads_per_worker": 1, "processes": True,
               "dashboard_address": None}
    api = _prefect_api_url()
    if api:  # the workers report task runs to this run's Prefect API, not each to a temporary server of its own
        cluster["env"] = {"PREFECT_API_URL": api}
    return DaskTaskRunner(cluster_kwargs=cluster)


def _prefect_api_url() -> str | None:
    """The Prefect API this process talks to: PREFECT_API_URL, or the temporary server Prefect started here."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return PREFECT_API_URL.value()
    server_module = sys.modules.get("prefect.server.api.server")  # imported where one was started; heavy else
    if server_module is None:
        return None
    # Prefect keeps its temporary servers by port (a private registry; no public accessor in prefect 3.9).
    running = [server for server in server_module.SubprocessASGIServer._instances.values() if server.running]
    return running[0].api_url if running else None


class SettingsTaskRunner(TaskRunner):
    """The runner ``task_runner(load_settings())`` names, chosen when a flow run starts, not at import.

    A deployment started from its entrypoint (a Kubernetes job, ``prefect.yaml``) imports the flow module
    fresh, so a runner given with ``with_options`` by whoever built the deployment is gone; the worker's
    ``KILN_TASK_RUNNER`` / ``KILN_DASK_ADDRESS`` still reach this one.
    """

    def __init__(self) -> None:
        super().__init__()
        self._inner: TaskRunner | None = None

    def duplicate(self) -> SettingsTaskRunner:
        return type(self)()

    def __enter__(self) -> SettingsTaskRunner:
        self._inner = task_runner(load_settings()).__enter__()
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if self._inner is not None:
                self._inner.__exit__(*exc)
        finally:
            self._inner = None
            super().__exit__(*exc)

    def submit(self, task: Any, parameters: dict[str, Any], wait_for: Any = None, dependencies: Any = None) -> Any:
        if self._inner is None:
            raise RuntimeError("The task runner must be started before submitting work.")
        return self._inner.submit(task, parameters, wait_for, dependencies)


@contextlib.contextmanager
def serial_section(name: str = LATENCY_LOCK) -> Iterator[None]:
    """Run the ``with`` body while no other section of the same ``name`` runs.

    Inside a Dask worker, or in a process with a Dask client, the lock is a :class:`distributed.Lock` held
    by the scheduler, so sections on different machines exclude each other. Otherwise it is a process lock:
    a thread lock plus an exclusive ``flock`` on a file in the temporary folder, so threads of one process and
    processes of one machine exclude each other.
    """
    client = _dask_client()
    if client is not None:
        with sys.modules["distributed"].Lock(name):  # the scheduler's; it finds this process's client itself
            yield
        return
    with _thread_lock(name), _file_lock(name):
        yield


def _dask_client() -> Any | None:
    """The Dask client of this worker or process, if any; never starts a cluster."""
    distributed = sys.modules.get("distributed")  # not imported: no worker and no client here (and no import cost)
    if distributed is None:
        return None
    try:
        distributed.get_worker()
    except ValueError:
        try:
            return distributed.default_client()
        except ValueError:
            return None
    return distributed.get_client()  # the worker's own client


def _thread_lock(name: str) -> threading.Lock:
    with _thread_locks_guard:
        return _thread_locks.setdefault(name, threading.Lock())


@contextlib.contextmanager
def _file_lock(name: str) -> Iterator[None]:
    path = Path(tempfile.gettempdir()) / f"kiln-serial-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.lock"
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def placement(started: float) -> dict[str, Any]:
    """Where and when a task ran, for the run's record: host, pid, thread, the Dask worker's address (None
    outside Dask), start and end as epoch seconds."""
    worker, distributed = None, sys.modules.get("distributed")
    if distributed is not None:
        with contextlib.suppress(ValueError):  # not in a Dask worker
            worker = distributed.get_worker().address
    return {"host": socket.gethostname(), "pid": os.getpid(), "thread": threading.current_thread().name,
            "worker": worker, "started": started, "finished": time.time()}
