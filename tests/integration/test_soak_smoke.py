"""``benchmarks/soak.py`` runs end to end: a seconds-long smoke run, not the soak itself (no speed is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_soak_benchmark_loads_the_gateway_and_two_servers_and_reports_growth_and_drift(tmp_path):
    # A real process, as a user runs it: stdout must hold the JSON and nothing else, whatever the servers print.
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--minutes", "0.1",
                             "--window-seconds", "3", "--rate", "20", "--json"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300, env=os.environ | {"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(result.stdout)

    assert doc["failed"] == 0, doc  # the target: no request lost behind the gateway
    windows = doc["windows"]
    assert len(windows) == 2 and all(w["requests"] > 0 and w["p99_ms"] > 0 for w in windows), windows
    assert doc["requests"] == sum(w["requests"] for w in windows)
    # Both servers answered: the gateway splits 50/50.
    assert {"champion", "challenger"} <= set().union(*(w["by_upstream"] for w in windows))
    assert set(doc["rss"]) == {"champion", "challenger", "gateway"}
    for growth in doc["rss"].values():
        assert growth["first_mb"] > 0 and growth["growth_mb"] == round(growth["last_mb"] - growth["first_mb"], 1)
    drift = doc["p99_drift"]
    assert drift["first_ms"] == windows[0]["p99_ms"] and drift["last_ms"] == windows[-1]["p99_ms"]
    assert "RSS" in result.stderr and "window" in result.stderr  # the table, beside the JSON, for a human
