"""Model servers that follow an alias, over real HTTP on 127.0.0.1 with a real MLflow SQLite registry.

``tiny`` has three registered versions, three tiny BERTs with the same labels and different weights:
v1 (@champion at the start of every test), v2 and v3. The in-process tests trigger the follower's check
(:meth:`AliasFollower.check_from_thread`) instead of waiting for its timer; the ``kiln serve`` test runs the
real command with a short ``--follow-interval`` and only moves the alias.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kiln.errors import ArtifactError
from kiln.infra.background import serving
from kiln.infra.follow import follow_refs, smoke_test
from kiln.infra.oip import parse_infer
from kiln.infra.runtime import ModelPool, ServedModel
from kiln.infra.server import create_app, load_registered
from kiln.settings import Settings
from kiln.tasks.core import tags as vocab
from kiln.tasks.engines import EngineOptions
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.onboard import register_folder
from tests.fakes import FastFake
from tests.tiny import save_tiny

TEXT = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["great day", "awful traffic"]}]}
STATUS_KEYS = ("following", "served_version", "alias_version", "pending_version", "last_error")


@pytest.fixture(scope="module")
def versions(tmp_path_factory, tiny_models, tiny_splits, tiny_spec):
    """A registry holding tiny v1 (the session's tiny BERT), v2 and v3 (the same, other seeds)."""
    root = tmp_path_factory.mktemp("follow")
    settings = Settings(home=root / ".kiln")
    client = registry.connect(settings)
    register_folder(client, settings, tiny_models["bert"], "tiny", "sequence-classification", tiny_spec)
    texts = tiny_splits.train["text"].tolist()
    for seed in (1, 2):
        folder = save_tiny("bert", texts, root / f"bert-seed{seed}", labels=tiny_splits.labels, seed=seed)
        register_folder(client, settings, folder, "tiny", "sequence-classification", tiny_spec, alias=None)
    assert sorted(str(v.version) for v in client.search_model_versions("name = 'tiny'")) == ["1", "2", "3"]
    return SimpleNamespace(settings=settings, client=client, labels=tiny_splits.labels)


@pytest.fixture
def world(versions):
    """``versions`` with @champion on v1 again, as every test starts."""
    versions.client.set_registered_model_alias("tiny", vocab.CHAMPION, "1")
    return versions


@contextmanager
def model_server(world, refs: tuple[str, ...] = ("tiny@champion",)) -> Iterator[SimpleNamespace]:
    """A model server on ``refs`` with followers attached as ``kiln serve`` attaches them (timer: an hour)."""
    options = EngineOptions(threads=1)
    served = load_registered(list(refs), world.settings, options)
    app = create_app(served)
    pool = app.state.server.pool
    followers = follow_refs(pool, list(refs), served, world.settings, options, interval_s=3600)
    with serving(app) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        yield SimpleNamespace(url=server.url, http=http, pool=pool, followers=followers)


def _wait(condition: Callable[[], bool], timeout_s: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _metrics(http: httpx.Client) -> dict[tuple[str, frozenset], float]:
    text = http.get("/metrics").text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _swaps(http: httpx.Client, result: str) -> float:
    return _metrics(http).get(("kiln_server_swaps_total", frozenset({("model", "tiny"), ("result", result)})), 0.0)


def _params(http: httpx.Client, path: str = "/v2/models/tiny") -> dict:
    meta = http.get(path).json()
    return {"versions": meta["versions"], **{k: meta["parameters"].get(k, "absent") for k in STATUS_KEYS}}


def _answer_version(http: httpx.Client, path: str = "/v2/models/tiny/infer") -> str:
    answer = http.post(path, json=TEXT)
    assert answer.status_code == 200, answer.text
    return answer.json()["model_version"]


def _stored_weights(world, version: str):
    """The weights file of ``version`` in the artifact store (not a serving cache)."""
    digest = world.client.get_model_version("tiny", version).tags[vocab.SOURCE_SHA256]
    found = [p for p in world.settings.artifact_root.rglob("model.safetensors")
             if hashlib.sha256(p.read_bytes()).hexdigest() == digest]
    assert found, f"no stored weights of v{version}"
    return found[0]


# ---- swapping ------------------------------------------------------------------------------------------------


class _Held(FastFake):
    """An engine that answers once ``release`` is set: a request stays in flight for as long as a test wants."""

    def __init__(self, label: str) -> None:
        super().__init__(label)
        self.release, self.calls = threading.Event(), 0

    def predict(self, texts):
        self.calls += 1
        assert self.release.wait(30), "never released"
        return super().predict(texts)


def test_a_swap_lets_requests_in_flight_and_queued_finish_on_the_old_version():
    held = _Held("negative")
    pool = ModelPool([ServedModel("m", "1", held)], max_batch_size=2, max_wait_ms=0)

    async def scenario() -> None:
        async with pool.running():
            running = asyncio.create_task(pool.infer("m", None, parse_infer(TEXT)))  # 2 rows: a batch of its own
            while held.calls == 0:
                await asyncio.sleep(0.01)
            queued = asyncio.create_task(pool.infer("m", None, parse_infer(TEXT)))  # waits behind it on v1
            await asyncio.sleep(0.05)
            swap = asyncio.create_task(pool.swap("m", ServedModel("m", "2", FastFake("positive"))))
            await asyncio.sleep(0.05)
            assert not swap.done() and not queued.done()  # the old version still has work
            model, outputs = await pool.infer("m", None, parse_infer(TEXT))  # new requests: the new version, at once
            assert (model.version, outputs[0]["data"]) == ("2", ["positive", "positive"])
            held.release.set()
            for task in (running, queued):
                model, outputs = await task
                assert (model.version, outputs[0]["data"]) == ("1", ["negative", "negative"])
            assert (await swap).version == "1"
            assert [rt.model.version for rt in pool.runtimes["m"]] == ["2"]

    asyncio.run(scenario())


def test_the_alias_moves_under_steady_load_and_no_request_fails(world):
    with model_server(world) as srv:
        [follower] = srv.followers
        assert _params(srv.http) == {"versions": ["1"], "following": "champion", "served_version": "1",
                                     "alias_version": "1", "pending_version": None, "last_error": None}
        stop, answers = threading.Event(), [[] for _ in range(4)]

        def load(mine: list) -> None:
            with httpx.Client(base_url=srv.url, timeout=60) as http:
                while not stop.is_set():
                    try:
                        answer = http.post("/v2/models/tiny/infer", json=TEXT)
                        mine.append((answer.status_code, answer.json().get("model_version")))
                    except Exception as exc:  # noqa: BLE001 - a failed request is what this test counts
                        mine.append((type(exc).__name__, None))

        threads = [threading.Thread(target=load, args=(mine,), daemon=True) for mine in answers]
        for t in threads:
            t.start()
        try:
            _wait(lambda: all(len(mine) >= 10 for mine in answers), what="requests on v1")
            world.client.set_registered_model_alias("tiny", vocab.CHAMPION, "2")
            assert follower.check_from_thread() == "swapped"
            marks = [len(mine) for mine in answers]
            _wait(lambda: all(len(mine) >= mark + 10 for mine, mark in zip(answers, marks, strict=True)),
                  what="requests on v2")
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        every = [a for mine in answers for a in mine]
        failed = [a for a in every if a[0] != 200]
        assert not failed, f"{len(failed)} of {len(every)} requests failed during the swap: {failed[:5]}"
        for mine, mark in zip(answers, marks, strict=True):
            versions = [v for _, v in mine]
            assert versions == sorted(versions), "a client went back to v1 after v2 answered it"
            # The request in flight when the check returned may have been sent before the switch.
            assert set(versions[mark + 1:]) == {"2"}
        assert {v for _, v in every} == {"1", "2"}
        assert _params(srv.http) == {"versions": ["2"], "following": "champion", "served_version": "2",
                                     "alias_version": "2", "pending_version": None, "last_error": None}
        assert [rt.model.version for rt in srv.pool.runtimes["tiny"]] == ["2"]  # the old runtime is gone
        assert _swaps(srv.http, "swapped") == 1 and _swaps(srv.http, "failed") == 0
        gauge = ("kiln_server_served_version", frozenset({("model", "tiny"), ("alias", "champion")}))
        assert _metrics(srv.http)[gauge] == 2
        assert follower.check_from_thread() == "unchanged"


def test_a_version_that_fails_verification_is_refused_and_the_old_one_keeps_serving(world):
    weights = _stored_weights(world, "3")
    with model_server(world) as srv:
        [follower] = srv.followers
        world.client.set_registered_model_alias("tiny", vocab.CHAMPION, "3")
        # Corrupt on disk: the stored weights no longer match kiln.json.
        original = weights.read_bytes()
        weights.write_bytes(original[:-10] + b"0123456789")
        try:
            assert follower.check_from_thread() == "failed"
        finally:
            weights.write_bytes(original)
        status = _params(srv.http)
        assert {k: status[k] for k in ("versions", "served_version", "alias_version", "pending_version")} == {
            "versions": ["1"], "served_version": "1", "alias_version": "3", "pending_version": "3"}
        assert status["last_error"].startswith("v3 refused: ") and "corrupt (sha256 mismatch)" in status["last_error"]
        assert _answer_version(srv.http) == "1"
        # A wrong pin: the registry says the package is another one.
        pin = world.client.get_model_version("tiny", "3").tags[vocab.PACKAGE_DIGEST]
        world.client.set_model_version_tag("tiny", "3", vocab.PACKAGE_DIGEST, "0" * 64)
        try:
            assert follower.check_from_thread() == "failed"
            status = _params(srv.http)
            assert status["served_version"] == "1" and "is not the manifest the registry pinned for tiny v3" in \
                status["last_error"]
            assert _answer_version(srv.http) == "1"
        finally:
            world.client.set_model_version_tag("tiny", "3", vocab.PACKAGE_DIGEST, pin)
        assert _swaps(srv.http, "failed") == 2 and _swaps(srv.http, "swapped") == 0
        # Fixed in the registry: the next look swaps.
        assert follower.check_from_thread() == "swapped"
        assert _params(srv.http) == {"versions": ["3"], "following": "champion", "served_version": "3",
                                     "alias_version": "3", "pending_version": None, "last_error": None}
        assert _answer_version(srv.http) == "3"


def test_a_deleted_alias_keeps_the_server_serving_and_says_so(world):
    with model_server(world) as srv:
        [follower] = srv.followers
        world.client.delete_registered_model_alias("tiny", vocab.CHAMPION)
        try:
            assert follower.check_from_thread() == "alias-missing"
            status = _params(srv.http)
            assert (status["served_version"], status["alias_version"]) == ("1", None)
            assert "alias @champion no longer exists in the registry; still serving v1" in status["last_error"]
            assert _answer_version(srv.http) == "1"
        finally:
            world.client.set_registered_model_alias("tiny", vocab.CHAMPION, "1")
        assert follower.check_from_thread() == "unchanged"
        assert _params(srv.http)["last_error"] is None


def test_a_version_with_other_labels_fails_the_smoke_test(world):
    served = load_registered(["tiny/1"], world.settings, EngineOptions(threads=1))[0]
    assert len(smoke_test(served.predictor, "sequence-classification", world.labels)) == 4
    with pytest.raises(ArtifactError, match="names and order must match"):
        smoke_test(served.predictor, "sequence-classification", list(reversed(world.labels)))
    with pytest.raises(ArtifactError, match="is a sequence-classification model and the version serving is a "
                       "causal-lm model"):
        smoke_test(served.predictor, "causal-lm", world.labels)


# ---- kiln serve -------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("entry", ["kiln serve", "python -m kiln.infra.server"])
def test_kiln_serve_follows_the_alias_and_a_pinned_version_never_changes(world, tmp_path, entry):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")} | {
        "KILN_HOME": str(world.settings.home), "KILN_THREADS": "1"}
    command = [sys.executable, "-m", "kiln", "serve", "tiny@champion", "tiny/1", "--no-grpc"] if entry == "kiln serve" \
        else [sys.executable, "-m", "kiln.infra.server", "--model", "tiny@champion", "--model", "tiny/1"]
    command += ["--port", str(port), "--follow-interval", "0.3"]
    log = tmp_path / "serve.log"  # a file, not a pipe: a server blocked on a full pipe would fail the test
    with log.open("w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            def ready() -> bool:
                assert process.poll() is None, log.read_text()[-3000:]
                try:
                    return http.get("/v2/health/ready").status_code == 200
                except httpx.TransportError:
                    return False

            _wait(ready, what="kiln serve to be ready")
            assert _answer_version(http) == "1"
            world.client.set_registered_model_alias("tiny", vocab.CHAMPION, "2")
            _wait(lambda: _params(http)["served_version"] == "2", what="the server to follow @champion to v2")
            assert _answer_version(http) == "2"
            assert _params(http, "/v2/models/tiny/versions/1") == {"versions": ["1"], "following": None,
                                                                   "served_version": "1", "alias_version": "absent",
                                                                   "pending_version": "absent", "last_error": "absent"}
            assert _answer_version(http, "/v2/models/tiny/versions/1/infer") == "1"
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C
        process.wait(timeout=60)
    output = log.read_text()
    assert process.returncode == 0 or entry != "kiln serve", output[-3000:]  # Ctrl-C is a normal end of kiln serve
    assert "tiny@champion: now serving v2 (was v1); top-1 agreement with v1 on 4 smoke texts:" in output
