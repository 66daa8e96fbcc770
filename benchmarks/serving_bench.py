"""Serving under load: an alias swap, the transports against in-process, and what the gateway adds.

    python benchmarks/serving_bench.py                            # sentiment@champion in $KILN_HOME (kiln demo)
    python benchmarks/serving_bench.py --model NAME@ALIAS --to 3  # swap @ALIAS to v3 and back
    python benchmarks/serving_bench.py --tiny --seconds 1 --json  # a tiny registry of its own, in seconds

1. **Swap under steady load.** A model server (``python -m kiln.infra.server``, its own process) follows
   ``NAME@kiln-bench``, the benchmark's own alias, first on the version ``NAME@ALIAS`` names; 8 clients send
   single-text requests over HTTP before, during and after that alias moves to another version (under a
   registry lease, by :func:`kiln.tasks.registry.aliases.point`, which refuses Kiln's decision aliases: the
   benchmark never moves @champion). Printed per window: requests, failures, p50/p99, and when the answers'
   ``model_version`` changed. Target: 0 failures. @kiln-bench is removed at the end, whatever happens.
2. **Transports vs in-process** at concurrency 1, 8, 32: rows/s and p50/p99 of the same model through a
   :class:`~kiln.infra.runtime.ModelPool` in this process (same batcher, no transport), HTTP JSON
   (``tritonclient.http``, binary data off both ways), HTTP binary (``tritonclient.http`` defaults) and gRPC
   (``tritonclient.grpc``); the ratio to in-process. Each level runs in
   ~1 s blocks, the transports interleaved in turning order, so that other load on the machine falls on all.
3. **Gateway added latency** at concurrency 1: direct to the server vs through ``kiln.infra.gateway`` (weight 0),
   in interleaved rounds (as :mod:`kiln.tasks.evaluate.latency` times engines) so machine drift cancels; the
   added p50 with a 95% interval from resampling whole rounds.

Clients, gateway and server share this machine's cores: on a small machine read the ratios, not the absolute
numbers. A benchmark, never a timed test: it prints, it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.gateway_bench import free_port, start, texts_for_bench  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "bench-token"
LEVELS = (1, 8, 32)
SWAP_CLIENTS = 8


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", default="sentiment@champion", help="NAME@ALIAS in $KILN_HOME's registry "
                       "(default: sentiment@champion, after `kiln demo`)")
    which.add_argument("--tiny", action="store_true", help="build a tiny two-version registry in a temp folder")
    parser.add_argument("--to", help="version to move the alias to during the swap (default: the newest other "
                        "version with the same recipe as the one the alias names)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each measurement window")
    parser.add_argument("--threads", type=int, default=1, help="engine intra-op threads (default 1: on a small "
                        "machine the clients need the other cores)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    return parser.parse_args(argv)


# ---- what is served --------------------------------------------------------------------------------------------


def tiny_registry(home: Path) -> str:
    """Two tiny BERT versions of ``tiny`` (different seeds) in a fresh registry under ``home``; v1 @champion."""
    from kiln.settings import Settings
    from kiln.tasks.data.datasets import DatasetSpec, load_splits
    from kiln.tasks.registry import client as registry
    from kiln.tasks.registry.onboard import register_folder
    from tests.tiny import save_tiny

    spec = DatasetSpec(limit=400, seed=0)
    splits = load_splits(spec)
    settings = Settings(home=home)
    client = registry.connect(settings)
    texts = splits.train["text"].tolist()
    for seed in (0, 1):
        folder = save_tiny("bert", texts, home.parent / f"bert-seed{seed}", labels=splits.labels, seed=seed)
        register_folder(client, settings, folder, "tiny", "sequence-classification", spec,
                        alias="champion" if seed == 0 else None)
    return "tiny@champion"


def swap_target(client: Any, name: str, current: str, asked: str | None) -> str:
    """``asked``, else the newest other version built by the same recipe as ``current`` (an engine like it)."""
    from kiln.tasks.core import tags as vocab

    if asked:
        return asked
    recipe = client.get_model_version(name, current).tags.get(vocab.RECIPE)
    others = [v for v in client.search_model_versions(f"name = '{name}'")
              if str(v.version) != current and v.tags.get(vocab.RECIPE) == recipe]
    if not others:
        raise SystemExit(f"error: {name} has no other version with recipe {recipe!r} to swap to; pass --to VERSION")
    return str(max(int(v.version) for v in others))


def move_alias(client: Any, settings: Any, name: str, version: str) -> None:
    """Point the benchmark's own alias (@kiln-bench) at ``version``: the swap never touches @champion."""
    from kiln.tasks.core import tags as vocab
    from kiln.tasks.registry import aliases

    aliases.point(client, name, vocab.BENCH, version, home=settings.home)


