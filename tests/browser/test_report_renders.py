"""The review report renders in a real browser (headless Chromium from Debian's `chromium` package).

`make test` installs Chromium when missing (infra/ci/services.sh); skipped only where it is not installed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from kiln.tasks.reports import review as review_report
from kiln.tasks.reports.plots import pareto_png

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.browser, pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")]

SUMMARY = {
    "source": {"accuracy": 0.775, "latency_p50_ms": 18.0, "size_mb": 90.9},
    "candidates": {
        "int8-dynamic": {"precision": "int8-dynamic", "passed": False,
                         "metrics": {"accuracy": 0.7736, "latency_p50_ms": 4.1, "size_mb": 23.1},
                         "reasons": ["size_mb 23.1 <= 12: FAILED [size_mb <= 12]"]},
        "distill-3l": {"precision": "int8-dynamic", "passed": True,
                       "metrics": {"accuracy": 0.7763, "latency_p50_ms": 1.6, "size_mb": 10.4},
                       "reasons": ["size_mb 10.4 <= 12: ok [size_mb <= 12]"]},
    },
    "pareto_front": ["distill-3l"],
    "registered": {"name": "sentiment", "version": "4", "recipe": "distill-3l"},
}


def test_report_renders_in_headless_chromium(tmp_path: Path):
    plot = pareto_png(SUMMARY, tmp_path / "pareto.png")
    page = review_report.write(tmp_path / "report.html", summary=SUMMARY, model="sentiment@champion", run_id="r1",
                               datachecks={"checks": []}, pareto_png=plot)
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                    "--window-size=1280,1600", f"--screenshot={shot}", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    assert shot.stat().st_size > 20_000  # a rendered page with a table and an image, not a blank canvas
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          f"--user-data-dir={tmp_path / 'profile2'}", page.as_uri()],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    assert "distill-3l" in dom and "int8-dynamic" in dom and "<img" in dom
