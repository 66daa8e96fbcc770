"""Kiln's training stages on a GPU against the CPU: `python benchmarks/gpu_check.py --training`.

Runs the same code paths Kiln uses — :func:`finetune_classifier`, the ``distill`` stage (to a 3-layer
student) and the ``qat`` stage — for a few steps on the CPU and on ``--device`` (cuda by default), on a
MiniLM-L6-shaped BERT classifier built from config (random, seeded init: no download) and a seeded
synthetic labelled dataset, then prints one row per stage and device: steps, seconds, steps/s, first and
final loss, peak GPU memory and the speed-up over the CPU.

The two devices must compute the same function: dropout is off in the model's config (CPU and CUDA draw
different dropout masks) and distillation and QAT start from the CPU's fine-tuned model, so the check is
    first-step loss equal within --first-tol (relative, default 1e-3: float32 rounding only), and
    final loss within --final-tol (relative, default 5 %: rounding differences that grew over training).
Exits 1 when a stage is out of tolerance, 2 when the device is missing. Imports only torch, transformers,
numpy, pandas, tqdm, pyyaml and pydantic (no MLflow, Prefect or ONNX): a bare GPU machine runs it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would interleave with the table
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

LABELS = ("negative", "positive")
GOOD = ["great", "lovely", "quick", "friendly", "excellent", "happy", "perfect", "fresh", "helpful", "clean"]
BAD = ["awful", "slow", "rude", "broken", "terrible", "sad", "late", "dirty", "noisy", "cold"]
FILLER = ["the", "food", "service", "room", "staff", "was", "and", "very", "a", "bit", "our", "order", "it",
          "delivery", "app", "screen", "price", "really", "quite", "not", "today", "again", "box", "team"]
# MiniLM-L6 (all-MiniLM-L6-v2): 6 layers, hidden 384, 12 heads, FFN 1536, BERT's 30522-token vocabulary.
MINILM = {"num_hidden_layers": 6, "hidden_size": 384, "num_attention_heads": 12, "intermediate_size": 1536,
          "vocab_size": 30522, "max_position_embeddings": 512, "hidden_dropout_prob": 0.0,
          "attention_probs_dropout_prob": 0.0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_check.py --training", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="device compared with the CPU (default cuda; "
                        "cpu runs both sides on the CPU, to try the script where there is no GPU)")
    parser.add_argument("--threads", type=int, default=min(16, os.cpu_count() or 1), help="CPU threads")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per stage (default 40)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--rows", type=int, default=2048, help="synthetic training rows (default 2048)")
    parser.add_argument("--first-tol", type=float, default=1e-3, help="relative first-step loss tolerance")
    parser.add_argument("--final-tol", type=float, default=0.05, help="relative final loss tolerance")
    parser.add_argument("--out", type=Path, help="work folder (default: a temporary one)")
    return parser.parse_args(argv)


def dataset(rows: int, seed: int = 0) -> Any:
    """Seeded review-like texts; the label is which side has more sentiment words (ties dropped)."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    texts, labels = [], []
    while len(texts) < rows:
        good, bad = rng.integers(0, 4, size=2)
        if good == bad:
            continue
        words = [*rng.choice(GOOD, good), *rng.choice(BAD, bad), *rng.choice(FILLER, rng.integers(4, 40))]
        texts.append(" ".join(rng.permutation(words)))
        labels.append(LABELS[int(good > bad)])
    return pd.DataFrame({"text": texts, "label": labels})


