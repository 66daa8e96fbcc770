"""Serve Kiln's flows as Prefect deployments: each shows a typed parameter form in the Prefect UI."""

from __future__ import annotations

from prefect import serve

from kiln.demo.flow import demo
from kiln.flows.optimize import optimize
from kiln.flows.promote import promote
from kiln.flows.retrain import retrain
from kiln.flows.rollout import rollout


def deployments() -> list:
    """The deployments Kiln offers; parameters come from the flows' pydantic models."""
    return [
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


def serve_all() -> None:
    """Block serving every deployment (needs PREFECT_API_URL pointing at a Prefect server)."""
    serve(*deployments())
