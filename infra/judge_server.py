"""Kiln's judge for the engines users already run: an Argo Rollouts ``web`` metric and Flagger's webhooks.

    KILN_JUDGE_TOKEN=... KILN_GATEWAY_TOKEN=... python -m kiln.infra.judge_server --spec rollout.yaml --port 8090
    (or `kiln judge serve`)

Each analysis gets the verdict a Kiln rollout step gets (:func:`kiln.tasks.rollout.judge.judge_window`: error
rate, p95/p99 ratios and the rank test on latency, agreement on mirrored rows, accuracy on labelled feedback,
drift), with every check's reason, from a :class:`~kiln.tasks.rollout.router.MetricsWindows` source: the Kiln
gateway's analysis windows by default (where its traffic flows through a Kiln gateway), or PromQL over a Prometheus
of the ``rollout_metrics`` setting (``--metrics NAME``: where a mesh splits the traffic). A judged window is closed,
so the next analysis counts only newer traffic.

    GET|POST /judge/argo[?weight=100]       200 {"verdict": "pass"|"fail"|"inconclusive", "ok", "checks", "reasons",
                                            "failed", "figures"}; the source unreachable: 502 (Argo: an Error
                                            measurement, as is any non-2xx)
    POST /judge/flagger/confirm-rollout     200 when the source answers and names both upstreams' versions, else 503
    POST /judge/flagger/pre-rollout         the same, and opens a fresh window (what came before is judged by no one)
    POST /judge/flagger/rollout             judge the window since the last call: 200 pass, 412 fail, 425 inconclusive
    POST /judge/flagger/confirm-promotion   200 when this canary's last verdict passed, else 412/425 (judges nothing)

Flagger passes only HTTP 2xx (any status above 202 fails the hook) and knows no "inconclusive": a window with too
little traffic halts its advancement like a failed check, as Flagger's own metrics do when a query finds no
values. Flagger's payload (``{"name", "namespace", "phase", "metadata"}``) names the canary whose last verdict
``confirm-promotion`` reads; ``metadata.weight`` (and Argo's ``?weight=``) of 100 judges without the champion.

Every route but ``/health`` needs the ``judge_token`` setting as ``Authorization: Bearer <token>`` (compared in
constant time). Flagger's webhooks send no headers, so its requests may carry it as ``metadata.token`` instead
(it then sits in the Canary object: give the judge its own token, never the gateway's). The judge reads: it
holds the source as MetricsWindows only, and moves no traffic and no alias.
"""

from __future__ import annotations

import argparse
import hmac
import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

from pydantic import BaseModel, Field, ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kiln.errors import KilnError, validation_problems
from kiln.infra.http_body import read_limited
from kiln.tasks.rollout.judge import Check, RolloutSpec, StepVerdict, judge_window
from kiln.tasks.rollout.router import MetricsWindows
from kiln.tasks.rollout.status import verdict_figures

log = logging.getLogger(__name__)

DriftJudge = Callable[[dict[str, Any]], list[Check]]
MAX_BODY = 64 << 10  # Flagger's payload is a few names and the hook's metadata
ARGO_KEY = "argo"
# Flagger fails a hook on any status above 202; these say which way it failed.
FLAGGER_STATUS = {"pass": HTTPStatus.OK, "fail": HTTPStatus.PRECONDITION_FAILED, "inconclusive": HTTPStatus.TOO_EARLY}


class SourceUnavailable(KilnError):
    """The metrics source (the gateway, Prometheus) did not answer; no verdict was made."""


class FlaggerPayload(BaseModel):
    """What Flagger POSTs to a webhook (flaggerv1.CanaryWebhookPayload); its checksum and more are ignored."""

    name: str = Field(..., min_length=1)
    namespace: str = Field(..., min_length=1)
    phase: str = ""
    metadata: dict[str, str] = Field(default_factory=dict)


def _weight(value: str | None) -> float | None:
    if value in (None, ""):
        return None
    try:
        weight = float(value)
    except ValueError:
        weight = -1.0
    if not 0 <= weight <= 100:
        raise ValueError(f"weight {value!r} must be the challenger's traffic share in percent, 0-100")
    return weight


def verdict_body(verdict: StepVerdict, window: dict[str, Any]) -> dict[str, Any]:
    """A verdict as JSON for an AnalysisTemplate's ``jsonPath``: ``{$.verdict}``, ``{$.ok}``, ``{$.figures...}``."""
    return {"verdict": verdict.outcome, "ok": verdict.outcome == "pass",
            "checks": [{"name": c.name, "status": c.status, "reason": c.reason} for c in verdict.checks],
            "reasons": verdict.reasons, "failed": [c.name for c in verdict.checks if c.status == "failed"],
            "figures": verdict_figures(window, verdict), "judged_at": datetime.now(UTC).isoformat()}


