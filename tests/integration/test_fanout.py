"""Candidate builds fanned out on a Dask cluster (flows/runners.py): in parallel, and the same challenger."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from kiln.errors import ConfigError
from kiln.flows import optimize as optimize_module
from kiln.flows.optimize import OptimizeParams, optimize
from kiln.tasks.core import tags as vocab
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.onboard import register_folder
from tests.conftest import fresh_project
from tests.integration.helpers import registry_state

distributed = pytest.importorskip("distributed")
pytest.importorskip("prefect_dask")

# Short timing (the fixture's 0.2 s per model and batch size, in the fewest rounds): latency is not what this
# test is about. The candidates are ranked by size, not latency: the two tiny graphs time within noise of each
# other, so a loaded CI machine ranked them one way in one run and the other way in the next.
PARAMS = {"model": "tiny@champion", "recipes": ["onnx-fp32", "int8-dynamic"], "eval_limit": 64,
          "bench": {"max_seconds": 0.2, "rounds": 4, "warmup": 1, "min_runs": 3}}
PRESET = Path(__file__).resolve().parents[2] / "tasks" / "presets" / "policy-sequence-classification.yaml"


def _optimize_fresh(root, monkeypatch, tiny_models, tiny_spec, **env: str) -> tuple[dict, tuple]:
    """Register the tiny classifier in a new project and optimize it (cache keys hold the source's run id, so
    nothing is shared with another project: every build and evaluation runs)."""
    root.mkdir()
    settings = fresh_project(monkeypatch, root)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("KILN_COST_TARGET_P95_MS", "10000")  # every tiny model servable: cost is measured
    client = registry.connect(settings)
    register_folder(client, settings, tiny_models["bert"], "tiny", "sequence-classification", tiny_spec)
    policy = root / "policy.yaml"
    document = yaml.safe_load(PRESET.read_text())
    document["objective"] = {"metric": "size_mb", "goal": "minimize"}  # the preset's clauses, ranked by size
    policy.write_text(yaml.safe_dump(document))
    summary = optimize(OptimizeParams(**PARAMS, policy=str(policy)))
    return summary, registry_state(client, "tiny")


def test_dask_builds_in_parallel_and_registers_what_threads_do(tmp_path, monkeypatch, tiny_models, tiny_spec):
    # An existing scheduler (KILN_DASK_ADDRESS), as on Kubernetes; two single-threaded workers in this process
    # (worker processes would import torch first: the same code path, ten seconds slower).
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cl:
        dask, dask_state = _optimize_fresh(tmp_path / "dask", monkeypatch, tiny_models, tiny_spec,
                                           KILN_TASK_RUNNER="dask", KILN_DASK_ADDRESS=cl.scheduler_address)
        workers = set(cl.scheduler_info["workers"])
    # Both Dask workers built, each while the other did.
    first, second = (dask["builds"][name] for name in PARAMS["recipes"])
    assert {first["worker"], second["worker"]} == workers and len(workers) == 2
    assert first["started"] < second["finished"] and second["started"] < first["finished"]

    # The default runner (one thread, builds in turn), from scratch in a project of its own: the registry gets
    # the same challenger with the same tags, and the candidates answer the same.
    default, default_state = _optimize_fresh(tmp_path / "thread", monkeypatch, tiny_models, tiny_spec)
    assert {b["worker"] for b in default["builds"].values()} == {None}
    assert dask["registered"] == default["registered"] and dask["registered"]["alias"] == "challenger"
    assert dask["registered"]["recipe"] == "int8-dynamic"  # the smaller graph, whatever the timing said
    assert _comparable(dask_state) == _comparable(default_state)
    for name in PARAMS["recipes"]:
        for metric in ("accuracy", "size_mb"):
            assert dask["candidates"][name]["metrics"][metric] == default["candidates"][name]["metrics"][metric]


def _comparable(state: tuple) -> tuple:
    """Versions, aliases and the tags that say what was registered (not run ids or timings)."""
    keep = {vocab.RECIPE, vocab.PRECISION, vocab.PARENT_VERSION, vocab.DATASET_DIGEST, vocab.BACKEND,
            vocab.BASELINE, vocab.GATE}
    versions, aliases = state
    return tuple((v, tuple((k, t) for k, t in tags if k in keep)) for v, tags in versions), aliases


def test_a_failing_build_fails_the_run_with_its_own_error_once_the_others_finish(monkeypatch):
    finished = []

    def build(recipe, *_):
        if recipe.name == "broken":
            raise ConfigError("recipe broken: stage prune-heads needs heads")
        time.sleep(0.3)  # still building when the other one fails
        finished.append(recipe.name)
        return SimpleNamespace(recipe=recipe), Path(recipe.name)

    monkeypatch.setattr(optimize_module, "build_candidate", SimpleNamespace(fn=build))

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=2))
    def builds(names: list[str]):
        chosen = [SimpleNamespace(name=n) for n in names]
        return optimize_module._build_all(chosen, None, None, None, 64, None, "onnxruntime")

    built, placed = builds(["good", "other"])
    assert [b.recipe.name for b, _ in built] == ["good", "other"] and set(placed) == {"good", "other"}
    finished.clear()
    with pytest.raises(ConfigError, match="stage prune-heads needs heads"):
        builds(["broken", "good"])
    assert finished == ["good"]
