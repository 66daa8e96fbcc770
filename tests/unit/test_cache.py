import importlib
import json
import multiprocessing
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kiln.tasks.core.cache import StageCache, code_files, code_version, make_key, reset_code_cache

TASKS = Path(__file__).resolve().parents[2] / "tasks"

# A package laid out like Kiln's: a stage in a technique package that imports a helper at the top and
# another inside the stage function, beside a module nothing imports.
FAKE_TREE = {
    "__init__.py": '"""A stand-in for Kiln."""\n',
    "helpers.py": "from kiln_fake.util import deep\n\n\ndef scale(x):\n    return deep.double(x)\n",
    "util/__init__.py": "",
    "util/deep.py": "def double(x):\n    return 2 * x\n",
    "lazy.py": "OFFSET = 1\n",
    "unrelated.py": "def unused():\n    return None\n",
    "technique/__init__.py": "",
    "technique/stage.py": ("import json\n\nfrom ..helpers import scale\n\n\ndef stage(x):\n"
                           "    from kiln_fake import lazy\n\n    return json.dumps(scale(x) + lazy.OFFSET)\n"),
    "technique/sibling.py": "SHARED = 3\n",
}


def test_result_is_persisted_and_reused(tmp_path):
    cache, calls = StageCache(tmp_path), []

    def work(folder):
        calls.append(folder)
        (folder / "out.txt").write_text("done")
        return {"path": "out.txt"}

    first, hit1 = cache.run("k", work)
    second, hit2 = StageCache(tmp_path).run("k", work)  # a new process sees the same folder
    assert (hit1, hit2) == (False, True) and first == second and len(calls) == 1
    assert (cache.folder("k") / "out.txt").read_text() == "done"


