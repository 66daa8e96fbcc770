"""The gateway's routing state and bookkeeping: the split, per-upstream windows, Prometheus metrics.

Kept apart from the HTTP code so the split and the statistics can be read (and tested) on their own.
Everything here runs on the gateway's event loop thread, so updates need no locks; the routing state is
an immutable object replaced whole, so a request sees one consistent weight from start to finish.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client import Counter as PromCounter

from kiln.tasks.core.tags import CHALLENGER, CHAMPION  # the two upstream roles are named after the aliases

ROLES = (CHAMPION, CHALLENGER)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class Routing:
    """What share of traffic goes where; replaced whole on every change (an atomic swap).

    Attributes:
        weight: percent (0-100) of live requests answered by the challenger.
        shadow: fraction (0-1) of champion-answered infer requests mirrored to the challenger, whose
            answers are compared with the champion's and never returned.
        generation: increases with every change, so a reader can tell two states apart.
        expires_at: wall-clock time when the split lapses back to all-on-champion unless renewed (a rollout's
            split, :mod:`kiln.infra.gateway_state`); None: never (a split set by hand).
    """

    weight: float = 0.0
    shadow: float = 0.0
    generation: int = 0
    expires_at: float | None = None


def sticky_bucket(key: str) -> float:
    """A stable position in [0, 100) for a sticky key: the same user lands in the same place.

    A key goes to the challenger while ``bucket < weight``, so raising the weight only moves users
    from champion to challenger, never back (and lowering it only the reverse).
    """
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 * 100


class Splitter:
    """Deterministic proportional choice (error diffusion): over any n calls, ``share * n`` ± 1 say yes.

    Random draws would put 2,000 requests at 25 % within ±3 points only about 99.7 % of the time; the
    error-diffusion counter is exact, and it is as cheap.
    """

    def __init__(self) -> None:
        self._credit = 0.0

    def take(self, share: float) -> bool:
        if share <= 0:
            return False
        self._credit += share
        if self._credit >= 1 - 1e-9:  # tolerance: ten additions of 0.1 sum to 0.9999999999999999
            self._credit -= 1
            return True
        return False


def choose(routing: Routing, sticky_key: str | None, splitter: Splitter) -> str:
    """The role that answers a live request under ``routing``."""
    if routing.weight <= 0:
        return CHAMPION
    if routing.weight >= 100:
        return CHALLENGER
    if sticky_key:
        return CHALLENGER if sticky_bucket(sticky_key) < routing.weight else CHAMPION
    return CHALLENGER if splitter.take(routing.weight / 100) else CHAMPION


def percentiles(samples: Any) -> dict[str, float | None]:
    """p50/p95/p99 of latency samples in ms (None without samples)."""
    if len(samples) == 0:
        return {"latency_p50_ms": None, "latency_p95_ms": None, "latency_p99_ms": None}
    p50, p95, p99 = np.percentile(np.fromiter(samples, float), [50, 95, 99])
    return {"latency_p50_ms": round(float(p50), 3), "latency_p95_ms": round(float(p95), 3),
            "latency_p99_ms": round(float(p99), 3)}


@dataclass
class TrafficWindow:
    """Counts for one kind of traffic of one upstream since the window opened.

    Errors are answers with status >= 500 and upstreams that could not be reached: the upstream's
    fault. A 4xx is the client's mistake: counted by status and as ``refused``, but neither a request the
    model served nor a latency sample, so a client sending junk cannot dilute or skew a canary's evidence.

    ``text_sample`` bounds a sample of the most recent input texts themselves (0: none kept), for the content
    and embedding drift checks; held in memory only and served only with the admin token (``samples=True``).
    """

    max_samples: int
    requests: int = 0
    errors: int = 0
    refused: int = 0
    codes: Counter = field(default_factory=Counter)
    labels: Counter = field(default_factory=Counter)
    feedback: int = 0
    correct: int = 0
    compared: int = 0
    agreed: int = 0
    dropped: int = 0
    input_rows: int = 0
    latency_ms: deque = field(init=False)
    input_chars: deque = field(init=False)
    input_words: deque = field(init=False)
    text_sample: int = field(default=0, kw_only=True)
    input_texts: deque = field(init=False)

    def __post_init__(self) -> None:
        self.latency_ms = deque(maxlen=self.max_samples)  # the most recent, for rank tests and percentiles
        # Input features of the most recent text rows, for drift checks: lengths of many rows, and the texts of
        # the last text_sample only (memory, admin-only), so what the model reads can be compared too.
        self.input_chars = deque(maxlen=self.max_samples)
        self.input_words = deque(maxlen=self.max_samples)
        self.input_texts = deque(maxlen=max(0, self.text_sample))

    def record(self, code: int, seconds: float) -> None:
        self.codes[str(code)] += 1
        if 400 <= code < 500:
            self.refused += 1
            return
        self.requests += 1
        if code >= 500:
            self.errors += 1
        else:  # a failure's latency (often a timeout) says nothing about the model's speed
            self.latency_ms.append(seconds * 1000)

    def record_inputs(self, texts: list[str]) -> None:
        """Note each text row's length in characters and in whitespace-separated words, and keep the most recent
        ``text_sample`` texts."""
        self.input_rows += len(texts)
        self.input_chars.extend(len(t) for t in texts)
        self.input_words.extend(len(t.split()) for t in texts)
        if self.text_sample > 0:
            self.input_texts.extend(texts)

    def to_dict(self, samples: bool) -> dict[str, Any]:
        out = {"requests": self.requests, "errors": self.errors, "codes": dict(self.codes), "refused": self.refused,
               "error_rate": self.errors / self.requests if self.requests else None,
               "labels": dict(self.labels), "feedback": self.feedback, "correct": self.correct,
               "accuracy": self.correct / self.feedback if self.feedback else None,
               "compared": self.compared, "agreed": self.agreed,
               "agreement": self.agreed / self.compared if self.compared else None, "dropped": self.dropped,
               "samples": len(self.latency_ms), "input_rows": self.input_rows} | percentiles(self.latency_ms)
        if samples:
            out["latency_ms"] = [round(x, 3) for x in self.latency_ms]
            out["input_chars"], out["input_words"] = list(self.input_chars), list(self.input_words)
            out["input_texts"] = list(self.input_texts)
        return out


@dataclass
class Window:
    """One analysis interval: live traffic per role, plus the challenger's shadow traffic.

    ``text_sample``: how many of the most recent input texts each traffic window keeps (setting
    ``gateway_text_sample``; 0 keeps none).
    """

    max_samples: int = 5000
    started: float = field(default_factory=time.time)
    text_sample: int = 2000
    live: dict[str, TrafficWindow] = field(init=False)
    shadow: TrafficWindow = field(init=False)

    def __post_init__(self) -> None:
        self.live = {role: TrafficWindow(self.max_samples, text_sample=self.text_sample) for role in ROLES}
        self.shadow = TrafficWindow(self.max_samples, text_sample=self.text_sample)

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        return {"started": self.started, "seconds": round(time.time() - self.started, 3),
                **{role: w.to_dict(samples) for role, w in self.live.items()},
                "shadow": self.shadow.to_dict(samples)}


class GatewayMetrics:
    """The gateway's Prometheus metrics, in a registry of its own (several gateways may share a process)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = PromCounter("kiln_gateway_requests_total", "Live inference requests by upstream and status.",
                                    ["role", "version", "code"], registry=r)
        self.duration = Histogram("kiln_gateway_request_duration_seconds", "Upstream latency of live requests.",
                                  ["role", "version"], buckets=LATENCY_BUCKETS, registry=r)
        self.predictions = PromCounter("kiln_gateway_predictions_total", "Predicted classes of live answers.",
                                       ["role", "version", "label"], registry=r)
        self.shadow_requests = PromCounter("kiln_gateway_shadow_requests_total",
                                           "Mirrored requests to the challenger by status.",
                                           ["version", "code"], registry=r)
        self.shadow_duration = Histogram("kiln_gateway_shadow_request_duration_seconds",
                                         "Challenger latency on mirrored requests.", ["version"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.shadow_rows = PromCounter("kiln_gateway_shadow_comparisons_total",
                                       "Mirrored rows whose challenger label agrees / disagrees with the champion.",
                                       ["version", "result"], registry=r)
        self.shadow_dropped = PromCounter("kiln_gateway_shadow_dropped_total",
                                          "Mirrors skipped because too many were in flight.", registry=r)
        self.feedback = PromCounter("kiln_gateway_feedback_total", "Labelled feedback rows scored per upstream.",
                                    ["role", "version", "source", "result"], registry=r)
        self.fallbacks = PromCounter("kiln_gateway_fallbacks_total",
                                     "Requests answered by the other upstream because the chosen one was "
                                     "unreachable or dropped the connection.",
                                     registry=r)
        self.weight = Gauge("kiln_gateway_challenger_weight", "Percent of live traffic routed to the challenger.",
                            registry=r)
        self.shadow_fraction = Gauge("kiln_gateway_shadow_fraction",
                                     "Fraction of champion traffic mirrored to the challenger.", registry=r)


class PredictionLog:
    """Recent predictions by request id, so labelled feedback can be scored against what each upstream said.

    Bounded (oldest dropped first): feedback that arrives after its prediction was evicted is refused. With
    ``keep_texts`` (a feedback sink stores scored rows) it also keeps each text request's input texts, noted after
    the answer went out (:meth:`text_keepers`), within ``max_text_chars`` in all, oldest texts dropped first.
    """

    def __init__(self, capacity: int = 100_000, *, keep_texts: bool = False, max_text_chars: int = 64_000_000) -> None:
        self.capacity, self.keep_texts, self.max_text_chars = capacity, keep_texts, max_text_chars
        self._items: OrderedDict[str, dict[str, tuple[str, str, list[str]]]] = OrderedDict()
        self._texts: OrderedDict[str, list[str]] = OrderedDict()
        self._text_chars = 0

    def add(self, request_id: str, source: str, role: str, version: str, labels: list[str]) -> None:
        entry = self._items.setdefault(request_id, {})
        entry[source] = (role, version, labels)
        self._items.move_to_end(request_id)
        while len(self._items) > self.capacity:
            self._drop_texts(self._items.popitem(last=False)[0])

    def get(self, request_id: str) -> dict[str, tuple[str, str, list[str]]] | None:
        return self._items.get(request_id)

    def pop(self, request_id: str) -> dict[str, tuple[str, str, list[str]]] | None:
        """Forget a scored prediction; its texts stay until :meth:`pop_texts` (or eviction) takes them."""
        return self._items.pop(request_id, None)

    # ---- input texts, for the feedback sink's rows ---------------------------------------------------------

    def text_keepers(self, request_id: str) -> list[_TextKeeper]:
        """Recorders to add to the input windows of ``request_id`` (none unless texts are kept): each notes the
        request's texts when the inputs are parsed, off the request path."""
        return [_TextKeeper(self, request_id)] if self.keep_texts else []

    def add_texts(self, request_id: str, texts: list[str]) -> None:
        if request_id not in self._items or request_id in self._texts:
            return
        self._texts[request_id] = list(texts)
        self._text_chars += sum(map(len, texts))
        while self._text_chars > self.max_text_chars and self._texts:
            self._drop_texts(next(iter(self._texts)))

    def pop_texts(self, request_id: str) -> list[str] | None:
        """The input texts of ``request_id`` (None when not kept), forgotten once taken."""
        texts = self._texts.get(request_id)
        self._drop_texts(request_id)
        return texts

    def _drop_texts(self, request_id: str) -> None:
        texts = self._texts.pop(request_id, None)
        if texts is not None:
            self._text_chars -= sum(map(len, texts))


@dataclass(frozen=True)
class _TextKeeper:
    """Records one request's input texts in its :class:`PredictionLog` (shaped like a window's ``record_inputs``)."""

    log: PredictionLog
    request_id: str

    def record_inputs(self, texts: list[str]) -> None:
        self.log.add_texts(self.request_id, texts)


InputRecorder = TrafficWindow | _TextKeeper  # what a request's parsed inputs are noted in
