"""OpenAPI 3.1 descriptions of Kiln's HTTP servers, served at ``GET /openapi.json`` by each app.

    model server   Open Inference Protocol v2 (health, server and model metadata, readiness, infer, and the
                   generate extension for causal LMs: generate, generate_stream) + /metrics
    gateway        the same v2 routes (proxied), POST /feedback and the /admin API, both behind bearer tokens
    webhooks       POST /hooks/github, /hooks/gitlab, /hooks/mlflow (signed or token-checked), GET /health

They are written by hand from the handlers, not generated: Starlette has no schema of its own, and the point
of a description is the contract a client may rely on (and that schemathesis checks: every answer's status
and content type must be listed here, and no input may produce a 5xx that is not documented). Every error
is ``{"error": "<one line>"}`` with the statuses each route documents. Pure data and one route factory.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kiln.infra.oip import DATATYPES

JSON = "application/json"
_ERROR_WHY = {400: "Malformed request: the message names the field", 401: "Missing or wrong credential",
              404: "No such model, version or recorded request", 409: "Conflicts with the current state",
              413: "Body or row count over the server's limit", 415: "Unsupported Content-Encoding",
              500: "The engine failed while decoding (the message names the error)",
              503: "Not ready, or a dependency (secret, Prefect, registry) is unavailable",
              502: "Neither upstream could be reached", 504: "The upstream did not answer in time"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _responses(ok: dict[str, dict[str, Any]], *errors: int) -> dict[str, Any]:
    """``ok`` (status -> response) plus the ``{"error": ...}`` answer for each of ``errors``."""
    return ok | {str(code): _json(_ref("Error"), _ERROR_WHY[code]) for code in errors}


def _op(summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"summary": summary, "responses": responses, **extra}


_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
_VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
_METRICS = {"get": _op("Prometheus metrics", {"200": {"description": "Prometheus text exposition format",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}}})}

SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    "Tensor": {
        "type": "object", "required": ["name", "shape", "datatype", "data"],
        "properties": {"name": {"type": "string", "examples": ["text", "input_ids"]},
                       "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}, "maxItems": 3},
                       "datatype": {"type": "string", "enum": list(DATATYPES)},
                       "data": {"type": "array", "description": "row-major, flat or nested",
                                "items": {"type": ["string", "integer", "number", "boolean", "array"]}},
                       "parameters": {"type": "object"}}},
    "InferRequest": {
        "type": "object", "required": ["inputs"],
        "properties": {"id": {"type": "string"}, "parameters": {"type": "object"},
                       "inputs": {"type": "array", "minItems": 1, "items": _ref("Tensor")},
                       "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
                           "name": {"type": "string"}, "parameters": {"type": "object"}}}}},
        "examples": [{"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["great", "awful"]}]}]},
    "InferResponse": {
        "type": "object", "required": ["model_name", "outputs"],
        "properties": {"model_name": {"type": "string"}, "model_version": {"type": "string"},
                       "id": {"type": "string"},
                       "outputs": {"type": "array", "items": {"type": "object", "required": ["name", "datatype",
                                                                                             "shape"]}}}},
    "ModelMetadata": {"type": "object", "required": ["name", "versions", "inputs", "outputs"],
                      "properties": {"name": {"type": "string"}, "versions": {"type": "array"},
                                     "platform": {"type": "string"}, "inputs": {"type": "array"},
                                     "outputs": {"type": "array"}, "parameters": {"type": "object"}}},
    "GenerateRequest": {
        "type": "object", "required": ["text_input"],
        "properties": {"text_input": {"type": "string"}, "parameters": {"type": "object", "properties": {
            "max_new_tokens": {"type": "integer", "minimum": 1}, "do_sample": {"type": "boolean"},
            "temperature": {"type": "number", "exclusiveMinimum": 0}, "top_p": {"type": "number"},
            "seed": {"type": "integer"}, "exclude_input_in_output": {"type": "boolean"}}}},
        "examples": [{"text_input": "The capital of France is", "parameters": {"max_new_tokens": 8}}]},
    "GenerateResponse": {"type": "object", "required": ["model_name", "model_version", "text_output"],
                         "properties": {"model_name": {"type": "string"}, "model_version": {"type": "string"},
                                        "text_output": {"type": "string"}}},
    "Routing": {"type": "object", "required": ["weight", "shadow", "generation"],
                "properties": {"weight": {"type": "number"}, "shadow": {"type": "number"},
                               "generation": {"type": "integer"}, "expires_at": {"type": ["number", "null"]}}},
}
_BEARER = {"bearer": {"type": "http", "scheme": "bearer"}}


def _document(title: str, description: str, paths: dict[str, Any], security: dict[str, Any] | None = None,
              schemas: tuple[str, ...] = ("Error",)) -> dict[str, Any]:
    components: dict[str, Any] = {"schemas": {name: SCHEMAS[name] for name in schemas}}
    if security:
        components["securitySchemes"] = security
    return {"openapi": "3.1.0", "info": {"title": title, "version": "1", "description": description},
            "paths": paths, "components": components}


def _v2_paths(names: list[str] | None, *, ready_fails: bool = True, generate: bool = False) -> dict[str, Any]:
    """The Open Inference Protocol v2 REST routes; ``names``: the models served, when known (others answer 404)."""
    name = _NAME | ({"schema": {"type": "string", "enum": names}} if names else {})
    not_ready = (503,) if ready_fails else ()
    infer = _op("Run inference", _responses(
        {"200": {"description": "Outputs (JSON, or binary tensor data when the request asks for it)",
                 "content": {JSON: {"schema": _ref("InferResponse")},
                             "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
        400, 404, 413, 415), requestBody={"required": True, "content": {JSON: {
            "schema": _ref("InferRequest"), "example": SCHEMAS["InferRequest"]["examples"][0]}}})
    paths: dict[str, Any] = {
        "/v2/health/live": {"get": _op("Liveness", {"200": _json({"type": "object"})})},
        "/v2/health/ready": {"get": _op("Readiness", _responses({"200": _json({"type": "object"})}, *not_ready))},
        "/v2": {"get": _op("Server metadata", {"200": _json({"type": "object", "required": ["name", "version"]})})},
    }
    for prefix, params in (("/v2/models/{name}", [name]), ("/v2/models/{name}/versions/{version}", [name, _VERSION])):
        paths[prefix] = {"get": _op("Model metadata", _responses({"200": _json(_ref("ModelMetadata"))}, 404),
                                    parameters=params)}
        paths[f"{prefix}/ready"] = {"get": _op("Model readiness", _responses(
            {"200": _json({"type": "object", "required": ["name", "ready"]})}, 404, *not_ready), parameters=params)}
        paths[f"{prefix}/infer"] = {"post": infer | {"parameters": params}}
        if generate:
            paths |= _generate_paths(prefix, params)
    return paths


def _generate_paths(prefix: str, params: list[dict[str, Any]]) -> dict[str, Any]:
    """The generate extension (Triton's): one prompt in, the text as one JSON object or as Server-Sent Events."""
    body = {"required": True, "content": {JSON: {"schema": _ref("GenerateRequest"),
                                                 "example": SCHEMAS["GenerateRequest"]["examples"][0]}}}
    events = {"description": "Server-Sent Events: `data: {model_name, model_version, text_output}` per chunk of new "
                             "text; the last adds finish_reason (stop or length) and output_tokens, or carries "
                             "{error} when decoding fails after the stream began",
              "content": {"text/event-stream": {"schema": {"type": "string"}}}}
    return {f"{prefix}/generate": {"post": _op(
                "Generate text (causal LMs; budgets checked before decoding)",
                _responses({"200": _json(_ref("GenerateResponse"))}, 400, 404, 413, 415, 500),
                requestBody=body, parameters=params)},
            f"{prefix}/generate_stream": {"post": _op(
                "Generate text as a stream of events (refusals come as one JSON error before any event)",
                _responses({"200": events}, 400, 404, 413, 415), requestBody=body, parameters=params)}}


def model_server(names: list[str] | None = None) -> dict[str, Any]:
    """The model server's description; ``names``: the models it serves."""
    index = {"type": "array", "items": {"type": "object", "required": ["name", "version", "state"], "properties": {
        "name": {"type": "string"}, "version": {"type": "string"}, "state": {"type": "string"}}}}
    paths = _v2_paths(names, generate=True) | {"/metrics": _METRICS, "/v2/repository/index": {"post": _op(
        "The models this server serves (model-repository extension; load/unload are refused: the registry decides)",
        _responses({"200": _json(index)}, 400, 413), requestBody={"required": False, "content": {JSON: {
            "schema": {"type": "object", "properties": {"ready": {"type": "boolean"}}}}}})}}
    return _document("Kiln model server", "Open Inference Protocol v2 over HTTP/JSON (and binary tensor data), "
                     "with the generate extension for causal LMs.", paths,
                     schemas=("Error", "Tensor", "InferRequest", "InferResponse", "ModelMetadata", "GenerateRequest",
                              "GenerateResponse"))


def _admin(summary: str, body: dict[str, Any] | None, *errors: int) -> dict[str, Any]:
    op = _op(summary, _responses({"200": _json(_ref("Routing"))}, 401, *errors), security=[{"bearer": []}])
    if body is not None:
        op["requestBody"] = {"required": True, "content": {JSON: {"schema": body}}}
    return {"post": op}


def _body(required: list[str], **fields: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": fields}


_WEIGHT = {"type": "number", "minimum": 0, "maximum": 100, "description": "challenger's share, percent"}
_SHADOW = {"type": "number", "minimum": 0, "maximum": 1, "description": "share of champion traffic mirrored"}
_DELIVERY = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"}  # what GitHub/GitLab send: UUIDs
_TTL = {"type": "number", "exclusiveMinimum": 0, "description": "seconds before the split reverts"}


def gateway() -> dict[str, Any]:
    """The gateway's description: the proxied v2 routes, feedback and the admin API."""
    feedback = _body(["request_id"], request_id={"type": "string"}, label={"type": "string"},
                     labels={"type": "array", "items": {"type": "string"}})
    proxied = _v2_paths(None, generate=True)
    for operation in (op for methods in proxied.values() for op in methods.values()):
        operation["responses"] |= _responses({}, 502, 504)  # the gateway's own answers when upstreams fail
    paths = proxied | {
        "/feedback": {"post": _op("Score a recorded prediction with its true label(s)", _responses(
            {"200": _json({"type": "object", "required": ["request_id", "scored"]})}, 400, 401, 404, 413),
            security=[{"bearer": []}], requestBody={"required": True, "content": {JSON: {"schema": feedback}}})},
        "/admin/split": _admin("Set weight and/or shadow", _body([], weight=_WEIGHT, shadow=_SHADOW, ttl_s=_TTL),
                               400, 409),
        "/admin/weight": _admin("Set the challenger's weight", _body(["weight"], weight=_WEIGHT, ttl_s=_TTL), 400, 409),
        "/admin/shadow": _admin("Set the shadow fraction", _body(["fraction"], fraction=_SHADOW, ttl_s=_TTL), 400, 409),
        "/admin/renew": _admin("Keep the current split longer", _body(["ttl_s"], ttl_s=_TTL), 400, 409),
        "/admin/reset": {"post": _op("Start a new analysis window", _responses({"200": _json({"type": "object"})},
                                                                               401), security=[{"bearer": []}])},
        "/admin/state": {"get": _op("Split, expiry, upstreams", _responses({"200": _json({"type": "object"})}, 401),
                                    security=[{"bearer": []}], parameters=[
                                        {"name": "samples", "in": "query", "schema": {"type": "string"}}])},
        "/health": {"get": _op("Liveness", {"200": _json({"type": "object"})})},
        "/metrics": _METRICS,
    }
    return _document("Kiln gateway", "Weighted champion/challenger split in front of two v2 model servers.", paths,
                     _BEARER, schemas=("Error", "Tensor", "InferRequest", "InferResponse", "ModelMetadata", "Routing",
                                       "GenerateRequest", "GenerateResponse"))


def _hook(summary: str, headers: dict[str, str], payload: dict[str, Any], *, form: bool = False,
          ok: dict[str, Any] | None = None) -> dict[str, Any]:
    content: dict[str, Any] = {JSON: {"schema": payload}}
    if form:
        content["application/x-www-form-urlencoded"] = {"schema": _body(["payload"], payload={"type": "string"})}
    delivery = ("delivery", "uuid", "delivery-id")
    parameters = [{"name": h, "in": "header", "required": True, "description": why,
                   "schema": _DELIVERY if h.lower().endswith(delivery) else {"type": "string"}}
                  for h, why in headers.items()]
    accepted = {"202": _json({"type": "object"}, "Started (flow_run_id) or ignored (ignored: reason)")}
    return {"post": _op(summary, _responses((ok or {}) | accepted, 400, 401, 409, 413, 503), parameters=parameters,
                        requestBody={"required": True, "content": content})}


def webhooks() -> dict[str, Any]:
    """The webhook receiver's description."""
    repo = {"type": "object", "properties": {"full_name": {"type": "string"}, "clone_url": {"type": "string"}}}
    github = _body(["ref", "after", "repository"], ref={"type": "string", "examples": ["refs/heads/main"]},
                   before={"type": "string"}, after={"type": "string", "pattern": "^[0-9a-f]{40}$"},
                   repository=repo, deleted={"type": "boolean"})
    gitlab = _body(["ref", "after", "project"], ref={"type": "string"},
                   after={"type": "string", "pattern": "^[0-9a-f]{40}$"},
                   checkout_sha={"type": "string", "pattern": "^[0-9a-f]{40}$"},
                   project={"type": "object", "properties": {"path_with_namespace": {"type": "string"},
                                                             "git_http_url": {"type": "string"}}})
    mlflow = _body(["entity", "action", "data"], entity={"type": "string", "examples": ["model_version"]},
                   action={"type": "string", "examples": ["created"]}, data={"type": "object"},
                   timestamp={"type": "string"})
    paths = {
        "/hooks/github": _hook("GitHub push", {
            "X-Hub-Signature-256": "sha256=<HMAC of the raw body with KILN_WEBHOOK_SECRET>",
            "X-GitHub-Event": "push (ping answers 200; other events are ignored)",
            "X-GitHub-Delivery": "delivery id"}, github, form=True,
            ok={"200": _json({"type": "object"}, "ping answered")}),
        "/hooks/gitlab": _hook("GitLab push", {"X-Gitlab-Token": "KILN_GITLAB_TOKEN", "X-Gitlab-Event": "Push Hook",
                                               "X-Gitlab-Event-UUID": "delivery id"}, gitlab),
        "/hooks/mlflow": _hook("MLflow registry event", {
            "X-MLflow-Signature": "v1,<base64 HMAC with KILN_MLFLOW_WEBHOOK_SECRET>",
            "X-MLflow-Delivery-Id": "delivery id", "X-MLflow-Timestamp": "seconds since the epoch"}, mlflow,
            ok={"200": _json({"type": "object"}, "handled, ignored or a duplicate delivery")}),
        "/health": {"get": _op("Liveness and which hooks are configured", {"200": _json({"type": "object"})})},
    }
    return _document("Kiln webhook receiver", "Git pushes and MLflow registry events in, Prefect flow runs out.",
                     paths)


def openapi_route(document: dict[str, Any]) -> Route:
    """``GET /openapi.json`` answering ``document``."""
    async def serve(request: Request) -> Response:
        return JSONResponse(document)

    return Route("/openapi.json", serve, methods=["GET"], name="openapi")
