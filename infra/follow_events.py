"""MLflow alias events wake a model server's alias followers: ``POST /hooks/mlflow`` on the model server.

    KILN_MLFLOW_WEBHOOK_SECRET=... kiln serve sentiment@champion --port 8000 \\
        --webhook-url http://this-host:8000/hooks/mlflow

A server that follows at least one ``NAME@ALIAS`` (:mod:`kiln.infra.follow`) serves ``POST /hooks/mlflow``.
MLflow 3.3+ (a tracking server on a SQL store) POSTs ``model_version_alias.created`` and
``model_version_alias.deleted`` there; a delivery is verified as Kiln's webhook receiver verifies one
(:mod:`kiln.infra.mlflow_signature`: HMAC with ``mlflow_webhook_secret``, timestamp window, delivery ids
handled once; the same body limit and parsing as :mod:`kiln.infra.mlflow_webhook`), and an event for an alias
this server follows wakes that :class:`~kiln.infra.follow.AliasFollower` at once (202, ``checking``). The event is
only a wake-up: the follower reads the alias from the registry itself, so a stale, duplicated or even forged
event can never change what is served; it can only make the server look sooner. Other events and other
models or aliases are answered 200 ``ignored``; without the secret the route answers 503 saying how to turn it on.

``--webhook-url URL`` (the address MLflow should call) registers an MLflow webhook for the two alias events at
start-up, named after the URL's host and port (``kiln-serve-HOST-PORT``: a restarted server updates its own
webhook rather than adding one, and replicas with their own addresses each get theirs), and deletes it on a
clean shutdown. Polling stays as the safety net for a lost delivery, every ``follow_webhook_interval_s`` (60 s)
unless ``--follow-interval`` says otherwise. MLflow caches its list of webhooks per event for
``MLFLOW_WEBHOOK_CACHE_TTL`` seconds (60), so the first events after a server registers may reach only the poller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from kiln.errors import ConfigError, ServiceUnavailable
from kiln.infra.follow import AliasFollower
from kiln.infra.mlflow_signature import Deliveries, WebhookRefused, verify
from kiln.infra.mlflow_webhook import MAX_NAME, parse_event, register_mlflow_webhook
from kiln.infra.webhook_body import read_body
from kiln.settings import Settings

log = logging.getLogger(__name__)

ALIAS_EVENTS = ("model_version_alias.created", "model_version_alias.deleted")
ROUTE = "/hooks/mlflow"
NO_SECRET = ("MLflow webhooks are off here: set KILN_MLFLOW_WEBHOOK_SECRET to the secret of the MLflow webhook "
             "that calls this server (`kiln serve --webhook-url` registers one); until then it polls the registry")


class Waker:
    """Runs one follower's check when an alias event comes: one check at a time, and one more after it when
    events came while it ran (so the last event is always followed by a complete look at the registry)."""

    def __init__(self, follower: AliasFollower) -> None:
        self.follower = follower
        self.task: asyncio.Task | None = None
        self.again = False

    def wake(self) -> str:
        """Start a check (``checking``), or ask the one running for another (``queued``)."""
        if self.task is not None and not self.task.done():
            self.again = True
            return "queued"
        self.task = asyncio.create_task(self._run(), name=f"wake-{self.follower.where}")
        return "checking"

    async def _run(self) -> None:
        while True:
            self.again = False
            try:
                # No force: an event may wake the follower, never skip the back-off of a version that failed.
                outcome = await self.follower.check_now(force=False)
                log.info("%s: looked at the registry on an MLflow alias event: %s", self.follower.where, outcome)
            except Exception:  # a failed check must not end the waking; the poller looks again anyway
                log.exception("%s: checking the alias on an MLflow event failed", self.follower.where)
            if not self.again:
                return

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


class AliasEvents:
    """``POST /hooks/mlflow`` of a model server: verified alias events wake the followers they name.

    Attach it to the pool (:meth:`~kiln.infra.runtime.ModelPool.attach`) so that checks still running when the
    server stops are cancelled.
    """

    def __init__(self, followers: Sequence[AliasFollower], settings: Settings) -> None:
        self.settings = settings
        self.wakers = {(f.ref.name, f.ref.alias): Waker(f) for f in followers}
        self.deliveries = Deliveries()

    def route(self) -> Any:
        from starlette.routing import Route

        return Route(ROUTE, self.receive, methods=["POST"], name="mlflow_alias_events")

    async def receive(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        secret = self.settings.mlflow_webhook_secret
        if secret is None:  # 503, as Kiln's receiver answers: MLflow retries, and the operator sees why
            return JSONResponse({"error": NO_SECRET}, 503)
        try:
            body = await read_body(request, self.settings.webhook_max_body)
            delivery_id = verify(secret.get_secret_value(), request.headers, body)
            if self.deliveries.claim(delivery_id) != "new":
                return JSONResponse({"status": "duplicate", "delivery": delivery_id})
            self.deliveries.finish(delivery_id, ok=True)  # handled once received: waking cannot fail
            event, data = parse_event(body)
            if event not in ALIAS_EVENTS:
                return JSONResponse({"status": "ignored", "delivery": delivery_id,
                                     "reason": f"a model server acts only on alias events, not {event[:80]!r}"})
            name, alias = _alias(event, data)
        except WebhookRefused as exc:
            log.warning("refused MLflow webhook delivery: %s", exc)
            return JSONResponse({"error": str(exc)}, exc.status)
        waker = self.wakers.get((name, alias))
        if waker is None:
            followed = ", ".join(f"{n}@{a}" for n, a in self.wakers) or "nothing"
            return JSONResponse({"status": "ignored", "delivery": delivery_id,
                                 "reason": f"this server follows {followed}, not {name}@{alias}"})
        status = waker.wake()
        log.info("%s: MLflow says the alias was %s (delivery %s); looking at the registry now", waker.follower.where,
                 event.rsplit(".", 1)[1], delivery_id)
        return JSONResponse({"status": status, "following": waker.follower.where, "delivery": delivery_id}, 202)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        for waker in self.wakers.values():
            await waker.stop()


def _alias(event: str, data: dict[str, Any]) -> tuple[str, str]:
    found = []
    for key in ("name", "alias"):
        value = data.get(key)
        # Printable: a name is echoed in the answer, and a lone surrogate could not be written as UTF-8.
        if not isinstance(value, str) or not value.strip() or len(value) > MAX_NAME or not value.isprintable():
            raise WebhookRefused(400, f"{event}: data.{key} must be printable text of at most {MAX_NAME} "
                                      "characters")
        found.append(value)
    return found[0], found[1]


def webhook_name(url: str) -> str:
    """``kiln-serve-HOST-PORT`` for the server ``url`` reaches, as MLflow allows names (letters, digits, ``.``,
    ``_``, ``-``; under 63 characters)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = re.sub(r"[^A-Za-z0-9._-]+", "-", parts.hostname or "").strip("-._")
    return f"kiln-serve-{host[:40].strip('-._')}-{port}"


