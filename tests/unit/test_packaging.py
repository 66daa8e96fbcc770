"""The installed distribution claims one top-level name, `kiln`, and carries everything under it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """A wheel built from a copy of the tree (building writes build/ and *.egg-info beside the sources)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for folder in ("kiln", "tasks", "flows", "infra"):
        shutil.copytree(ROOT / folder, src / folder, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(src)], check=True, capture_output=True, timeout=300)
    (path,) = out.glob("*.whl")
    return zipfile.ZipFile(path)


def test_only_kiln_is_installed_at_the_top(wheel: zipfile.ZipFile) -> None:
    tops = {name.split("/")[0] for name in wheel.namelist() if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"kiln"}
    top_level = next(n for n in wheel.namelist() if n.endswith(".dist-info/top_level.txt"))
    assert wheel.read(top_level).decode().split() == ["kiln"]


def test_the_design_cards_folders_ship_under_kiln(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    assert {"kiln/tasks/core/tags.py", "kiln/flows/optimize.py", "kiln/infra/server.py",
            "kiln/tasks/registry/pyfunc_entry.py", "kiln/cli/app.py"} <= names
    presets = {n for n in names if n.startswith("kiln/tasks/presets/") and n.endswith(".yaml")}
    assert {p.name for p in (ROOT / "tasks" / "presets").glob("*.yaml")} == {Path(n).name for n in presets}
    assert not any(n.startswith("kiln/tasks/tasks") or "/tests/" in n for n in names)  # no loops, no test code
