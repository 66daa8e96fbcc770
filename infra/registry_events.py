"""Registry events: a new version of a watched model starts optimize; an approval resumes a paused promotion.

Two ways to hear the registry, one meaning for both (:class:`RegistryEvents`):

- **webhooks** (MLflow 3.3+ server, SQL store): MLflow POSTs ``model_version.created`` and
  ``model_version_tag.set`` to ``/hooks/mlflow``, signed ``X-MLflow-Signature: v1,<base64 HMAC-SHA256 of
  "{delivery_id}.{timestamp}.{body}">`` (see ``mlflow/webhooks/delivery.py``);
- **polling** (:class:`RegistryPoller`, ``python -m kiln.infra.registry_events``): the embedded SQLite store sends
  no webhooks, and MLflow drops a delivery after its retries, so polling is also the backstop.

Both start optimize with the idempotency key ``mlflow:{name}:{version}:optimize``: whichever comes second
gets the run the first one created. Versions that Kiln registered itself (its optimize flow's challengers)
never start optimize, or optimize would feed on its own output forever.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol
from uuid import UUID

from kiln.errors import ConfigError, KilnError
from kiln.settings import Settings

from .starter import OPTIMIZE, Started
from .webhook_body import Reject, read_body

log = logging.getLogger(__name__)

EVENTS = ("model_version.created", "model_version_tag.set")
WEBHOOK_NAME = "kiln-registry-events"
WINDOW_S = 300  # Standard Webhooks' replay tolerance; MLflow signs with int(time.time()) at send time
CANDIDATE_TAG = "kiln.candidate_key"  # tasks/publish.py tags every version the optimize flow registers
OPTIMIZE_RUN_TAG = "kiln.model"  # flows/optimize.py tags its MLflow run; set before any version exists
PROMOTE_RUN_TAG = "kiln.promote_flow_run"  # the paused promote flow run that reviews this version
# `promotion.decide` sets these in this order; a decision is complete once approver and reason are there too.
APPROVAL_KEYS = frozenset({"kiln.approval", "kiln.approver", "kiln.approval_reason", "kiln.approval_at"})
# tasks.promotion's tag values → flows.promote.ApprovalInput.decision (literals: importing either pulls MLflow
# into every receiver that mounts the route)
FORM_ANSWER = {"approved": "approve", "rejected": "reject"}


class Starter(Protocol):
    def start_sync(self, deployment: str, parameters: dict[str, Any], *, idempotency_key: str | None = None,
                   tags: list[str] | None = None) -> Started: ...


@dataclass(frozen=True)
class Outcome:
    """What one event led to; the webhook answers it as JSON, the poller logs it."""

    status: str  # started | ignored | resumed | error
    reason: str = ""
    flow_runs: list[str] = field(default_factory=list)


# ── Prefect: paused promote runs ─────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class PausedPromotion:
    flow_run_id: str
    model: str


class PrefectPromotions:
    """Paused ``promote`` flow runs (``approval="ui"``) and resuming them with an approval form's answer."""

    def __init__(self, api_url: str | None = None) -> None:
        self.api_url = api_url

    @contextlib.contextmanager
    def _client(self) -> Iterator[Any]:
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        scope = temporary_settings({PREFECT_API_URL: self.api_url}) if self.api_url else contextlib.nullcontext()
        with scope, get_client(sync_client=True) as client:
            yield client

    def paused(self, model: str | None = None) -> list[PausedPromotion]:
        from prefect.client.schemas.filters import (
            FlowFilter,
            FlowFilterName,
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType

        with self._client() as client:
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["promote"])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.PAUSED]))), limit=200)
        found = [PausedPromotion(str(r.id), ((r.parameters or {}).get("params") or {}).get("model", "")) for r in runs]
        return [p for p in found if p.model and (model is None or p.model == model)]

    def resume(self, flow_run_id: str, answer: dict[str, str]) -> bool:
        """True when resumed, False when the run is no longer paused; raises when Prefect refuses the answer."""
        from prefect.client.schemas.responses import SetStateStatus

        with self._client() as client:
            result = client.resume_flow_run(UUID(flow_run_id), run_input=answer)
        if result.status == SetStateStatus.ACCEPT:
            return True
        if result.status == SetStateStatus.ABORT:  # resumed already (a second event for the same decision)
            return False
        raise RuntimeError(f"Prefect refused to resume {flow_run_id}: {getattr(result.details, 'reason', result)}")


