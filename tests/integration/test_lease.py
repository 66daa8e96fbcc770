"""One lease per model, against a real MLflow SQLite registry: a rollout holds it, and promote, rollback and
publish refuse meanwhile; renewal keeps it; another process's transient error does not break it; a corrupt
lease is refused and `kiln lease break` clears it; a holder that lost it moves nothing.

Two project folders stand for two machines (separate file locks, one registry). A refusal by the lease is a
registry state that forbids the request: exit status 2, with the registry unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
from typer.testing import CliRunner

from kiln.cli.app import app
from kiln.tasks.core import tags as vocab
from kiln.tasks.lifecycle import promotion
from kiln.tasks.optimize.publish import register_candidate
from kiln.tasks.registry import aliases, audit
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.lease import ModelLease
from kiln.tasks.registry.lease_record import LeaseCorrupt, LeaseHeld, LeaseLost, break_lease, read_lease
from kiln.tasks.rollout.commands import send_command
from kiln.tasks.rollout.driver import RolloutDriver
from kiln.tasks.rollout.judge import RolloutSpec
from kiln.tasks.rollout.router import Split
from tests.integration.helpers import registry_state
from tests.keys import DIGEST, approve

runner = CliRunner()
LEASE = "kiln-lease.tiny"


@pytest.fixture
def tiny(settings, tmp_path, empty_store):
    """``tiny``: v1 @previous, v2 @champion, v3 @challenger (gate passed, pinned, nominated; not approved)."""
    shutil.copy(empty_store, settings.home / "mlflow.db")
    client = registry.connect(settings)
    client.create_registered_model("tiny")
    for recipe in ("source", "int8-dynamic", "int8-static"):
        client.create_model_version("tiny", (tmp_path / "model").as_uri(), tags={
            vocab.RECIPE: recipe, vocab.GATE: vocab.GATE_PASSED, vocab.METRICS: json.dumps({"accuracy": 0.8}),
            vocab.PACKAGE_DIGEST: DIGEST})
    for alias, version in ((vocab.PREVIOUS, "1"), (vocab.CHAMPION, "2")):
        client.set_registered_model_alias("tiny", alias, version)
    aliases.nominate(client, "tiny", "3", home=settings.home)  # under a publish lease, released at once
    return client


@pytest.fixture
def elsewhere(tmp_path) -> Path:
    """The project folder of another machine sharing the registry."""
    return tmp_path / "other-machine"


def _hand_made_lease(client, expires: str, owner: str = "host-x:42:cafe", purpose: str = "promote") -> None:
    client.create_registered_model(LEASE, tags={vocab.LEASE_OWNER: owner, vocab.LEASE_PURPOSE: purpose,
                                                vocab.LEASE_EXPIRES: expires})


def test_promote_rollback_and_publish_refuse_while_a_rollout_holds_the_lease(tiny, settings, elsewhere):
    with ModelLease(tiny, "tiny", elsewhere, purpose="rollout", version="3"):
        before = registry_state(tiny, "tiny")
        promoted = runner.invoke(app, ["promote", "tiny", "--timeout", "5", "--poll", "0.1"])
        assert promoted.exit_code == 2, promoted.output
        assert "a canary rollout of v3" in promoted.output and "holds the lease of 'tiny' until" in promoted.output
        assert "wait for it or `kiln rollout abort tiny`" in promoted.output
        rolled = runner.invoke(app, ["rollback", "tiny", "--reason", "error rate up", "--actor", "bob"])
        assert rolled.exit_code == 2 and "a canary rollout of v3" in rolled.output, rolled.output
        with pytest.raises(LeaseHeld, match="a canary rollout of v3"):  # the alias move itself, as any caller
            aliases.promote(tiny, "tiny", home=settings.home, expected=registry.aliases_of(tiny, "tiny"))
        with pytest.raises(LeaseHeld, match="a canary rollout of v3"):  # optimize's publish registers nothing
            register_candidate(tiny, SimpleNamespace(version=SimpleNamespace(name="tiny")), None, "m-1", "run",
                               {}, settings.home)
        shown = runner.invoke(app, ["show", "tiny"])
        assert shown.exit_code == 0 and "lease: held by " in shown.output and "for a canary rollout of v3 until" \
            in shown.output
        assert registry_state(tiny, "tiny") == before
    assert runner.invoke(app, ["show", "tiny"]).output.splitlines()[-1] == "lease: free"
    assert not registry.model_exists(tiny, LEASE)
    result = runner.invoke(app, ["rollback", "tiny", "--reason", "error rate up", "--actor", "bob"])
    assert result.exit_code == 0, result.output  # free again: the same request goes through


def test_a_second_holder_on_the_same_machine_is_told_who_holds_it(tiny, settings):
    with ModelLease(tiny, "tiny", settings.home, purpose="promote", version="3", owner="me"):
        with pytest.raises(LeaseHeld, match=r"a promotion of v3 \(me\) holds the lease of 'tiny'"):
            ModelLease(tiny, "tiny", settings.home, purpose="publish").acquire()


def test_renewal_keeps_a_lease_alive_past_its_ttl(tiny, settings, elsewhere):
    with ModelLease(tiny, "tiny", settings.home, purpose="rollout", version="3", ttl_s=1.0) as lease:
        first = read_lease(tiny, "tiny")
        time.sleep(2.5)  # 2.5 ttl: without renewal it would have expired twice over
        assert lease.held
        lease.check()
        now = read_lease(tiny, "tiny")
        assert now.owner == lease.owner and now.expires > time.time() and now.renewed_at > first.renewed_at
        with pytest.raises(LeaseHeld):
            ModelLease(tiny, "tiny", elsewhere, purpose="promote").acquire()
    assert not registry.model_exists(tiny, LEASE)


def test_an_expired_lease_of_a_crashed_holder_is_taken_over(tiny, settings):
    _hand_made_lease(tiny, f"{time.time() - 5:.3f}", owner="crashed:1:dead")
    assert "expired at" in runner.invoke(app, ["show", "tiny"]).output
    with ModelLease(tiny, "tiny", settings.home, purpose="promote") as lease:
        assert read_lease(tiny, "tiny").owner == lease.owner


def test_a_live_lease_of_a_killed_holder_on_this_machine_is_taken_over_at_once(tiny, settings):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid names no process now
    _hand_made_lease(tiny, f"{time.time() + 60:.3f}", owner=f"{os.uname().nodename}:{dead.pid}:dead")
    with ModelLease(tiny, "tiny", settings.home, purpose="promote") as lease:  # no 60 s wait for the expiry
        assert read_lease(tiny, "tiny").owner == lease.owner
    alive = f"{os.uname().nodename}:{os.getpid()}:alive"  # a live holder here (or elsewhere) still holds it
    for owner in (alive, f"another-host:{dead.pid}:dead"):
        _hand_made_lease(tiny, f"{time.time() + 60:.3f}", owner=owner)
        with pytest.raises(LeaseHeld):
            ModelLease(tiny, "tiny", settings.home, purpose="promote").acquire()
        break_lease(tiny, "tiny", actor="test", reason="next case", home=settings.home, force=True)


FLAKY = """
import sys
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
from mlflow.tracking import MlflowClient
from kiln.settings import load_settings
from kiln.tasks.registry import aliases
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.lease_record import PromotionError

