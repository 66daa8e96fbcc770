"""`kiln bench` on a registered tiny model, and the Prefect deployments' typed parameter forms."""

from __future__ import annotations

from rich.console import Console

from kiln.tasks.optimize.compare import run_bench
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.onboard import register_folder


def test_bench_compares_torch_with_each_candidate_in_one_run(settings, tiny_models, tiny_spec):
    register_folder(registry.connect(settings), settings, tiny_models["bert"], "tiny", "sequence-classification",
                    tiny_spec)
    console = Console(record=True, width=250)
    result = run_bench(settings, "tiny", ["onnx-fp32", "int8-dynamic"], seconds=0.2, console=console)
    rows = result["rows"]
    assert [r["model"] for r in rows] == ["torch fp32 eager", "onnx-fp32", "int8-dynamic"]
    assert all(r["metrics"]["latency_p50_ms"] > 0 and r["metrics"]["batch_latency_p50_ms"] > 0
               and r["metrics"]["size_mb"] > 0 for r in rows)
    assert rows[1]["metrics"]["accuracy"] == rows[0]["metrics"]["accuracy"]  # fp32 ONNX predicts what PyTorch does
    # Every number with its interval; the baseline's speed-up is exactly 1, the others' intervals surround them.
    for row in rows:
        acc, p50 = row["intervals"]["accuracy"], row["intervals"]["latency_p50_ms"]
        assert acc["low"] <= row["metrics"]["accuracy"] <= acc["high"] and acc["level"] == 0.95
        assert p50["low"] <= row["metrics"]["latency_p50_ms"] <= p50["high"]
        for key in ("speedup_b1", "speedup_bN"):
            assert 0 < row[key]["low"] <= row[key]["value"] <= row[key]["high"]
    assert rows[0]["speedup_b1"] == {"value": 1.0, "low": 1.0, "high": 1.0, "level": 0.95}
    assert rows[0]["quality_delta"] is None
    # fp32 ONNX answers every row as PyTorch does: paired, the difference is exactly zero.
    assert {k: rows[1]["quality_delta"][k] for k in ("metric", "value", "low", "high")} == {
        "metric": "accuracy", "value": 0.0, "low": 0.0, "high": 0.0}
    assert set(result["noise"]["models"]) == {r["model"] for r in rows} and result["noise"]["median_b1"] > 0
    text = console.export_text()
    assert "speed-up b1" in text and "1.00×" in text and "int8-dynamic" in text
    lines = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") > 5}
    assert "acc 0." in lines["int8-dynamic"] and "±" in lines["int8-dynamic"]  # quality ± half-width
    assert "pt [" in lines["int8-dynamic"] and "× [" in lines["int8-dynamic"]  # paired Δ, speed-up interval
    assert lines["torch fp32 eager"].count("[") >= 2  # p50 at batch 1 and 32 with their intervals
    assert "machine noise: per-round p50 varies by" in text and "not distinguishable from noise" in text
    # Against a named baseline recipe, added to the run when not asked for.
    console = Console(record=True, width=250)
    result = run_bench(settings, "tiny", ["onnx-fp32"], seconds=0.2, console=console, baseline="int8-dynamic")
    assert [r["model"] for r in result["rows"]] == ["torch fp32 eager", "int8-dynamic", "onnx-fp32"]
    assert result["baseline"] == "int8-dynamic" and result["rows"][1]["quality_delta"] is None
    assert result["rows"][0]["quality_delta"]["metric"] == "accuracy"
    assert "vs int8-dynamic" in console.export_text()


def test_deployments_have_typed_forms_with_descriptions():
    from kiln.deployments import deployments

    by_name = {d.name: d for d in deployments()}
    schema = by_name["kiln-optimize"]._parameter_openapi_schema.model_dump()
    params = schema["definitions"]["OptimizeParams"]["properties"]
    assert params["model"]["description"].startswith("Registered model")
    assert params["recipes"]["default"] == ["onnx-fp32", "int8-dynamic"]
    assert "DatasetSpec" in schema["definitions"]
    assert "kiln-demo" in by_name and "kiln-promote" in by_name
