"""The LLM demo's canary: a registered causal LM's @challenger rolled out under streamed generate traffic.

    model servers (champion, challenger) ─► gateway ─► streaming clients (POST .../generate_stream)
    the rollout moves the challenger's weight step by step, judging errors and time to first token

The servers, gateway and rollout are the classifier demo's (:func:`kiln.demo.canary.canary_stack`: each server
follows its alias, so the promotion at the end hands the champion's server the new version); what differs is the
traffic (streams of generated text, no labels) and the spec (``tasks/presets/rollout-llm-demo.yaml``: no shadow
step, since streams are not mirrored). :func:`canary` returns what the streams saw (requests, errors, time to first
token p50/p95, tokens/s) beside the rollout's outcome; ``kiln demo-llm`` prints it at its end.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from kiln.demo import approver
from kiln.demo.canary import canary_stack, rollout_under_traffic
from kiln.errors import ConfigError
from kiln.settings import Settings
from kiln.tasks.core import tags as vocab
from kiln.tasks.presets import PRESETS
from kiln.tasks.registry import client as registry

log = logging.getLogger(__name__)
LLM_SPEC = PRESETS / "rollout-llm-demo.yaml"
PROMPTS = ("The capital of France is", "Once upon a time,", "The best way to learn a language is",
           "Here is a short poem about the sea:", "In machine learning, a canary release")


@dataclass
class StreamStats:
    """What the streaming clients saw, all of them together."""

    requests: int = 0
    errors: int = 0
    tokens: int = 0
    ttft_s: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, ok: bool, ttft: float | None, tokens: int) -> None:
        with self.lock:
            self.requests += 1
            self.errors += not ok
            self.tokens += tokens
            if ttft is not None:
                self.ttft_s.append(ttft)

    def summary(self) -> dict[str, Any]:
        seconds = time.perf_counter() - self.started
        ttft = np.asarray(self.ttft_s or [np.nan]) * 1000
        return {"requests": self.requests, "errors": self.errors, "tokens": self.tokens,
                "ttft_p50_ms": round(float(np.percentile(ttft, 50)), 1),
                "ttft_p95_ms": round(float(np.percentile(ttft, 95)), 1),
                "tokens_per_s": round(self.tokens / seconds, 1) if seconds > 0 else 0.0, "seconds": round(seconds, 1)}


def stream_once(client: httpx.Client, url: str, body: dict[str, Any]) -> tuple[bool, float | None, int]:
    """One generate_stream request: (ended well, seconds to its first event, tokens the server counted)."""
    started, ttft, last = time.perf_counter(), None, {}
    try:
        with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                response.read()
                return False, None, 0
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                if ttft is None:
                    ttft = time.perf_counter() - started
                last = json.loads(line.removeprefix("data: "))
    except (httpx.HTTPError, ValueError):
        return False, ttft, 0
    return "error" not in last and "finish_reason" in last, ttft, int(last.get("output_tokens", 0))


def drive_streams(url: str, name: str, stop: threading.Event, stats: StreamStats, *,
                  prompts: Sequence[str] = PROMPTS, concurrency: int = 2, max_new_tokens: int = 16) -> None:
    """``concurrency`` clients sending generate_stream requests to ``url`` (a gateway) back to back until ``stop``."""
    endpoint = f"{url}/v2/models/{name}/generate_stream"

    def client_loop(offset: int) -> None:
        with httpx.Client(timeout=60) as client:
            i = offset
            while not stop.is_set():
                body = {"text_input": prompts[i % len(prompts)], "parameters": {"max_new_tokens": max_new_tokens}}
                stats.add(*stream_once(client, endpoint, body))
                i += concurrency

    threads = [threading.Thread(target=client_loop, args=(k,), daemon=True, name=f"llm-stream-{k}")
               for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def canary(settings: Settings, name: str, *, spec: Path = LLM_SPEC, prompts: Sequence[str] = PROMPTS,
           concurrency: int = 3, max_new_tokens: int = 8, echo: Callable[[str], None] | None = None
           ) -> dict[str, Any]:
    """Roll ``name``'s @challenger out against its @champion under streamed generate traffic; the summary.

    The challenger is approved with the demo's own key first (:mod:`kiln.demo.approver`), so a passing canary
    promotes it. Raises :class:`ConfigError` when there is no distinct @challenger to roll out.
    """
    settings = approver.demo_settings(settings)
    client = registry.connect(settings)
    aliases = registry.aliases_of(client, name)
    champion, challenger = aliases.get(vocab.CHAMPION), aliases.get(vocab.CHALLENGER)
    if not champion or not challenger or champion == challenger:
        raise ConfigError(f"{name} needs a @champion and a different @challenger for its canary (aliases: {aliases});"
                          " register or optimize a challenger first")
    approver.approve(client, settings, name, challenger)
    stats, stop = StreamStats(), threading.Event()
    with canary_stack(settings, name) as (url, token):
        traffic = threading.Thread(target=drive_streams, args=(url, name, stop, stats), daemon=True,
                                   kwargs={"prompts": prompts, "concurrency": concurrency,
                                           "max_new_tokens": max_new_tokens}, name="llm-canary-traffic")
        state, where = rollout_under_traffic(settings, name, spec, url, token, traffic, stop, echo)
    return {"version": state.challenger, "champion_before": state.champion, "status": state.status,
            "message": state.message, "analyses": [(v.step + 1, v.weight, v.outcome) for v in state.verdicts],
            "traffic": where.removeprefix("traffic: "), **stats.summary()}
