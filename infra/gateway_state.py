"""The gateway's control state: the split and its TTL, what each upstream serves, kept across restarts.

    Upstream      a model server: its URL and the version it last said it serves
    RoutingState  the split (weight, shadow, when it lapses), the upstreams' versions and the model's name;
                  written atomically to ``--state-file`` on every change and read back at start
    StateFile     that file

**Versions are watched, not assumed.** A model server started on ``NAME@champion`` swaps to whatever version
the alias points at (:mod:`kiln.infra.follow`), so the gateway asks each upstream ``GET /v2/models/{name}``
every ``poll_s`` seconds and also reads the version named by every answer that passes through. The answer
to the request sent last wins: an old version's late answer never hides a swap already seen. The model's
name is given (``--model-name``) or learnt from the first ``/v2/models/{name}/...`` request.

**A split with a TTL lapses.** A rollout sets its split with ``ttl_s`` and renews it while its driver lives;
when nobody renews it (the driver died), the gateway sends everything back to the champion and says why. A
split set without ``ttl_s`` (by hand) never lapses.

Everything here runs on the gateway's event loop; the routing object is immutable and replaced whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from kiln.infra.gateway_stats import CHALLENGER, CHAMPION, ROLES, Routing
from kiln.infra.server import VERSION_HEADER
from kiln.infra.upstream import Answer, UpstreamClient

log = logging.getLogger(__name__)
STATE_FORMAT = 1
MAX_TTL_S = 7 * 24 * 3600.0  # a week: longer is a typo, and "never" is what leaving ttl_s out means
_MODEL_PATH = re.compile(r"^/v2/models/([^/]+)")
_MAX_METADATA_BYTES = 1 << 16


class RoutingConflict(Exception):
    """The request is well formed but the state does not allow it (answered 409): e.g. renewing a lapsed split."""


@dataclass
class Upstream:
    """A model server. ``version`` is what it last said it serves (given at start, or None until it says)."""

    url: str
    version: str | None = None
    seen_at: float | None = None  # wall-clock time of the last answer that named a version
    error: str | None = None  # why the last metadata poll failed (None: it answered, or none was sent yet)
    _sent: float = field(default=-math.inf, repr=False, compare=False)  # monotonic send time behind ``version``

    @property
    def label(self) -> str:
        """The version for metric labels; ``unknown`` until learnt."""
        return self.version or "unknown"

    def observe(self, version: str, sent: float) -> bool:
        """Take ``version`` from the answer to a request sent at ``sent`` (monotonic); True when it changed.

        An answer to a request sent before the one behind the current version is older news: ignored.
        """
        if sent < self._sent:
            return False
        self._sent, self.seen_at = sent, time.time()
        changed, self.version = version != self.version, version
        return changed


def version_named(answer: Answer) -> str | None:
    """The model version an answer names: the version header, else (v2 metadata or infer JSON) its one version."""
    if header := answer.headers.get(VERSION_HEADER.lower()):
        return header
    if answer.status != 200 or len(answer.content) > _MAX_METADATA_BYTES:
        return None
    try:
        body = json.loads(answer.content)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(body, dict):
        return None
    versions = body.get("versions")
    named = versions[0] if isinstance(versions, list) and len(versions) == 1 else body.get("model_version")
    return str(named) if isinstance(named, str | int) and str(named) else None


class StateFile:
    """A JSON file replaced atomically (temporary file, fsync, rename): a crash leaves the old or the new state."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is none yet; a ValueError saying what to do when it is unreadable."""
        try:
            text = self.path.read_text()
        except (FileNotFoundError, NotADirectoryError):  # none yet (whether it can be written is seen at once)
            return None
        except OSError as exc:
            raise ValueError(f"cannot read the gateway's state file {self.path} ({exc.strerror}); fix its "
                             "permissions or pass another --state-file") from exc
        try:
            state = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the gateway's state file {self.path} is not valid JSON ({exc.msg}); delete it to "
                             "start from --weight, or restore it") from exc
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"the gateway's state file {self.path} is not a format-{STATE_FORMAT} Kiln gateway "
                             "state; delete it to start from --weight")
        return state

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state``; raises OSError when the disk refuses."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(state, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(OSError):  # the rename itself survives a power cut once the folder is synced
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


