"""What the serving path costs: gateway overhead, and the model server against the bare engine.

    python benchmarks/gateway_bench.py --model sentiment@champion     # a registered version (KILN_HOME)
    python benchmarks/gateway_bench.py --tiny                         # builds a tiny ONNX BERT itself

Starts the model server and the gateway as separate processes on loopback (as they run in production),
then, at concurrency 1, 8 and 32, sends single-text infer requests to the model server directly and
through the gateway: the gateway's added p50/p99 latency and its throughput ratio. Then compares the
server's best throughput with the same package predicting in this process (tokenize + engine, no HTTP),
one text per call and 32 per call. Clients, gateway and server share this machine's cores: read the
ratios, not the absolute numbers, on a small machine.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from kiln.infra.loadgen import LoadPlan, LoadSummary, generate_load  # noqa: E402

FALLBACK_TEXTS = [
    "the service was quick and the staff were friendly", "my order arrived late and the box was damaged",
    "it is fine, nothing special", "absolutely loved the new update", "worst customer support ever",
    "the battery lasts about a day", "not sure how I feel about the redesign", "great value for the money",
]
TOKEN = "bench-token"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="registered model, NAME@ALIAS or NAME/VERSION (local registry)")
    which.add_argument("--tiny", action="store_true", help="build and serve a tiny ONNX BERT")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated client concurrency levels")
    parser.add_argument("--requests", type=int, default=400, help="requests per measurement (default 400)")
    parser.add_argument("--seconds", type=float, default=20.0, help="time limit per measurement")
    parser.add_argument("--threads", type=int, default=1, help=(
        "engine intra-op threads (default 1: on a small machine the client and gateway need the other cores)"))
    return parser.parse_args(argv)


def texts_for_bench() -> list[str]:
    """The evaluation split's texts when the demo data is installed, else a few fixed sentences."""
    try:
        from kiln.tasks.data.datasets import DatasetSpec, load_splits

        return load_splits(DatasetSpec(limit=2000)).test["text"].astype(str).tolist()
    except Exception:  # noqa: BLE001 - any data problem: the benchmark still runs on fixed sentences
        return FALLBACK_TEXTS


def tiny_package(workdir: Path, texts: list[str]) -> Path:
    """A tiny BERT classifier exported to ONNX and packaged, as the optimize flow would."""
    from kiln.tasks.core.stages import Artifact
    from kiln.tasks.models.export import export_onnx
    from kiln.tasks.models.hf import load_model
    from kiln.tasks.models.predictor import PackageMeta, package
    from tests.tiny import save_tiny

    labels = ("negative", "neutral", "positive")
    hf = save_tiny("bert", texts * 4, workdir / "hf", labels=labels)
    onnx = export_onnx(load_model(hf, "sequence-classification"), workdir / "model.onnx")
    meta = PackageMeta(format="onnx", task="sequence-classification", labels=list(labels), recipe="onnx-fp32")
    return package(Artifact("onnx", onnx), hf, workdir / "pkg", meta)


