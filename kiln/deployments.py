"""Serve Kiln's flows as Prefect deployments: each shows a typed parameter form in the Prefect UI."""

from __future__ import annotations

from prefect import serve
from prefect.schedules import Interval

from kiln.demo.flow import demo
from kiln.flows.monitor import monitor
from kiln.flows.optimize import optimize
from kiln.flows.promote import promote
from kiln.flows.retrain import retrain
from kiln.flows.rollout import rollout
from kiln.settings import Settings, load_settings


def deployments(settings: Settings | None = None) -> list:
    """The deployments Kiln offers; parameters come from the flows' pydantic models, and the rollout's form offers
    the traffic routers and metrics sources ``settings`` names (the worker's) as choices."""
    settings = settings or load_settings()
    made = [
        optimize.to_deployment(name="kiln-optimize", tags=["kiln"],
                               description="Registered model in, gated challenger out."),
        demo.to_deployment(name="kiln-demo", tags=["kiln"], description="Fine-tune MiniLM, register, optimize."),
        promote.to_deployment(name="kiln-promote", tags=["kiln"],
                              description="Review @challenger, wait for an approval, promote it."),
        rollout.to_deployment(name="kiln-rollout", tags=["kiln"],
                              description="Canary @challenger against @champion through the gateway; promote "
                                          "or roll back."),
        retrain.to_deployment(name="kiln-retrain", tags=["kiln"],
                              description="A pushed commit's training config, fine-tuned and registered, then "
                                          "optimized."),
        # One schedule per model of monitor_models, each with that model as its parameter; none: runs by hand.
        monitor.to_deployment(name="kiln-monitor", tags=["kiln"], schedules=[
            Interval(settings.monitor_interval_s, parameters={"params": {"model": name}})
            for name in settings.monitor_models],
            description="Judge the served @champion on its live traffic; on a breach notify, roll back or "
                        "retrain, once."),
    ]
    rollout_form = next(d for d in made if d.name == "kiln-rollout")._parameter_openapi_schema
    fields = rollout_form.definitions["RolloutParams"]["properties"]
    routers = sorted({*(settings.rollout_gateways or {"default": None}), *settings.rollout_routers})
    fields["gateway"] |= {"enum": routers} | ({} if "default" in routers else {"default": routers[0]})
    if "metrics" in fields:
        fields["metrics"]["enum"] = sorted({"gateway", *settings.rollout_metrics})
    return made


def serve_all(settings: Settings | None = None) -> None:
    """Block serving every deployment (needs PREFECT_API_URL pointing at a Prefect server)."""
    serve(*deployments(settings))
