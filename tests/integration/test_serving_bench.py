"""``benchmarks/serving_bench.py --tiny`` runs end to end: a smoke run, not a timed test (no speed is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_serving_benchmark_runs_its_three_parts_and_no_request_fails_during_the_swap(tmp_path):
    # A real process, as a user runs it: stdout must hold the JSON and nothing else, whatever the servers print.
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serving_bench.py"), "--tiny", "--seconds",
                             "1", "--json"], capture_output=True, text=True, cwd=tmp_path, timeout=600,
                            env=os.environ | {"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(result.stdout)
    assert {"swap", "transports", "gateway"} <= set(doc)

    swap = doc["swap"]
    assert swap["failed"] == 0, swap
    assert (swap["from_version"], swap["to_version"]) == ("1", "2")
    windows = swap["windows"]
    assert list(windows) == ["before", "during", "after"] and all(w["requests"] > 0 for w in windows.values())
    assert windows["before"]["versions"] == ["1"] and windows["after"]["versions"] == ["2"]
    assert swap["first_new_answer_after_move_s"] is not None

    transports = doc["transports"]
    assert transports["levels"] == [1, 8, 32]
    assert list(transports["rows"]) == ["in-process", "http-json", "http-binary", "grpc"]
    for by_level in transports["rows"].values():
        for row in by_level.values():
            assert row["failed"] == 0 and row["requests"] > 0 and row["ratio"] > 0, row
    assert transports["target_met"] == all(transports["target_met_by"].values())
    assert set(transports["target_met_by"]) == {"http-json", "http-binary", "grpc"}

    gateway = doc["gateway"]
    low, high = gateway["added_p50_ci95_ms"]
    assert gateway["rounds"] >= 4 and low <= high
    assert gateway["direct"]["p50_ms"] > 0 and gateway["gateway"]["p50_ms"] > 0
