"""The import contracts in pyproject.toml hold on this tree, and each one breaks when code breaks its rule.

`make test` runs `lint-imports` on the real tree. These tests run it on a copy of the tree, once as it is
(the control) and once per contract with one offending import added, so a contract that silently stopped
checking anything (a renamed package, a typo in a layer) fails here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")

# contract id -> (file to edit, the import that breaks the contract)
VIOLATIONS = {
    "kiln-layers": ("kiln/settings.py", "import kiln.tasks.core.stages"),
    "tasks-layers": ("tasks/core/stages.py", "import kiln.tasks.registry.client"),
    "compress-techniques": ("tasks/compress/prune/scores.py", "import kiln.tasks.compress.quantization.dynamic"),
    "engine-backends": ("tasks/engines/onnxruntime.py", "import kiln.tasks.engines.tensorrt.plan"),
    "cli-commands": ("kiln/cli/promote.py", "import kiln.cli.app"),
    "tasks-plain-python": ("tasks/evaluate/gate.py", "import prefect"),
    "flows-no-servers": ("flows/rollout.py", "import kiln.infra.gateway"),
}


def contract_ids() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [c["id"] for c in config["tool"]["importlinter"]["contracts"]]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A copy of the package folders (symlinks kept, so kiln/tasks points at the copy's tasks/)."""
    root = tmp_path_factory.mktemp("tree")
    for folder in ("kiln", "tasks", "flows", "infra"):
        shutil.copytree(ROOT / folder, root / folder, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


def lint(root: Path, *contracts: str) -> subprocess.CompletedProcess:
    args = [str(LINT), "--no-cache", "--no-logo"] + [a for c in contracts for a in ("--contract", c)]
    env = os.environ | {"PYTHONPATH": str(root)}  # the copy's kiln package, not the installed one
    return subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_every_contract_has_a_violation_case() -> None:
    assert set(contract_ids()) == set(VIOLATIONS)


def test_contracts_hold_on_an_untouched_copy(tree: Path) -> None:
    result = lint(tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(VIOLATIONS)} kept, 0 broken" in result.stdout


@pytest.mark.parametrize("contract", sorted(VIOLATIONS))
def test_a_forbidden_import_breaks_its_contract(tree: Path, contract: str) -> None:
    relative, offending = VIOLATIONS[contract]
    path = tree / relative
    original = path.read_text()
    path.write_text(original + f"\n{offending}  # added by test_import_contracts\n")
    try:
        result = lint(tree, contract)
    finally:
        path.write_text(original)
    assert result.returncode != 0, f"{contract} did not notice `{offending}` in {relative}:\n{result.stdout}"
    assert "BROKEN" in result.stdout and "1 broken" in result.stdout, result.stdout