# ---- load ------------------------------------------------------------------------------------------------------


def start_clients(make_call: Callable[[], Callable[[], Any]], concurrency: int, stop: threading.Event,
                  sink: list[tuple[float, float, Any]]) -> list[threading.Thread]:
    """``concurrency`` threads, each calling its own ``make_call()`` back to back until ``stop`` is set and
    appending (start, latency s, result or exception) per call to ``sink`` as it lands."""
    lock = threading.Lock()

    def worker() -> None:
        call = make_call()
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                result: Any = call()
            except Exception as exc:  # noqa: BLE001 - a failed request is what this counts
                result = exc
            with lock:
                sink.append((t0, time.perf_counter() - t0, result))

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    return threads


def closed_loop(make_call: Callable[[], Callable[[], Any]], concurrency: int, seconds: float
                ) -> list[tuple[float, float, Any]]:
    """``concurrency`` clients back to back for ``seconds``; (start, latency s, result or exception) per call,
    in start order."""
    records: list[tuple[float, float, Any]] = []
    stop = threading.Event()
    threads = start_clients(make_call, concurrency, stop, records)
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(120)
    return sorted(records, key=lambda r: r[0])


def stats(records: list[tuple[float, float, Any]], seconds: float | None = None) -> dict[str, Any]:
    ok = [r for r in records if not isinstance(r[2], Exception)]
    lat = np.array([r[1] for r in ok]) * 1000
    span = seconds or ((records[-1][0] + records[-1][1] - records[0][0]) if records else 0.0)
    return {"requests": len(records), "failed": len(records) - len(ok),
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
            "rows_per_s": len(ok) / span if span else 0.0,
            "errors": sorted({f"{type(r[2]).__name__}: {str(r[2])[:120]}" for r in records if r not in ok})[:5]}


def http_json_call(url: str, name: str, text: str) -> Callable[[], Callable[[], str]]:
    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]}

    def make() -> Callable[[], str]:
        http = httpx.Client(base_url=url, timeout=60)

        def call() -> str:
            answer = http.post(f"/v2/models/{name}/infer", json=body)
            if answer.status_code != 200:
                raise RuntimeError(f"{answer.status_code} {answer.text[:100]}")
            return answer.json()["model_version"]
        return call
    return make


def triton_call(module: Any, address: str, name: str, text: str, *, binary: bool = True
                ) -> Callable[[], Callable[[], str]]:
    """A ``tritonclient.http`` or ``tritonclient.grpc`` client with its defaults (binary tensor data on), or
    ``tritonclient.http`` with ``binary=False``: JSON both ways (every input and output ``binary_data=False``)."""
    def make() -> Callable[[], str]:
        client = module.InferenceServerClient(address)
        data = np.array([text.encode()], dtype=np.object_)
        outputs = None if binary else [module.InferRequestedOutput(o, binary_data=False)
                                       for o in ("label", "score", "scores")]

        def call() -> str:
            item = module.InferInput("text", [1], "BYTES")
            item.set_data_from_numpy(data, **({} if binary else {"binary_data": False}))
            result = client.infer(name, [item], outputs=outputs)
            return str(result.get_response()["model_version"] if isinstance(result.get_response(), dict)
                       else result.get_response().model_version)
        return call
    return make


def in_process_call(pool: Any, loop: asyncio.AbstractEventLoop, name: str, text: str
                    ) -> Callable[[], Callable[[], str]]:
    """The same model and batcher (a :class:`ModelPool`) called from threads in this process: no transport."""
    from kiln.infra.oip import parse_infer

    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]}

    def make() -> Callable[[], str]:
        def call() -> str:
            model, _ = asyncio.run_coroutine_threadsafe(pool.infer(name, None, parse_infer(body)), loop).result(60)
            return model.version
        return call
    return make


# ---- the three parts -------------------------------------------------------------------------------------------