# ── what an event means ──────────────────────────────────────────────────────────────────────────────
class RegistryEvents:
    """The meaning of registry events, shared by the webhook route and the poller (blocking calls)."""

    def __init__(self, settings: Settings, starter: Starter, *, promotions: PrefectPromotions | None = None,
                 client: Any = None) -> None:
        self.settings, self.starter = settings, starter
        self.promotions = promotions or PrefectPromotions(getattr(starter, "api_url", None))
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            # Not registry.connect(): that sets MLflow's process-wide URI, and a receiver should not.
            self._client = MlflowClient(self.settings.effective_tracking_uri, self.settings.registry_uri)
        return self._client

    def version_created(self, name: str, version: str, *, tags: dict[str, str] | None = None,
                        run_id: str | None = None, via: str = "webhook") -> Outcome:
        """Start optimize on ``name/version`` when the model is watched and the version is not Kiln's own."""
        if name not in self.settings.watch_models:
            return Outcome("ignored", f"{name} is not watched (KILN_WATCH_MODELS)")
        if self._registered_by_kiln(name, version, tags or {}, run_id):
            return Outcome("ignored", f"{name} v{version} was registered by Kiln's optimize flow")
        started = self.starter.start_sync(
            OPTIMIZE, {"params": {"model": f"{name}/{version}"}}, idempotency_key=optimize_key(name, version),
            tags=["kiln", f"trigger:mlflow-{via}", f"model:{name}"])
        return Outcome("started", f"{OPTIMIZE} for {name}/{version}", [started.flow_run_id])

    def _registered_by_kiln(self, name: str, version: str, tags: dict[str, str], run_id: str | None) -> bool:
        # publish.register tags the version just after creating it, so the creation event may not carry
        # the tag yet; the optimize flow's MLflow run is tagged before any version exists.
        if CANDIDATE_TAG in tags:
            return True
        mv = self.client.get_model_version(name, version)
        if CANDIDATE_TAG in mv.tags:
            return True
        run_id = run_id or mv.run_id
        if not run_id:
            return False
        from mlflow.exceptions import MlflowException

        try:
            return OPTIMIZE_RUN_TAG in self.client.get_run(run_id).data.tags
        except MlflowException:  # the run was deleted: nothing says Kiln made this version
            return False

    def resume_decided(self, name: str | None = None, version: str | None = None) -> Outcome:
        """Resume every paused promote run whose version carries a complete decision (``kiln.approval`` etc.)."""
        resumed, waiting = [], []
        for run in self.promotions.paused(name):
            mv = self._reviewed_version(run)
            if mv is None or (version is not None and str(mv.version) != str(version)):
                continue
            answer = approval_answer(mv.tags)
            if answer is None:
                waiting.append(f"{run.model} v{mv.version}")
                continue
            if self.promotions.resume(run.flow_run_id, answer):
                log.info("resumed promote run %s for %s v%s: %s by %s", run.flow_run_id, run.model, mv.version,
                         answer["decision"], answer["approver"])
                resumed.append(run.flow_run_id)
        if resumed:
            return Outcome("resumed", "approval tag", resumed)
        what = f"{name} v{version}" if name else "any version"
        return Outcome("ignored", f"no decision yet on {', '.join(waiting)}" if waiting
                       else f"no paused promote run waits on {what}")

    def _reviewed_version(self, run: PausedPromotion) -> Any:
        """The version a paused run reviews: the one linked to it by tag, else the model's current challenger."""
        from mlflow.exceptions import MlflowException

        from kiln.tasks.registry.client import CHALLENGER

        linked = self.client.search_model_versions(
            f"name = '{_quote(run.model)}' and tags.`{PROMOTE_RUN_TAG}` = '{run.flow_run_id}'")
        if linked:
            return linked[0]
        try:
            return self.client.get_model_version_by_alias(run.model, CHALLENGER)
        except MlflowException:
            return None


