"""The demo's last act: two canary rollouts on loopback, one that promotes and one that rolls back.

    model servers (champion, challenger) ─► gateway ─► load generator replaying the test split (+ feedback)
    rollout 1: the optimize run's @challenger, approved with the demo's own key ─► every step passes ─► promoted
               ─► the champion's server follows @champion to it ─► the gateway hands it all traffic
    rollout 2: the same engine registered again, served with injected faults ─► rolled back, champion untouched

Each server follows its alias as ``kiln serve NAME@ALIAS`` does (:mod:`kiln.infra.follow`), and each rollout ends
by saying where the gateway sends the traffic (``traffic: 100% on champion v2 (gateway http://...)``).

Everything runs in this process on 127.0.0.1 (servers in threads, as in the tests); in production the
servers and the gateway are long-running processes (``python -m kiln.infra.server`` / ``kiln.infra.gateway``) and
only the rollout runs as a flow.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from mlflow.tracking import MlflowClient
from pydantic import AnyHttpUrl, SecretStr

from kiln.demo import approver
from kiln.infra.background import serving
from kiln.infra.faults import Faults
from kiln.infra.follow import follow_refs
from kiln.infra.gateway import create_app as gateway_app
from kiln.infra.gateway_proxy import Gateway, Upstream
from kiln.infra.loadgen import LoadPlan, LoadSummary, generate_load
from kiln.infra.runtime import ServedModel
from kiln.infra.server import create_app as server_app
from kiln.infra.server import load_registered, with_faults
from kiln.settings import Settings
from kiln.tasks.core import tags as vocab
from kiln.tasks.engines import EngineOptions
from kiln.tasks.presets import PRESETS
from kiln.tasks.registry import aliases as alias_moves
from kiln.tasks.registry import audit
from kiln.tasks.registry import client as registry
from kiln.tasks.rollout.launch import run_rollout
from kiln.tasks.rollout.params import RolloutParams
from kiln.tasks.rollout.state import RolloutState

log = logging.getLogger(__name__)
DEMO_SPEC = PRESETS / "rollout-demo.yaml"
# What the sabotaged server does: a bad deploy that answers a third of rows wrongly and slowly.
DEMO_FAULTS = Faults(wrong=0.3, latency_ms=25.0, seed=1)
_COPIED_TAGS = (vocab.CANDIDATE_KEY, vocab.RECIPE, vocab.PRECISION, vocab.TASK, vocab.PARENT_VERSION, vocab.DATASET,
                vocab.GATE, vocab.GATE_REASONS, vocab.METRICS, vocab.SHA256, vocab.PACKAGE_DIGEST, vocab.STAGES)


@dataclass
class CanaryResult:
    state: RolloutState
    traffic: LoadSummary | None
    routed: str = ""  # where the gateway sends the traffic at the end, in words


@contextmanager
def canary_stack(settings: Settings, name: str, faults: Faults | None = None) -> Iterator[tuple[str, str]]:
    """Serve ``name@champion`` and ``name@challenger`` behind a gateway, each server following its alias;
    yields (gateway URL, admin token)."""
    options = EngineOptions(threads=1)  # two servers and a load generator share the machine
    token = secrets.token_urlsafe(24)
    with ExitStack() as stack:
        urls = []
        for ref, fault in ((f"{name}@{vocab.CHAMPION}", None), (f"{name}@{vocab.CHALLENGER}", faults)):
            prepare = _faulty(fault)
            served = [prepare(m) for m in load_registered([ref], settings, options)]
            app = server_app(served)
            follow_refs(app.state.server.pool, [ref], served, settings, options, prepare=prepare)
            urls.append(stack.enter_context(serving(app)).url)
        gateway = Gateway(Upstream(urls[0]), Upstream(urls[1]), token, model_name=name)
        gw = stack.enter_context(serving(gateway_app(gateway)))
        log.info("canary stack: champion %s, challenger %s, gateway %s", urls[0], urls[1], gw.url)
        yield gw.url, token


def _faulty(faults: Faults | None) -> Callable[[ServedModel], ServedModel]:
    """What the challenger's server does to each version it serves: inject ``faults`` (when any)."""
    if faults is None:
        return lambda model: model
    return lambda model: with_faults([model], faults)[0]