class RoutingState:
    """The split, its expiry, the upstreams' versions and the model's name; saved on every change.

    Args:
        champion, challenger: the two model servers.
        weight, shadow: the split when there is no saved state (a saved state wins: it is what was routed).
        model: the served model's name (for version polls); None: learnt from traffic or the saved state.
        state_file: where the state survives restarts; None keeps it in memory only.
        on_routing: called with every new routing object (the gateway's gauges).
    """

    def __init__(self, champion: Upstream, challenger: Upstream, *, weight: float = 0.0, shadow: float = 0.0,
                 model: str | None = None, state_file: Path | None = None,
                 on_routing: Callable[[Routing], None] = lambda _: None) -> None:
        self.upstreams = {CHAMPION: champion, CHALLENGER: challenger}
        self.model, self._model_given = model, model is not None
        self.routing = Routing(check_weight(weight), check_fraction(shadow))
        self.lapsed: dict[str, Any] | None = None  # the split that lapsed last, until another one is set
        self.store = StateFile(state_file) if state_file is not None else None
        self.save_error: str | None = None
        self._on_routing = on_routing
        saved = self.store.load() if self.store is not None else None
        if saved is not None:
            self._restore(saved)
        self._on_routing(self.routing)
        if not self.lapse_if_due():  # (a split that lapsed while the gateway was down is reverted, and saved)
            self.save()  # at once: a state file that cannot be written is reported at start, not at the first change

    # ---- the split ------------------------------------------------------------------------------------------

    def set(self, *, weight: Any = None, shadow: Any = None, ttl_s: Any = None) -> Routing:
        """A new split (unset parts kept); with ``ttl_s`` it lapses unless renewed within that many seconds."""
        old = self.routing
        expires = time.time() + check_ttl(ttl_s) if ttl_s is not None else None
        routing = Routing(old.weight if weight is None else check_weight(weight),
                          old.shadow if shadow is None else check_fraction(shadow), old.generation + 1, expires)
        self._apply(routing, None)
        log.info("routing changed: weight %.1f%% shadow %.2f (generation %d%s)", routing.weight, routing.shadow,
                 routing.generation, f", lapses in {ttl_s:g}s unless renewed" if expires else "")
        return routing

    def renew(self, ttl_s: Any) -> Routing:
        """Push the current split's expiry to ``ttl_s`` seconds from now; RoutingConflict when it has none."""
        ttl, r = check_ttl(ttl_s), self.routing
        if r.expires_at is None:
            if self.lapsed is not None:
                lapsed = self.lapsed
                raise RoutingConflict(
                    f"the split (weight {lapsed['weight']:g}%, shadow {lapsed['shadow']:g}) lapsed at "
                    f"{_iso(lapsed['at'])} because nobody renewed it within its ttl_s, and all traffic went back "
                    "to the champion; set the split again to go on")
            raise RoutingConflict("the current split was set without ttl_s, so there is nothing to renew; set it "
                                  "again with ttl_s")
        self.routing = dataclasses.replace(r, expires_at=time.time() + ttl)
        self.save()
        return self.routing

    def lapse_if_due(self, now: float | None = None) -> bool:
        """Send everything back to the champion when the split's TTL has run out; True when it did."""
        r = self.routing
        if r.expires_at is None or (time.time() if now is None else now) < r.expires_at:
            return False
        log.warning("the split (weight %g%%, shadow %g, generation %d) lapsed at %s: nobody renewed it within its "
                    "ttl_s (did the rollout driver that set it stop?); all traffic goes to the champion now",
                    r.weight, r.shadow, r.generation, _iso(r.expires_at))
        lapsed = {"at": r.expires_at, "weight": r.weight, "shadow": r.shadow, "generation": r.generation}
        self._apply(Routing(0.0, 0.0, r.generation + 1), lapsed)
        return True

    def _apply(self, routing: Routing, lapsed: dict[str, Any] | None) -> None:
        self.routing, self.lapsed = routing, lapsed
        self._on_routing(routing)
        self.save()

    # ---- versions ---------------------------------------------------------------------------------------------

    def learn_model(self, path: str) -> None:
        """Take the model's name from a ``/v2/models/{name}/...`` request path, when it is not known yet."""
        if self.model is None and (match := _MODEL_PATH.match(path)):
            self.model = unquote(match[1])
            log.info("watching the upstreams' versions of model %r (learnt from traffic)", self.model)
            self.save()

    def observe(self, role: str, answer: Answer, sent: float) -> None:
        """Note the version ``answer`` names, from a request to ``role``'s upstream sent at ``sent`` (monotonic)."""
        version = version_named(answer)
        upstream = self.upstreams[role]
        before = upstream.version
        if version is not None and upstream.observe(version, sent):
            log.info("the %s upstream %s now serves %s v%s (was %s)", role, upstream.url, self.model or "the model",
                     version, f"v{before}" if before else "unknown")
            self.save()

    async def poll(self, client: UpstreamClient, timeout_s: float) -> None:
        """Ask every upstream which version of the model it serves (one metadata request each, in parallel)."""
        if self.model is None:
            return
        await asyncio.gather(*(self._poll_one(client, role, timeout_s) for role in ROLES))

    async def _poll_one(self, client: UpstreamClient, role: str, timeout_s: float) -> None:
        model = self.model
        upstream, path = self.upstreams[role], f"/v2/models/{quote(model, safe='')}"
        sent = time.monotonic()
        try:
            answer = await asyncio.wait_for(client.request("GET", upstream.url + path), timeout_s)
        except TimeoutError:
            upstream.error = f"GET {path}: no answer within {timeout_s:g}s"
            return
        if not isinstance(answer, Answer):
            upstream.error = f"GET {path}: {answer.message}"[:300]
        elif answer.status != 200 or version_named(answer) is None:
            upstream.error = f"GET {path} answered {answer.status} without a version"
            if answer.status == 404 and not self._model_given and self.model == model:
                log.warning("%s does not serve model %r; learning the name again from the next request", upstream.url,
                            model)
                self.model = None  # a client's typo taught it: the next request teaches it again
        else:
            upstream.error = None
            self.observe(role, answer, sent)

    async def watch(self, client: UpstreamClient, poll_s: float) -> None:
        """Poll the versions every ``poll_s`` and lapse the split on time, until cancelled."""
        next_poll = 0.0
        while True:
            try:
                now = time.monotonic()
                if now >= next_poll:
                    next_poll = now + poll_s
                    await self.poll(client, timeout_s=max(poll_s, 2.0))
                self.lapse_if_due()
            except Exception:  # a bug here must not stop the watch: lapsing on time is what matters most
                log.exception("the gateway's version watch failed; trying again")
            expires = self.routing.expires_at
            until_lapse = math.inf if expires is None else max(0.0, expires - time.time())
            await asyncio.sleep(max(0.0, min(next_poll - time.monotonic(), until_lapse, 1.0)))

    # ---- persistence --------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """What is saved and what ``/admin/state`` shows about the split and the upstreams."""
        r = self.routing
        return {"weight": r.weight, "shadow": r.shadow, "generation": r.generation, "expires_at": r.expires_at,
                "expires_in_s": None if r.expires_at is None else round(max(0.0, r.expires_at - time.time()), 3),
                "lapsed": self.lapsed, "model": self.model,
                "upstreams": {role: {"url": u.url, "version": u.version, "seen_at": u.seen_at, "error": u.error}
                              for role, u in self.upstreams.items()}}

    def save(self) -> None:
        """Write the state file (when there is one); a failure is logged and shown in ``/admin/state``, never raised:
        routing goes on in memory."""
        if self.store is None:
            return
        try:
            self.store.save({"format": STATE_FORMAT, "saved_at": time.time(), **self.to_dict()})
            if self.save_error is not None:
                log.info("the gateway's state file %s is written again", self.store.path)
            self.save_error = None
        except OSError as exc:
            if self.save_error is None:
                log.error("cannot write the gateway's state file %s (%s): a restart would forget the split",
                          self.store.path, exc)
            self.save_error = f"{exc.__class__.__name__}: {exc}"

    def _restore(self, saved: dict[str, Any]) -> None:
        assert self.store is not None
        urls = {role: (saved.get("upstreams") or {}).get(role, {}).get("url") for role in ROLES}
        mine = {role: u.url for role, u in self.upstreams.items()}
        if urls != mine:
            log.warning("the state file %s was written for other upstreams (%s); starting from --weight %g instead",
                        self.store.path, urls, self.routing.weight)
            return
        try:
            expires = saved.get("expires_at")
            self.routing = Routing(check_weight(saved["weight"]), check_fraction(saved["shadow"]),
                                   int(saved.get("generation", 0)), None if expires is None else float(expires))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"the gateway's state file {self.store.path} holds no valid split ({exc}); delete it "
                             "to start from --weight") from exc
        self.lapsed = saved.get("lapsed") if isinstance(saved.get("lapsed"), dict) else None
        if self.model is None and isinstance(saved.get("model"), str):
            self.model = saved["model"]
        for role, upstream in self.upstreams.items():
            version = saved["upstreams"][role].get("version")
            if upstream.version is None and isinstance(version, str):
                upstream.version = version  # what it served last; the first poll or answer replaces it
        r = self.routing
        log.info("restored the split from %s: weight %g%% shadow %g (generation %d%s)", self.store.path, r.weight,
                 r.shadow, r.generation, f", lapses at {_iso(r.expires_at)}" if r.expires_at else "")


def check_weight(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 100:
        raise ValueError(f"weight must be a number from 0 to 100 (percent to the challenger), got {value!r}")
    return float(value)


def check_fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"shadow fraction must be a number from 0 to 1, got {value!r}")
    return float(value)


def check_ttl(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= MAX_TTL_S:
        raise ValueError(f"ttl_s must be a number of seconds above 0 and at most {MAX_TTL_S:g} (leave it out for a "
                         f"split that never lapses), got {value!r}")
    return float(value)


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
