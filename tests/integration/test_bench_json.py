"""Machine-readable results for scripts and CI: ``kiln bench --json`` and ``kiln show --json``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from typer.testing import CliRunner

from kiln.cli.app import app
from kiln.flows.optimize import OptimizeParams, optimize
from kiln.tasks.core import tags as vocab
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.onboard import register_folder

runner = CliRunner()


def test_bench_json_is_one_document_with_speedup_intervals_and_noise(settings, tiny_models, tiny_spec):
    register_folder(registry.connect(settings), settings, tiny_models["bert"], "tiny", "sequence-classification",
                    tiny_spec)
    # A real process: stdout must hold the JSON and nothing else, whatever the libraries print.
    result = subprocess.run([sys.executable, "-m", "kiln", "bench", "tiny", "--recipes", "onnx-fp32,int8-dynamic",
                             "--seconds", "0.2", "--json"], capture_output=True, text=True, env=os.environ | {
                                 "COLUMNS": "200", "KILN_COST_TARGET_P95_MS": "10000"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(result.stdout)
    assert doc["baseline"] == "torch fp32 eager" and doc["threads"] == settings.threads and doc["rounds"] >= 4
    rows = {row["model"]: row for row in doc["rows"]}
    assert list(rows) == ["torch fp32 eager", "onnx-fp32", "int8-dynamic"]
    for row in rows.values():
        for key in ("speedup_b1", "speedup_bN"):
            assert row[key]["low"] <= row[key]["value"] <= row[key]["high"], (row["model"], row[key])
        assert row["intervals"]["latency_p50_ms"]["low"] <= row["metrics"]["latency_p50_ms"]
        assert row["intervals"]["accuracy"]["high"] >= row["metrics"]["accuracy"]
        assert row["precision"] and row["metrics"]["size_mb"] > 0
        assert row["metrics"]["cost_per_million"] > 0 and row["metrics"]["instances_needed"] >= 1  # issue 19
    assert rows["torch fp32 eager"]["quality_delta"] is None
    assert rows["int8-dynamic"]["quality_delta"]["metric"] == "accuracy"
    assert set(doc["noise"]["models"]) == set(rows) and doc["noise"]["median_b1"] > 0
    # The human table still goes somewhere a person watching sees it: stderr.
    assert "speed-up b1" in result.stderr and "machine noise" in result.stderr
    assert "cost/1M" in result.stderr


def test_show_json_carries_versions_gate_verdicts_and_the_lease(settings, tiny_models, tiny_spec):
    client = registry.connect(settings)
    register_folder(client, settings, tiny_models["bert"], "tiny", "sequence-classification", tiny_spec)
    optimize(OptimizeParams(model="tiny", eval_limit=40))
    human = runner.invoke(app, ["show", "tiny"])
    assert human.exit_code == 0, human.output
    result = runner.invoke(app, ["show", "tiny", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["name"] == "tiny" and doc["lease"] == "free"
    source, challenger = doc["versions"]
    assert (source["version"], source["aliases"], source["recipe"]) == (1, ["champion"], "source")
    assert source["gate"] is None and source["gate_reasons"] == [] and source["rollout_status"] is None
    assert challenger["version"] == 2 and challenger["aliases"] == ["challenger"]
    assert challenger["recipe"] in {"onnx-fp32", "int8-dynamic"} and challenger["precision"]
    assert challenger["gate"] == vocab.GATE_PASSED and challenger["gate_reasons"]
    assert all(isinstance(reason, str) for reason in challenger["gate_reasons"])
    assert challenger["metrics"]["accuracy"] > 0 and challenger["metrics"]["latency_p50_ms"] > 0
    # The human view is unchanged: one line per version, then the lease.
    assert human.output.splitlines()[1].split()[:2] == ["v2", "challenger"]
    assert human.output.splitlines()[-1] == "lease: free"
