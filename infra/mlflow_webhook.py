"""``POST /hooks/mlflow``: MLflow's registry webhooks in, optimize and promotion actions out.

MLflow 3.3+ with a SQL store POSTs ``model_version.created`` and ``model_version_tag.set`` here; a delivery
is verified (:mod:`kiln.infra.mlflow_signature`), parsed, and handed to :class:`RegistryEvents`, which
does the same for a webhook as for the poller. :mod:`kiln.infra.webhooks` mounts the route beside the git
push routes; :func:`register_mlflow_webhook` points the MLflow server at it (``kiln up`` calls it).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from typing import Any

from kiln.errors import ConfigError
from kiln.infra.mlflow_signature import Deliveries, WebhookRefused, verify
from kiln.infra.registry_actions import APPROVAL_KEYS, Outcome, RegistryEvents, Starter
from kiln.infra.webhook_body import read_body
from kiln.settings import Settings

log = logging.getLogger(__name__)

EVENTS = ("model_version.created", "model_version_tag.set")
WEBHOOK_NAME = "kiln-registry-events"


def mlflow_webhook_route(settings: Settings, starter: Starter, *, events: RegistryEvents | None = None) -> Any:
    """``POST /hooks/mlflow``: verify an MLflow registry webhook delivery and act on it."""
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    events = events or RegistryEvents(settings, starter)
    deliveries = Deliveries()

    async def receive(request: Request) -> JSONResponse:
        if settings.mlflow_webhook_secret is None:
            return JSONResponse({"error": "MLflow webhooks are off here: set KILN_MLFLOW_WEBHOOK_SECRET"}, 503)
        try:
            body = await read_body(request, settings.webhook_max_body)
            delivery_id = verify(settings.mlflow_webhook_secret.get_secret_value(), request.headers, body)
        except WebhookRefused as exc:
            log.warning("refused MLflow webhook delivery: %s", exc)
            return JSONResponse({"error": str(exc)}, exc.status)
        claim = deliveries.claim(delivery_id)
        if claim == "done":
            return JSONResponse({"status": "duplicate", "delivery": delivery_id})
        if claim == "busy":  # a 503 makes MLflow retry later, when the first attempt has succeeded or failed
            return JSONResponse({"error": f"delivery {delivery_id} is being handled; retry"}, 503)
        ok = False
        try:
            try:
                payload = json.loads(body)
                event = f"{payload['entity']}.{payload['action']}"
                data = payload["data"]
            except (ValueError, KeyError, TypeError):
                ok = True  # a signed body that is not an event: retrying cannot help
                return JSONResponse({"error": "body is not an MLflow webhook event (entity, action, data)"}, 400)
            try:
                outcome = await run_in_threadpool(handle, events, event, data)
            except Exception as exc:  # noqa: BLE001 - MLflow retries a 503 (Prefect or the registry is down)
                log.exception("MLflow event %s failed", event)
                return JSONResponse({"error": f"{event}: {type(exc).__name__}: {exc}"}, 503)
            ok = True
            log.info("MLflow event %s (%s): %s %s", event, delivery_id, outcome.status, outcome.reason)
            return JSONResponse({"event": event, "delivery": delivery_id} | asdict(outcome))
        finally:
            deliveries.finish(delivery_id, ok=ok)

    return Route("/hooks/mlflow", receive, methods=["POST"], name="mlflow_webhook")


def handle(events: RegistryEvents, event: str, data: dict[str, Any]) -> Outcome:
    """Dispatch one webhook event (blocking)."""
    if event not in EVENTS:
        return Outcome("ignored", f"Kiln does not act on {event}")
    name, version = data.get("name"), data.get("version")
    if not isinstance(name, str) or not name or version is None:
        return Outcome("ignored", "event names no model version")
    if event == "model_version.created":
        return events.version_created(name, str(version), tags=data.get("tags") or {}, run_id=data.get("run_id"))
    if data.get("key") not in APPROVAL_KEYS:
        return Outcome("ignored", f"tag {data.get('key')!r} is not an approval")
    return events.resume_decided(name, str(version))


def create_app(settings: Settings, starter: Starter, **kwargs: Any) -> Any:
    """A receiver with only the MLflow route (tests; ``infra/webhooks.py`` mounts the route with the others)."""
    from starlette.applications import Starlette

    return Starlette(routes=[mlflow_webhook_route(settings, starter, **kwargs)])


def register_mlflow_webhook(settings: Settings, url: str, secret: str) -> Any:
    """Create (or update) the MLflow webhook that sends Kiln's events to ``url``; returns it.

    The MLflow server needs ``MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https`` and
    ``MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true`` for a receiver on loopback, and one
    ``MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY`` shared by its workers and restarts.
    """
    from mlflow.tracking import MlflowClient

    uri = settings.registry_uri or settings.effective_tracking_uri
    if not uri.startswith(("http://", "https://")):
        raise ConfigError(f"MLflow webhooks need an MLflow server (KILN_TRACKING_URI=http://...), not {uri}; "
                          "without one Kiln polls the registry (python -m kiln.infra.registry_events)")
    client = MlflowClient(settings.effective_tracking_uri, settings.registry_uri)
    existing, token = None, None
    while existing is None:
        page = client.list_webhooks(max_results=100, page_token=token)
        existing = next((w for w in page if w.name == WEBHOOK_NAME), None)
        token = page.token
        if not token:
            break
    description = "Kiln: new versions start optimize; approval tags resume promotions"
    if existing is not None:
        return client.update_webhook(existing.webhook_id, url=url, events=list(EVENTS), secret=secret,
                                     description=description, status="ACTIVE")
    return client.create_webhook(WEBHOOK_NAME, url, list(EVENTS), description=description, secret=secret)