def check_options(settings: Settings, refs: Sequence[str], *, follow: bool, webhook_url: str | None) -> None:
    """Refuse ``--webhook-url`` (:class:`ConfigError`, before any model loads) when it could not work."""
    from kiln.tasks.registry.client import ModelRef

    if webhook_url is None:
        return
    if not follow or not any(ModelRef.parse(r).alias for r in refs):
        raise ConfigError("--webhook-url wakes servers that follow NAME@ALIAS, and this one follows none "
                          "(--no-follow, NAME/VERSION or --package): drop --webhook-url")
    if settings.mlflow_webhook_secret is None:
        raise ConfigError("--webhook-url needs KILN_MLFLOW_WEBHOOK_SECRET (MLflow signs each delivery with it and "
                          "the server checks it): set it, or drop --webhook-url and poll only")
    parts = urlsplit(webhook_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--webhook-url {webhook_url!r} is not an http(s) URL; give the address MLflow should "
                          f"call, e.g. http://this-host:8000{ROUTE}")
    uri = settings.registry_uri or settings.effective_tracking_uri
    if not uri.startswith(("http://", "https://")):
        raise ConfigError(f"--webhook-url needs an MLflow server (KILN_TRACKING_URI=http://...): only a tracking "
                          f"server sends webhooks, not {uri.split(':', 1)[0]}:...; drop --webhook-url to poll only")


