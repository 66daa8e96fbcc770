"""flows/runners.py: which task runner the settings name, and serial_section's mutual exclusion."""

from __future__ import annotations

import multiprocessing
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from prefect.task_runners import ThreadPoolTaskRunner

from kiln.errors import ConfigError
from kiln.flows import runners
from kiln.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
HOLD_S = 0.03  # how long each timed section holds the lock: long enough that an overlap could not hide


def _timed(name: str) -> tuple[float, float]:
    with runners.serial_section(name):
        start = time.monotonic()
        time.sleep(HOLD_S)
        return start, time.monotonic()


def _assert_disjoint(intervals: list[tuple[float, float]]) -> None:
    ordered = sorted(intervals)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(ordered, ordered[1:], strict=False)), ordered


def test_thread_is_the_default_and_runs_one_task_at_a_time(monkeypatch):
    monkeypatch.delenv("KILN_TASK_RUNNER", raising=False)
    runner = runners.task_runner(load_settings())
    assert isinstance(runner, ThreadPoolTaskRunner) and runner._max_workers == 1


def test_dask_runner_starts_a_local_cluster_or_joins_a_scheduler():
    pytest.importorskip("prefect_dask")
    local = runners.task_runner(Settings(task_runner="dask", dask_workers=3))
    assert local.address is None
    assert local.cluster_kwargs.items() >= {"n_workers": 3, "threads_per_worker": 1, "processes": True,
                                            "dashboard_address": None}.items()
    remote = runners.task_runner(Settings(task_runner="dask", dask_address="tcp://dask.example:8786"))
    assert remote.address == "tcp://dask.example:8786" and remote.cluster_kwargs == {}


def test_dask_without_prefect_dask_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "prefect_dask", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match="pip install 'kiln-mlops\\[fanout\\]'") as caught:
        runners.task_runner(Settings(task_runner="dask"))
    assert caught.value.exit_code == 2


def test_kiln_optimize_refuses_dask_without_prefect_dask_before_any_work(settings, monkeypatch):
    from typer.testing import CliRunner

    from kiln.cli.app import app

    monkeypatch.setitem(sys.modules, "prefect_dask", None)
    monkeypatch.setenv("KILN_TASK_RUNNER", "dask")
    result = CliRunner().invoke(app, ["optimize", "--model", "tiny"])
    assert result.exit_code == 2, result.output
    assert "prefect-dask is not installed" in " ".join(result.output.split())


@pytest.mark.parametrize(("variable", "value"), [("KILN_TASK_RUNNER", "ray"), ("KILN_DASK_WORKERS", "0")])
def test_bad_fanout_settings_are_refused(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=variable.removeprefix("KILN_").lower()):
        load_settings()


def test_the_settings_runner_is_chosen_when_the_run_starts(monkeypatch):
    runner = runners.SettingsTaskRunner()
    monkeypatch.setenv("KILN_TASK_RUNNER", "thread")
    with runner.duplicate() as started:
        assert isinstance(started._inner, ThreadPoolTaskRunner)
        assert started.submit  # delegates; a started runner accepts work
    assert started._inner is None
    with pytest.raises(RuntimeError, match="started"):
        runner.submit(None, {})


def test_serial_section_excludes_threads():
    intervals: list[tuple[float, float]] = []
    threads = [threading.Thread(target=lambda: intervals.append(_timed("unit-threads"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(intervals) == 4
    _assert_disjoint(intervals)


def _timed_into(queue, name: str) -> None:
    queue.put(_timed(name))


def test_serial_section_excludes_processes():
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_timed_into, args=(queue, "unit-processes")) for _ in range(3)]
    for p in procs:
        p.start()
    intervals = [queue.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    _assert_disjoint(intervals)  # time.monotonic is one clock for the whole machine


def test_serial_section_excludes_dask_workers():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=2, processes=False, dashboard_address=None) as c, \
            distributed.Client(c) as client:
        futures = client.map(_timed, ["unit-dask"] * 6, pure=False)
        intervals = client.gather(futures)
        # the lock was the scheduler's (a distributed.Lock), not this process's
        locks = client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.extensions["semaphores"].max_leases))
        assert "unit-dask" in locks
    _assert_disjoint(intervals)


def test_kubernetes_runs_send_builds_to_the_dask_scheduler_service():
    env = yaml.safe_load((ROOT / "infra" / "prefect.yaml").read_text())["definitions"]["work_pools"]["kubernetes"]
    env = env["job_variables"]["env"]
    docs = [d for d in yaml.safe_load_all((ROOT / "infra" / "k8s" / "dask.yaml").read_text()) if d]
    service = next(d for d in docs if d["kind"] == "Service")
    address = urlsplit(env["KILN_DASK_ADDRESS"])
    assert env["KILN_TASK_RUNNER"] == "dask" and address.scheme == "tcp"
    assert address.hostname == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    assert address.port == service["spec"]["ports"][0]["port"]
    worker = next(d for d in docs if d["kind"] == "Deployment" and "worker" in d["metadata"]["name"])
    argv = worker["spec"]["template"]["spec"]["containers"][0]["command"]
    assert env["KILN_DASK_ADDRESS"] in argv and argv[argv.index("--nthreads") + 1] == "1"
    Settings(task_runner=env["KILN_TASK_RUNNER"], dask_address=env["KILN_DASK_ADDRESS"])
