"""A local stand-in for the Kubernetes API server: the custom-object paths Kiln's routers use, on loopback.

    GET    /apis/{group}/{version}/namespaces/{ns}/{plural}/{name}
    PUT    /apis/{group}/{version}/namespaces/{ns}/{plural}/{name}      (replace)
    PATCH  /apis/{group}/{version}/namespaces/{ns}/{plural}/{name}      (application/merge-patch+json, RFC 7386)
    POST   /apis/{group}/{version}/namespaces/{ns}/{plural}             (create)

Objects live in memory. Every body about to be stored is validated against the real CRD schema of its kind
(Gateway API's HTTPRoute CRD, Istio's VirtualService CRD, KServe's InferenceService schema; see
tests/schemas/README.md) and refused the way the API server refuses it: a ``Status`` with 422 ``Invalid``
naming the field, 400 ``BadRequest`` for an unknown field (``fieldValidation=Strict``, which the routers send),
409 ``Conflict`` when a write names a ``metadata.resourceVersion`` that is not the stored one, 404 ``NotFound``.

What it does NOT do that a real API server does: apply the schema's defaults, evaluate CEL rules
(``x-kubernetes-validations``), authenticate, or run any controller (no ``status`` is ever written).
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMAS = Path(__file__).with_name("schemas")
HTTPROUTE_CRD = SCHEMAS / "gateway-api-v1.6.1-httproutes.yaml"
KSERVE_SCHEMA = SCHEMAS / "kserve-inferenceservice-v1beta1.json"
VIRTUALSERVICE_CRD = SCHEMAS / "istio-1.30.3-virtualservice-crd.yaml"
PATH = re.compile(r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/]+)"
                  r"(?:/(?P<name>[^/]+))?$")


def _strict(schema: Any) -> Any:
    """An OpenAPI structural schema as the API server applies it with fieldValidation=Strict: an object with
    ``properties`` takes no other key (unless it says ``x-kubernetes-preserve-unknown-fields``)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def httproute_validator() -> jsonschema.Validator:
    """The ``v1`` schema of the HTTPRoute CRD (gateway-api v1.6.1, standard channel)."""
    crd = yaml.load(HTTPROUTE_CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    return jsonschema.Draft7Validator(_strict(schema))


def virtualservice_validator() -> jsonschema.Validator:
    """The ``v1`` schema of Istio's VirtualService CRD (istio 1.30.3, ``networking.istio.io``)."""
    crd = yaml.load(VIRTUALSERVICE_CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    # Istio's schema lists only spec and status at the root; the API server adds the fields every object has.
    schema["properties"] = {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                            "metadata": {"type": "object"}} | schema["properties"]
    return jsonschema.Draft7Validator(_strict(schema))


def kserve_validator() -> jsonschema.Validator:
    """KServe's InferenceService (v1beta1), with the Kubernetes types it refers to from kubernetes-validate."""
    import kubernetes_validate
    from referencing import Registry, Resource

    folders = importlib.resources.files(kubernetes_validate) / "kubernetes-json-schema"
    latest = max((p for p in folders.iterdir() if p.name.endswith("-local-strict")),
                 key=lambda p: [int(x) for x in p.name[1:].split("-")[0].split(".")])
    k8s_defs = json.loads((latest / "_definitions.json").read_text())
    registry = Registry().with_resource(k8s_defs["$id"], Resource.from_contents(k8s_defs))
    return jsonschema.Draft202012Validator(json.loads(KSERVE_SCHEMA.read_text()), registry=registry)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge key by key, ``null`` deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> dict[str, Any]:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": self.message,
                "reason": self.reason, "code": self.code}


@dataclass
class KubeApi:
    """The objects the stand-in holds, by (group, version, namespace, plural, name), and the schemas it checks."""

    validators: dict[tuple[str, str, str], jsonschema.Validator]  # (group, version, plural) → schema
    objects: dict[tuple[str, str, str, str, str], dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path) of every request
    refused: list[tuple[int, str]] = field(default_factory=list)  # (code, message) of every refusal
    url: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _version: int = 0

    def get(self, group: str, version: str, namespace: str, plural: str, name: str) -> dict[str, Any]:
        """A deep copy of the object held (KeyError when none)."""
        with self._lock:
            return copy.deepcopy(self.objects[(group, version, namespace, plural, name)])

    def handle(self, method: str, path: str, query: str, body: Any) -> tuple[int, dict[str, Any]]:
        self.requests.append((method, path))
        m = PATH.match(path)
        if m is None or (m["group"], m["version"], m["plural"]) not in self.validators:
            return 404, ApiError(404, "NotFound", f"the server could not find the requested resource ({path})").status()
        key = (m["group"], m["version"], m["ns"], m["plural"], m["name"])
        try:
            with self._lock:
                return 200 if method != "POST" else 201, self._act(method, key, body)
        except ApiError as exc:
            self.refused.append((exc.code, exc.message))
            return exc.code, exc.status()

    def _act(self, method: str, key: tuple[str, ...], body: Any) -> dict[str, Any]:
        group, _, namespace, plural, name = key
        what = f"{plural}.{group} \"{name or (body or {}).get('metadata', {}).get('name')}\""
        if method == "POST":
            name = (body or {}).get("metadata", {}).get("name")
            key = (*key[:4], name)
            if key in self.objects:
                raise ApiError(409, "AlreadyExists", f"{what} already exists")
            return self._store(key, body, what)
        if key not in self.objects:
            raise ApiError(404, "NotFound", f"{what} not found")
        held = self.objects[key]
        if method == "GET":
            return copy.deepcopy(held)
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body of the request was not a JSON object")
        asked = (body.get("metadata") or {}).get("resourceVersion")
        if asked is not None and asked != held["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", f"Operation cannot be fulfilled on {what}: the object has been "
                           "modified; please apply your changes to the latest version and try again")
        if method == "PATCH":
            return self._store(key, merge_patch(held, body), what)
        if method == "PUT":
            return self._store(key, body, what)
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported here")

    def _store(self, key: tuple[str, ...], obj: dict[str, Any], what: str) -> dict[str, Any]:
        group, version, namespace, plural, name = key
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta.pop("resourceVersion", None)  # server-owned: not part of what the schema sees
        errors = sorted(self.validators[(group, version, plural)].iter_errors(obj), key=lambda e: list(e.path))
        unknown = [e for e in errors if e.validator == "additionalProperties"]
        if unknown:
            where = ".".join(map(str, unknown[0].absolute_path))
            raise ApiError(400, "BadRequest", f"strict decoding error: {unknown[0].message} in {where or 'the object'}")
        if errors:
            first = errors[0]
            where = ".".join(map(str, first.absolute_path)) or "<root>"
            raise ApiError(422, "Invalid", f"{what} is invalid: {where}: Invalid value: {first.message}")
        self._version += 1
        meta.update(name=name, namespace=namespace, resourceVersion=str(self._version))
        self.objects[key] = obj
        return copy.deepcopy(obj)


class _Handler(BaseHTTPRequestHandler):
    api: KubeApi

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _serve(self) -> None:
        path, _, query = self.path.partition("?")
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if self.command == "PATCH" and "merge-patch+json" not in (self.headers.get("Content-Type") or ""):
            code, out = 415, ApiError(415, "UnsupportedMediaType", "the stand-in takes merge patches only").status()
        else:
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                code, out = 400, ApiError(400, "BadRequest", "the body is not JSON").status()
            else:
                code, out = self.api.handle(self.command, path, query, body)
        data = json.dumps(out).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_PATCH = do_POST = _serve


@contextmanager
def serve(validators: dict[tuple[str, str, str], jsonschema.Validator]) -> Iterator[KubeApi]:
    """The stand-in on 127.0.0.1 (an ephemeral port) until the block ends; ``api.url`` is its base URL."""
    api = KubeApi(validators)
    handler = type("Handler", (_Handler,), {"api": api})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    api.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="k8s-api", daemon=True)
    thread.start()
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def api_client(url: str):  # noqa: ANN201 - kubernetes is imported lazily
    """A ``kubernetes`` client pointed at the stand-in (no kubeconfig, no credentials)."""
    from kubernetes import client

    configuration = client.Configuration(host=url)
    return client.ApiClient(configuration)


def seed(api: KubeApi, namespace: str, objects: list[tuple[tuple[str, str, str], dict[str, Any]]]) -> KubeApi:
    """Empty the stand-in, then create each ``(group, version, plural), body`` through the kubernetes client (so
    it is validated as a test's own writes are); returns ``api``."""
    from kubernetes import client

    api.objects.clear()
    api.refused.clear()
    with api_client(api.url) as connection:
        custom = client.CustomObjectsApi(connection)
        for (group, version, plural), body in objects:
            custom.create_namespaced_custom_object(group, version, namespace, plural, copy.deepcopy(body))
    return api