class AliasWebhook:
    """The MLflow webhook that calls a model server on alias events: :meth:`register` at start-up; attached to
    the pool, it is deleted when the server stops cleanly."""

    def __init__(self, settings: Settings, url: str) -> None:
        self.settings, self.url, self.name = settings, url, webhook_name(url)
        self.webhook_id: str | None = None

    def register(self) -> Any:
        """Create the webhook, or update the one of the same name (a restart); returns it."""
        from mlflow.exceptions import MlflowException

        secret = self.settings.mlflow_webhook_secret
        if secret is None:
            raise ConfigError("registering the MLflow webhook needs KILN_MLFLOW_WEBHOOK_SECRET")
        try:
            hook = register_mlflow_webhook(self.settings, self.url, secret.get_secret_value(), name=self.name,
                                           events=ALIAS_EVENTS, description="Kiln model server: alias events wake "
                                           "its followers (kiln serve --webhook-url)")
        except MlflowException as exc:
            first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            if exc.error_code not in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS"):
                raise ServiceUnavailable(f"the MLflow server did not register webhook {self.name}: {first} (is it "
                                         "MLflow 3.3+ on a SQL store, and up?)") from exc
            raise ConfigError(f"MLflow refused webhook {self.name} for {self.url}: {first} (the MLflow server needs "
                              "MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https for http URLs and "
                              "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true for private addresses)") from exc
        self.webhook_id = hook.webhook_id
        log.info("MLflow webhook %s (%s) sends alias events to %s", self.name, self.webhook_id, self.url)
        return hook

    def delete(self) -> None:
        """Delete the webhook; a failure is logged (the next start of this server updates it)."""
        if self.webhook_id is None:
            return
        from mlflow.tracking import MlflowClient

        try:
            MlflowClient(self.settings.effective_tracking_uri, self.settings.registry_uri).delete_webhook(
                self.webhook_id)
            log.info("deleted MLflow webhook %s (%s)", self.name, self.webhook_id)
            self.webhook_id = None
        except Exception as exc:  # noqa: BLE001 - shutting down: say so and go on
            log.warning("could not delete MLflow webhook %s (%s): %s", self.name, self.webhook_id,
                        str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        await asyncio.to_thread(self.delete)


def follow_events(app: Any, followers: Sequence[AliasFollower], settings: Settings, *,
                  webhook_url: str | None = None, interval_given: bool = False) -> AliasWebhook | None:
    """Mount ``POST /hooks/mlflow`` on a model server ``app`` that follows; with ``webhook_url``, register the
    MLflow webhook now (deleted on clean shutdown) and poll every ``follow_webhook_interval_s`` unless
    ``interval_given``. Returns the webhook, if registered.

    Raises:
        ConfigError: MLflow refused the webhook (call :func:`check_options` first for the cheap checks).
        ServiceUnavailable: The MLflow server could not be reached.
    """
    if not followers:
        return None
    pool = followers[0].pool
    events = AliasEvents(followers, settings)
    app.router.routes.append(events.route())
    pool.attach(events)
    if webhook_url is None:
        return None
    hook = AliasWebhook(settings, webhook_url)
    hook.register()
    pool.attach(hook)
    if not interval_given:  # the webhook wakes the followers; polling is only the safety net now
        for follower in followers:
            follower.interval_s = settings.follow_webhook_interval_s
    return hook