def swap_part(url: str, name: str, client: Any, settings: Any, start_v: str, target: str,
              seconds: float, text: str) -> dict[str, Any]:
    """Steady load through before / during / after; the alias moves at the start of "during"."""
    records: list[tuple[float, float, Any]] = []  # appended to by the clients as their answers come
    done, marks = threading.Event(), {}
    load = threading.Thread(target=_load_until, args=(url, name, text, done, records), daemon=True)
    started = time.perf_counter()
    load.start()
    time.sleep(seconds)
    marks["moved"] = time.perf_counter()
    move_alias(client, settings, name, target)
    marks["move_returned"] = time.perf_counter()
    deadline, seen = time.perf_counter() + 300, 0
    while "changed" not in marks and time.perf_counter() < deadline:
        time.sleep(0.05)
        fresh = records[seen:]
        seen += len(fresh)
        answered = [t0 + lat for t0, lat, result in fresh if result == target and t0 >= marks["moved"]]
        if answered:
            marks["changed"] = min(answered)
    marks.setdefault("changed", time.perf_counter())
    during_end = max(marks["changed"], marks["moved"] + seconds)
    time.sleep(max(0.0, during_end + seconds - time.perf_counter()))
    done.set()
    load.join(120)
    windows = {"before": (started, marks["moved"]), "during": (marks["moved"], during_end),
               "after": (during_end, during_end + seconds)}
    out: dict[str, Any] = {}
    for window, (lo, hi) in windows.items():
        part = [r for r in records if lo <= r[0] < hi]
        out[window] = stats(part, hi - lo) | {"versions": sorted({str(r[2]) for r in part
                                                                  if not isinstance(r[2], Exception)})}
    last_old = max((r[0] + r[1] for r in records if r[2] == start_v), default=None)
    first_new = min((r[0] + r[1] for r in records if r[2] == target), default=None)
    return {"from_version": start_v, "to_version": target, "clients": SWAP_CLIENTS, "windows": out,
            "failed": sum(isinstance(r[2], Exception) for r in records),
            "alias_moved_s": marks["moved"] - started, "move_took_s": marks["move_returned"] - marks["moved"],
            "first_new_answer_after_move_s": None if first_new is None else first_new - marks["moved"],
            "last_old_answer_after_move_s": None if last_old is None else last_old - marks["moved"]}


def _load_until(url: str, name: str, text: str, done: threading.Event, out: list[tuple[float, float, Any]]) -> None:
    """``SWAP_CLIENTS`` clients sending back to back until ``done``; (start, latency s, version or error) to ``out``."""
    for t in start_clients(http_json_call(url, name, text), SWAP_CLIENTS, done, out):
        t.join()


def transports_part(folder: Path, name: str, server: str, grpc: str, seconds: float, threads: int, text: str
                    ) -> dict[str, Any]:
    """rows/s, p50, p99 per transport and concurrency; ratio of rows/s to in-process at the same concurrency."""
    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp

    from kiln.infra.runtime import ModelPool, ServedModel
    from kiln.tasks.engines import EngineOptions
    from kiln.tasks.models.predictor import Predictor

    pool = ModelPool([ServedModel(name, "local", Predictor(folder, EngineOptions(threads=threads)))],
                     max_batch_size=32, max_wait_ms=0.0)  # the server's defaults
    loop, ready, finish = asyncio.new_event_loop(), threading.Event(), None

    async def serve() -> None:
        nonlocal finish
        finish = asyncio.Event()
        async with pool.running():
            ready.set()
            await finish.wait()

    runner = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    runner.start()
    ready.wait(120)
    transports = {"in-process": in_process_call(pool, loop, name, text),
                  # tritonclient.http in JSON mode: a C-parsed client, as the binary and gRPC rows have, so that
                  # on a 2-core machine the row measures the server's JSON path, not the client's (httpx in 32
                  # threads spends more CPU per request than the server does)
                  "http-json": triton_call(thttp, server.removeprefix("http://"), name, text, binary=False),
                  "http-binary": triton_call(thttp, server.removeprefix("http://"), name, text),
                  "grpc": triton_call(tgrpc, grpc, name, text)}
    rows: dict[str, dict[str, Any]] = {}
    rounds = max(3, round(seconds))  # ~1 s blocks: a load that comes and goes on the machine hits every transport
    try:
        for c in LEVELS:
            for make in transports.values():
                closed_loop(make, c, min(1.0, seconds / 2))  # warm up
            records: dict[str, list[tuple[float, float, Any]]] = {label: [] for label in transports}
            for r in range(rounds):  # interleaved, in an order that turns each round, as part 3 does
                order = list(transports)[r % len(transports):] + list(transports)[:r % len(transports)]
                for label in order:
                    records[label] += closed_loop(transports[label], c, seconds / rounds)
            for label, recs in records.items():
                rows.setdefault(label, {})[str(c)] = stats(recs, seconds)
    finally:
        loop.call_soon_threadsafe(finish.set)
        runner.join(60)
    for by_level in rows.values():
        for c, row in by_level.items():
            base = rows["in-process"][c]["rows_per_s"]
            row["ratio"] = row["rows_per_s"] / base if base else None
    met_by = {t: all(rows[t][str(c)]["ratio"] >= 0.9 for c in LEVELS if c >= 8) for t in rows if t != "in-process"}
    return {"levels": list(LEVELS), "rows": rows, "target": "≥ 0.9× in-process rows/s at concurrency ≥ 8",
            "target_met": all(met_by.values()), "target_met_by": met_by}


