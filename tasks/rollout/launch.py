"""How a rollout starts, for the flow and the CLI: check everything that can be wrong before traffic moves
(spec, token, gateway, the model's lease, a rejected challenger), wire the drift checks, then drive the
rollout to its end."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from mlflow.tracking import MlflowClient

from kiln.errors import ConfigError
from kiln.settings import Settings
from kiln.tasks.core import tags as vocab
from kiln.tasks.lifecycle import promotion
from kiln.tasks.registry import audit
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.lease_record import refuse_if_held
from kiln.tasks.rollout import prometheus
from kiln.tasks.rollout.driver import DriftJudge, RolloutDriver
from kiln.tasks.rollout.gateway_client import GatewayRouter
from kiln.tasks.rollout.judge import Check, RolloutSpec
from kiln.tasks.rollout.params import RolloutParams, load_rollout_spec
from kiln.tasks.rollout.router import CanaryRouter, MetricsWindows, RoutedCanary
from kiln.tasks.rollout.state import RolloutState


def preflight(params: RolloutParams, settings: Settings, *,
              windows: MetricsWindows | None = None) -> tuple[RolloutSpec, CanaryRouter]:
    """Everything that can be wrong before traffic moves: the spec, the router's name, the token, the router.
    ``windows``: the metrics of a Kubernetes router (which measures nothing). Raises KilnError."""
    spec = load_rollout_spec(params.spec)
    if windows is None:  # the evidence from Prometheus when the rollout names a source of rollout_metrics
        windows, spec = prometheus.windows_for(params.metrics, settings, spec)
    try:
        router = _router(params.gateway, settings, windows)
    except BaseException:
        if callable(close := getattr(windows, "close", None)):
            close()
        raise
    try:
        router.read_split()  # reachable, and the token works
        refuse_if_held(registry.connect(settings), params.model)  # a publish, promotion or rollout is acting
        k8s = getattr(router, "router", None)  # a Kubernetes router, paired with its windows
        if k8s is not None and not isinstance(k8s, GatewayRouter):
            k8s.revert_if_lapsed()  # a split its dead driver left (no lease is held: nobody renews it)
            k8s.check_spec(spec)  # a spec it cannot follow (KServe: no shadow) fails here, not mid-rollout
        promotion.refuse_if_rejected(registry.connect(settings), params.model, settings)  # never a rejected one
        router.served_versions()  # it says what it serves (the driver checks which versions)
    except BaseException:
        router.close()
        raise
    return spec, router


def _router(name: str, settings: Settings, windows: MetricsWindows | None) -> CanaryRouter:
    """The router called ``name``: a Kubernetes one from rollout_routers, else a Kiln gateway from
    rollout_gateways (a name from the allow-list in settings, never a URL from the form)."""
    config = settings.rollout_routers.get(name)
    if config is None:
        url = settings.gateway_url(name)
        token = settings.gateway_token.get_secret_value() if settings.gateway_token else ""
        gateway = GatewayRouter(url, token, handover_timeout_s=settings.handover_timeout_s)
        return gateway if windows is None else RoutedCanary(gateway, windows)  # it routes, Prometheus measures
    if windows is None:
        raise ConfigError(f"router {name!r} ({config.kind}) moves traffic but measures nothing; name a Prometheus "
                          "source of the rollout_metrics setting to judge the rollout by (`--metrics NAME`), or "
                          "roll out through a Kiln gateway of rollout_gateways")
    from kiln.tasks.rollout.k8s_routers import build_router

    return build_router(config, windows, handover_timeout_s=settings.handover_timeout_s)


def run_rollout(params: RolloutParams, settings: Settings, *, drift: DriftJudge | None = None,
                echo: Callable[[str], None] | None = None,
                driver_class: Callable[..., RolloutDriver] = RolloutDriver,
                windows: MetricsWindows | None = None) -> RolloutState:
    """Validate everything, then drive the rollout to its end; raises :class:`KilnError` on bad input.
    ``driver_class``: a RolloutDriver subclass (the rollout flow's runs steps as Prefect tasks)."""
    spec, router = preflight(params, settings, windows=windows)
    try:
        client = registry.connect(settings)
        judge = drift if drift is not None else default_drift(spec, client, params.model, settings)
        driver = driver_class(settings, client, router, spec, params.model,
                              actor=params.actor or audit.current_user(settings), poll_s=params.poll_s,
                              drift=judge, echo=echo)
        return driver.run()
    finally:
        router.close()


def default_drift(spec: RolloutSpec, client: MlflowClient, model: str, settings: Settings) -> DriftJudge | None:
    """Drift checks for each analysis window, when the spec asks for them; the reference is profiled once."""
    cfg = spec.drift
    if cfg is None:
        return None
    from kiln.tasks.rollout import drift

    reference = drift.load_reference(cfg.reference) if cfg.reference else _recorded_reference(client, model)

    def judge(window: dict[str, Any]) -> list[Check]:
        return drift.drift_checks(cfg, reference, *drift.observed_from_state(window))

    return judge


def _recorded_reference(client: MlflowClient, model: str):  # noqa: ANN202 - drift is imported lazily
    """The test split of the dataset recorded on the champion (what its quality was measured on)."""
    from kiln.tasks.data.datasets import DatasetSpec, load_splits
    from kiln.tasks.rollout import drift

    aliases = registry.existing_aliases(client, model)
    champion = aliases.get(vocab.CHAMPION) or aliases.get(vocab.CHALLENGER)
    raw = client.get_model_version(model, champion).tags.get(vocab.DATASET) if champion else None
    if not raw:
        raise ConfigError(f"drift checks need a reference: {model} v{champion} records no dataset ({vocab.DATASET}); "
                          "set drift.reference in the rollout spec to a CSV/Parquet/JSONL file with a text column")
    test = load_splits(DatasetSpec(**json.loads(raw))).test
    return drift.reference_profile(test["text"].tolist(), test["label"].tolist() if "label" in test else None)
