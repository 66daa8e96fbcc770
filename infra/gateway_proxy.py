"""The gateway's traffic: forward each request to champion or challenger, mirror a share, score feedback.

Open Inference Protocol v2 requests (``/v2/...``) are forwarded unchanged to one upstream, chosen by
the challenger's weight (0-100 %, exact proportion) or, with an ``X-Kiln-Sticky`` header, by a hash of
its value (a user stays on one side while the weight holds). Every answer names its upstream in
``X-Kiln-Upstream`` and carries the gateway's own ``X-Kiln-Request-Id`` (a client's is never the key) that
``POST /feedback`` can later score, with the feedback or admin token as bearer credential. A body over
``max_body_bytes`` is refused (413) before it is read in full or forwarded.

Only inference requests (``POST .../infer`` and ``.../generate``; ``.../generate_stream`` is relayed by
:mod:`kiln.infra.gateway_stream`) are canary evidence: health and metadata requests are forwarded but not counted, and
an upstream's 4xx (the client's mistake) is neither a request nor an error of that upstream. When the upstream chosen
for a request cannot be reached or drops the connection before answering (a model server killed under load), the other
upstream answers it instead: inference has no side effects, so the client sees no failure, and the failure is counted
against the side that failed.
Shadow mode mirrors a share of champion-answered requests (HTTP here, gRPC in :mod:`kiln.infra.gateway_grpc`, both
through :meth:`Gateway.mirror`) to the challenger in the background and records whether the predicted labels
agree; the client only ever sees the champion's answer.

The split, windows and metrics themselves live in :mod:`kiln.infra.gateway_stats`; the split's TTL, the
versions the upstreams serve and the state file in :mod:`kiln.infra.gateway_state`; the admin routes that
change the split in :mod:`kiln.infra.gateway_admin`; ``POST /feedback`` in :mod:`kiln.infra.gateway_feedback`; the
app and its command in :mod:`kiln.infra.gateway`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kiln.infra.feedback_sink import FeedbackSink
from kiln.infra.gateway_state import RoutingState, Upstream
from kiln.infra.gateway_stats import (
    CHALLENGER,
    CHAMPION,
    GatewayMetrics,
    InputRecorder,
    PredictionLog,
    Routing,
    Splitter,
    Window,
    choose,
)
from kiln.infra.http_body import read_limited
from kiln.infra.oip import InferError, TextRequest, labels_of
from kiln.infra.oip_binary import HEADER_LENGTH, read_request, read_response
from kiln.infra.server import MAX_BODY_BYTES, VERSION_HEADER
from kiln.infra.upstream import Answer, Failure, UpstreamClient

log = logging.getLogger(__name__)
UPSTREAM_HEADER, REQUEST_ID_HEADER, STICKY_HEADER = "X-Kiln-Upstream", "X-Kiln-Request-Id", "X-Kiln-Sticky"
TOKEN_ENV = "KILN_GATEWAY_TOKEN"
_HOP_BY_HOP = {"host", "connection", "keep-alive", "content-length", "transfer-encoding", "te", "trailer",
               "upgrade", "proxy-authorization", "proxy-authenticate", "authorization", "accept-encoding",
               REQUEST_ID_HEADER.lower()}
_PASS_BACK = {"content-type", VERSION_HEADER.lower(), HEADER_LENGTH.lower()}  # the last: binary answers' layout
VERSION_HEADER_KEY = VERSION_HEADER.lower()
_MAX_PARSE_BYTES = 1 << 20  # bookkeeping parses bodies up to 1 MB; raw LM logits can be far larger
INFERENCE_ENDPOINTS = ("/infer", "/generate")  # canary evidence; /generate_stream: kiln.infra.gateway_stream


@dataclass(frozen=True)
class Routed:
    """Where one request goes: the split it was routed by, the upstream's role, and what to send there."""

    routing: Routing
    role: str
    path: str  # path and query, as the client sent them
    headers: dict[str, str]
    body: bytes
    request_id: str


