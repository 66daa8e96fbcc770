"""The deployments' forms offer choices where the values are known: the Prefect UI draws an ``enum`` as a dropdown.

Known statically: engine backends, the shipped recipes, the rollout's gate mode, the promote flow's approval
path. Known only on the worker: the traffic routers and metrics sources its settings name, put into the
kiln-rollout form when the deployments are built (``kiln serve-flows``).
"""

from __future__ import annotations

import pytest
from pydantic import AnyHttpUrl


@pytest.fixture
def forms(settings):
    from kiln.deployments import deployments

    configured = settings.model_copy(update={"rollout_gateways": {"staging": AnyHttpUrl("http://127.0.0.1:8081"),
                                                                  "prod": AnyHttpUrl("http://127.0.0.1:8082")}})
    return {d.name: d._parameter_openapi_schema.model_dump() for d in deployments(configured)}


def test_optimize_and_demo_forms_offer_backends_and_named_recipes(forms):
    from kiln.tasks.compress.recipes import library

    optimize = forms["kiln-optimize"]["definitions"]["OptimizeParams"]["properties"]
    assert optimize["backend"]["enum"] == ["onnxruntime", "tensorrt", "auto"]
    named = optimize["recipes"]["items"]  # the shipped recipes: a dropdown
    assert named["enum"] == sorted(library()) and {"int8-dynamic", "onnx-fp32"} <= set(named["enum"])
    assert optimize["file_recipes"]["items"] == {"type": "string"}  # recipe_file's own names: free text
    demo = forms["kiln-demo"]["definitions"]["DemoParams"]["properties"]
    assert demo["recipes"]["items"]["enum"] == sorted(library())


def test_rollout_form_offers_the_workers_routers_and_the_gate_modes(forms):
    rollout = forms["kiln-rollout"]
    params = rollout["definitions"]["RolloutParams"]["properties"]
    assert params["gateway"]["enum"] == ["prod", "staging"] and params["gateway"]["default"] == "prod"
    if "metrics" in params:
        assert "gateway" in params["metrics"]["enum"]
    assert rollout["properties"]["gates"]["enum"] == ["prefect", "registry"]
    assert rollout["properties"]["gates"]["default"] == "prefect"
    assert rollout["properties"]["gate_timeout_s"]["exclusiveMinimum"] == 0
    assert forms["kiln-promote"]["definitions"]["PromoteParams"]["properties"]["approval"]["enum"] == ["registry", "ui"]


def test_rollout_form_defaults_to_the_default_gateway_when_none_is_configured(settings):
    from kiln.deployments import deployments

    rollout = next(d for d in deployments(settings) if d.name == "kiln-rollout")._parameter_openapi_schema
    gateway = rollout.model_dump()["definitions"]["RolloutParams"]["properties"]["gateway"]
    assert gateway["enum"] == ["default"] and gateway["default"] == "default"


def test_gate_form_is_typed():
    from kiln.flows.rollout_inputs import GateInput

    schema = GateInput.model_json_schema()
    assert schema["properties"]["decision"]["enum"] == ["resume", "promote", "abort"]
    assert {"reason", "token"} <= set(schema["properties"])