failures = int(sys.argv[1])
real = MlflowClient.get_registered_model


def flaky(self, name):  # the registry hiccups on the lease, as a busy SQLite or a restarting server does
    global failures
    if name.startswith("kiln-lease.") and failures > 0:
        failures -= 1
        raise MlflowException("(sqlite3.OperationalError) database is locked", error_code=TEMPORARILY_UNAVAILABLE)
    return real(self, name)


MlflowClient.get_registered_model = flaky
settings = load_settings()
client = registry.connect(settings)
try:
    aliases.promote(client, "tiny", home=settings.home, expected=registry.aliases_of(client, "tiny"))
    print("PROMOTED", flush=True)
except PromotionError as exc:
    print("REFUSED", exc, flush=True)
"""


@pytest.mark.parametrize(("failures", "said"), [
    (1, "a canary rollout of v3 (holder) holds the lease of 'tiny'"),
    (99, "could not read the lease of 'tiny' (registered model kiln-lease.tiny) after 4 tries"),
], ids=["once", "persistently"])
def test_a_transient_registry_error_in_another_process_does_not_break_a_held_lease(tiny, settings, tmp_path,
                                                                                   failures, said):
    root = Path(__file__).resolve().parents[2]
    env = os.environ | {"PYTHONPATH": str(root), "KILN_TRACKING_URI": settings.effective_tracking_uri,
                        "KILN_HOME": str(tmp_path / "other-machine")}
    with ModelLease(tiny, "tiny", settings.home, purpose="rollout", version="3", owner="holder") as lease:
        before = registry_state(tiny, "tiny")
        done = subprocess.run([sys.executable, "-c", FLAKY, str(failures)], cwd=tmp_path, env=env, text=True,
                              capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("REFUSED") and said in done.stdout, done.stdout + done.stderr
        lease.check()  # still ours, in the registry too
        assert read_lease(tiny, "tiny").owner == "holder"
        assert registry_state(tiny, "tiny") == before


@pytest.mark.parametrize("expires", ["inf", "nan", "-1", "soon", "99999999999"])
def test_a_corrupt_lease_is_refused_clearly_and_kiln_lease_break_clears_it(tiny, settings, expires):
    _hand_made_lease(tiny, expires)
    before = registry_state(tiny, "tiny")
    with pytest.raises(LeaseCorrupt, match="the lease of 'tiny' .* is corrupt: kiln.lease_expires="):
        aliases.promote(tiny, "tiny", home=settings.home, expected=registry.aliases_of(tiny, "tiny"))
    result = runner.invoke(app, ["rollback", "tiny", "--reason", "error rate up", "--actor", "bob"])
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert line.startswith("error: the lease of 'tiny' (registered model kiln-lease.tiny) is corrupt: ")
    assert "clear it with `kiln lease break tiny`" in line and "\n" not in line and "Traceback" not in line
    assert registry_state(tiny, "tiny") == before
    assert "lease: CORRUPT (" in runner.invoke(app, ["show", "tiny"]).output

    broken = runner.invoke(app, ["lease", "break", "tiny", "--reason", "hand-made junk", "--actor", "ops"])
    assert broken.exit_code == 0 and "broke the lease (CORRUPT" in broken.output, broken.output
    assert not registry.model_exists(tiny, LEASE)
    event = audit.AuditLog.under(settings.home).read("tiny")[-1]
    assert (event.event, event.actor, event.reason) == (vocab.EVENT_LEASE_BROKEN, "ops", "hand-made junk")
    again = runner.invoke(app, ["rollback", "tiny", "--reason", "error rate up", "--actor", "bob"])
    assert again.exit_code == 0, again.output
    assert runner.invoke(app, ["lease", "break", "tiny"]).output.strip() == "tiny: no lease held; nothing to break"


def test_a_holder_whose_lease_was_broken_cannot_move_aliases(tiny, settings, elsewhere):
    holder = ModelLease(tiny, "tiny", settings.home, purpose="rollout", version="3").acquire()
    try:
        live = runner.invoke(app, ["lease", "break", "tiny"])
        assert live.exit_code == 2 and "if its holder is gone, `kiln lease break tiny --force`" in live.output
        assert runner.invoke(app, ["lease", "show", "tiny"]).output.startswith("tiny: lease held by ")
        forced = runner.invoke(app, ["lease", "break", "tiny", "--force", "--reason", "worker died"])
        assert forced.exit_code == 0, forced.output
        before = registry_state(tiny, "tiny")
        with pytest.raises(LeaseLost, match="lost the lease of 'tiny' \\(it was broken\\)"):
            aliases.promote(tiny, "tiny", home=settings.home, expected=registry.aliases_of(tiny, "tiny"),
                            lease=holder)
        with pytest.raises(LeaseLost):
            aliases.withdraw(tiny, "tiny", "3", home=settings.home, lease=holder)
        assert registry_state(tiny, "tiny") == before
        with ModelLease(tiny, "tiny", elsewhere, purpose="promote"):  # someone else may act now
            pass
    finally:
        holder.release()


def test_a_holder_that_cannot_renew_in_time_knows_it_lost_the_lease(tiny, settings, monkeypatch):
    client = registry.connect(settings)  # the holder's own client, whose writes start failing

    def down(*args, **kwargs):
        raise MlflowException("connection refused", error_code=TEMPORARILY_UNAVAILABLE)

    holder = ModelLease(client, "tiny", settings.home, purpose="rollout", version="3", ttl_s=1.0).acquire()
    try:
        monkeypatch.setattr(client, "set_registered_model_tag", down)
        time.sleep(1.3)
        assert not holder.held
        before = registry_state(tiny, "tiny")
        with pytest.raises(LeaseLost, match="could not renew it in time: connection refused"):
            aliases.withdraw(client, "tiny", "3", home=settings.home, lease=holder)
        assert registry_state(tiny, "tiny") == before
    finally:
        holder.release()


class _Router:
    """A traffic router that routes nothing: the rollout below never leaves its first manual gate."""

    url = "test://router"

    def __init__(self) -> None:
        self.split, self.promoted = Split(), None

    def set_split(self, split: Split, *, ttl_s: float | None = None) -> None:
        self.split = split

    def renew(self, ttl_s: float) -> None:
        pass

    def read_split(self) -> Split:
        return self.split

    def promote(self, version: str) -> str:
        self.promoted = version
        return ""

    def roll_back(self) -> None:
        self.split = Split()

    def close(self) -> None:
        pass

    def next_window(self) -> dict:
        return {}

    def served_versions(self) -> dict:
        return {}


@pytest.mark.parametrize(("command", "after"), [
    ("abort", {"champion": "2", "previous": "1"}),
    ("promote", {"champion": "3", "previous": "2"}),
])
def test_a_rollout_holds_the_lease_throughout_and_ends_under_it(tiny, settings, keys, command, after):
    if command == "promote":
        approve(tiny, "tiny", "3", keys, "alice", "ship it if the canary passes")
    spec = RolloutSpec.model_validate({"steps": [{"weight": 50, "analysis_s": 1, "manual_gate": True}]})
    driver = RolloutDriver(settings, tiny, _Router(), spec, "tiny", actor="carol", poll_s=0.1)
    outcome: dict = {}
    worker = threading.Thread(target=lambda: outcome.update(state=driver.run()), daemon=True)
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while tiny.get_model_version("tiny", "3").tags.get(vocab.ROLLOUT_STATUS) != "paused":
            assert time.monotonic() < deadline, "the rollout never paused at its manual gate"
            time.sleep(0.1)
        held = read_lease(tiny, "tiny")
        assert (held.purpose, held.version) == ("rollout", "3")
        # (The CLI's refusal is the first test: typer's runner swaps stdout under the driver thread's logging.)
        with pytest.raises(LeaseHeld, match="a canary rollout of v3"):
            promotion.rollback(tiny, "tiny", actor="bob", reason="during the canary", home=settings.home)
        with pytest.raises(LeaseHeld, match="a canary rollout of v3"):
            aliases.promote(tiny, "tiny", home=settings.home, expected=registry.aliases_of(tiny, "tiny"))
        send_command(tiny, "tiny", command, settings=settings, key=keys.key("bob"), reason="decided by hand")
    finally:
        if "state" not in outcome and tiny.get_model_version("tiny", "3").tags.get(vocab.ROLLOUT_COMMAND) is None:
            send_command(tiny, "tiny", "abort", settings=settings, key=keys.key("bob"), reason="the test failed")
        worker.join(30)
    assert outcome["state"].status == ("aborted" if command == "abort" else "promoted")
    assert registry.aliases_of(tiny, "tiny") == after  # moved under the rollout's own lease
    assert not registry.model_exists(tiny, LEASE)


def test_a_rollout_whose_lease_is_broken_stops_with_traffic_on_the_champion(tiny, settings):
    spec = RolloutSpec.model_validate({"steps": [{"weight": 50, "analysis_s": 1, "manual_gate": True}]})
    router = _Router()
    router.split = Split(50.0, 0.0)  # as if traffic were already split
    driver = RolloutDriver(settings, tiny, router, spec, "tiny", actor="carol", poll_s=0.1)
    failure: dict = {}

    def run() -> None:
        try:
            driver.run()
        except LeaseLost as exc:
            failure["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    deadline = time.monotonic() + 30
    while tiny.get_model_version("tiny", "3").tags.get(vocab.ROLLOUT_STATUS) != "paused":
        assert time.monotonic() < deadline, "the rollout never paused at its manual gate"
        time.sleep(0.1)
    break_lease(tiny, "tiny", actor="ops", reason="worker looked dead", home=settings.home, force=True)
    worker.join(30)
    assert "lost the lease of 'tiny' (it was broken)" in str(failure["error"])
    assert router.split == Split() and tiny.get_model_version("tiny", "3").tags[vocab.ROLLOUT_STATUS] == "aborted"
    assert registry.aliases_of(tiny, "tiny") == {"previous": "1", "champion": "2", "challenger": "3"}


def test_point_moves_an_operators_alias_under_the_lease_and_never_a_decision(tiny, settings, elsewhere):
    from kiln.errors import ConfigError

    aliases.point(tiny, "tiny", vocab.BENCH, "2", home=settings.home)
    assert str(tiny.get_registered_model("tiny").aliases[vocab.BENCH]) == "2"
    for decision in (vocab.CHAMPION, vocab.CHALLENGER, vocab.PREVIOUS):
        before = registry_state(tiny, "tiny")
        with pytest.raises(ConfigError, match="moves only through promotion"):
            aliases.point(tiny, "tiny", decision, "2", home=settings.home)
        assert registry_state(tiny, "tiny") == before
    with ModelLease(tiny, "tiny", elsewhere, purpose="rollout"):  # another machine holds the model
        with pytest.raises(LeaseHeld):
            aliases.point(tiny, "tiny", vocab.BENCH, "1", home=settings.home)
    assert aliases.drop(tiny, "tiny", vocab.BENCH, home=settings.home)
    assert not aliases.drop(tiny, "tiny", vocab.BENCH, home=settings.home)
    assert vocab.BENCH not in tiny.get_registered_model("tiny").aliases