def optimize_key(name: str, version: str) -> str:
    """The idempotency key shared by the webhook and the poller: one optimize run per version, ever."""
    return f"mlflow:{name}:{version}:optimize"


def approval_answer(tags: dict[str, str]) -> dict[str, str] | None:
    """The promote flow's ``ApprovalInput`` from a version's tags, or None while the decision is incomplete."""
    decision = FORM_ANSWER.get(tags.get("kiln.approval", ""))
    approver, reason = tags.get("kiln.approver", "").strip(), tags.get("kiln.approval_reason", "").strip()
    if decision is None or not approver or not reason:
        return None
    return {"decision": decision, "approver": approver, "reason": reason}


def _quote(text: str) -> str:
    return text.replace("'", "\\'")


# ── the webhook ──────────────────────────────────────────────────────────────────────────────────────
WebhookRefused = Reject  # the receiver's refusal: a status and a message



def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """``X-MLflow-Signature`` for a body, exactly as ``mlflow.webhooks.delivery`` computes it."""
    digest = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(secret: str, headers: Any, body: bytes, *, now: float | None = None, window_s: float = WINDOW_S) -> str:
    """Check signature and timestamp; returns the delivery id or raises :class:`WebhookRefused`."""
    delivery_id = headers.get("x-mlflow-delivery-id", "")
    timestamp = headers.get("x-mlflow-timestamp", "")
    signature = headers.get("x-mlflow-signature", "")
    missing = [h for h, v in (("X-MLflow-Delivery-Id", delivery_id), ("X-MLflow-Timestamp", timestamp),
                              ("X-MLflow-Signature", signature)) if not v]
    if missing:
        raise WebhookRefused(400, f"missing header(s) {', '.join(missing)}; is this an MLflow webhook with a secret?")
    expected = sign(secret, delivery_id, timestamp, body)
    # Standard Webhooks allow several space-separated signatures (key rotation); MLflow sends one.
    if not any(hmac.compare_digest(expected, s) for s in signature.split()):
        raise WebhookRefused(401, "X-MLflow-Signature does not match; the webhook's secret must equal "
                                  "KILN_MLFLOW_WEBHOOK_SECRET")
    try:
        age = (time.time() if now is None else now) - int(timestamp)
    except ValueError:
        raise WebhookRefused(400, f"X-MLflow-Timestamp {timestamp!r} is not a Unix time in seconds") from None
    if abs(age) > window_s:
        when = f"{age:.0f} s old" if age > 0 else f"{-age:.0f} s in the future"
        raise WebhookRefused(401, f"delivery timestamp is {when}; only {window_s:.0f} s either way are accepted "
                                  "(a replayed delivery, or MLflow's and Kiln's clocks disagree)")
    return delivery_id


class Deliveries:
    """Delivery ids handled within the replay window; older ones are refused by their timestamp anyway."""

    def __init__(self, ttl_s: float = 2 * WINDOW_S, max_size: int = 10_000) -> None:
        self.ttl_s, self.max_size = ttl_s, max_size
        self.done: OrderedDict[str, float] = OrderedDict()
        self.in_flight: set[str] = set()
        self.lock = threading.Lock()

    def claim(self, delivery_id: str) -> str:
        """``new`` (handle it), ``done`` (handled already) or ``busy`` (being handled: MLflow gave up waiting)."""
        with self.lock:
            now = time.monotonic()
            while self.done and (len(self.done) > self.max_size or next(iter(self.done.values())) < now - self.ttl_s):
                self.done.popitem(last=False)
            if delivery_id in self.done:
                return "done"
            if delivery_id in self.in_flight:
                return "busy"
            self.in_flight.add(delivery_id)
            return "new"

    def finish(self, delivery_id: str, *, ok: bool) -> None:
        with self.lock:
            self.in_flight.discard(delivery_id)
            if ok:
                self.done[delivery_id] = time.monotonic()


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