def registered_package(ref: str, workdir: Path) -> Path:
    from kiln.settings import load_settings
    from kiln.tasks.registry import client as registry

    settings = load_settings()
    client = registry.connect(settings)
    return registry.fetch_package(client, registry.resolve(client, registry.ModelRef.parse(ref)), workdir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], url: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a server process and wait until ``url`` answers."""
    proc = subprocess.Popen([sys.executable, "-m", *args], env=(os.environ | (env or {})),
                            cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{args[0]} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit(f"{args[0]} did not start within 120 s")


def measure(url: str, name: str, texts: list[str], concurrency: int, args: argparse.Namespace) -> LoadSummary:
    generate_load(LoadPlan(url, name, texts, requests=max(20, concurrency * 2), concurrency=concurrency))  # warm up
    summary = generate_load(LoadPlan(url, name, texts, requests=args.requests, concurrency=concurrency,
                                     seconds=args.seconds))
    if summary.failed or summary.ok != summary.sent:
        raise SystemExit(f"{summary.sent - summary.ok} of {summary.sent} requests to {url} failed: {summary}")
    return summary


def in_process(folder: Path, texts: list[str], threads: int, seconds: float) -> dict[int, float]:
    """Rows per second of the package predicting in this process, one text and 32 texts per call."""
    from kiln.tasks.engines import EngineOptions
    from kiln.tasks.models.predictor import Predictor

    predictor = Predictor(folder, EngineOptions(threads=threads))
    rates = {}
    for batch in (1, 32):
        predictor.predict(texts[:batch])
        rows, started, i = 0, time.perf_counter(), 0
        while time.perf_counter() - started < min(seconds, 5.0):
            chunk = [texts[(i + k) % len(texts)] for k in range(batch)]
            predictor.predict(chunk)
            rows, i = rows + batch, i + batch
        rates[batch] = rows / (time.perf_counter() - started)
    return rates


def print_tables(levels: list[int], direct: dict[int, LoadSummary], via: dict[int, LoadSummary],
                 rates: dict[int, float]) -> None:
    print("\nGateway overhead (single-text infer requests; latency in ms, throughput in requests/s)")
    print(f"{'conc':>4} | {'direct p50':>10} {'gw p50':>8} {'added':>7} | {'direct p99':>10} {'gw p99':>8} "
          f"{'added':>7} | {'direct rps':>10} {'gw rps':>8} {'gw/direct':>9}")
    for c in levels:
        d, g = direct[c], via[c]
        print(f"{c:>4} | {d.latency_ms['p50']:>10.2f} {g.latency_ms['p50']:>8.2f} "
              f"{g.latency_ms['p50'] - d.latency_ms['p50']:>+7.2f} | {d.latency_ms['p99']:>10.2f} "
              f"{g.latency_ms['p99']:>8.2f} {g.latency_ms['p99'] - d.latency_ms['p99']:>+7.2f} | "
              f"{d.throughput_per_s:>10.1f} {g.throughput_per_s:>8.1f} {g.throughput_per_s / d.throughput_per_s:>9.2f}")
    best = max(direct.values(), key=lambda s: s.throughput_per_s)
    print("\nModel server vs the same package in one process (rows/s; baseline: in-process, 32 texts per call)")
    rows = [("in-process, 1 text per call", rates[1]), ("in-process, 32 texts per call", rates[32]),
            (f"model server over HTTP, best of {levels}", best.throughput_per_s)]
    for label, value in rows:
        print(f"{label:<42} {value:>9.1f} rows/s   {value / rates[32]:>5.2f}x")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    texts = texts_for_bench()
    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny_package(Path(tmp), texts) if args.tiny else registered_package(args.model, Path(tmp))
        server_port, gateway_port = free_port(), free_port()
        server_url, gateway_url = f"http://127.0.0.1:{server_port}", f"http://127.0.0.1:{gateway_port}"
        procs = []
        try:
            procs.append(start(["kiln.infra.server", "--package", str(folder), "--name", "bench", "--port",
                                str(server_port), "--threads", str(args.threads)], server_url + "/v2/health/ready"))
            procs.append(start(["kiln.infra.gateway", "--champion", server_url, "--challenger", server_url, "--port",
                                str(gateway_port)], gateway_url + "/health", {"KILN_GATEWAY_TOKEN": TOKEN}))
            direct, via = {}, {}
            for c in levels:  # interleaved, so drift in the machine's load touches both sides alike
                direct[c] = measure(server_url, "bench", texts, c, args)
                via[c] = measure(gateway_url, "bench", texts, c, args)
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(10)
        rates = in_process(folder, texts, args.threads, args.seconds)
    print(f"\nmodel: {'tiny ONNX BERT' if args.tiny else args.model}; engine threads {args.threads}; "
          f"{os.cpu_count()} CPUs shared by client, gateway and server")
    print_tables(levels, direct, via, rates)


if __name__ == "__main__":
    main()
