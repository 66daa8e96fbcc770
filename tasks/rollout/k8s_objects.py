"""Kubernetes objects as traffic routers: the shared part of :mod:`kiln.tasks.rollout.k8s_routers`.

    CustomObject  one namespaced custom object through the official ``kubernetes`` client (CustomObjectsApi):
                  read it, merge-patch it (``fieldValidation=Strict``); the API's refusals as one-line
                  RolloutErrors, 409 as :class:`Conflict`
    K8sRouter     the split written with its lease annotation ``kiln.dev/split-expires-at``
                  (:data:`~kiln.tasks.core.tags.SPLIT_EXPIRES_AT`), renewals, lapses, rollbacks; each kind
                  says how a split reads and writes on its object

Every write is one merge patch computed from a fresh read and carrying that read's ``resourceVersion``, so a
concurrent writer makes it retry instead of being overwritten.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kiln.errors import ConfigError
from kiln.router_config import RouterConfig
from kiln.tasks.core import tags as vocab
from kiln.tasks.rollout.params import RolloutError
from kiln.tasks.rollout.router import ALL_ON_CHAMPION, Split, SplitLapsed

log = logging.getLogger(__name__)


class CustomObject:
    """One namespaced custom object: read it, merge-patch it; the API's refusals become one-line RolloutErrors."""

    def __init__(self, api_client: Any, group: str, version: str, plural: str, namespace: str, name: str) -> None:
        from kubernetes import client

        self.api_client, self.api = api_client, client.CustomObjectsApi(api_client)
        self.group, self.version, self.plural, self.namespace, self.name = group, version, plural, namespace, name
        host = api_client.configuration.host.rstrip("/")
        self.url = f"{host}/apis/{group}/{version}/namespaces/{namespace}/{plural}/{name}"

    def get(self) -> dict[str, Any]:
        return self._call("GET", self.api.get_namespaced_custom_object)

    def patch(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("PATCH", self.api.patch_namespaced_custom_object, body=body, field_validation="Strict")

    def _call(self, verb: str, method: Callable[..., Any], **kw: Any) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        try:
            return method(self.group, self.version, self.namespace, self.plural, self.name, _request_timeout=10, **kw)
        except ApiException as exc:
            raise _api_error(verb, self, exc) from exc
        except Exception as exc:  # urllib3's connection errors, a kubeconfig that points nowhere
            raise RolloutError(f"cannot reach the Kubernetes API at {self.url} ({exc.__class__.__name__}); check "
                               "the router's api_url / kubeconfig context in the rollout_routers setting") from exc


class Conflict(RolloutError):
    """The object changed between our read and our write (HTTP 409): read again and retry."""


def _api_error(verb: str, obj: CustomObject, exc: Any) -> RolloutError:
    message = _status_message(exc)
    what = f"{obj.plural}/{obj.name} in namespace {obj.namespace}"
    if exc.status == 409:
        return Conflict(f"{verb} {what}: {message}")
    if exc.status == 404:
        return RolloutError(f"{what} does not exist ({message}); create it, or fix the router's names in the "
                            "rollout_routers setting")
    if exc.status in (401, 403):
        return RolloutError(f"the Kubernetes API refused to {verb} {what} ({message}); give Kiln's service "
                            f"account get and patch on {obj.plural}.{obj.group}")
    return RolloutError(f"the Kubernetes API refused to {verb} {what} ({exc.status}): {message}")


def _status_message(exc: Any) -> str:
    try:
        return str(json.loads(exc.body).get("message") or exc.reason)[:300]
    except (TypeError, ValueError, AttributeError):
        return str(exc.reason)


class K8sRouter:
    """What both routers share: the split written with its expiry annotation, renewals, lapses."""

    def __init__(self, obj: CustomObject, *, clock: Callable[[], float] = time.time) -> None:
        self.obj, self.url, self.clock = obj, obj.url, clock
        self._split = ALL_ON_CHAMPION  # the split this router last set
        self._ttl_s: float | None = None  # and its TTL

    # -- what each kind says about its object --
    def _spec_patch(self, obj: dict[str, Any], split: Split | None) -> dict[str, Any]:
        raise NotImplementedError

    def _split_of(self, obj: dict[str, Any]) -> Split:
        raise NotImplementedError

    # -- TrafficRouter --
    def set_split(self, split: Split, *, ttl_s: float | None = None) -> None:
        """The split on the object; with ``ttl_s``, an expiry the driver's :meth:`renew` must keep moving on."""
        self._write(split, None if ttl_s is None else self.clock() + ttl_s)
        self._split, self._ttl_s = split, ttl_s

    def renew(self, ttl_s: float) -> None:
        """Move the split's expiry ``ttl_s`` on; :class:`SplitLapsed` (after reverting it) when it passed already,
        or when someone else reverted it (the annotation is gone)."""
        for _ in range(3):
            obj = self.obj.get()
            expires = _expiry(obj)
            if expires is None:
                raise SplitLapsed(f"{self.url} holds no split with a lease any more (it was reverted or replaced); "
                                  "traffic is wherever the object now says")
            if expires <= self.clock():
                self.roll_back()
                raise SplitLapsed(f"the split on {self.url} lapsed at {_iso(expires)} (not renewed in time); "
                                  "traffic is back on the champion")
            try:
                self.obj.patch(_meta(obj, self.clock() + ttl_s))
                return
            except Conflict:
                continue
        raise RolloutError(f"could not renew the split on {self.url}: the object kept changing under the router")

    def read_split(self) -> Split:
        """The split the object says now (whatever its lease)."""
        return self._split_of(self.obj.get())

    def roll_back(self) -> None:
        """All traffic on the champion, no shadow, no lease (it holds until changed)."""
        self._write(ALL_ON_CHAMPION, None)
        self._split, self._ttl_s = ALL_ON_CHAMPION, None

    def revert_if_lapsed(self) -> bool:
        """Put a split whose lease passed back on the champion (a driver died holding it); True when it did."""
        expires = _expiry(self.obj.get())
        if expires is None or expires > self.clock():
            return False
        log.warning("the split on %s lapsed at %s (its driver stopped renewing it): reverting it to the champion",
                    self.url, _iso(expires))
        self.roll_back()
        return True

    def close(self) -> None:
        self.obj.api_client.close()

    def _write(self, split: Split | None, expires: float | None) -> None:
        """One merge patch of spec and annotation, computed from a fresh read, retried when the object changed
        in between. ``split`` None: the promoted form (each kind says what that is)."""
        for _ in range(3):
            obj = self.obj.get()
            try:
                self.obj.patch(_meta(obj, expires) | self._spec_patch(obj, split))
                return
            except Conflict:
                continue
        raise RolloutError(f"could not set the split on {self.url}: the object kept changing under the router")


def _meta(obj: dict[str, Any], expires: float | None) -> dict[str, Any]:
    return {"metadata": {"resourceVersion": (obj.get("metadata") or {}).get("resourceVersion"),
                         "annotations": {vocab.SPLIT_EXPIRES_AT: None if expires is None else _iso(expires)}}}


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _expiry(obj: dict[str, Any]) -> float | None:
    raw = ((obj.get("metadata") or {}).get("annotations") or {}).get(vocab.SPLIT_EXPIRES_AT)
    if not raw:
        return None
    try:
        return datetime.fromisoformat(raw.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0  # unreadable: treat as lapsed, so the split goes back to the champion


def whole_percent(value: float) -> int:
    return int(round(value))


def api_client_for(config: RouterConfig) -> Any:
    """A ``kubernetes`` ApiClient for the router: its ``api_url`` (no credentials), else the kubeconfig
    (``context``), else the pod's service account."""
    try:
        from kubernetes import client
        from kubernetes import config as kube_config
    except ImportError as exc:
        raise ConfigError("Kubernetes routers need the kubernetes client: pip install 'kiln[k8s]'") from exc
    configuration = client.Configuration()
    if config.api_url is not None:
        configuration.host = str(config.api_url).rstrip("/")
    else:
        try:
            kube_config.load_kube_config(context=config.context, client_configuration=configuration)
        except Exception:  # noqa: BLE001 - no kubeconfig: in a pod, its service account
            try:
                kube_config.load_incluster_config(client_configuration=configuration)
            except kube_config.ConfigException as exc:
                raise ConfigError(f"no Kubernetes credentials: no kubeconfig (context {config.context or 'current'}) "
                                  "and not in a pod; set KUBECONFIG, or the router's api_url (e.g. `kubectl proxy`'s "
                                  "http://127.0.0.1:8001)") from exc
    return client.ApiClient(configuration)