def test_a_killed_stage_leaves_nothing_that_looks_finished(tmp_path):
    cache = StageCache(tmp_path)

    def dies(folder):
        (folder / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.run("k", dies)
    assert cache.get("k") is None and not (tmp_path / "k").exists()
    # The next attempt gets the same work folder back, so a checkpointing stage can resume.
    result, hit = cache.run("k", lambda folder: {"resumed": (folder / "half.bin").exists()})
    assert result == {"resumed": True} and not hit
    assert not (tmp_path / ".k.partial").exists()


def test_keys_change_with_any_input():
    base = make_key("model/1", "digest", {"p": 1}, "code")
    assert base == make_key("model/1", "digest", {"p": 1}, "code")
    assert len({base, make_key("model/2", "digest", {"p": 1}, "code"), make_key("model/1", "digest", {"p": 2},
                "code"), make_key("model/1", "digest", {"p": 1}, "code2")}) == 4


def test_code_version_tracks_the_module_source():
    from kiln.tasks.compress import recipes
    from kiln.tasks.compress.quantization import dynamic as quantize

    assert code_version(quantize.int8_dynamic) != code_version(recipes.export_stage)
    assert code_version(quantize.int8_dynamic).startswith("0.")


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """A copy of ``FAKE_TREE`` importable as ``kiln_fake``; forgotten again (modules and sources) afterwards."""
    root = tmp_path / "kiln_fake"
    for name, text in FAKE_TREE.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    reset_code_cache()
    yield root
    for name in [m for m in sys.modules if m == "kiln_fake" or m.startswith("kiln_fake.")]:
        del sys.modules[name]
    reset_code_cache()


def _edit(path: Path) -> None:
    path.write_text(path.read_text() + "# edited\n")
    reset_code_cache()  # sources are read once per process


def test_a_stage_key_follows_every_module_it_runs(fake_package):
    stage = importlib.import_module("kiln_fake.technique.stage").stage
    assert set(code_files(stage)) == {"kiln_fake", "kiln_fake.helpers", "kiln_fake.util", "kiln_fake.util.deep",
                                      "kiln_fake.lazy", "kiln_fake.technique", "kiln_fake.technique.stage",
                                      "kiln_fake.technique.sibling"}
    key = code_version(stage)
    _edit(fake_package / "unrelated.py")
    assert code_version(stage) == key  # nothing the stage runs changed
    for helper in ["util/deep.py", "helpers.py", "lazy.py", "technique/sibling.py"]:
        _edit(fake_package / helper)
        assert code_version(stage) != key, helper  # imported transitively, inside a function, or its package
        key = code_version(stage)


def test_the_key_does_not_depend_on_where_the_code_lives(fake_package, tmp_path, monkeypatch):
    stage = importlib.import_module("kiln_fake.technique.stage").stage
    key = code_version(stage)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    fake_package.rename(moved / "kiln_fake")
    for name in [m for m in sys.modules if m.startswith("kiln_fake")]:
        del sys.modules[name]
    monkeypatch.syspath_prepend(str(moved))
    reset_code_cache()
    assert code_version(importlib.import_module("kiln_fake.technique.stage").stage) == key


def test_the_export_stage_depends_on_the_export_module():
    from kiln.tasks.compress import recipes
    from kiln.tasks.compress.prune import stages as prune

    # export_stage is defined in recipes.py but runs models/export.py (imported inside the function).
    exported = {path.resolve() for path in code_files(recipes.export_stage).values()}
    assert TASKS / "models" / "export.py" in exported and TASKS / "compress" / "recipes.py" in exported
    pruning = {path.resolve() for path in code_files(prune.prune_heads).values()}
    assert {TASKS / "compress" / "prune" / "scores.py", TASKS / "compress" / "prune" / "surgery.py"} <= pruning
    assert TASKS / "compress" / "quantization" / "dynamic.py" not in pruning  # another technique


# ---- two callers, one key ------------------------------------------------------------------------------------
# Module-level functions, so that spawned processes can import them.
def _slow_stage(root: str, calls: str, seconds: float, started: str | None = None):
    def fn(folder: Path) -> dict:
        with open(calls, "a") as out:  # one line per computation, whichever process runs it
            out.write(f"{os.getpid()}\n")
        (folder / "half.bin").write_bytes(b"x")
        (folder / "result.json").write_text("{not finished")  # what a holder killed at the wrong time leaves
        if started:
            Path(started).touch()
        time.sleep(seconds)
        return {"answer": 42}
    return StageCache(Path(root)).run("k", fn)


def _race(root: str, calls: str, go, results) -> None:
    go.wait(10)
    results.put(_slow_stage(root, calls, 1.0))


def _hold_forever(root: str, calls: str, started: str) -> None:
    _slow_stage(root, calls, 3600, started)


def _wait_for(check, timeout_s: float = 20.0) -> None:
    end = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_two_processes_asking_for_one_key_compute_it_once(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    go, results = ctx.Event(), ctx.Queue()
    calls = tmp_path / "calls"
    procs = [ctx.Process(target=_race, args=(str(tmp_path / "cache"), str(calls), go, results)) for _ in range(2)]
    for p in procs:
        p.start()
    go.set()
    got = [results.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(10)
    assert len(calls.read_text().splitlines()) == 1  # one computed, the other waited and reused it
    assert sorted(hit for _, hit in got) == [False, True] and all(r == {"answer": 42} for r, _ in got)
    assert not (tmp_path / "cache" / ".k.partial").exists()


def test_two_threads_asking_for_one_key_compute_it_once(tmp_path):
    calls = tmp_path / "calls"
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda _: _slow_stage(str(tmp_path), str(calls), 0.3), range(2)))
    assert len(calls.read_text().splitlines()) == 1 and sorted(hit for _, hit in got) == [False, True]


def test_a_holder_killed_mid_stage_blocks_nobody_and_leaves_nothing_trusted(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    root, calls, started = tmp_path / "cache", tmp_path / "calls", tmp_path / "started"
    holder = ctx.Process(target=_hold_forever, args=(str(root), str(calls), str(started)))
    holder.start()
    _wait_for(started.exists)
    go, results = ctx.Event(), ctx.Queue()
    go.set()
    waiter = ctx.Process(target=_race, args=(str(root), str(calls), go, results))
    waiter.start()
    time.sleep(0.5)  # the waiter is blocked on the holder's lock
    assert results.empty()
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(10)
    result, hit = results.get(timeout=30)  # the kernel released the lock: the waiter computed the stage
    waiter.join(10)
    assert (result, hit) == ({"answer": 42}, False) and len(calls.read_text().splitlines()) == 2
    assert json.loads((root / "k" / "result.json").read_text()) == {"answer": 42}


def test_the_next_holder_resumes_the_work_folder_but_not_a_stale_result(tmp_path):
    work = tmp_path / ".k.partial"
    work.mkdir()
    (work / "checkpoints").mkdir()
    (work / "checkpoints" / "step-00000010.pt").write_bytes(b"ckpt")
    (work / "result.json").write_text('{"answer": "from a holder that died before publishing"}')

    def resume(folder: Path) -> dict:
        assert not (folder / "result.json").exists()  # a stale result is never trusted ...
        return {"resumed_from": sorted(p.name for p in (folder / "checkpoints").iterdir())}  # ... checkpoints are

    assert StageCache(tmp_path).run("k", resume) == ({"resumed_from": ["step-00000010.pt"]}, False)