def routed(url: str, token: str) -> str:
    """Where the gateway at ``url`` sends live traffic now, with the version each side serves, in one line."""
    state = httpx.get(f"{url}/admin/state", headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
    weight, versions = state["weight"], {role: u["version"] for role, u in state["upstreams"].items()}
    if weight <= 0:
        split = f"100% on champion v{versions[vocab.CHAMPION]}"
    elif weight >= 100:
        split = f"100% on challenger v{versions[vocab.CHALLENGER]}"
    else:
        split = (f"{100 - weight:g}% on champion v{versions[vocab.CHAMPION]}, {weight:g}% on challenger "
                 f"v{versions[vocab.CHALLENGER]}")
    return f"traffic: {split} (gateway {url})"


def run_canary(settings: Settings, name: str, texts: list[str], labels: list[str], *, spec: Path = DEMO_SPEC,
               faults: Faults | None = None, rate_per_s: float = 40.0,
               echo: Callable[[str], None] | None = None) -> CanaryResult:
    """One rollout of ``name@challenger`` under generated, labelled traffic; returns how it ended."""
    with canary_stack(settings, name, faults) as (url, token):
        stop = threading.Event()
        plan = LoadPlan(url=url, model=name, texts=texts, labels=labels, requests=200_000, seconds=3600,
                        concurrency=4, feedback=True, feedback_token=token, rate_per_s=rate_per_s, stop=stop)
        box: dict[str, LoadSummary] = {}
        traffic = threading.Thread(target=lambda: box.update(summary=generate_load(plan)), daemon=True,
                                   name="demo-traffic")
        state, where = rollout_under_traffic(settings, name, spec, url, token, traffic, stop, echo)
    return CanaryResult(state, box.get("summary"), where)


def rollout_under_traffic(settings: Settings, name: str, spec: Path, url: str, token: str, traffic: threading.Thread,
                          stop: threading.Event, echo: Callable[[str], None] | None) -> tuple[RolloutState, str]:
    """Start ``traffic``, roll ``name`` out through the demo's gateway at ``url``, then stop the traffic; the
    rollout's end state and where the gateway routes now. Shared by the classifier and LLM demos."""
    traffic.start()
    try:
        # The demo is the operator here: its gateway (random port) goes into the settings' allow-list.
        run_settings = settings.model_copy(update={"gateway_token": SecretStr(token),
                                                   "rollout_gateways": {"demo": AnyHttpUrl(url)}})
        state = run_rollout(RolloutParams(model=name, spec=str(spec), gateway="demo", poll_s=0.5,
                                          actor="kiln-demo"), run_settings, echo=echo)
        where = routed(url, token)
        (echo or log.info)(where)
    finally:
        stop.set()
        traffic.join(60)
    return state, where


def register_broken_copy(client: MlflowClient, name: str, of_version: str, home: Path) -> str:
    """Register ``of_version``'s engine again as the new @challenger, labelled as the demo's sabotaged deploy."""
    source = client.get_model_version(name, of_version)
    tags = {k: v for k, v in source.tags.items() if k in _COPIED_TAGS} | {
        vocab.DEMO_FAULTS: DEMO_FAULTS.describe(), vocab.CANDIDATE_KEY: f"demo-broken-{of_version}"}
    existing = registry.find_version(client, name, vocab.CANDIDATE_KEY, tags[vocab.CANDIDATE_KEY])
    if existing is not None and existing.tags.get(vocab.ROLLOUT_STATUS) not in (None, "running", "paused"):
        # Already played out in an earlier demo run: register a fresh copy so this run has a challenger too.
        tags[vocab.CANDIDATE_KEY] += f"-{audit.now_iso()}"
        existing = None
    version = existing or client.create_model_version(name, source.source, run_id=source.run_id, tags=tags)
    alias_moves.nominate(client, name, version.version, home=home)
    audit.AuditLog.under(home).append(audit.AuditEvent(
        name, str(version.version), vocab.EVENT_REGISTERED, "kiln-demo",
        f"copy of v{of_version} for the broken-canary demo; served with injected faults ({DEMO_FAULTS.describe()})"))
    return str(version.version)


def canary_demo(settings: Settings, name: str, texts: list[str], labels: list[str], *, spec: Path = DEMO_SPEC,
                rate_per_s: float = 40.0, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Both rollouts; returns their end states (and skips the first when there is nothing to roll out)."""
    settings = approver.demo_settings(settings)  # the demo's own key is the only approver it trusts
    client = registry.connect(settings)
    aliases = registry.aliases_of(client, name)
    out: dict[str, Any] = {}
    engine = aliases.get(vocab.CHALLENGER)  # the gated engine the broken copy reuses
    if aliases.get(vocab.CHALLENGER) and aliases.get(vocab.CHALLENGER) != aliases.get(vocab.CHAMPION):
        echo(f"\n── canary 1: v{aliases[vocab.CHALLENGER]} (from optimize) against champion "
             f"v{aliases.get(vocab.CHAMPION)}, approved with the demo's key ──")
        approver.approve(client, settings, name, aliases[vocab.CHALLENGER])
        good = run_canary(settings, name, texts, labels, spec=spec, rate_per_s=rate_per_s, echo=echo)
        out["rollout"] = _summary(good)
    else:
        echo(f"\n(no new @challenger for {name}: aliases {aliases}; skipping the first canary)")
    champion = registry.aliases_of(client, name)[vocab.CHAMPION]
    engine = engine or champion
    if not vocab.gate_passed(client.get_model_version(name, engine).tags):
        echo(f"(v{engine} has no passed gate to copy; skipping the broken canary)")
        return out
    broken = register_broken_copy(client, name, engine, settings.home)
    echo(f"\n── canary 2: v{broken} = v{engine}'s engine on a sabotaged server ({DEMO_FAULTS.describe()}) against "
         f"champion v{champion} ──")
    bad = run_canary(settings, name, texts, labels, spec=spec, faults=DEMO_FAULTS, rate_per_s=rate_per_s, echo=echo)
    out["broken_rollout"] = _summary(bad)
    return out


def _summary(result: CanaryResult) -> dict[str, Any]:
    s, t = result.state, result.traffic
    return {"version": s.challenger, "champion_before": s.champion, "status": s.status, "message": s.message,
            "analyses": [(v.step + 1, v.weight, v.outcome) for v in s.verdicts], "run_id": s.run_id,
            "requests": t.sent if t else 0, "failed_requests": t.failed if t else 0, "traffic": result.routed}