class Judge:
    """Judges analysis windows from ``windows`` against ``spec``'s thresholds; remembers each key's last verdict.

    One window at a time: two analyses asking at once must not split one window between them.
    """

    def __init__(self, spec: RolloutSpec, windows: MetricsWindows, *, drift: DriftJudge | None = None) -> None:
        self.spec, self.windows, self.drift = spec, windows, drift
        self._lock = threading.Lock()
        self._last: dict[str, dict[str, Any]] = {}

    def _source(self, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except KilnError as exc:
            raise SourceUnavailable(f"the metrics source did not answer: {exc}") from exc

    def ready(self, *, open_window: bool = False) -> dict[str, Any]:
        """The upstreams' versions (the source answers and names both); with ``open_window`` a fresh window starts."""
        with self._lock:
            versions = self._source(self.windows.served_versions)
            if open_window:
                self._source(self.windows.next_window)
        missing = [role for role in ("champion", "challenger") if not versions.get(role)]
        return {"ready": not missing, "versions": versions,
                "reason": f"the source does not say which version {' and '.join(missing)} serves" if missing
                else "the source answers and names both upstreams' versions"}

    def judge(self, key: str, weight: float | None = None) -> dict[str, Any]:
        """Close the current window and judge it; the JSON body of the verdict (also kept as ``key``'s last)."""
        with self._lock:
            window = self._source(self.windows.next_window)
        verdict = judge_window(self.spec, window, weight=weight, drift=self.drift)
        body = verdict_body(verdict, window)
        self._last[key] = body
        log.info("judged %s: %s; %s", key, verdict.outcome, "; ".join(verdict.reasons))
        return body

    def last(self, key: str) -> dict[str, Any] | None:
        """The last verdict judged for ``key`` (None before the first)."""
        return self._last.get(key)


# ---- HTTP ------------------------------------------------------------------------------------------------


def _error(message: str, status: int) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == HTTPStatus.UNAUTHORIZED else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _token_ok(given: str, token: bytes) -> bool:
    return hmac.compare_digest(given.strip().encode(errors="replace"), token)


def _bearer(request: Request) -> str:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return given if scheme.lower() == "bearer" else ""


async def _flagger_payload(request: Request) -> FlaggerPayload:
    def refuse(size: int | None) -> ValueError:
        return ValueError(f"the body is over {MAX_BODY} bytes; a Flagger webhook payload is a few names")

    raw = await read_limited(request, MAX_BODY, refuse)
    try:
        return FlaggerPayload.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        raise ValueError(f"not a Flagger webhook payload ({validation_problems(exc, 'body', model=FlaggerPayload)}"
                         '); Flagger sends {"name", "namespace", "phase", "metadata"}') from exc


def judge_routes(judge: Judge, token: str) -> list[Route]:
    """The judge's routes, each behind ``token`` (mountable beside other routes)."""
    if not token:
        raise ValueError("the judge needs a bearer token: set KILN_JUDGE_TOKEN (the judge_token setting)")
    secret = token.encode()

    async def argo(request: Request) -> Response:
        if not _token_ok(_bearer(request), secret):
            return _error("missing or wrong judge token; send 'Authorization: Bearer <token>'", 401)
        try:
            weight = _weight(request.query_params.get("weight"))
            return JSONResponse(await run_in_threadpool(judge.judge, ARGO_KEY, weight))
        except ValueError as exc:
            return _error(str(exc), 400)
        except SourceUnavailable as exc:
            return _error(str(exc), 502)

    def flagger(hook: str) -> Callable[[Request], Any]:
        async def handle(request: Request) -> Response:
            try:
                payload = await _flagger_payload(request)
            except ValueError as exc:
                # Unauthenticated callers learn only that they are unauthenticated.
                return _error(str(exc), 400) if _token_ok(_bearer(request), secret) else _error(
                    "missing or wrong judge token; send it as a bearer token or as metadata.token", 401)
            if not (_token_ok(_bearer(request), secret) or _token_ok(payload.metadata.get("token", ""), secret)):
                return _error("missing or wrong judge token; send it as a bearer token or as metadata.token", 401)
            key = f"{payload.namespace}/{payload.name}"
            try:
                return await _flagger_hook(judge, hook, key, _weight(payload.metadata.get("weight")))
            except ValueError as exc:
                return _error(str(exc), 400)
            except SourceUnavailable as exc:
                return _error(str(exc), 503)

        return handle

    return [Route("/judge/argo", argo, methods=["GET", "POST"]),
            *(Route(f"/judge/flagger/{hook}", flagger(hook), methods=["POST"])
              for hook in ("confirm-rollout", "pre-rollout", "rollout", "confirm-promotion"))]


async def _flagger_hook(judge: Judge, hook: str, key: str, weight: float | None) -> Response:
    if hook in ("confirm-rollout", "pre-rollout"):
        body = await run_in_threadpool(judge.ready, open_window=hook == "pre-rollout")
        return JSONResponse(body, status_code=200 if body["ready"] else 503)
    if hook == "rollout":
        body = await run_in_threadpool(judge.judge, key, weight)
    else:  # confirm-promotion: Flagger keeps calling the rollout hook meanwhile, which keeps the verdict fresh
        body = judge.last(key) or {"verdict": "inconclusive", "ok": False, "checks": [], "failed": [],
                                   "reasons": [f"no window of {key} judged yet: the rollout hook has not run"]}
    return JSONResponse(body, status_code=FLAGGER_STATUS[body["verdict"]])


def create_app(judge: Judge, token: str) -> Starlette:
    """The judge as an ASGI app: :func:`judge_routes` and ``GET /health``."""
    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[*judge_routes(judge, token), Route("/health", health)])