def gateway_part(server: str, gateway: str, name: str, seconds: float, text: str) -> dict[str, Any]:
    """Concurrency 1, direct vs through the gateway in alternating blocks; added p50/p99 with a round bootstrap."""
    calls = {"direct": http_json_call(server, name, text)(), "gateway": http_json_call(gateway, name, text)()}
    for call in calls.values():
        for _ in range(20):
            call()
    rounds: list[dict[str, list[float]]] = []
    deadline = time.perf_counter() + 2 * seconds
    while time.perf_counter() < deadline or len(rounds) < 4:
        order = list(calls) if len(rounds) % 2 == 0 else list(reversed(calls))
        timing: dict[str, list[float]] = {}
        for side in order:
            times = timing.setdefault(side, [])
            for _ in range(20):
                t0 = time.perf_counter()
                calls[side]()
                times.append((time.perf_counter() - t0) * 1000)
        rounds.append(timing)
    direct = np.concatenate([r["direct"] for r in rounds])
    via = np.concatenate([r["gateway"] for r in rounds])
    rng, added = np.random.default_rng(0), []
    for _ in range(1000):  # resample whole rounds, the same ones for both sides (paired)
        pick = rng.integers(0, len(rounds), len(rounds))
        added.append(np.median(np.concatenate([rounds[i]["gateway"] for i in pick]))
                     - np.median(np.concatenate([rounds[i]["direct"] for i in pick])))
    low, high = np.percentile(added, [2.5, 97.5])
    p50 = float(np.median(via) - np.median(direct))
    return {"rounds": len(rounds), "requests_per_side": len(direct),
            "direct": {"p50_ms": float(np.median(direct)), "p99_ms": float(np.percentile(direct, 99))},
            "gateway": {"p50_ms": float(np.median(via)), "p99_ms": float(np.percentile(via, 99))},
            "added_p50_ms": p50, "added_p50_ci95_ms": [float(low), float(high)],
            "added_p99_ms": float(np.percentile(via, 99) - np.percentile(direct, 99)),
            "target": "≤ 1 ms added p50", "target_met": p50 <= 1.0}


# ---- output ----------------------------------------------------------------------------------------------------


