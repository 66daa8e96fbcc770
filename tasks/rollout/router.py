"""What a rollout needs from whatever splits live traffic between @champion and @challenger.

    TrafficRouter   set the split (with a TTL while a rollout drives it), renew it, read it back, after a
                    promotion hand everything over to the new champion, on a rollback send everything back
                    to the champion
    MetricsWindows  the evidence: each analysis window's per-upstream counts and latency samples, and
                    which versions the upstreams serve

The Kiln gateway is the first router (:class:`kiln.tasks.rollout.gateway_client.GatewayRouter`, both
protocols at once). Another router (a Gateway API HTTPRoute, a KServe canary) implements
:class:`TrafficRouter` and takes its windows from wherever its metrics live (e.g. Prometheus).

A rollout's split is a lease on the traffic: the driver sets it with ``ttl_s`` and renews it from its own loop
(the rhythm of its model lease), so a driver that dies leaves a split that lapses back to the champion
instead of one that holds forever. Splits set without ``ttl_s`` (a rollback, an operator) hold until changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from kiln.tasks.rollout.params import RolloutError


@dataclass(frozen=True)
class Split:
    """How live traffic is shared between the champion and the challenger."""

    weight: float = 0.0  # percent of live requests answered by the challenger (0-100)
    shadow: float = 0.0  # fraction of the champion's requests mirrored to the challenger (0-1), answers discarded


ALL_ON_CHAMPION = Split(0.0, 0.0)


@dataclass(frozen=True)
class RouterHint:
    """A router in words, for what the driver tells an operator when traffic must be put right by hand."""

    what: str  # a noun phrase naming it: "the gateway", "the HTTPRoute sentiment (namespace kiln)"
    reset: str  # how to put all traffic on the champion by hand, as a clause: "set ... to 0 (`kubectl ...`)"
    lapses: bool  # True: a split set with a TTL reverts to the champion by itself once it is not renewed


def hint_of(router: Any) -> RouterHint:
    """``router.describe()``, or a plain description naming its URL when it has none (a router written before
    :meth:`TrafficRouter.describe` existed)."""
    describe = getattr(router, "describe", None)
    if callable(describe):
        return describe()
    url = getattr(router, "url", "?")
    return RouterHint(f"the router at {url}", f"put all traffic on the champion at {url}", lapses=False)


class SplitLapsed(RolloutError):
    """The router says the rollout's split lapsed (not renewed within its TTL): all traffic is on the champion."""


class TrafficRouter(Protocol):
    """Moves live traffic between @champion and @challenger."""

    url: str  # where the router is (shown in the rollout's state)

    def set_split(self, split: Split, *, ttl_s: float | None = None) -> None:
        """Route ``split`` from now on; with ``ttl_s``, only until ``ttl_s`` seconds pass without :meth:`renew`
        (then everything goes back to the champion)."""

    def renew(self, ttl_s: float) -> None:
        """Keep the current split ``ttl_s`` seconds more; :class:`SplitLapsed` when it has lapsed already, another
        RolloutError when the router cannot be reached."""

    def read_split(self) -> Split:
        """The split the router applies now (also proves it is reachable and the credentials work)."""

    def promote(self, version: str) -> str:
        """After ``version`` became @champion: send it all traffic once the champion's side serves it (waiting,
        bounded, while its server follows the alias; never sending traffic to the old version meanwhile);
        returns what is left for an operator to do ("" when nothing)."""

    def roll_back(self) -> None:
        """All traffic on the champion, no shadow."""

    def describe(self) -> RouterHint:
        """What it is, how to reset it by hand, whether a split lapses by itself (for messages)."""

    def close(self) -> None:
        """Release connections."""


class MetricsWindows(Protocol):
    """Where a rollout's evidence comes from."""

    def next_window(self) -> dict[str, Any]:
        """Close the current analysis window (returned: counts and latency samples per upstream) and open
        the next one, so that analysis intervals never overlap."""

    def served_versions(self) -> dict[str, str | None]:
        """The model version each upstream role (champion, challenger) serves, when the upstream says."""


class CanaryRouter(TrafficRouter, MetricsWindows, Protocol):
    """A router that also measures what it routes (the Kiln gateway)."""


class RoutedCanary:
    """A router that measures nothing (a Gateway API HTTPRoute, a KServe canary) paired with the windows of a
    metrics provider (Prometheus, ...): together, what the driver drives."""

    def __init__(self, router: TrafficRouter, windows: MetricsWindows) -> None:
        self.router, self.windows = router, windows
        self.url = router.url

    def set_split(self, split: Split, *, ttl_s: float | None = None) -> None:
        self.router.set_split(split, ttl_s=ttl_s)

    def renew(self, ttl_s: float) -> None:
        self.router.renew(ttl_s)

    def read_split(self) -> Split:
        return self.router.read_split()

    def promote(self, version: str) -> str:
        return self.router.promote(version)

    def roll_back(self) -> None:
        self.router.roll_back()

    def describe(self) -> RouterHint:
        return hint_of(self.router)

    def next_window(self) -> dict[str, Any]:
        return self.windows.next_window()

    def served_versions(self) -> dict[str, str | None]:
        return self.windows.served_versions()

    def close(self) -> None:
        """Close both (the windows too, when they hold connections)."""
        try:
            self.router.close()
        finally:
            if callable(close := getattr(self.windows, "close", None)):
                close()
