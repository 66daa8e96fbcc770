"""``POST /hooks/mlflow``: MLflow's registry webhooks in, optimize and promotion actions out.

MLflow 3.3+ with a SQL store POSTs ``model_version.created`` and ``model_version_tag.set`` here; a delivery
is verified (:mod:`kiln.infra.mlflow_signature`), parsed, and handed to :class:`RegistryEvents`, which
does the same for a webhook as for the poller. :mod:`kiln.infra.webhooks` mounts the route beside the git
push routes; :func:`register_mlflow_webhook` points the MLflow server at it (``kiln up`` calls it).
"""

from __future__ import annotations

import json
import logging
import re
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
MAX_NAME = 256  # longer than any registered model name MLflow's SQL stores hold


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
                event, data = parse_event(body)
            except WebhookRefused as exc:
                ok = True  # a signed body that is not an event: retrying cannot help
                log.warning("refused MLflow webhook delivery %s: %s", delivery_id, exc)
                return JSONResponse({"error": str(exc)}, exc.status)
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


def parse_event(body: bytes) -> tuple[str, dict[str, Any]]:
    """``(entity.action, data)`` of a signed delivery, or :class:`WebhookRefused` (400) naming the field that is
    wrong. Never anything else: bytes that are not UTF-8, NaN, deep nesting and wrong types are all refused.

    The fields Kiln acts on are checked here, so that nothing an event carries can fail later, as a 503 that
    MLflow would retry for ever.
    """
    try:
        payload = json.loads(body, parse_constant=_not_json)
    except RecursionError:
        raise WebhookRefused(400, "body is not an MLflow webhook event: JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError and NaN/Infinity
        raise WebhookRefused(400, f"body is not an MLflow webhook event: not JSON ({str(exc)[:120]})") from None
    if not isinstance(payload, dict):
        raise WebhookRefused(400, "body is not an MLflow webhook event (entity, action, data): not a JSON object")
    for key in ("entity", "action"):
        if not isinstance(payload.get(key), str) or not payload[key]:
            raise WebhookRefused(400, f"body is not an MLflow webhook event (entity, action, data): {key} must be "
                                      "a non-empty string")
    data = payload.get("data")
    if not isinstance(data, dict):
        raise WebhookRefused(400, "body is not an MLflow webhook event (entity, action, data): data must be an "
                                  "object")
    event = f"{payload['entity']}.{payload['action']}"
    if event in EVENTS:
        _check_fields(data, event)
    return event, data


def _check_fields(data: dict[str, Any], event: str) -> None:
    name, version = data.get("name"), data.get("version")
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME:
        raise WebhookRefused(400, f"{event}: data.name must be a model name (a non-empty string of at most "
                                  f"{MAX_NAME} characters)")
    if isinstance(version, bool) or not isinstance(version, int | str) \
            or not re.fullmatch(r"[1-9][0-9]{0,17}", str(version)):
        raise WebhookRefused(400, f"{event}: data.version must be a version number (1, 2, ...), not "
                                  f"{str(version)[:40]!r}")
    tags = data.get("tags")
    if tags is not None and (not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values())):
        raise WebhookRefused(400, f"{event}: data.tags must be an object of strings")
    for key in ("run_id", "key"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise WebhookRefused(400, f"{event}: data.{key} must be a string")


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def handle(events: RegistryEvents, event: str, data: dict[str, Any]) -> Outcome:
    """Dispatch one webhook event (blocking); ``data`` as :func:`parse_event` checked it.

    At most one run per (model, version, action), however often the event comes (MLflow's retries, a
    redelivery with a fresh delivery id, the poller hearing the same version): the optimize run is started with
    an idempotency key made of model and version, never of the delivery, so Prefect hands back the run the first
    delivery created; a decision resumes only a run that is still paused.
    """
    if event not in EVENTS:
        return Outcome("ignored", f"Kiln does not act on {event}")
    name, version = data["name"], str(data["version"])
    if event == "model_version.created":
        return events.version_created(name, version, tags=data.get("tags") or {}, run_id=data.get("run_id"))
    if data.get("key") not in APPROVAL_KEYS:
        return Outcome("ignored", f"tag {data.get('key')!r} is not an approval")
    return events.resume_decided(name, version)


def create_app(settings: Settings, starter: Starter, **kwargs: Any) -> Any:
    """A receiver with only the MLflow route (tests; ``infra/webhooks.py`` mounts the route with the others)."""
    from starlette.applications import Starlette

    return Starlette(routes=[mlflow_webhook_route(settings, starter, **kwargs)])


def register_mlflow_webhook(settings: Settings, url: str, secret: str, *, name: str = WEBHOOK_NAME,
                            events: tuple[str, ...] = EVENTS, description: str | None = None) -> Any:
    """Create (or update) the MLflow webhook ``name`` that sends ``events`` (Kiln's receiver's by default) to
    ``url``; returns it. :mod:`kiln.infra.follow_events` registers a model server's alias events with it.

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
        existing = next((w for w in page if w.name == name), None)
        token = page.token
        if not token:
            break
    description = description or "Kiln: new versions start optimize; approval tags resume promotions"
    if existing is not None:
        return client.update_webhook(existing.webhook_id, url=url, events=list(events), secret=secret,
                                     description=description, status="ACTIVE")
    return client.create_webhook(name, url, list(events), description=description, secret=secret)
