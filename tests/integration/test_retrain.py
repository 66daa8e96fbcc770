"""Git-push-triggered retraining end to end: a real `git push` to a bare repository whose post-receive
hook signs and posts a GitHub push payload to Kiln's receiver on loopback, which starts the retrain
deployment in the session's Prefect server; that flow run is then executed (as a served deployment's
runner would) and registers a tagged version. Also: what the receiver refuses creates no flow run, and
the retrain flow itself, called directly, never registers one commit twice.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from kiln.errors import ConfigError
from kiln.flows.retrain import RetrainParams, retrain
from kiln.infra.background import serving
from kiln.infra.starter import DeploymentStarter
from kiln.infra.webhooks import create_app
from kiln.settings import load_settings
from kiln.tasks.data.datasets import DatasetSpec
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.onboard import register_folder

SECRET = "push-secret"
WORDS = {"positive": ["great", "lovely", "happy", "wonderful"], "negative": ["awful", "sad", "terrible", "bad"],
         "neutral": ["ordinary", "plain", "usual", "average"]}
# Tiny on purpose: 8 steps at batch 8 on 90 rows; only the onnx-fp32 recipe in the chained optimize.
CONFIG = """\
name: {name}
model: tiny@champion
data: data/reviews.csv
steps: 8
batch_size: 8
max_length: 32
recipes: [onnx-fp32]
"""

HOOK = """#!{python}
# post-receive: sign each pushed ref as GitHub would and post it to Kiln's receiver.
import hashlib, hmac, json, sys, urllib.error, urllib.request, uuid

for line in sys.stdin:
    before, after, ref = line.split()
    body = json.dumps({{"ref": ref, "before": before, "after": after,
                       "repository": {{"full_name": "acme/models"}},
                       "head_commit": {{"id": after, "message": "pushed"}}}}).encode()
    delivery = str(uuid.uuid4())
    headers = {{"Content-Type": "application/json", "X-GitHub-Event": "push", "X-GitHub-Delivery": delivery,
               "X-Hub-Signature-256": "sha256=" + hmac.new({secret!r}.encode(), body, hashlib.sha256).hexdigest()}}
    request = urllib.request.Request({url!r}, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            status, text = answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    print("kiln webhook:", status, text)
    with open({log!r}, "a") as fh:
        fh.write(json.dumps({{"status": status, "answer": json.loads(text), "delivery": delivery,
                             "body": body.decode()}}) + "\\n")
"""


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", "-c", "user.name=ci", "-c", "user.email=ci@example.com", *args], cwd=cwd,
                          capture_output=True, text=True, check=True)
    return (done.stdout + done.stderr).strip()


def _write_repo(work: Path, name: str) -> None:
    (work / "data").mkdir(parents=True, exist_ok=True)
    with (work / "data" / "reviews.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for label, words in WORDS.items():
            for i in range(30):
                writer.writerow([f"the {['day', 'film', 'meal', 'trip', 'song'][i % 5]} was {words[i % 4]} {i}", label])
    (work / "kiln-train.yaml").write_text(CONFIG.format(name=name))


@pytest.fixture
def base(settings, tiny_models, tmp_path):
    """``tiny`` v1 @champion: the base model the training configs name."""
    client = registry.connect(settings)
    register_folder(client, settings, tiny_models["bert"], "tiny", "sequence-classification",
                    DatasetSpec(limit=50))
    return client


@pytest.fixture
def local_repo(tmp_path) -> tuple[Path, str]:
    """A plain repository with one commit (data + config); returns its path and the commit SHA."""
    work = tmp_path / "repo"
    work.mkdir()
    _git(work, "init", "-q", "-b", "main")
    _write_repo(work, "tiny")
    _git(work, "add", ".")
    _git(work, "commit", "-qm", "data and config")
    return work, _git(work, "rev-parse", "HEAD")


@pytest.fixture(scope="module")
def deployment() -> str:
    """The retrain deployment in the session's Prefect test server (``kiln serve-flows`` serves it for real)."""
    return str(retrain.to_deployment(name="kiln-retrain").apply())


def _runs(deployment_id: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id])))


