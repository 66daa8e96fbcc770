"""The demo's epilogue: the served champion watched after the rollouts, healthy and then with planted drift.

    champion's server ─► gateway ─► load generator: the test split (+ feedback)  ─► monitor: HEALTHY
                                  ─► load generator: the same texts, another domain's words at equal lengths
                                                                                  ─► monitor: BREACH, notified once

Both evaluations are steps of the model's MLflow run for the day; the breach's notification is a Prefect event
(``kiln.monitor.breach``) that automations can fan out, recorded with the incident on the registered model.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import AnyHttpUrl, SecretStr

from kiln.flows.monitor import PrefectActions
from kiln.infra.background import serving
from kiln.infra.gateway import create_app as gateway_app
from kiln.infra.gateway_proxy import Gateway, Upstream
from kiln.infra.loadgen import LoadPlan, generate_load
from kiln.infra.server import create_app as server_app
from kiln.infra.server import load_registered
from kiln.settings import Settings
from kiln.tasks.core import tags as vocab
from kiln.tasks.data.planted import another_domain
from kiln.tasks.engines import EngineOptions
from kiln.tasks.monitor.params import MonitorParams
from kiln.tasks.monitor.run import MonitorResult, run_monitor
from kiln.tasks.presets import PRESETS

log = logging.getLogger(__name__)
DEMO_POLICY = PRESETS / "monitor-demo.yaml"


@contextmanager
def champion_stack(settings: Settings, name: str) -> Iterator[tuple[str, str]]:
    """``name@champion`` on a model server behind a gateway (no challenger: both upstreams are the champion's)."""
    token = secrets.token_urlsafe(24)
    served = load_registered([f"{name}@{vocab.CHAMPION}"], settings, EngineOptions(threads=1))
    with serving(server_app(served)) as server:
        gateway = Gateway(Upstream(server.url), Upstream(server.url), token, model_name=name)
        with serving(gateway_app(gateway)) as gw:
            yield gw.url, token


def monitor_demo(settings: Settings, name: str, texts: list[str], labels: list[str], *, policy: Path = DEMO_POLICY,
                 requests: int = 400, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Two monitor evaluations of ``name@champion``: on the test split (healthy), then on planted drift."""
    results: dict[str, MonitorResult] = {}
    with champion_stack(settings, name) as (url, token):
        watched = settings.model_copy(update={"gateway_token": SecretStr(token),
                                              "rollout_gateways": {"demo": AnyHttpUrl(url)}})
        params = MonitorParams(model=name, policy=str(policy), gateway="demo")
        runner = PrefectActions(watched)
        for label, batch, truth in (("its own test split", texts, labels),
                                    ("the same texts in another domain's words (equal lengths)", another_domain(texts),
                                     None)):
            echo(f"\n── monitor: {requests} requests of {label} ──")
            generate_load(LoadPlan(url=url, model=name, texts=batch, labels=truth, requests=requests, seconds=300,
                                   concurrency=4, feedback=truth is not None, feedback_token=token))
            results["drifted" if truth is None else "healthy"] = run_monitor(params, watched, runner=runner,
                                                                             echo=echo)
    return {k: {"status": r.status, "breaches": r.verdict.breaches, "actions": r.actions, "run_id": r.run_id}
            for k, r in results.items()}