def print_tables(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120)  # the tables stay whole in logs and pipes
    console.print(f"model: {doc['model']}; engine threads {doc['threads']}; {doc['cpus']} CPUs shared by clients, "
                  "gateway and server")
    swap = doc["swap"]
    table = Table(title=f"1. Alias swap under load: v{swap['from_version']} → v{swap['to_version']}, "
                  f"{swap['clients']} HTTP clients (failures in total: {swap['failed']}; target 0)")
    for col in ("window", "requests", "failed", "p50 ms", "p99 ms", "req/s", "versions answering"):
        table.add_column(col, justify="left" if col in ("window", "versions answering") else "right")
    for window, row in swap["windows"].items():
        table.add_row(window, str(row["requests"]), str(row["failed"]), _ms(row["p50_ms"]), _ms(row["p99_ms"]),
                      f"{row['rows_per_s']:.1f}", ", ".join(row["versions"]))
    console.print(table)
    console.print(f"alias moved {swap['alias_moved_s']:.1f} s in (the move took {swap['move_took_s']:.2f} s); first "
                  f"answer from v{swap['to_version']} {_s(swap['first_new_answer_after_move_s'])} after the move, "
                  f"last from v{swap['from_version']} {_s(swap['last_old_answer_after_move_s'])} after it")
    part = doc["transports"]
    table = Table(title="2. Transports vs in-process (single-text requests, so rows/s = requests/s; × = rows/s "
                  "over in-process rows/s at the same concurrency)")
    for col in ("transport", "concurrency", "rows/s", "p50 ms", "p99 ms", "×", "failed"):
        table.add_column(col, justify="left" if col == "transport" else "right")
    for c in part["levels"]:
        for label, by_level in part["rows"].items():
            row = by_level[str(c)]
            table.add_row(label, str(c), f"{row['rows_per_s']:.1f}", _ms(row["p50_ms"]), _ms(row["p99_ms"]),
                          f"{row['ratio']:.2f}", str(row["failed"]))
    console.print(table)
    console.print(f"target {part['target']}: " + "; ".join(f"{t} {'met' if ok else 'NOT met'}"
                                                          for t, ok in part["target_met_by"].items()))
    gw = doc["gateway"]
    table = Table(title=f"3. Gateway added latency, concurrency 1 ({gw['rounds']} interleaved rounds, "
                  f"{gw['requests_per_side']} requests a side)")
    for col in ("", "p50 ms", "p99 ms"):
        table.add_column(col, justify="right" if col else "left")
    table.add_row("direct", _ms(gw["direct"]["p50_ms"]), _ms(gw["direct"]["p99_ms"]))
    table.add_row("through the gateway", _ms(gw["gateway"]["p50_ms"]), _ms(gw["gateway"]["p99_ms"]))
    low, high = gw["added_p50_ci95_ms"]
    table.add_row("added", f"{gw['added_p50_ms']:+.2f} [{low:+.2f}, {high:+.2f}]", f"{gw['added_p99_ms']:+.2f}")
    console.print(table)
    console.print(f"target {gw['target']}: {'met' if gw['target_met'] else 'NOT met'} "
                  "(interval: 95%, rounds resampled)")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _s(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f} s"


# ---- wiring ----------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from kiln.settings import Settings, load_settings
    from kiln.tasks.core import tags as vocab
    from kiln.tasks.registry import aliases
    from kiln.tasks.registry import client as registry

    ref_text = tiny_registry(tmp / ".kiln") if args.tiny else args.model
    settings = Settings(home=tmp / ".kiln") if args.tiny else load_settings()
    ref = registry.ModelRef.parse(ref_text)
    if ref.alias is None:
        raise SystemExit(f"error: {ref_text} names a version; the swap needs NAME@ALIAS")
    client = registry.connect(settings)
    start_v = str(registry.resolve(client, ref).version)
    target = swap_target(client, ref.name, start_v, args.to)
    folder = registry.fetch_package(client, client.get_model_version(ref.name, start_v), tmp / "pkg")
    text = texts_for_bench()[0]
    port, grpc_port, gw_port = free_port(), free_port(), free_port()
    server, gateway = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{gw_port}"
    env = {"KILN_HOME": str(settings.home)}
    followed = f"{ref.name}@{vocab.BENCH}"
    procs: list[subprocess.Popen] = []
    move_alias(client, settings, ref.name, start_v)
    try:
        procs.append(start(["kiln.infra.server", "--model", followed, "--port", str(port), "--grpc-port",
                            str(grpc_port), "--threads", str(args.threads), "--follow-interval", "0.5"],
                           server + "/v2/health/ready", env))
        swap = swap_part(server, ref.name, client, settings, start_v, target, args.seconds, text)
        move_alias(client, settings, ref.name, start_v)
        deadline = time.monotonic() + 300  # the server follows the alias back: the other parts measure start_v
        while httpx.get(f"{server}/v2/models/{ref.name}").json()["versions"] != [start_v]:
            if time.monotonic() > deadline:
                raise SystemExit(f"error: the server did not follow {followed} back to v{start_v}")
            time.sleep(0.2)
        procs.append(start(["kiln.infra.gateway", "--champion", server, "--challenger", server, "--port",
                            str(gw_port), "--no-state-file"], gateway + "/health",
                           env | {"KILN_GATEWAY_TOKEN": TOKEN}))
        transports = transports_part(folder, ref.name, server, f"127.0.0.1:{grpc_port}", args.seconds,
                                     args.threads, text)
        gw = gateway_part(server, gateway, ref.name, args.seconds, text)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
        aliases.drop(client, ref.name, vocab.BENCH, home=settings.home)
    return {"model": ref_text if not args.tiny else "tiny@champion (tiny BERT, --tiny)", "threads": args.threads,
            "cpus": os.cpu_count(), "seconds": args.seconds, "swap": swap, "transports": transports, "gateway": gw}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        doc = run(args, Path(tmp))
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_tables(doc)


if __name__ == "__main__":
    main()