def error_response(message: str, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    """Every error the gateway itself answers: ``{"error": message}`` with ``status``."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class Gateway:
    """Routing, forwarding, shadowing and bookkeeping; :func:`kiln.infra.gateway.create_app` wires it to HTTP.

    ``weight`` and ``shadow`` are the split to start from when ``state_file`` holds none yet; ``model_name`` is
    the model whose version each upstream is asked for every ``poll_s`` (learnt from traffic when None).
    ``POST /feedback`` takes ``feedback_token`` (when set) or ``admin_token`` as its bearer credential.
    """

    def __init__(self, champion: Upstream, challenger: Upstream, admin_token: str, *, weight: float = 0.0,
                 shadow: float = 0.0, timeout_s: float = 30.0, max_connections: int = 256,
                 max_shadow_inflight: int = 64, max_samples: int = 5000, model_name: str | None = None,
                 state_file: Path | None = None, poll_s: float = 2.0, feedback_token: str | None = None,
                 max_body_bytes: int = MAX_BODY_BYTES, text_sample: int = 2000,
                 feedback_sink: FeedbackSink | None = None) -> None:
        if not admin_token:
            raise ValueError(f"the admin API needs a token; set {TOKEN_ENV}")
        if not poll_s > 0:
            raise ValueError(f"poll_s must be above 0 seconds, got {poll_s!r}")
        self._token = admin_token.encode()
        self._feedback_tokens = [self._token] + ([feedback_token.encode()] if feedback_token else [])
        self.max_body_bytes = max_body_bytes
        self.splitter, self.shadow_splitter = Splitter(), Splitter()
        self.metrics = GatewayMetrics()
        self.control = RoutingState(champion, challenger, weight=weight, shadow=shadow, model=model_name,
                                    state_file=state_file, on_routing=self._publish_routing)
        self.upstreams = self.control.upstreams
        self.poll_s = poll_s
        self.window = Window(max_samples, text_sample=text_sample)  # texts: admin-only, in memory
        self.predictions, self.feedback_sink = PredictionLog(keep_texts=feedback_sink is not None), feedback_sink
        self.timeout_s, self.max_connections, self.max_shadow_inflight = timeout_s, max_connections, \
            max_shadow_inflight
        self._shadow_tasks: set[asyncio.Task] = set()
        # Feedback often arrives before the mirrored answer (the client has the champion's at once): keep the
        # truth for request ids still being mirrored, and score the shadow answer when it lands.
        self._mirroring: set[str] = set()
        self._late_truth: OrderedDict[str, list[str]] = OrderedDict()
        self.client: UpstreamClient | None = None

    @property
    def routing(self) -> Routing:
        """The split in force now (an immutable object, replaced whole on every change)."""
        return self.control.routing

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette):  # noqa: ANN201 - Starlette's lifespan protocol
        async with UpstreamClient(max_connections=self.max_connections, timeout_s=self.timeout_s) as client:
            self.client = client
            watch = asyncio.create_task(self.control.watch(client, self.poll_s), name="gateway-watch")
            try:
                yield
            finally:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch
                await self.wait_mirrors()
                self.client = None

    # ---- live traffic -------------------------------------------------------------------------------------

    async def route(self, request: Request) -> Routed | Response:
        """Read the body (refused past ``max_body_bytes``: a 413 Response), pick the upstream, and say what to send
        it; shared by :meth:`proxy` and the streamed answers of :mod:`kiln.infra.gateway_stream`."""
        routing = self.routing  # one snapshot for the whole request: a concurrent weight change cannot split it
        try:  # before anything is chosen or counted: a refused body leaves no trace
            body = await read_body(request, self.max_body_bytes)
        except InferError as exc:
            return error_response(str(exc), exc.status)
        # The scope's path and query as they are: building Starlette's URL object costs more than the rest of it.
        scope_path, query = request.scope["path"], request.scope.get("query_string", b"")
        if self.control.model is None:
            self.control.learn_model(scope_path)
        role = choose(routing, request.headers.get(STICKY_HEADER), self.splitter)
        request_id = uuid.uuid4().hex  # the gateway's own: a client cannot choose which sample its feedback scores
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers[REQUEST_ID_HEADER] = request_id
        # Forwarded as the client sent it (still percent-encoded), not as Starlette decoded it.
        raw_path = request.scope.get("raw_path") or scope_path.encode()
        path = raw_path.decode("latin-1") + (f"?{query.decode('latin-1')}" if query else "")
        return Routed(routing, role, path, headers, body, request_id)

    async def proxy(self, request: Request) -> Response:
        """Forward a ``/v2/...`` request to the upstream the routing picks, and mirror it when shadowing."""
        routed = await self.route(request)
        if isinstance(routed, Response):
            return routed
        routing, role, path, headers, body, request_id = (routed.routing, routed.role, routed.path, routed.headers,
                                                           routed.body, routed.request_id)
        is_infer = request.method == "POST" and request.scope["path"].endswith(INFERENCE_ENDPOINTS)
        answer = await self._send(role, request.method, path, headers, body, is_infer)
        if isinstance(answer, Failure) and answer.kind != "timeout":
            # Unreachable or dropped before answering (counted against ``role`` already): inference has no side
            # effects, so the other upstream answers rather than the client seeing the failure. A timeout is not
            # retried: the request may still be running, and a second wait would double the client's.
            self.metrics.fallbacks.inc()
            role = CHAMPION if role == CHALLENGER else CHALLENGER
            answer = await self._send(role, request.method, path, headers, body, is_infer)
        extra = {UPSTREAM_HEADER: role, REQUEST_ID_HEADER: request_id}
        if isinstance(answer, Failure):
            return error_response(f"upstream {role} failed: {answer.message}"[:300], answer.status, extra)
        labels = self._labels(role, answer) if is_infer else None
        if labels is not None:
            self.predictions.add(request_id, "live", role, self.upstreams[role].label, labels)
        mirrored = (is_infer and role == CHAMPION and answer.status == 200 and routing.shadow > 0
                    and self.mirror(routing, request_id, labels, partial(self._send_shadow, path, headers, body)))
        passed = {k: v for k, v in answer.headers.items() if k.lower() in _PASS_BACK}
        # Inputs are recorded after the answer has gone out, so parsing them never delays the client; a
        # request the upstream refused as the client's mistake (4xx) is not traffic the model saw.
        windows = [self.window.live[role]] + ([self.window.shadow] if mirrored else [])
        windows += self.predictions.text_keepers(request_id)  # the texts, for the feedback sink's rows
        record = BackgroundTask(_record_inputs, body, request.headers.get(HEADER_LENGTH), windows) \
            if is_infer and not 400 <= answer.status < 500 else None
        return Response(answer.content, status_code=answer.status, headers=passed | extra, background=record)

    async def _send(self, role: str, method: str, path: str, headers: dict[str, str], body: bytes,
                    is_infer: bool = True) -> Answer | Failure:
        """Forward to ``role``'s upstream and record the outcome of an inference request (only those are canary
        evidence); a transport failure is returned, not raised."""
        assert self.client is not None, "the gateway's lifespan has not started"
        upstream = self.upstreams[role]
        started, sent = time.perf_counter(), time.monotonic()
        answer = await self.client.request(method, upstream.url + path, headers=headers, body=body)
        seconds = time.perf_counter() - started
        code = answer.status
        if isinstance(answer, Answer) and VERSION_HEADER_KEY in answer.headers:
            self.control.observe(role, answer, sent)
        if not is_infer:
            return answer
        self.metrics.requests.labels(role, upstream.label, str(code)).inc()
        if code < 500:
            self.metrics.duration.labels(role, upstream.label).observe(seconds)
        self.window.live[role].record(code, seconds)
        return answer

    def _labels(self, role: str, answer: Answer) -> list[str] | None:
        labels = _answer_labels(answer)
        if labels is not None:
            window, version = self.window.live[role], self.upstreams[role].label
            for label in labels:
                window.labels[label] += 1
                self.metrics.predictions.labels(role, version, label).inc()
        return labels

    # ---- shadow traffic ------------------------------------------------------------------------------------

    def mirror(self, routing: Routing, request_id: str, champion_labels: list[str] | None,
               send: Callable[[], Awaitable[tuple[int, list[str] | None]]]) -> bool:
        """Mirror a champion-answered request to the challenger when the shadow share says so; True when it was sent.

        ``send`` forwards it over the client's transport (HTTP or gRPC) and returns the challenger's status, counted
        as the HTTP proxy counts it, and its predicted labels (None when it has none); it runs as a task, so the
        client's answer never waits for it. Both transports share this bound and :meth:`_shadow`'s bookkeeping.
        """
        if not self.shadow_splitter.take(routing.shadow):
            return False
        if len(self._shadow_tasks) >= self.max_shadow_inflight:  # shadowing must never slow live traffic
            self.window.shadow.dropped += 1
            self.metrics.shadow_dropped.inc()
            return False
        task = asyncio.create_task(self._shadow(send, request_id, champion_labels))
        self._shadow_tasks.add(task)
        self._mirroring.add(request_id)
        task.add_done_callback(self._shadow_tasks.discard)
        task.add_done_callback(lambda _: self._mirroring.discard(request_id))
        return True

    async def wait_mirrors(self) -> None:
        """Let mirrors in flight finish (bounded by the upstream timeout), so their answers are counted, not torn."""
        if self._shadow_tasks:
            await asyncio.wait(self._shadow_tasks, timeout=self.timeout_s)

    async def _send_shadow(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, list[str] | None]:
        """The HTTP mirror: the challenger's status and predicted labels for the same request."""
        assert self.client is not None
        sent = time.monotonic()
        answer = await self.client.request("POST", self.upstreams[CHALLENGER].url + path, headers=headers, body=body)
        if isinstance(answer, Answer) and VERSION_HEADER_KEY in answer.headers:
            self.control.observe(CHALLENGER, answer, sent)
        return answer.status, _answer_labels(answer) if isinstance(answer, Answer) else None

    async def _shadow(self, send: Callable[[], Awaitable[tuple[int, list[str] | None]]], request_id: str,
                      champion_labels: list[str] | None) -> None:
        """Send one mirror and score it: the shadow window, metrics, agreement with the champion, feedback."""
        upstream, window = self.upstreams[CHALLENGER], self.window.shadow
        started = time.perf_counter()
        code, labels = await send()
        seconds = time.perf_counter() - started
        window.record(code, seconds)
        self.metrics.shadow_requests.labels(upstream.label, str(code)).inc()
        if code < 500:
            self.metrics.shadow_duration.labels(upstream.label).observe(seconds)
        for label in labels or []:  # the challenger's predicted classes, for the class drift check
            window.labels[label] += 1
        if labels is None or champion_labels is None or len(labels) != len(champion_labels):
            return
        agreed = sum(a == b for a, b in zip(labels, champion_labels, strict=True))
        window.compared += len(labels)
        window.agreed += agreed
        self.metrics.shadow_rows.labels(upstream.label, "agree").inc(agreed)
        self.metrics.shadow_rows.labels(upstream.label, "disagree").inc(len(labels) - agreed)
        truth = self._late_truth.pop(request_id, None)
        if truth is not None and len(truth) == len(labels):
            self._score("shadow", CHALLENGER, upstream.label, labels, truth)
        else:
            self.predictions.add(request_id, "shadow", CHALLENGER, upstream.label, labels)

    # ---- feedback (the route: kiln.infra.gateway_feedback) ------------------------------------------------

    def _score(self, source: str, role: str, version: str, predicted: list[str], truth: list[str]) -> float:
        correct = sum(p == t for p, t in zip(predicted, truth, strict=True))
        window = self.window.shadow if source == "shadow" else self.window.live[role]
        window.feedback += len(truth)
        window.correct += correct
        self.metrics.feedback.labels(role, version, source, "correct").inc(correct)
        self.metrics.feedback.labels(role, version, source, "incorrect").inc(len(truth) - correct)
        return correct / len(truth)

    # ---- admin ---------------------------------------------------------------------------------------------

    def authorized(self, request: Request) -> bool:
        """True when the request carries the admin token as ``Authorization: Bearer <token>``."""
        return self._bearer_in(request, [self._token])

    @staticmethod
    def _bearer_in(request: Request, tokens: list[bytes]) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode(errors="replace")
        return scheme.lower() == "bearer" and any([hmac.compare_digest(given, t) for t in tokens])  # no short cut

    def state(self, samples: bool = False) -> dict[str, Any]:
        """Routing (and when it lapses), upstreams and the versions they serve, the state file, and the current
        analysis window (with raw samples when ``samples``)."""
        store = self.control.store
        return {**self.control.to_dict(), "sticky_header": STICKY_HEADER,
                "state_file": None if store is None else {"path": str(store.path), "error": self.control.save_error},
                "shadow_in_flight": len(self._shadow_tasks), "window": self.window.to_dict(samples)}

    def set_routing(self, *, weight: float | None = None, shadow: float | None = None,
                    ttl_s: float | None = None) -> Routing:
        """Swap in a new routing object (saved); requests in flight keep the one they started with. With ``ttl_s``
        the split reverts to all-on-champion unless :meth:`renew` is called within that many seconds."""
        return self.control.set(weight=weight, shadow=shadow, ttl_s=ttl_s)

    def renew(self, ttl_s: float) -> Routing:
        """Keep the current split for ``ttl_s`` more seconds; :class:`RoutingConflict` when it has no TTL (set by
        hand, or lapsed already)."""
        return self.control.renew(ttl_s)

    def reset_window(self) -> dict[str, Any]:
        """Start a new analysis window; returns the closed one, samples included."""
        closed, self.window = self.window, Window(self.window.max_samples, text_sample=self.window.text_sample)
        return closed.to_dict(samples=True)

    def _publish_routing(self, routing: Routing) -> None:
        self.metrics.weight.set(routing.weight)
        self.metrics.shadow_fraction.set(routing.shadow)


