"""The Kiln gateway as a rollout's router: a thin client of its authenticated admin API.

    POST /admin/split {"weight": 25, "shadow": 0.5, "ttl_s": 60}   (the split; it lapses unless renewed)
    POST /admin/renew {"ttl_s": 60}                                 (the driver is alive: keep the split)
    GET  /admin/state                   (the split, and the version each upstream serves now)
    POST /admin/reset                   (closes the analysis window, returned with latency samples)

**Promotion hands traffic over.** The gateway's champion upstream is a model server on ``NAME@champion``
that follows the alias (``kiln serve``): once a promotion moved the alias it swaps to the new version by
itself. :meth:`GatewayRouter.promote` waits (at most ``handover_timeout_s``) until the gateway reports that
upstream serving the new champion, then sends it all traffic; until then traffic stays where the canary
left it, on the challenger's server, which serves the same version. If the champion upstream never swaps,
the split stays (made permanent, so it cannot lapse onto the old version) and the operator is told what to do.

Errors say what to fix (start the gateway, set the token). The URL comes from the ``rollout_gateways``
setting, never from a run parameter (:meth:`kiln.settings.Settings.gateway_url`), so the admin token is only
ever sent to a gateway the operator configured. See :mod:`kiln.tasks.rollout.router` for the interface other
routers implement.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx

from kiln.errors import ConfigError
from kiln.tasks.rollout.params import RolloutError
from kiln.tasks.rollout.router import ALL_ON_CHAMPION, RouterHint, Split, SplitLapsed

log = logging.getLogger(__name__)
DEFAULT_HANDOVER_S = 120.0  # 2 × a following server's 5 s poll, plus loading a large engine, with room to spare


class GatewayRouter:
    """The Kiln gateway (``python -m kiln.infra.gateway``) in front of both model servers.

    Args:
        url: the gateway's base URL.
        token: its admin token.
        timeout_s: per admin call.
        handover_timeout_s: how long :meth:`promote` waits for the champion upstream to serve the new champion.
        handover_poll_s: how often it asks the gateway meanwhile.
    """

    def __init__(self, url: str, token: str, timeout_s: float = 10.0, *,
                 handover_timeout_s: float = DEFAULT_HANDOVER_S, handover_poll_s: float = 0.5) -> None:
        if not token:
            raise ConfigError("the gateway's admin API needs a token: set KILN_GATEWAY_TOKEN (the same value the "
                              "gateway was started with)")
        self.url = url.rstrip("/")
        self.handover_timeout_s, self.handover_poll_s = handover_timeout_s, handover_poll_s
        self._client = httpx.Client(base_url=self.url, timeout=timeout_s,
                                    headers={"Authorization": f"Bearer {token}"})
        self._split = ALL_ON_CHAMPION  # the split this client last set
        self._ttl_s: float | None = None  # and its TTL

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
        if response.status_code == 409:
            raise SplitLapsed(f"the gateway at {self.url}: {_error_of(response)}")
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
    def set_split(self, split: Split, *, ttl_s: float | None = None) -> None:
        """Weight and shadow in one admin call; with ``ttl_s`` the gateway reverts to all-on-champion unless
        :meth:`renew` is called within that many seconds."""
        body: dict[str, Any] = {"weight": split.weight, "shadow": split.shadow}
        if ttl_s is not None:
            body["ttl_s"] = ttl_s
        self._call("POST", "/admin/split", body)
        self._split, self._ttl_s = split, ttl_s

    def renew(self, ttl_s: float) -> None:
        """Keep the split for ``ttl_s`` more seconds; SplitLapsed when it lapsed (traffic is on the champion)."""
        self._call("POST", "/admin/renew", {"ttl_s": ttl_s})

    def read_split(self) -> Split:
        """The gateway's current split (one ``GET /admin/state``)."""
        state = self._call("GET", "/admin/state")
        return Split(float(state.get("weight", 0.0)), float(state.get("shadow", 0.0)))

    def promote(self, version: str) -> str:
        """Once the champion upstream serves ``version``, all traffic on it; else keep the split and say what to do.

        Waits at most ``handover_timeout_s``, renewing the split's TTL meanwhile. Returns "" when traffic was
        handed over, otherwise what is left for an operator to do.
        """
        deadline, renewed = time.monotonic() + self.handover_timeout_s, time.monotonic()
        state: dict[str, Any] = {}
        try:
            while True:
                state = self._call("GET", "/admin/state")
                if _version((state.get("upstreams") or {}).get("champion")) == str(version):
                    self.set_split(ALL_ON_CHAMPION)
                    return ""
                if time.monotonic() >= deadline:
                    break
                if self._ttl_s is not None and time.monotonic() - renewed >= self._ttl_s / 3:
                    self._renew_quietly()
                    renewed = time.monotonic()
                time.sleep(self.handover_poll_s)
            self.set_split(self._split)  # no TTL: it must not lapse onto the old version unattended
        except RolloutError as exc:
            return (f"traffic was not handed over: {exc}; once the gateway's champion upstream serves v{version}, "
                    "set the split to all-on-champion (POST /admin/split {\"weight\": 0, \"shadow\": 0})")
        return self._stuck_message(version, state)

    def _renew_quietly(self) -> None:
        try:
            self.renew(self._ttl_s or 0)
        except RolloutError as exc:  # lapsed: traffic is on the champion already; the hand-over goes on anyway
            log.warning("%s", exc)

    def _stuck_message(self, version: str, state: dict[str, Any]) -> str:
        champion = (state.get("upstreams") or {}).get("champion") or {}
        serving = _version(champion)
        model, old = state.get("model") or "NAME", f"v{serving}" if serving else "an unknown version"
        rest = f" (the other {100 - self._split.weight:g}% still reach {old})" if self._split.weight < 100 else ""
        return (f"the gateway's champion upstream ({champion.get('url', '?')}) still serves {old} after "
                f"{self.handover_timeout_s:g}s, so the gateway keeps {self._split.weight:g}% on the challenger's "
                f"server (v{version}, now @champion){rest}; run "
                f"the champion's server on {model}@champion (`kiln serve {model}@champion`, it follows the alias) "
                "or restart it, then set the weight to 0 (POST /admin/split {\"weight\": 0, \"shadow\": 0})")

    def roll_back(self) -> None:
        """Weight 0 and no shadow, for good (no TTL): every request answered by the champion."""
        self.set_split(ALL_ON_CHAMPION)

    def describe(self) -> RouterHint:
        """The gateway reverts an unrenewed split by itself; by hand, its admin API resets it."""
        return RouterHint("the gateway", f"POST /admin/split {{\"weight\": 0, \"shadow\": 0}} to the gateway at "
                          f"{self.url} (bearer KILN_GATEWAY_TOKEN)", lapses=True)

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


def _error_of(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    return str(body["error"]) if isinstance(body, dict) and "error" in body else response.text[:200]
