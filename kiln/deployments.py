"""Serve Kiln's flows as Prefect deployments: each shows a typed parameter form in the Prefect UI."""

from __future__ import annotations

from prefect import serve

from kiln.demo.flow import demo
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
