"""Git push webhooks in, retrain flow runs out: the receiver Prefect's open-source server does not have.

    python -m kiln.infra.webhooks --host 127.0.0.1 --port 8765      (settings: KILN_WEBHOOK_SECRET, ...)

``POST /hooks/github`` (``X-Hub-Signature-256`` HMAC of the raw body), ``POST /hooks/gitlab``
(``X-Gitlab-Token``), ``POST /hooks/mlflow`` (registry events, :mod:`kiln.infra.mlflow_webhook`) and
``GET /health``. A push is checked in this order, and the first failure answers, always as JSON
``{"error": "..."}``:

    503 the route's secret is not configured (the message names the KILN_ variable)
    413 body larger than KILN_WEBHOOK_MAX_BODY (Content-Length, or counted while reading: never all read)
    401 signature / token missing or wrong (401 for both: the sender did not authenticate)
    415 a Content-Type other than application/json (or GitHub's form encoding, application/x-www-form-urlencoded)
    400 missing or malformed event or delivery header, a body that is not one JSON object (not UTF-8,
        NaN, nested too deeply, a form body without exactly one payload= field), a push whose ref,
        repository, commit SHA, clone URL or ``deleted`` is missing or of the wrong type
    202 {"ignored": "..."} an event that is not a push, another repository or branch, a branch deletion
    503 neither KILN_REPO nor KILN_WEBHOOK_REPOSITORIES is set: nothing says what the worker may clone
    400 KILN_REPO unset and the push's clone URL is not one of KILN_WEBHOOK_REPOSITORIES (a URL that only
        the payload names is never cloned)
    409 this commit of this repository was received before: ``{"error": "push <sha> of <repo> was already
        received (...); nothing started"}``. Pushes coalesce on repository + commit SHA, not on the delivery
        id, so GitHub's "redeliver" (a fresh delivery id), a replayed capture and two simultaneous
        deliveries of one push start ONE run. The key, ``push:<owner/name>@<sha>``, is both the Prefect
        idempotency key and the delivery log's (KILN_HOME/webhooks/deliveries.jsonl, so a restart
        remembers); a concurrent duplicate finds the first one's claim and answers 409 "in progress".
        To retrain a commit again, use `kiln trigger retrain`.
    202 {"flow_run_id": ...} the retrain deployment was started with the repository URL (KILN_REPO, or the
                             allow-listed one), never credentials, as a parameter: the worker clones with
                             its own KILN_REPO_TOKEN
    503 the Prefect API could not start it (the push is not remembered: the sender may redeliver)

A claim is always released or recorded (try/finally): whatever fails after it, a redelivery is tried again.

GitHub's ``ping`` (sent when a hook is created) answers 200 once its signature checks out.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import os
import re
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from kiln.errors import KilnError
from kiln.infra import openapi
from kiln.infra.mlflow_webhook import mlflow_webhook_route
from kiln.infra.push_payload import Push, clone_url, github_push, gitlab_push, why_ignored
from kiln.infra.starter import RETRAIN, DeploymentStarter, Started
from kiln.infra.webhook_body import Reject, parse_json, read_body
from kiln.settings import Settings, load_settings
from kiln.tasks.lifecycle.retrain import RetrainParams

# not __name__: under `python -m` that is __main__, outside Kiln's loggers
log = logging.getLogger("kiln.infra.webhooks")

_DELIVERY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")  # GitHub and GitLab send UUIDs


class Starter(Protocol):
    """What the push routes need from :class:`infra.starter.DeploymentStarter` (tests pass a recorder).

    The registry route (``kiln.infra.mlflow_webhook``) calls its ``start_sync`` from a worker thread.
    """

    async def start(self, deployment: str, parameters: dict[str, Any], *, idempotency_key: str | None = None,
                    tags: list[str] | None = None) -> Started: ...


# ── delivery de-duplication ──────────────────────────────────────────────────────────────────────────
class DeliveryLog:
    """The last ``capacity`` delivery ids, in memory and appended to a JSON-lines file that survives restarts.

    The file is rewritten with only the newest ``capacity`` entries once it holds twice that many, so it
    stays bounded. One receiver process per file (a second would not see the first one's new entries).
    """

    def __init__(self, path: Path, capacity: int = 10_000) -> None:
        self.path = path
        self.capacity = capacity
        self.seen: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.pending: set[str] = set()
        self._lines = 0
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self.seen[entry["key"]] = entry
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a torn last line after a crash
                self._lines += 1
            while len(self.seen) > capacity:
                self.seen.popitem(last=False)

    def claim(self, key: str) -> dict[str, Any] | None:
        """Reserve ``key``; returns the earlier record when it was seen (or is being handled) already."""
        if key in self.seen:
            return self.seen[key]
        if key in self.pending:
            return {"key": key, "outcome": "in progress"}
        self.pending.add(key)
        return None

    def release(self, key: str) -> None:
        """Forget a claim whose handling failed, so that a redelivery is tried again."""
        self.pending.discard(key)

    def record(self, key: str, outcome: str, **detail: Any) -> None:
        self.pending.discard(key)
        entry = {"key": key, "outcome": outcome, "at": time.time(), **detail}
        self.seen[key] = entry
        while len(self.seen) > self.capacity:
            self.seen.popitem(last=False)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._lines >= 2 * self.capacity:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(e) + "\n" for e in self.seen.values()))
            os.replace(tmp, self.path)
            self._lines = len(self.seen)
        else:
            with self.path.open("a") as fh:
                fh.write(json.dumps(entry) + "\n")
            self._lines += 1


# ── reading and checking a request ───────────────────────────────────────────────────────────────────
def _secret(value: SecretStr | None, variable: str) -> bytes:
    if value is None or not value.get_secret_value():
        raise Reject(503, f"this hook is not configured: set {variable} to the secret configured on the webhook")
    return value.get_secret_value().encode()


def verify_github(secret: bytes, body: bytes, header: str | None) -> None:
    """Check ``X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of body>`` in constant time."""
    if not header:
        raise Reject(401, "missing X-Hub-Signature-256 header; set the webhook's secret on GitHub")
    expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), header.strip().encode()):
        raise Reject(401, "X-Hub-Signature-256 does not match the body; the secret differs from KILN_WEBHOOK_SECRET")


def verify_token(secret: bytes, header: str | None) -> None:
    if not header:
        raise Reject(401, "missing X-Gitlab-Token header; set the webhook's secret token on GitLab")
    if not hmac.compare_digest(secret, header.encode()):
        raise Reject(401, "X-Gitlab-Token is wrong; it differs from KILN_GITLAB_TOKEN")


# ── the app ──────────────────────────────────────────────────────────────────────────────────────────
class Receiver:
    """Turns authenticated push deliveries into retrain flow runs, at most one per repository and commit."""

    def __init__(self, settings: Settings, starter: Starter) -> None:
        self.settings = settings
        self.starter = starter
        self.deliveries = DeliveryLog(settings.home / "webhooks" / "deliveries.jsonl")

    async def github(self, request: Request) -> JSONResponse:
        secret = _secret(self.settings.webhook_secret, "KILN_WEBHOOK_SECRET")
        body = await read_body(request, self.settings.webhook_max_body)
        verify_github(secret, body, request.headers.get("x-hub-signature-256"))
        event = _header(request, "X-GitHub-Event")
        delivery = _delivery(_header(request, "X-GitHub-Delivery"), "X-GitHub-Delivery")
        payload = parse_json(body, request.headers.get("content-type", ""))
        if event == "ping":
            zen = payload.get("zen")
            log.info("github delivery %s: ping answered", delivery)
            return JSONResponse({"pong": True, "zen": zen if isinstance(zen, str) and zen.isprintable() else None})
        if event != "push":
            return self._ignored("github", delivery, f"event {event!r} is not a push")
        return await self._push(github_push(payload, delivery))

    async def gitlab(self, request: Request) -> JSONResponse:
        secret = _secret(self.settings.gitlab_token, "KILN_GITLAB_TOKEN")
        body = await read_body(request, self.settings.webhook_max_body)
        verify_token(secret, request.headers.get("x-gitlab-token"))
        event = _header(request, "X-Gitlab-Event")
        delivery = request.headers.get("x-gitlab-event-uuid") or request.headers.get("idempotency-key")
        if not delivery:
            raise Reject(400, "missing X-Gitlab-Event-UUID (or Idempotency-Key) header: no delivery id")
        delivery = _delivery(delivery, "X-Gitlab-Event-UUID")
        payload = parse_json(body, request.headers.get("content-type", ""))
        if event != "Push Hook":
            return self._ignored("gitlab", delivery, f"event {event!r} is not a Push Hook")
        return await self._push(gitlab_push(payload, delivery))

    async def _push(self, push: Push) -> JSONResponse:
        reason = why_ignored(push, self.settings)
        if reason:  # not remembered: the same commit pushed to the watched branch later must still retrain
            return self._ignored(push.provider, push.delivery, reason)
        repo = clone_url(push, self.settings)
        key = f"push:{push.repository.lower()}@{push.sha}"
        # Claimed before the first await: a concurrent duplicate (same event loop) sees the claim.
        earlier = self.deliveries.claim(key)
        if earlier is not None:
            via = f"delivery {earlier['delivery']}: " if earlier.get("delivery") else ""
            raise Reject(409, f"push {push.sha[:12]} of {push.repository} was already received ({via}"
                              f"{earlier.get('outcome')}); nothing started")
        recorded = False
        try:
            params = RetrainParams(sha=push.sha, repo=repo, branch=push.ref.removeprefix("refs/heads/"),
                                   triggered_by=f"webhook:{push.provider}:{push.delivery}")
            try:
                started = await self.starter.start(RETRAIN, {"params": params.model_dump(mode="json",
                                                                                         exclude_none=True)},
                                                   idempotency_key=key, tags=["kiln", f"webhook:{push.provider}"])
            except Exception as exc:  # noqa: BLE001 - any failure to reach Prefect is answered, not raised
                log.error("%s delivery %s: push %s of %s NOT started: %s", push.provider, push.delivery,
                          push.sha[:12], push.repository, exc)
                raise Reject(503, str(exc) if isinstance(exc, KilnError) else
                             f"could not start {RETRAIN}: {type(exc).__name__}") from exc
            self.deliveries.record(key, "started", delivery=push.delivery, sha=push.sha,
                                   flow_run_id=started.flow_run_id)
            recorded = True
        finally:
            if not recorded:  # whatever failed, a redelivery is tried again (Prefect's key still dedupes)
                self.deliveries.release(key)
        log.info("%s delivery %s: push %s to %s of %s started %s (flow run %s)", push.provider, push.delivery,
                 push.sha[:12], push.ref, push.repository, RETRAIN, started.flow_run_id)
        return JSONResponse({"flow_run_id": started.flow_run_id, "flow_run_name": started.name,
                             "deployment": started.deployment, "sha": push.sha, "delivery": push.delivery},
                            status_code=202)

    @staticmethod
    def _ignored(provider: str, delivery: str, reason: str) -> JSONResponse:
        log.info("%s delivery %s: ignored, %s", provider, delivery, reason)
        return JSONResponse({"ignored": reason}, status_code=202)


def _header(request: Request, name: str) -> str:
    value = request.headers.get(name)
    if not value:
        raise Reject(400, f"missing {name} header")
    if len(value) > 128 or not value.isprintable():
        raise Reject(400, f"{name} header is not printable text of at most 128 characters")
    return value


def _delivery(value: str, name: str) -> str:
    if not _DELIVERY.fullmatch(value):
        raise Reject(400, f"{name} header {value[:40]!r} is not a delivery id (letters, digits, '.', '_', ':', '-')")
    return value


def _guarded(handler):  # noqa: ANN001, ANN202 - wraps a route; every Reject becomes a JSON error
    async def route(request: Request) -> JSONResponse:
        try:
            return await handler(request)
        except Reject as exc:
            level = logging.WARNING if exc.status in (401, 409, 413) else logging.INFO
            log.log(level, "%s %s refused (%d): %s", request.method, request.url.path, exc.status, exc.message)
            return JSONResponse({"error": exc.message}, status_code=exc.status)

    return route


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": f"{request.method} {request.url.path}: {exc.detail}"}, status_code=exc.status_code)


async def _bug(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": f"internal error ({type(exc).__name__}); see the receiver's log"}, status_code=500)


def create_app(settings: Settings, starter: Starter | None = None) -> Starlette:
    """The receiver's ASGI app; ``starter`` defaults to a :class:`DeploymentStarter` on the configured API."""
    receiver = Receiver(settings, starter or DeploymentStarter(settings.prefect_api_url))

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "github": settings.webhook_secret is not None,
                             "gitlab": settings.gitlab_token is not None,
                             "mlflow": settings.mlflow_webhook_secret is not None})

    routes = [Route("/hooks/github", _guarded(receiver.github), methods=["POST"]),
              Route("/hooks/gitlab", _guarded(receiver.gitlab), methods=["POST"]),
              Route("/health", health, methods=["GET"])]
    routes.append(mlflow_webhook_route(settings, receiver.starter))  # POST /hooks/mlflow: registry events
    routes.append(openapi.openapi_route(openapi.webhooks()))
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error, Exception: _bug})
    app.state.receiver = receiver
    return app


def main(argv: list[str] | None = None) -> None:
    """Command line entry point: serve the receiver (settings from ``KILN_*`` / kiln.yaml)."""
    import uvicorn

    from kiln.logs import setup_logging

    parser = argparse.ArgumentParser(description="Kiln webhook receiver: git pushes start the retrain flow")
    parser.add_argument("--host", help="address to bind (default: KILN_HOST)")
    parser.add_argument("--port", type=int, help="port (default: KILN_WEBHOOK_PORT)")
    parser.add_argument("--config", type=Path, help="settings YAML (default: ./kiln.yaml)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        settings = load_settings(args.config)
    except KilnError as exc:
        raise SystemExit(f"error: {exc}") from exc
    if settings.webhook_secret is None and settings.gitlab_token is None:
        log.warning("neither KILN_WEBHOOK_SECRET nor KILN_GITLAB_TOKEN is set: every hook will answer 503")
    host, port = args.host or settings.host, args.port or settings.webhook_port
    log.info("receiving git pushes on http://%s:%d/hooks/{github,gitlab}; %s of %s starts %s", host, port,
             settings.webhook_branch, settings.webhook_repository or "any repository", RETRAIN)
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning", timeout_keep_alive=30)


if __name__ == "__main__":
    main()
