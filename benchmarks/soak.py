"""Soak: the gateway and two model servers under steady loopback load for a bounded time.

    python benchmarks/soak.py                                   # tiny ONNX BERT, 10 minutes
    python benchmarks/soak.py --model sentiment@champion        # the demo model (after `kiln demo`)
    python benchmarks/soak.py --minutes 0.1 --window-seconds 2 --json   # a smoke run, seconds long

Starts two model servers (``python -m kiln.infra.server``, each its own process, the same package) and the
gateway in front of them (``python -m kiln.infra.gateway``, a 50/50 split), then sends single-text infer
requests through the gateway at a steady rate (open loop, :mod:`kiln.infra.loadgen`) in back-to-back windows
(one a minute by default). Printed: per window, requests, failed requests, p50/p99 and each process's
resident memory; then the totals — failed requests (target 0), RSS growth per process from the first window
to the last, and p99 drift from the first window to the last.

A leak shows as RSS that keeps growing window after window; a slow leak in a queue or a cache as p99 that
drifts up. Clients, gateway and servers share this machine's cores. A benchmark, never a timed test: it
prints, it asserts nothing (``tests/integration/test_soak_smoke.py`` runs it for seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.gateway_bench import free_port, registered_package, texts_for_bench, tiny_package  # noqa: E402
from kiln.infra.loadgen import LoadPlan, generate_load  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "soak-token"
MODEL = "soak"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="serve a registered model, NAME@ALIAS or NAME/VERSION in $KILN_HOME's "
                        "registry (e.g. sentiment@champion after `kiln demo`); default: a tiny ONNX BERT")
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to load the stack (default 10)")
    parser.add_argument("--window-seconds", type=float, default=60.0, help="length of one measurement window "
                        "(default 60: the table has one row a minute)")
    parser.add_argument("--rate", type=float, default=40.0, help="requests started per second, steadily "
                        "(default 40: well under a small machine's capacity, so latency measures the stack, "
                        "not a queue)")
    parser.add_argument("--concurrency", type=int, default=16, help="most requests in flight at once")
    parser.add_argument("--threads", type=int, default=1, help="engine intra-op threads per model server")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    args = parser.parse_args(argv)
    if not 0 < args.minutes <= 24 * 60:
        parser.error("--minutes must be in (0, 1440]")
    if not 0 < args.window_seconds <= args.minutes * 60:
        parser.error("--window-seconds must be positive and at most the whole run")
    return args


# ---- the stack ---------------------------------------------------------------------------------------------------


@dataclass
class Stack:
    """The processes under test, by role, and where the gateway listens."""

    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    gateway_url: str = ""

    def rss_mb(self) -> dict[str, float]:
        """Resident memory of each process (with its children, if any), MB; nan for one that has exited."""
        out = {}
        for role, proc in self.procs.items():
            try:
                p = psutil.Process(proc.pid)
                total = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
                out[role] = round(total / 2**20, 1)
            except psutil.Error:
                out[role] = float("nan")
        return out

    def alive(self) -> list[str]:
        return [role for role, proc in self.procs.items() if proc.poll() is None]

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def start(stack: Stack, role: str, argv: list[str], ready_url: str, log: Path, env: dict[str, str] | None = None
          ) -> None:
    """Start ``python -m argv...`` as ``role`` (output to ``log``, never this script's stdout) and wait for it."""
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", *argv], env=os.environ | (env or {}), cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    stack.procs[role] = proc
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: {role} exited with {proc.returncode}; log: {log}\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(ready_url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"error: {role} did not answer {ready_url} within 120 s; log: {log}")


def start_stack(folder: Path, workdir: Path, threads: int) -> Stack:
    stack = Stack()
    try:
        urls = {}
        for role in ("champion", "challenger"):
            port = free_port()
            urls[role] = f"http://127.0.0.1:{port}"
            start(stack, role, ["kiln.infra.server", "--package", str(folder), "--name", MODEL, "--port", str(port),
                                "--threads", str(threads)], f"{urls[role]}/v2/health/ready",
                  workdir / f"{role}.log")
        port = free_port()
        stack.gateway_url = f"http://127.0.0.1:{port}"
        start(stack, "gateway", ["kiln.infra.gateway", "--champion", urls["champion"], "--challenger",
                                 urls["challenger"], "--port", str(port), "--weight", "50", "--no-state-file"],
              f"{stack.gateway_url}/health", workdir / "gateway.log", {"KILN_GATEWAY_TOKEN": TOKEN})
    except BaseException:
        stack.stop()
        raise
    return stack


# ---- the load ----------------------------------------------------------------------------------------------------


@dataclass
class Window:
    index: int
    requests: int
    failed: int
    p50_ms: float | None
    p99_ms: float | None
    rss_mb: dict[str, float]
    by_upstream: dict[str, int]


def soak(stack: Stack, texts: list[str], args: argparse.Namespace) -> list[Window]:
    """Back-to-back equal windows of steady load for ``--minutes``; RSS sampled at each window's end."""
    windows: list[Window] = []
    count = max(1, round(args.minutes * 60 / args.window_seconds))  # equal windows, so first and last compare
    for _ in range(count):
        summary = generate_load(LoadPlan(stack.gateway_url, MODEL, texts, requests=1_000_000,
                                         seconds=args.window_seconds,
                                         concurrency=args.concurrency, rate_per_s=args.rate, timeout_s=30.0))
        windows.append(Window(len(windows) + 1, summary.sent, summary.failed, summary.latency_ms.get("p50"),
                              summary.latency_ms.get("p99"), stack.rss_mb(), summary.by_upstream))
        print(_row(windows[-1], list(stack.procs)), flush=True)
        if dead := [role for role in stack.procs if role not in stack.alive()]:
            raise SystemExit(f"error: {', '.join(dead)} exited during the soak")
    return windows


def report(windows: list[Window], roles: list[str], args: argparse.Namespace) -> dict[str, Any]:
    first, last = windows[0], windows[-1]
    growth = {role: {"first_mb": first.rss_mb[role], "last_mb": last.rss_mb[role],
                     "growth_mb": round(last.rss_mb[role] - first.rss_mb[role], 1)} for role in roles}
    drift = None
    if first.p99_ms and last.p99_ms:
        drift = {"first_ms": first.p99_ms, "last_ms": last.p99_ms, "ratio": round(last.p99_ms / first.p99_ms, 3)}
    return {"minutes": args.minutes, "window_seconds": args.window_seconds, "rate_per_s": args.rate,
            "model": args.model or "tiny", "requests": sum(w.requests for w in windows),
            "failed": sum(w.failed for w in windows), "rss": growth, "p99_drift": drift,
            "windows": [asdict(w) for w in windows]}


def _row(w: Window, roles: list[str]) -> str:
    p50 = f"{w.p50_ms:.2f}" if w.p50_ms is not None else "–"
    p99 = f"{w.p99_ms:.2f}" if w.p99_ms is not None else "–"
    return f"{w.index:>6} {w.requests:>9} {w.failed:>7} {p50:>9} {p99:>9} " + " ".join(
        f"{w.rss_mb[r]:>11.1f}" for r in roles)


def print_summary(doc: dict[str, Any]) -> None:
    print(f"\nrequests {doc['requests']}, failed {doc['failed']} (target 0)")
    print("RSS growth, first window -> last window:")
    for role, g in doc["rss"].items():
        print(f"  {role:<11} {g['first_mb']:>8.1f} MB -> {g['last_mb']:>8.1f} MB  ({g['growth_mb']:+.1f} MB)")
    d = doc["p99_drift"]
    print("p99 drift, first window -> last window: " + (
        f"{d['first_ms']:.2f} ms -> {d['last_ms']:.2f} ms (x{d['ratio']:.2f})" if d else "no answers to measure"))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # With --json, stdout holds the JSON document and nothing else, whatever the libraries print on the way.
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        doc = run(args)
    if args.json:
        print(json.dumps(doc))
    else:
        print_summary(doc)


def run(args: argparse.Namespace) -> dict[str, Any]:
    texts = texts_for_bench()
    with tempfile.TemporaryDirectory(prefix="kiln-soak-") as tmp:
        work = Path(tmp)
        folder = registered_package(args.model, work) if args.model else tiny_package(work, texts)
        stack = start_stack(folder, work, args.threads)
        try:
            roles = list(stack.procs)
            print(f"soak: {args.model or 'tiny ONNX BERT'} on 2 model servers behind the gateway (50/50), "
                  f"{args.rate:g} requests/s for {args.minutes:g} min; {os.cpu_count()} CPUs shared")
            print(f"{'window':>6} {'requests':>9} {'failed':>7} {'p50 ms':>9} {'p99 ms':>9} "
                  + " ".join(f"{'RSS ' + r[:7]:>11}" for r in roles))
            windows = soak(stack, texts, args)
        finally:
            stack.stop()
    return report(windows, roles, args)


if __name__ == "__main__":
    main()