def base_model(folder: Path, seed: int = 0) -> Path:
    """A randomly initialised (seeded) MiniLM-L6-shaped classifier and a word-level BERT tokenizer."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(GOOD + BAD + FILLER))]
    vocab = words + [f"[unused{i}]" for i in range(MINILM["vocab_size"] - len(words))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(**MINILM, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
                        label2id={name: i for i, name in enumerate(LABELS)})
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


@dataclass
class Run:
    """One stage on one device: the loss of every step and when it ended."""

    stage: str
    device: str
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    peak_mb: float | None = None

    def record(self, loss: float) -> None:
        self.losses.append(float(loss))
        self.times.append(time.perf_counter())

    @property
    def steps_per_s(self) -> float:
        """Steady-state rate: the first step (allocation, kernel selection) is left out."""
        if len(self.times) < 2:
            return float("nan")
        return (len(self.times) - 1) / max(self.times[-1] - self.times[0], 1e-9)


def _recording(module: Any, name: str, run: Run) -> Callable[[], None]:
    """Wrap ``module.name`` (a stage's loss function) so every training step's loss lands in ``run``."""
    original = getattr(module, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        loss = out["loss"] if isinstance(out, dict) else out
        if loss.requires_grad:  # a training step (evaluation runs under no_grad)
            run.record(loss.item())
        return out

    setattr(module, name, wrapped)
    return lambda: setattr(module, name, original)


def run_stage(stage: str, device: str, args: argparse.Namespace, base: Path, tuned: Path | None, data: Any,
              work: Path) -> tuple[Run, Path | None]:
    """One stage on ``device``; returns its record and (fine-tune only) the model folder it wrote."""
    import torch

    from kiln.tasks.compress import distill as distill_module
    from kiln.tasks.compress.quantization import qat as qat_module
    from kiln.tasks.core.stages import Artifact, StageContext
    from kiln.tasks.models.finetune import FinetuneConfig, finetune_classifier

    run, folder = Run(stage, device), None
    torch.set_num_threads(args.threads)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    ctx = StageContext(task="sequence-classification", workdir=work / f"{stage}-{device}", tokenizer_dir=base,
                       train=data, labels=LABELS, seq_len=args.seq_len, seed=0, threads=args.threads,
                       device=device)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if stage == "fine-tune":
        config = FinetuneConfig(max_steps=args.steps, batch_size=args.batch_size, lr=1e-4, seq_len=args.seq_len,
                                eval_every=args.steps, eval_rows=256, seed=0, threads=args.threads)
        finetune_classifier(base, data, data.tail(256), LABELS, ctx.workdir / "model", config, device=device,
                            on_step=lambda step, loss: run.record(loss))
        folder = ctx.workdir / "model"
    elif stage == "distill":
        restore = _recording(distill_module, "_losses", run)
        try:
            distill_module.distill(Artifact("hf", tuned), {"layers": [0, 2, 4], "max_steps": args.steps,
                                   "batch_size": args.batch_size, "lr": 1e-4, "checkpoint_every": 0}, ctx)
        finally:
            restore()
    else:
        restore = _recording(qat_module, "_loss", run)
        try:
            qat_module.qat(Artifact("hf", tuned), {"steps": args.steps, "batch_size": args.batch_size,
                                                   "lr": 1e-5}, ctx)
        finally:
            restore()
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        run.peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    run.seconds = time.perf_counter() - start
    return run, folder


def compare(cpu: Run, other: Run, args: argparse.Namespace) -> list[str]:
    """What is out of tolerance between the two devices' loss curves (empty: they agree)."""
    def rel(a: float, b: float) -> float:
        return abs(a - b) / max(abs(a), 1e-12)

    problems = []
    if len(cpu.losses) != len(other.losses) or not cpu.losses:
        return [f"{cpu.stage}: {len(cpu.losses)} CPU steps but {len(other.losses)} on {other.device}"]
    if rel(cpu.losses[0], other.losses[0]) > args.first_tol:
        problems.append(f"{cpu.stage}: first-step loss {cpu.losses[0]:.6f} (cpu) vs {other.losses[0]:.6f} "
                        f"({other.device}) differs by more than {args.first_tol:.0e} relative")
    if rel(cpu.losses[-1], other.losses[-1]) > args.final_tol:
        problems.append(f"{cpu.stage}: final loss {cpu.losses[-1]:.4f} (cpu) vs {other.losses[-1]:.4f} "
                        f"({other.device}) differs by more than {args.final_tol:.0%}")
    return problems


def table(pairs: list[tuple[Run, Run]]) -> None:
    header = (f"{'stage':<10}{'device':<8}{'steps':>6}{'seconds':>9}{'steps/s':>9}{'first loss':>12}"
              f"{'final loss':>12}{'peak GPU MB':>13}{'speed-up':>10}")
    print(header, "-" * len(header), sep="\n")
    for cpu, other in pairs:
        for run in (cpu, other):
            speed = f"{run.steps_per_s / cpu.steps_per_s:>9.1f}x" if run is other else f"{'':>10}"
            peak = f"{run.peak_mb:>13.0f}" if run.peak_mb is not None else f"{'-':>13}"
            print(f"{run.stage:<10}{run.device:<8}{len(run.losses):>6}{run.seconds:>9.1f}{run.steps_per_s:>9.2f}"
                  f"{run.losses[0]:>12.6f}{run.losses[-1]:>12.6f}{peak}{speed}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from kiln.errors import KilnError
    from kiln.tasks.core.device import resolve_device

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check --training: CUDA is not available (torch {torch.__version__} sees no GPU); run it on a "
              "CUDA machine, or pass --device cpu to try the script with the CPU on both sides", file=sys.stderr)
        return 2
    try:
        device = resolve_device(args.device)
    except KilnError as exc:  # an unknown name, or a GPU index that is not there
        print(f"gpu_check --training: {str(exc).replace('KILN_DEVICE', '--device')}", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device != "cpu" else "CPU only"
    print(f"{name}; torch {torch.__version__}; cpu threads {args.threads}; {args.steps} steps per stage, "
          f"batch {args.batch_size}, seq {args.seq_len}")
    work = args.out or Path(tempfile.mkdtemp(prefix="kiln-gpu-training-"))
    data, base = dataset(args.rows), base_model(work / "base")
    pairs, tuned = [], None
    for stage in ("fine-tune", "distill", "qat"):
        cpu, folder = run_stage(stage, "cpu", args, base, tuned, data, work / "cpu")
        other, _ = run_stage(stage, device, args, base, tuned, data, work / "device")
        tuned = tuned or folder  # distillation and QAT start from the CPU's fine-tuned model on both sides
        pairs.append((cpu, other))
    table(pairs)
    # Same seed, same device, same result? Informational: some CUDA kernels may add in any order.
    again, _ = run_stage("distill", device, args, base, tuned, data, work / "again")
    drift = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(pairs[1][1].losses, again.losses, strict=True))
    print(f"distill on {device} run twice with one seed: " + ("identical losses" if drift == 0 else
          f"losses differ by up to {drift:.1e} relative"))
    problems = [p for cpu, other in pairs for p in compare(cpu, other, args)]
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    print("loss curves agree" if not problems else f"{len(problems)} check(s) failed",
          f"(first step within {args.first_tol:.0e} relative, final within {args.final_tol:.0%})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