# ── the poller ───────────────────────────────────────────────────────────────────────────────────────
@dataclass
class PollReport:
    started: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class RegistryPoller:
    """Looks at the watched models every ``poll_interval_s``; remembers seen versions in ``<home>/events``.

    The first look at a model records the versions it already has without starting anything: a restart,
    or a newly watched model, must not optimize history.
    """

    def __init__(self, settings: Settings, starter: Starter, *, events: RegistryEvents | None = None) -> None:
        self.settings = settings
        self.events = events or RegistryEvents(settings, starter)
        self.state_file = settings.home / "events" / "registry-poller.json"

    def poll_once(self) -> PollReport:
        report, seen = PollReport(), self._load()
        for name in self.settings.watch_models:
            try:
                versions = self._versions(name)
            except Exception as exc:  # noqa: BLE001 - one unreadable model must not stop the others
                report.errors.append(f"{name}: {type(exc).__name__}: {exc}")
                continue
            if name not in seen:
                seen[name] = sorted(versions, key=int)
                self._save(seen)
                continue
            for version in sorted(set(versions) - set(seen[name]), key=int):
                try:
                    outcome = self.events.version_created(name, version, tags=versions[version].tags,
                                                          run_id=versions[version].run_id, via="poller")
                except Exception as exc:  # noqa: BLE001 - not marked seen: the next poll tries again
                    report.errors.append(f"{name}/{version}: {type(exc).__name__}: {exc}")
                    break
                (report.started if outcome.status == "started" else report.ignored).append(f"{name}/{version}")
                seen[name].append(version)
                self._save(seen)  # after each: a crash between two starts repeats nothing
        try:
            report.resumed = self.events.resume_decided().flow_runs
        except Exception as exc:  # noqa: BLE001
            report.errors.append(f"resume: {type(exc).__name__}: {exc}")
        for line in report.errors:
            log.warning("registry poll: %s", line)
        return report

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set."""
        log.info("polling %s every %g s", ", ".join(self.settings.watch_models) or "no models (approvals only)",
                 self.settings.poll_interval_s)
        while not stop.is_set():
            report = self.poll_once()
            if report.started or report.resumed:
                log.info("registry poll: started %s, resumed %s", report.started, report.resumed)
            stop.wait(self.settings.poll_interval_s)

    def _versions(self, name: str) -> dict[str, Any]:
        found, token = {}, None
        while True:
            page = self.events.client.search_model_versions(f"name = '{_quote(name)}'", page_token=token)
            found |= {str(v.version): v for v in page}
            token = page.token
            if not token:
                return found

    def _load(self) -> dict[str, list[str]]:
        try:
            return json.loads(self.state_file.read_text())["seen"]
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError) as exc:
            raise ConfigError(f"{self.state_file} is corrupt ({exc}); delete it to start over "
                              "(existing versions are then recorded, not optimized)") from exc

    def _save(self, seen: dict[str, list[str]]) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"seen": seen}, indent=1))
        os.replace(tmp, self.state_file)


def main(argv: list[str] | None = None) -> int:
    """``python -m kiln.infra.registry_events [--once]``: poll the registry (for stores that send no webhooks)."""
    from kiln.logs import setup_logging
    from kiln.settings import load_settings

    from .starter import DeploymentStarter

    parser = argparse.ArgumentParser(prog="python -m kiln.infra.registry_events", description=main.__doc__)
    parser.add_argument("--once", action="store_true", help="poll once, print what happened, exit")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        settings = load_settings()
        poller = RegistryPoller(settings, DeploymentStarter(settings.prefect_api_url))
        if args.once:
            report = poller.poll_once()
            print(json.dumps(asdict(report), indent=2))
            return 1 if report.errors else 0
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        poller.run(stop)
    except KilnError as exc:
        print(f"error: {exc}")
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