def _answer_labels(answer: Answer) -> list[str] | None:
    """The ``label`` output of a 200 infer answer, JSON or binary; None for anything else (never an error)."""
    if answer.status != 200 or len(answer.content) > _MAX_PARSE_BYTES:
        return None
    try:
        return labels_of(read_response(answer.content, answer.headers.get(HEADER_LENGTH.lower())))
    except (InferError, ValueError, TypeError, RecursionError):  # not a v2 answer: nothing to count
        return None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) past ``limit`` bytes (see :func:`kiln.infra.http_body.read_limited`)."""
    def refuse(size: int | None) -> InferError:
        amount = f"has {size} bytes" if size is not None else f"is over {limit} bytes"
        return InferError(f"the request body {amount}; this gateway takes at most {limit} (max_body_bytes): send "
                          "fewer rows per request", 413)

    return await read_limited(request, limit, refuse)


async def _record_inputs(body: bytes, header_length: str | None, windows: list[InputRecorder]) -> None:
    """Note the text rows' lengths in ``windows``; a body that is not a v2 text request (JSON or binary) is
    simply skipped.

    Async so that Starlette runs it on the event loop (the windows take no locks), after the response.
    """
    if len(body) > _MAX_PARSE_BYTES:
        return
    try:
        payload = read_request(body, header_length).payload
    except (ValueError, InferError, RecursionError):  # bad JSON or bytes, a malformed request, absurd nesting
        return
    if isinstance(payload, TextRequest):
        for window in windows:
            window.record_inputs(payload.texts)

