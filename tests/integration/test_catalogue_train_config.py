"""Bad-input catalogue, pushed training configs: a ``kiln-train.yaml`` at a commit that points outside the checkout,
names a model it may not train, asks for an unbounded budget or is a YAML bomb is refused by
``kiln trigger retrain --local`` with one line and exit 2 — before anything is copied, trained or registered, and
without quoting any file (:mod:`tests.integration.catalogue`: registry, aliases and KILN_HOME unchanged).

One project for the module: ``tiny`` v1 @champion, and a repository whose first commit holds good data; each case
commits its own config (and files) on top.
"""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kiln.cli.app import app
from kiln.tasks.data.datasets import DatasetSpec
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.onboard import register_folder
from tests.conftest import fresh_project
from tests.integration.catalogue import snapshot, unchanged
from tests.integration.helpers import prefect_console_follows_stdout

pytestmark = pytest.mark.catalogue

SECRET_LINE = "root-password-SECRET-4711"  # what a config pointing outside the checkout must never reveal
BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8))


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", "-c", "user.name=ci", "-c", "user.email=ci@example.com", *args], cwd=cwd,
                          capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("train-config")
    with pytest.MonkeyPatch.context() as monkeypatch:
        settings = fresh_project(monkeypatch, root)
        client = registry.connect(settings)
        register_folder(client, settings, tiny_models["bert"], "tiny", "sequence-classification",
                        DatasetSpec(limit=50))
        (root / "outside.csv").write_text(f"text,label\n{SECRET_LINE},positive\n")
        repo = root / "repo"
        (repo / "data").mkdir(parents=True)
        with (repo / "data" / "reviews.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text", "label"])
            writer.writerows([f"the film was {w} {i}", label] for i in range(20)
                             for w, label in (("great", "positive"), ("awful", "negative")))
        _git(repo, "init", "-q", "-b", "main")
        _git(repo, "add", ".")
        _git(repo, "commit", "-qm", "data")
        yield settings, client, repo, root


@pytest.fixture(autouse=True)
def prefect_console_follows_the_runner(monkeypatch):
    prefect_console_follows_stdout(monkeypatch)


def _commit(repo: Path, files: dict[str, str | bytes | Path]) -> str:
    for name, content in files.items():
        path = repo / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or path.exists():
            path.unlink()
        if isinstance(content, Path):
            path.symlink_to(content)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "case", "--allow-empty")
    return _git(repo, "rev-parse", "HEAD")


GOOD = "name: tiny\ndata: data/reviews.csv\nsteps: 2\nbatch_size: 4\n"


def config(**changes: str) -> str:
    """GOOD with some lines replaced or added (``key='value'``) or removed (``key=None``)."""
    lines = dict(line.split(": ", 1) for line in GOOD.splitlines())
    lines.update(changes)
    return "".join(f"{k}: {v}\n" for k, v in lines.items() if v is not None)


def _outside(root: Path) -> Path:
    return root / "outside.csv"


# (id, files at the commit: {path: text | bytes | symlink target} or a callable(root) building them,
#  extra CLI args, extra env, words the one-line error must hold)
CASES = [
    ("data-absolute", {"kiln-train.yaml": lambda root: config(data=str(_outside(root)))}, [], {},
     "data: must be a relative path inside the repository"),
    ("data-dotdot", {"kiln-train.yaml": config(data="../outside.csv")}, [], {}, "without '..'"),
    ("data-dotdot-inner", {"kiln-train.yaml": config(data="data/../../outside.csv")}, [], {}, "without '..'"),
    ("data-symlink-out", {"data/link.csv": _outside, "kiln-train.yaml": config(data="data/link.csv")}, [], {},
     "points outside the repository"),
    ("data-missing", {"kiln-train.yaml": config(data="data/nope.csv")}, [], {}, "not a file at that commit"),
    ("data-directory", {"kiln-train.yaml": config(data="data")}, [], {}, "not a file at that commit"),
    ("config-symlink-out", {"kiln-train.yaml": _outside}, [], {}, "config_path 'kiln-train.yaml' points outside"),
    ("config-path-absolute", {}, ["--config-path", "/etc/passwd"], {}, "must be a path inside the repository"),
    ("config-path-dotdot", {}, ["--config-path", "../outside.csv"], {}, "must be a path inside the repository"),
    ("billion-laughs", {"kiln-train.yaml": BOMB}, [], {}, "through its aliases"),
    ("deep-nesting", {"kiln-train.yaml": "a: " + "[" * 500 + "]" * 500 + "\n"}, [], {}, "nests deeper"),
    ("non-mapping", {"kiln-train.yaml": "- name: tiny\n- data: data/reviews.csv\n"}, [], {}, "must be a mapping"),
    ("not-yaml", {"kiln-train.yaml": "name: [tiny\n"}, [], {}, "is not valid YAML at line"),
    ("not-utf8", {"kiln-train.yaml": b"name: tiny\ndata: \xff\xfe\n"}, [], {}, "is not UTF-8"),
    ("unknown-key", {"kiln-train.yaml": config(step="8")}, [], {}, "unknown key 'step' (did you mean 'steps'?)"),
    ("steps-nan", {"kiln-train.yaml": config(steps=".nan")}, [], {}, "steps:"),
    ("lr-inf", {"kiln-train.yaml": config(learning_rate=".inf")}, [], {}, "learning_rate:"),
    ("lr-negative", {"kiln-train.yaml": config(learning_rate="-0.1")}, [], {}, "learning_rate:"),
    ("steps-huge", {"kiln-train.yaml": config(steps="1000000000")}, [], {}, "steps: Input should be less than"),
    ("batch-zero", {"kiln-train.yaml": config(batch_size="0")}, [], {}, "batch_size:"),
    ("batch-huge", {"kiln-train.yaml": config(batch_size="100000")}, [], {}, "batch_size: Input should be less"),
    ("max-length-huge", {"kiln-train.yaml": config(max_length="100000")}, [], {}, "max_length:"),
    ("seed-negative", {"kiln-train.yaml": config(seed="-1")}, [], {}, "seed:"),
    ("recipes-many", {"kiln-train.yaml": config(recipes="[" + ", ".join(["onnx-fp32"] * 50) + "]")}, [], {},
     "recipes:"),
    ("name-path", {"kiln-train.yaml": config(name="../../evil")}, [], {}, "name: String should match pattern"),
    ("name-new", {"kiln-train.yaml": config(name="brand-new")}, [], {}, "'brand-new', which is not registered"),
    ("name-not-listed", {"kiln-train.yaml": GOOD}, [], {"KILN_TRAIN_MODELS": "other"},
     "KILN_TRAIN_MODELS does not list"),
    ("sha-not-hex", {}, ["--sha", "HEAD~1"], {}, "is not a commit SHA"),
]


@pytest.mark.parametrize(("files", "args", "env", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused_training_configs_change_nothing(project, monkeypatch, files, args, env, words):
    settings, client, repo, root = project
    built = {name: (content(root) if callable(content) else content) for name, content in files.items()}
    sha = _commit(repo, built) if built else _git(repo, "rev-parse", "HEAD")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    before = snapshot(settings.home, client)
    command = ["trigger", "retrain", "--sha", sha, "--repo", str(repo), "--local", "--no-optimize", *args]
    if "--sha" in args:
        command[2:4] = []
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 2, result.output
    assert words in result.output, result.output
    assert "Traceback" not in result.output and SECRET_LINE not in result.output
    unchanged(before, settings.home, client)
    assert not (settings.home / "datasets").exists() or not any((settings.home / "datasets").iterdir())