@pytest.fixture
def pushed(settings, monkeypatch, tmp_path, deployment):
    """A bare "origin" with a post-receive hook posting to a live receiver, and a clone to push from."""
    from prefect.settings import PREFECT_API_URL

    origin, work, hook_log = tmp_path / "origin.git", tmp_path / "work", tmp_path / "deliveries.jsonl"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], check=True)
    monkeypatch.setenv("KILN_REPO", str(origin))  # where the flow run (the "worker") clones from
    monkeypatch.setenv("KILN_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("KILN_WEBHOOK_REPOSITORY", "acme/models")
    monkeypatch.setenv("KILN_TRAIN_MODELS", "tiny-retrained")  # a new name: pushes may create only listed ones
    receiver_settings = load_settings(webhook_max_body=4096)
    # The receiver's threads do not see the test harness's Prefect context: name its API explicitly.
    with serving(create_app(receiver_settings, DeploymentStarter(PREFECT_API_URL.value()))) as server:
        hook = origin / "hooks" / "post-receive"
        hook.write_text(HOOK.format(python=sys.executable, secret=SECRET, url=f"{server.url}/hooks/github",
                                    log=str(hook_log)))
        hook.chmod(0o755)
        _git(tmp_path, "clone", "-q", str(origin), str(work))
        _write_repo(work, "tiny-retrained")
        _git(work, "add", ".")
        _git(work, "commit", "-qm", "reviews and a training config")

        def deliveries() -> list[dict]:
            return [json.loads(line) for line in hook_log.read_text().splitlines()] if hook_log.exists() else []

        yield work, server.url, deliveries


def test_git_push_starts_and_runs_retrain(base, pushed, deployment):
    from prefect.flow_engine import run_flow

    work, _, deliveries = pushed
    before = {r.id for r in _runs(deployment)}
    output = _git(work, "push", "-q", "origin", "HEAD:main")
    sha = _git(work, "rev-parse", "HEAD")

    (delivery,) = deliveries()
    assert delivery["status"] == 202, output
    (run,) = [r for r in _runs(deployment) if r.id not in before]
    assert str(run.id) == delivery["answer"]["flow_run_id"]
    assert run.parameters["params"]["sha"] == sha and run.parameters["params"]["branch"] == "main"
    assert run.idempotency_key == f"push:acme/models@{sha}"  # coalesced on repository + commit

    # What the served deployment's runner does with the scheduled run: execute it (here, in-process).
    summary = run_flow(retrain, flow_run=run)
    assert summary["name"] == "tiny-retrained" and summary["version"] == "1" and not summary["reused"]
    assert summary["new_model"]  # said so: registered without an alias
    tags = base.get_model_version("tiny-retrained", "1").tags
    assert tags["kiln.git_sha"] == sha and tags["kiln.triggered_by"] == f"webhook:github:{delivery['delivery']}"
    assert tags["kiln.base_version"] == "tiny/1" and tags["kiln.git_branch"] == "main"
    # The chained optimize built a gated challenger from the retrained version; a push crowned nothing.
    assert summary["optimize"]["registered"]["name"] == "tiny-retrained"
    assert "champion" not in registry.aliases_of(base, "tiny-retrained")
    (done,) = [r for r in _runs(deployment) if r.id == run.id]
    assert done.state.is_completed()


def test_refused_deliveries_start_nothing(pushed, deployment, settings):
    work, url, deliveries = pushed
    count = len(_runs(deployment))

    # A real push to another branch: the hook delivers it, the receiver ignores it.
    _git(work, "push", "-q", "origin", "HEAD:feature")
    assert deliveries()[-1]["status"] == 202 and "refs/heads/feature" in deliveries()[-1]["answer"]["ignored"]

    _git(work, "push", "-q", "origin", "HEAD:main")
    accepted = deliveries()[-1]
    assert accepted["status"] == 202 and len(_runs(deployment)) == count + 1
    body = accepted["body"].encode()
    signature = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    headers = {"X-GitHub-Event": "push", "X-Hub-Signature-256": signature, "Content-Type": "application/json"}

    def post(content: bytes, **extra) -> httpx.Response:
        return httpx.post(f"{url}/hooks/github", content=content, headers=headers | extra, timeout=30)

    replayed = post(body, **{"X-GitHub-Delivery": accepted["delivery"]})
    assert replayed.status_code == 409 and accepted["delivery"] in replayed.json()["error"]
    redelivered = post(body, **{"X-GitHub-Delivery": "redelivered-1"})  # GitHub's redeliver: a fresh id
    assert redelivered.status_code == 409 and "was already received" in redelivered.json()["error"]
    forged = post(body.replace(b"main", b"mainx"), **{"X-GitHub-Delivery": "forged-1"})
    assert forged.status_code == 401 and "X-Hub-Signature-256" in forged.json()["error"]
    big = json.dumps(json.loads(body) | {"padding": "x" * 8192}).encode()
    oversized = post(big, **{"X-GitHub-Delivery": "big-1",
                             "X-Hub-Signature-256": "sha256=" + hmac.new(SECRET.encode(), big, "sha256").hexdigest()})
    assert oversized.status_code == 413 and "KILN_WEBHOOK_MAX_BODY" in oversized.json()["error"]
    broken = b'{"ref": "refs/heads/main", '
    malformed = post(broken, **{"X-GitHub-Delivery": "broken-1",
                                "X-Hub-Signature-256": "sha256=" + hmac.new(SECRET.encode(), broken,
                                                                            "sha256").hexdigest()})
    assert malformed.status_code == 400 and "not valid JSON" in malformed.json()["error"]
    assert len(_runs(deployment)) == count + 1


def test_retrain_flow_registers_a_tagged_version_once(base, local_repo, settings):
    repo, sha = local_repo
    params = RetrainParams(sha=sha[:10], repo=str(repo), branch="main", chain_optimize=False, triggered_by="cli")
    first = retrain(params)
    assert first == {"name": "tiny", "version": "2", "reused": False, "sha": sha, "base": "tiny@champion"}
    tags = base.get_model_version("tiny", "2").tags
    config = (repo / "kiln-train.yaml").read_bytes()
    data = (repo / "data" / "reviews.csv").read_bytes()
    assert tags["kiln.git_sha"] == sha and tags["kiln.git_repo"] == str(repo)
    assert tags["kiln.config_digest"] == hashlib.sha256(config).hexdigest()
    assert tags["kiln.data_digest"] == hashlib.sha256(data).hexdigest()
    assert tags["kiln.triggered_by"] == "cli" and tags["kiln.base_version"] == "tiny/1"
    assert set(json.loads(tags["kiln.train_metrics"])) == {"validation_accuracy", "train_loss"}
    # The version's dataset is a kept copy, not the deleted checkout: optimize can read it later.
    assert Path(json.loads(tags["kiln.dataset"])["source"]).read_bytes() == data
    assert registry.aliases_of(base, "tiny") == {"champion": "1"}  # a retrained version is not promoted
    assert not list((settings.home / "checkouts").iterdir())

    again = retrain(params)
    assert again["reused"] and again["version"] == "2"
    assert len(base.search_model_versions("name = 'tiny'")) == 2


def test_bad_commits_and_configs_fail_clearly(base, local_repo):
    repo, sha = local_repo
    with pytest.raises(ConfigError, match="commit deadbeef0 does not exist in .*push it first"):
        retrain(RetrainParams(sha="deadbeef0", repo=str(repo), chain_optimize=False))
    (repo / "kiln-train.yaml").write_text("name: tiny\ndata: data/reviews.csv\nstep: 8\n")
    _git(repo, "commit", "-qam", "typo in the config")
    typo = _git(repo, "rev-parse", "HEAD")
    with pytest.raises(ConfigError, match=r"kiln-train.yaml is invalid: unknown key 'step' \(did you mean 'steps'\?\)"):
        retrain(RetrainParams(sha=typo, repo=str(repo), chain_optimize=False))
    with pytest.raises(ConfigError, match="ml/train.yaml does not exist; commit a training config"):
        retrain(RetrainParams(sha=sha, repo=str(repo), config_path="ml/train.yaml", chain_optimize=False))
    assert len(base.search_model_versions("name = 'tiny'")) == 1


def test_kiln_trigger_retrain_for_ci(base, local_repo, deployment, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from kiln.cli.trigger import register_commands

    app = typer.Typer()
    app.callback()(lambda: None)
    register_commands(app)
    runner = CliRunner()
    repo, sha = local_repo
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_REPOSITORY", "acme/models")
    monkeypatch.setenv("GITHUB_RUN_ID", "42")

    started = runner.invoke(app, ["trigger", "retrain", "--sha", sha, "--repo", str(repo), "--no-optimize",
                                  "--idempotency-key", "github-42-1"])
    assert started.exit_code == 0, started.output
    (run,) = [r for r in _runs(deployment) if r.idempotency_key == "github-42-1"]
    assert run.parameters["params"] | {"sha": sha, "chain_optimize": False,
                                       "triggered_by": "cli:github-actions:acme/models/42"} == run.parameters["params"]
    assert str(run.id) in started.output
    again = runner.invoke(app, ["trigger", "retrain", "--sha", sha, "--repo", str(repo), "--idempotency-key",
                                "github-42-1"])
    assert again.exit_code == 0 and str(run.id) in again.output  # the same run: a retried CI job starts nothing

    local = runner.invoke(app, ["trigger", "retrain", "--sha", sha[:8], "--repo", str(repo), "--no-optimize",
                                "--local"])
    assert local.exit_code == 0 and f"registered tiny v2 for {sha[:12]}" in local.output, local.output

    bad = runner.invoke(app, ["trigger", "retrain", "--sha", "HEAD~1"])
    assert bad.exit_code == 2 and "is not a commit SHA" in bad.output
    monkeypatch.setenv("KILN_PREFECT_API_URL", "http://127.0.0.1:9/api")
    down = runner.invoke(app, ["trigger", "retrain", "--sha", sha])
    assert down.exit_code == 2 and "cannot reach the Prefect API at http://127.0.0.1:9/api" in down.output
    assert "kiln up" in down.output


def test_examples_are_valid():
    import yaml

    from kiln.tasks.lifecycle.retrain import load_config

    examples = Path(__file__).resolve().parents[2] / "examples"
    config = load_config(examples / "kiln-train.yaml", "examples/kiln-train.yaml")
    assert config.name == "sentiment" and config.base_ref(None) == "sentiment@champion"
    workflow = yaml.safe_load((examples / "github-actions" / "kiln-retrain.yml").read_text())
    (step,) = [s for s in workflow["jobs"]["retrain"]["steps"] if "kiln trigger retrain" in s.get("run", "")]
    assert '--sha "${{ github.sha }}"' in step["run"] and step["env"]["PREFECT_API_URL"]
