"""`kiln bench` on a registered tiny model, and the Prefect deployments' typed parameter forms."""

from __future__ import annotations

from rich.console import Console

from kiln.tasks.optimize.compare import run_bench
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.onboard import register_folder


def test_bench_compares_torch_with_each_candidate_in_one_run(settings, tiny_models, tiny_spec):
    register_folder(registry.connect(settings), settings, tiny_models["bert"], "tiny", "sequence-classification",
                    tiny_spec)
    console = Console(record=True, width=200)
    rows = run_bench(settings, "tiny", ["onnx-fp32", "int8-dynamic"], seconds=0.2, console=console)
    assert [r["model"] for r in rows] == ["torch fp32 eager", "onnx-fp32", "int8-dynamic"]
    assert all(r["latency_p50_ms"] > 0 and r["batch_latency_p50_ms"] > 0 and r["size_mb"] > 0 for r in rows)
    assert rows[1]["accuracy"] == rows[0]["accuracy"]  # fp32 ONNX predicts what PyTorch predicts
    text = console.export_text()
    assert "speed-up b1" in text and "1.00×" in text and "int8-dynamic" in text
    # Against a named baseline recipe, added to the run when not asked for.
    console = Console(record=True, width=200)
    rows = run_bench(settings, "tiny", ["onnx-fp32"], seconds=0.2, console=console, baseline="int8-dynamic")
    assert [r["model"] for r in rows] == ["torch fp32 eager", "int8-dynamic", "onnx-fp32"]
    assert "speed-up vs int8-dynamic" in console.export_text()


def test_deployments_have_typed_forms_with_descriptions():
    from kiln.deployments import deployments

    by_name = {d.name: d for d in deployments()}
    schema = by_name["kiln-optimize"]._parameter_openapi_schema.model_dump()
    params = schema["definitions"]["OptimizeParams"]["properties"]
    assert params["model"]["description"].startswith("Registered model")
    assert params["recipes"]["default"] == ["onnx-fp32", "int8-dynamic"]
    assert "DatasetSpec" in schema["definitions"]
    assert "kiln-demo" in by_name and "kiln-promote" in by_name
