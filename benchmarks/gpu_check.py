"""Check Kiln's TensorRT path on a CUDA machine, in one command (``--training``: the training stages).

    python benchmarks/gpu_check.py --model-dir PATH_TO_HF_CLASSIFIER_FOLDER [--seq-len 64] [--out DIR]
    python benchmarks/gpu_check.py --training [--threads 16] [--steps 40] [--device cuda]

With ``--training`` it needs no TensorRT, MLflow or Prefect: fine-tuning, distillation and QAT run on the
CPU and on CUDA and their loss curves are compared (see ``gpu_training.py`` beside this file).

Exports the classifier to ONNX, writes an FP16 copy of the graph (FP16 weights and compute, int64 inputs
and FP32 logits kept, as TensorRT 11 takes precision from the graph), builds a TensorRT plan from each,
then compares every engine's logits with ONNX Runtime FP32 on the CPU (max |Δ|, top-1 agreement) and
times it (median latency at batch 1 and batch 32, host arrays in and out, as serving sees it).
Exits 2 with a clear message where tensorrt or CUDA is missing, 1 where an engine is out of tolerance.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

SENTENCES = [
    "the service was quick and the staff were friendly", "my order arrived late and the box was damaged",
    "it is fine, nothing special", "absolutely loved the new update", "worst customer support ever",
    "the battery lasts about a day", "not sure how I feel about the redesign", "great value for the money",
    "the app keeps crashing when I open settings", "delivery was on time", "meh", "would buy again",
]
Runner = Callable[[np.ndarray, np.ndarray], np.ndarray]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="Hugging Face classifier folder")
    parser.add_argument("--seq-len", type=int, default=64, help="serving sequence length (default 64)")
    parser.add_argument("--out", type=Path, help="folder for ONNX files, plans and the timing cache")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per measurement (default 50)")
    parser.add_argument("--fp32-tol", type=float, default=1e-2, help="max |Δ| allowed for FP32 (TF32 on)")
    parser.add_argument("--fp16-tol", type=float, default=5e-2, help="max |Δ| allowed for FP16")
    return parser.parse_args(argv)


def inputs(model_dir: Path, seq_len: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """``batch`` sentences, tokenised and padded to ``seq_len`` as Kiln serves them."""
    from transformers import AutoTokenizer

    texts = [SENTENCES[i % len(SENTENCES)] for i in range(batch)]
    enc = AutoTokenizer.from_pretrained(model_dir)(texts, truncation=True, max_length=seq_len,
                                                   padding="max_length", return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def median_ms(run: Runner, ids: np.ndarray, mask: np.ndarray, runs: int) -> float:
    for _ in range(max(3, runs // 10)):  # warm-up: lazy allocations, kernel selection, clocks
        run(ids, mask)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(ids, mask)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def fp16_graph(src: Path, dst: Path) -> Path:
    """An FP16 copy of ``src`` with its input and output types kept (casts at the edges)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dst))
    return dst


def build(args: argparse.Namespace, work: Path) -> dict[str, Runner]:
    """Export, convert and build; every engine under test, by row name, reference first."""
    import onnxruntime as ort
    from transformers import AutoModelForSequenceClassification

    from kiln.tasks.engines import EngineOptions, OnnxRuntimeEngine, load_engine
    from kiln.tasks.engines.tensorrt.build import TensorRTBuildConfig, build_engine
    from kiln.tasks.models.export import export_onnx

    model = AutoModelForSequenceClassification.from_pretrained(args.model_dir)
    fp32 = export_onnx(model, work / "fp32" / "model.onnx")
    fp16 = fp16_graph(fp32, work / "fp16" / "model.onnx")
    config = TensorRTBuildConfig.for_serving(args.seq_len, (1, 32), timing_cache=work / "timing.cache")
    reference = OnnxRuntimeEngine(fp32, EngineOptions(threads=4)).run
    engines: dict[str, Runner] = {"onnxruntime cpu fp32": reference}
    if "CUDAExecutionProvider" in ort.get_available_providers():
        engines["onnxruntime cuda fp32"] = OnnxRuntimeEngine(fp32, EngineOptions(use_cuda=True)).run
    for label, graph in (("fp32", fp32), ("fp16", fp16)):
        start = time.perf_counter()
        plan = build_engine(graph, work / f"trt-{label}", config)
        print(f"built TensorRT {label} plan in {time.perf_counter() - start:.1f} s: {plan}")
        engines[f"tensorrt {label}"] = load_engine(plan, EngineOptions(backend="tensorrt")).run
    return engines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--training" in argv:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from gpu_training import main as training

        return training([a for a in argv if a != "--training"])
    args = parse_args(argv)
    from kiln.errors import KilnError
    from kiln.tasks.engines.tensorrt.machine import runtime_info

    try:
        info = runtime_info()
    except KilnError as exc:  # tensorrt or CUDA missing: say so, no traceback
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2
    if not (args.model_dir / "config.json").is_file():
        print(f"gpu_check: no config.json in {args.model_dir}: not a Hugging Face model", file=sys.stderr)
        return 2
    print(f"{info['gpu_name']} (compute {info['compute_capability']}), TensorRT {info['tensorrt_version']}, "
          f"seq {args.seq_len}")
    work = args.out or Path(tempfile.mkdtemp(prefix="kiln-gpu-check-"))
    try:
        engines = build(args, work)
    except KilnError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2
    return report(args, engines)


def report(args: argparse.Namespace, engines: dict[str, Runner]) -> int:
    """Print the comparison table; 1 if an engine is out of tolerance."""
    small, large = inputs(args.model_dir, args.seq_len, 1), inputs(args.model_dir, args.seq_len, 32)
    reference = next(iter(engines.values()))(*large)
    header = f"{'engine':<24}{'max |Δ|':>10}{'top-1 agree':>13}{'p50 b1 ms':>11}{'p50 b32 ms':>12}  check"
    print(header, "-" * len(header), sep="\n")
    failed = False
    for name, run in engines.items():
        logits = run(*large)
        delta = float(np.max(np.abs(logits - reference)))
        agree = float(np.mean(logits.argmax(-1) == reference.argmax(-1)))
        tolerance = args.fp16_tol if "fp16" in name else args.fp32_tol
        ok = delta <= tolerance
        failed |= not ok
        print(f"{name:<24}{delta:>10.2e}{agree:>13.1%}{median_ms(run, *small, args.runs):>11.2f}"
              f"{median_ms(run, *large, args.runs):>12.2f}  {'ok' if ok else f'FAIL (> {tolerance:.0e})'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