# ---- running it ------------------------------------------------------------------------------------------


def build_judge(spec_path: str | None, gateway: str, model: str | None, settings: Any, *,
                metrics: str | None = None) -> tuple[Judge, Any]:
    """A judge over ``metrics``, a source of the ``rollout_metrics`` setting (Prometheus: the spec is fitted to
    what it measures), or by default the analysis windows of the Kiln gateway named ``gateway`` (read with its
    admin token, ``gateway_token``); returns the judge and the source to close. ``model`` gives drift checks
    their reference when the spec names none."""
    from kiln.errors import ConfigError
    from kiln.tasks.registry import client as registry
    from kiln.tasks.rollout.launch import default_drift
    from kiln.tasks.rollout.params import load_rollout_spec

    spec, source = load_rollout_spec(spec_path), None
    if metrics:
        from kiln.tasks.rollout.prometheus import windows_for

        source, spec = windows_for(metrics, settings, spec)  # None: the gateway's own windows
    source = source or _gateway_windows(gateway, settings)
    try:
        drift = None
        if spec.drift is not None:
            if spec.drift.reference is None and not model:
                raise ConfigError("the spec asks for drift checks without drift.reference: pass --model NAME (its "
                                  "champion's recorded test split is the reference) or set drift.reference")
            client = registry.connect(settings) if spec.drift.reference is None else None
            drift = default_drift(spec, client, model or "", settings)
    except BaseException:
        source.close()
        raise
    return Judge(spec, source, drift=drift), source


def _gateway_windows(gateway: str, settings: Any) -> Any:
    from kiln.errors import ConfigError
    from kiln.tasks.rollout.gateway_client import GatewayRouter

    if not settings.gateway_token:
        raise ConfigError("the judge closes the gateway's analysis windows with its admin token: set "
                          "KILN_GATEWAY_TOKEN (or judge a Prometheus source with --metrics NAME)")
    return GatewayRouter(settings.gateway_url(gateway), settings.gateway_token.get_secret_value())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Kiln's judge: Argo Rollouts web metric and Flagger webhooks")
    parser.add_argument("--spec", help="rollout spec YAML whose metrics, min_samples and drift the judge applies "
                        "(Kiln's form or Argo's strategy.canary.steps; default: Kiln's preset)")
    parser.add_argument("--gateway", default="default", help="the Kiln gateway whose windows are judged, by its "
                        "name in the rollout_gateways setting (default: 'default')")
    parser.add_argument("--metrics", help="judge a source of the rollout_metrics setting (Prometheus) by its "
                        "name instead of the gateway's windows")
    parser.add_argument("--model", help="registered model whose champion's test split is the drift reference")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, help="default: the judge_port setting (8090)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Command line entry point; tokens come from the settings (``KILN_JUDGE_TOKEN``, ``KILN_GATEWAY_TOKEN``)."""
    import uvicorn

    from kiln.settings import load_settings

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings()
        token = settings.judge_token.get_secret_value() if settings.judge_token else ""
        if not token:
            raise SystemExit("error: set KILN_JUDGE_TOKEN (the judge_token setting): Argo and Flagger send it")
        judge, source = build_judge(args.spec, args.gateway, args.model, settings, metrics=args.metrics)
    except KilnError as exc:
        raise SystemExit(f"error: {exc}") from exc
    try:
        uvicorn.run(create_app(judge, token), host=args.host, port=args.port or settings.judge_port,
                    log_level="warning")
    finally:
        source.close()


if __name__ == "__main__":
    main()
