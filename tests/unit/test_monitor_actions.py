"""Acting once: the monitor's action guard against a real MLflow SQLite registry, the signed webhook against a
loopback HTTP server, and the rollback through the promotion path."""

from __future__ import annotations

import json
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kiln.errors import ModelNotFoundError
from kiln.tasks.core import tags as vocab
from kiln.tasks.monitor.actions import (
    SIGNATURE_HEADER,
    ActionGuard,
    notify,
    rollback_champion,
    verify_signature,
)
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.audit import AuditLog

MODEL = "sentiment"


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """A migrated, empty MLflow SQLite store, made once: creating one takes seconds, copying it none."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_registered_models()
    return path


@pytest.fixture
def client(settings, empty_store, tmp_path):
    """``sentiment`` v1 @previous, v2 @champion."""
    shutil.copy(empty_store, settings.home / "mlflow.db")
    client = registry.connect(settings)
    client.create_registered_model(MODEL)
    for _ in range(2):
        client.create_model_version(MODEL, (tmp_path / "model").as_uri())
    client.set_registered_model_alias(MODEL, vocab.PREVIOUS, "1")
    client.set_registered_model_alias(MODEL, vocab.CHAMPION, "2")
    return client


def _guard(client, settings, **kwargs) -> ActionGuard:
    return ActionGuard(client, MODEL, home=settings.home, settle_s=kwargs.pop("settle_s", 0.0), **kwargs)


def _tags(client) -> dict[str, str]:
    return client.get_registered_model(MODEL).tags


def test_one_action_at_a_time_then_a_new_one_after_finish(client, settings):
    guard = _guard(client, settings)
    first = guard.begin("notify+rollback", {"version": "2", "breaches": ["slo"]}, timeout_s=600)
    assert first
    record = json.loads(_tags(client)[vocab.MONITOR_ACTION])  # what the MLflow UI shows
    assert record["action"] == "notify+rollback" and record["id"] == first and record["detail"]["version"] == "2"
    assert guard.begin("notify", {"version": "2"}, timeout_s=600) is None  # in flight: nothing repeats
    assert _guard(client, settings).begin("retrain", {}, timeout_s=600) is None  # nor from another guard
    in_flight = guard.in_flight()
    assert in_flight["id"] == first and in_flight["action"] == "notify+rollback" and in_flight["started_at"]

    guard.finish(first, "rolled back sentiment: @champion is v1 again")
    assert guard.in_flight() is None and vocab.MONITOR_ACTION not in _tags(client)
    last = json.loads(_tags(client)[vocab.MONITOR_LAST_ACTION])
    assert last["id"] == first and last["outcome"].startswith("rolled back") and last["version"] == "2"
    events = [(e.event, e.version, e.actor) for e in AuditLog.under(settings.home).read(MODEL)]
    assert events == [(vocab.EVENT_MONITOR_ACTION_STARTED, "2", "kiln-monitor"),
                      (vocab.EVENT_MONITOR_ACTION_FINISHED, "2", "kiln-monitor")]

    second = guard.begin("notify", {"version": "1"}, timeout_s=600)
    assert second and second != first


def test_a_stale_action_no_longer_blocks_and_says_so(client, settings, caplog):
    now = [1_800_000_000.0]
    guard = _guard(client, settings, clock=lambda: now[0])
    old = guard.begin("retrain", {"version": "2"}, timeout_s=60)
    now[0] += 30
    assert guard.in_flight()["id"] == old and guard.begin("notify", {}, timeout_s=60) is None
    now[0] += 31  # past its timeout: its process died, say
    assert guard.current()["stale"] is True and guard.current()["age_s"] == pytest.approx(61)
    with caplog.at_level("WARNING"):
        assert guard.in_flight() is None
    assert "is stale" in caplog.text and old in caplog.text
    new = guard.begin("notify", {"version": "2"}, timeout_s=60)
    assert new and new != old
    assert json.loads(_tags(client)[vocab.MONITOR_ACTION])["replaces"]["id"] == old
    guard.finish(old, "retrain: finished late")  # the old one's outcome is recorded; the new one stays
    assert guard.in_flight()["id"] == new
    assert json.loads(_tags(client)[vocab.MONITOR_LAST_ACTION])["outcome"] == "retrain: finished late"


def test_an_unreadable_record_counts_as_stale(client, settings):
    client.set_registered_model_tag(MODEL, vocab.MONITOR_ACTION, "{not json")
    guard = _guard(client, settings)
    assert guard.current()["stale"] and guard.in_flight() is None
    assert guard.begin("notify", {}, timeout_s=60)


@pytest.mark.parametrize("stale", [False, True], ids=["absent", "replacing-stale"])
def test_concurrent_monitors_act_once(client, settings, tmp_path, stale):
    """Absent record (an insert: the store's unique key decides): four threads on this machine (one file lock)
    and two 'machines' (separate homes). A stale record (an update: the read-back decides): six 'machines'."""
    if stale:
        old = ActionGuard(client, MODEL, home=settings.home, settle_s=0, clock=lambda: time.time() - 120)
        old.begin("retrain", {"version": "2"}, timeout_s=60)
        guards = [ActionGuard(client, MODEL, home=tmp_path / f"machine-{i}", settle_s=1.0) for i in range(6)]
    else:
        guards = [_guard(client, settings, settle_s=0.3) for _ in range(4)]
        guards += [ActionGuard(client, MODEL, home=tmp_path / "other-machine", settle_s=0.3) for _ in range(2)]
    barrier, ids = threading.Barrier(len(guards)), []

    def run(guard: ActionGuard) -> None:
        barrier.wait()
        ids.append(guard.begin("notify", {"version": "2"}, timeout_s=600))

    threads = [threading.Thread(target=run, args=(g,)) for g in guards]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [i for i in ids if i]
    assert len(ids) == 6 and len(winners) == 1
    assert json.loads(_tags(client)[vocab.MONITOR_ACTION])["id"] == winners[0]


def test_an_unknown_model_is_one_line(client, settings):
    with pytest.raises(ModelNotFoundError, match="no registered model 'nope'"):
        ActionGuard(client, "nope", home=settings.home).in_flight()


def test_rollback_goes_through_the_promotion_path_and_never_raises(client, settings):
    outcome = rollback_champion(client, settings, MODEL, "monitor: slo on v2")
    assert outcome == "rolled back sentiment: @champion is v1 again (was v2)"
    assert registry.existing_aliases(client, MODEL) == {vocab.CHAMPION: "1"}
    restored = client.get_model_version(MODEL, "1").tags
    assert restored[vocab.ROLLED_BACK_BY] == "kiln-monitor" and restored[vocab.ROLLBACK_REASON] == "monitor: slo on v2"
    # no @previous any more: a clear outcome, not an exception that would leave the guard's action open
    again = rollback_champion(client, settings, MODEL, "monitor: slo on v1")
    assert again.startswith("cannot roll back sentiment: 'sentiment' has no @previous to roll back to")
    assert registry.existing_aliases(client, MODEL) == {vocab.CHAMPION: "1"}


# ---- notify ------------------------------------------------------------------------------------------------


class _Hook(BaseHTTPRequestHandler):
    received: list = []
    status = 204
    delay_s = 0.0

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append((self.path, dict(self.headers), body))
        time.sleep(self.delay_s)
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def hook():
    handler = type("Hook", (_Hook,), {"received": [], "status": 204, "delay_s": 0.0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield handler, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_notify_posts_signed_json(hook):
    handler, url = hook
    payload = {"model": MODEL, "version": "2", "status": "breach", "breaches": ["slo"]}
    assert notify(f"{url}/hooks/T0ken/secret-path", payload, "s3cret") == f"notified {url} (HTTP 204)"
    path, headers, body = handler.received[0]
    assert path == "/hooks/T0ken/secret-path" and json.loads(body) == payload
    assert headers[SIGNATURE_HEADER].startswith("sha256=") and headers["Content-Type"] == "application/json"
    assert verify_signature(body, headers[SIGNATURE_HEADER], "s3cret")
    assert not verify_signature(body, headers[SIGNATURE_HEADER], "other")
    assert not verify_signature(body.replace(b"breach", b"healthy"), headers[SIGNATURE_HEADER], "s3cret")
    notify(url, payload, None)
    assert SIGNATURE_HEADER not in handler.received[1][1]  # no secret: unsigned
    assert handler.received[0][1]["X-Kiln-Delivery"] != handler.received[1][1]["X-Kiln-Delivery"]


def test_notify_failures_are_one_line_and_never_raise(hook):
    handler, url = hook
    handler.status = 500
    assert notify(f"{url}/x?token=abc", {"a": 1}, "s") == f"failed: {url} answered HTTP 500"
    handler.status, handler.delay_s = 204, 0.5
    assert notify(url, {"a": 1}, None, timeout_s=0.1) == f"failed: {url} did not answer within 0.1 s"
    closed = "http://127.0.0.1:9"  # discard port: nothing listens
    assert notify(closed + "/secret", {"a": 1}, None).startswith(f"failed: cannot reach {closed} (")
    assert notify(url, {"not json": object()}, None).startswith("notified")  # default=str: anything serialises
