"""The Kiln gateway as a rollout's router: a thin client of its authenticated admin API.

    POST /admin/weight {"weight": 25}   POST /admin/shadow {"fraction": 0.5}   (the split)
    GET  /admin/state                   (the split, and the version each upstream serves)
    POST /admin/reset                   (closes the analysis window, returned with latency samples)

Errors say what to fix (start the gateway, set the token). The URL comes from the ``rollout_gateways``
setting, never from a run parameter (:meth:`kiln.settings.Settings.gateway_url`), so the admin token is only
ever sent to a gateway the operator configured. See :mod:`kiln.tasks.rollout.router` for the interface other
routers implement.
"""

from __future__ import annotations

from typing import Any

import httpx

from kiln.errors import ConfigError
from kiln.tasks.rollout.params import RolloutError
from kiln.tasks.rollout.router import ALL_ON_CHAMPION, Split


class GatewayRouter:
    """The Kiln gateway (``python -m kiln.infra.gateway``) in front of both model servers."""

    def __init__(self, url: str, token: str, timeout_s: float = 10.0) -> None:
        if not token:
            raise ConfigError("the gateway's admin API needs a token: set KILN_GATEWAY_TOKEN (the same value the "
                              "gateway was started with)")
        self.url = url.rstrip("/")
        self._client = httpx.Client(base_url=self.url, timeout=timeout_s,
                                    headers={"Authorization": f"Bearer {token}"})
        self._split = ALL_ON_CHAMPION  # the split this client last set

    def close(self) -> None:
        """Release the HTTP connection pool."""
        self._client.close()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            response = self._client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise RolloutError(f"cannot reach the gateway at {self.url} ({exc.__class__.__name__}); start it "
                               "with `python -m kiln.infra.gateway --champion URL --challenger URL`, or name "
                               "another one of the rollout_gateways setting with --gateway") from exc
        if response.status_code in (401, 403):
            raise RolloutError(f"the gateway at {self.url} refused the admin token; set KILN_GATEWAY_TOKEN to the "
                               "token it was started with")
        if response.status_code >= 400:
            raise RolloutError(f"gateway {method} {path} answered {response.status_code}: {response.text[:200]}")
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise RolloutError(f"gateway {method} {path} did not answer a JSON object; is {self.url} a Kiln gateway?")
        return body

    # -- TrafficRouter --
    def set_split(self, split: Split) -> None:
        """Shadow first, then weight (each is one admin call)."""
        self._call("POST", "/admin/shadow", {"fraction": split.shadow})
        self._call("POST", "/admin/weight", {"weight": split.weight})
        self._split = split

    def read_split(self) -> Split:
        """The gateway's current split (one ``GET /admin/state``)."""
        state = self._call("GET", "/admin/state")
        return Split(float(state.get("weight", 0.0)), float(state.get("shadow", 0.0)))

    def promote(self, version: str) -> str:
        """The gateway cannot repoint its upstreams itself: it keeps the split and says what to do."""
        return (f"The gateway still sends {self._split.weight:g}% to v{version}; it is now @champion, so repoint "
                "the gateway's champion upstream at it and set the weight to 0")

    def roll_back(self) -> None:
        """Weight 0 and no shadow: every request answered by the champion."""
        self.set_split(ALL_ON_CHAMPION)

    # -- MetricsWindows --
    def next_window(self) -> dict[str, Any]:
        """Close the current analysis window (returned, with latency samples) and open a new one."""
        return self._call("POST", "/admin/reset")

    def served_versions(self) -> dict[str, str | None]:
        """``{role: version}`` as the gateway's upstreams report them (None when one does not say yet).

        A gateway that reports no upstreams at all is refused: what it serves cannot be checked.
        """
        upstreams = self._call("GET", "/admin/state").get("upstreams")
        if not isinstance(upstreams, dict) or not upstreams:
            raise RolloutError(f"the gateway at {self.url} reports no upstreams, so the versions it serves cannot "
                               "be checked; run Kiln's gateway (`python -m kiln.infra.gateway`) there")
        return {str(role): _version(info) for role, info in upstreams.items()}


def _version(info: Any) -> str | None:
    version = info.get("version") if isinstance(info, dict) else None
    return str(version) if version not in (None, "") else None
