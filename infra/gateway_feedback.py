"""The gateway's ``POST /feedback`` route: true labels for requests it answered, scored against what each side
predicted (the canary's accuracy, and rows for :mod:`kiln.infra.feedback_sink`).

A module of its own so that :mod:`kiln.infra.gateway_proxy` stays the forwarding path; it works on the
:class:`~kiln.infra.gateway_proxy.Gateway`'s prediction log, windows and metrics.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kiln.infra.gateway_proxy import Gateway, error_response, read_body
from kiln.infra.oip import InferError
from kiln.infra.oip_binary import loads

MAX_FEEDBACK_BYTES = 1 << 20  # a label per row of the largest request (4,096 rows) fits many times over


async def feedback(gateway: Gateway, request: Request) -> Response:
    """``{"request_id": ..., "label": ...}`` or ``"labels": [...]``: score what each upstream predicted.

    Needs the feedback (or admin) token as bearer credential: scores move a canary's verdict."""
    if not gateway._bearer_in(request, gateway._feedback_tokens):
        return error_response("missing or wrong feedback token; send 'Authorization: Bearer <token>' (the "
                              "gateway_feedback_token setting, or the admin token)", 401,
                              {"WWW-Authenticate": "Bearer"})
    try:
        body = loads(await read_body(request, MAX_FEEDBACK_BYTES), "feedback body")
    except InferError as exc:
        return error_response(f"{exc}; send JSON like {{\"request_id\": ..., \"label\": ...}}", exc.status)
    request_id = body.get("request_id") if isinstance(body, dict) else None
    truth = body.get("labels", [body.get("label")]) if isinstance(body, dict) else None
    if not isinstance(request_id, str) or not isinstance(truth, list) or not all(isinstance(t, str) for t in truth):
        return error_response("feedback needs a string 'request_id' and a string 'label' (or a 'labels' list)", 400)
    entry = gateway.predictions.get(request_id)
    if entry is None:
        return error_response(f"no recorded prediction for request id {request_id!r} (unknown, already "
                              "scored, or too old)", 404)
    rows = {len(predicted) for _, _, predicted in entry.values()}
    if rows != {len(truth)}:
        return error_response(f"request {request_id} predicted {sorted(rows)} rows; the feedback has "
                              f"{len(truth)}", 400)
    gateway.predictions.pop(request_id)  # scored once: a repeated post would count the same answer twice
    scored = {f"{role}/{source}": gateway._score(source, role, version, predicted, truth)
              for source, (role, version, predicted) in entry.items()}
    if request_id in gateway._mirroring and "shadow" not in entry:
        gateway._late_truth[request_id] = truth
        while len(gateway._late_truth) > gateway.max_shadow_inflight * 4:
            gateway._late_truth.popitem(last=False)
        scored["challenger/shadow"] = None  # scored when the mirrored answer arrives
    if gateway.feedback_sink is not None:  # buffered only: the sink writes in the background
        gateway.feedback_sink.add(gateway.control.model, request_id, entry, truth,
                                  gateway.predictions.pop_texts(request_id))
    return JSONResponse({"request_id": request_id, "scored": scored})
