"""Start Kiln's Prefect deployments from outside a flow: webhooks, registry events, `kiln trigger`.

Every trigger goes through :class:`DeploymentStarter` so that all of them name deployments the same
way (``<flow>/<deployment>``, e.g. ``retrain/kiln-retrain``), pass an idempotency key (a webhook
delivery id, a model version) so that a redelivered event never starts a second run, and tag the run
with what started it. A run's parameters are stored for anyone with Prefect access to read: a parameter
carrying credentials in a URL is refused here, whichever trigger built it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from kiln.credentials import redact_text
from kiln.errors import KilnError

log = logging.getLogger(__name__)

# The deployments `kiln serve-flows` / `kiln up` serve, by what they do.
OPTIMIZE = "optimize/kiln-optimize"
PROMOTE = "promote/kiln-promote"
ROLLOUT = "rollout/kiln-rollout"
RETRAIN = "retrain/kiln-retrain"


class TriggerError(KilnError):
    """A deployment could not be started: no Prefect API configured or reachable, or the deployment is not served."""


@dataclass(frozen=True)
class Started:
    """A flow run that a trigger created (or found, when its idempotency key was already used)."""

    flow_run_id: str
    name: str
    deployment: str


class DeploymentStarter:
    """Creates flow runs of served deployments through the Prefect API (``PREFECT_API_URL`` or ``api_url``).

    ``timeout=0`` in :func:`arun_deployment` means "create the run and return": the served deployment's
    runner picks it up; the trigger never waits for training to finish.
    """

    def __init__(self, api_url: str | None = None) -> None:
        self.api_url = api_url

    async def start(self, deployment: str, parameters: dict[str, Any], *, idempotency_key: str | None = None,
                    tags: list[str] | None = None) -> Started:
        """Create a flow run of ``deployment`` (``flow/deployment``); raises :class:`TriggerError` on failure."""
        from contextlib import nullcontext

        import httpx
        from prefect.client.orchestration import get_client
        from prefect.deployments.flow_runs import arun_deployment
        from prefect.exceptions import ObjectNotFound
        from prefect.settings import PREFECT_API_URL, temporary_settings

        _refuse_credentials(deployment, parameters)
        scope = temporary_settings({PREFECT_API_URL: self.api_url}) if self.api_url else nullcontext()
        with scope:
            url = PREFECT_API_URL.value()
            if not url:  # without one, Prefect would start a throw-away API in which nothing is deployed
                raise TriggerError(f"cannot start {deployment}: no Prefect API configured; set PREFECT_API_URL (or "
                                   "KILN_PREFECT_API_URL) to a Prefect server, e.g. the one `kiln up` starts")
            try:
                async with get_client() as client:
                    run = await arun_deployment(deployment, client=client, parameters=parameters, timeout=0,
                                                idempotency_key=idempotency_key, tags=tags or [], as_subflow=False)
            except ObjectNotFound as exc:
                raise TriggerError(f"deployment {deployment} does not exist on the Prefect API at {url}; serve it "
                                   "with `kiln serve-flows` (or `kiln up`)") from exc
            except httpx.TransportError as exc:
                raise TriggerError(f"cannot reach the Prefect API at {url} ({exc.__class__.__name__}: {exc}); "
                                   "start it with `kiln up`, or fix PREFECT_API_URL / KILN_PREFECT_API_URL") from exc
        log.info("started %s: flow run %s (%s)", deployment, run.name, run.id)
        return Started(str(run.id), run.name, deployment)

    def start_sync(self, deployment: str, parameters: dict[str, Any], *, idempotency_key: str | None = None,
                   tags: list[str] | None = None) -> Started:
        """:meth:`start` for callers without an event loop (CLI, pollers)."""
        import asyncio

        return asyncio.run(self.start(deployment, parameters, idempotency_key=idempotency_key, tags=tags))


def _refuse_credentials(deployment: str, parameters: dict[str, Any]) -> None:
    """Raise :class:`TriggerError` when a parameter holds a URL with credentials (the run would store them)."""
    text = json.dumps(parameters, default=str)
    if redact_text(text) != text:
        raise TriggerError(f"not starting {deployment}: a parameter carries credentials in a URL, which the flow "
                           "run would store for anyone with Prefect access to read; pass the URL without them (the "
                           "worker adds its own, e.g. KILN_REPO_TOKEN)")
