"""Registry events: the signed MLflow webhook route and the poller, against a real SQLite registry.

Prefect is replaced by a recording starter and a fake list of paused promote runs; the integration tests
run the real ones.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid

import pytest
from mlflow.tracking import MlflowClient
from starlette.testclient import TestClient

from kiln.infra.mlflow_signature import Deliveries, sign
from kiln.infra.mlflow_webhook import create_app
from kiln.infra.paused_promotions import PausedPromotion
from kiln.infra.registry_actions import OPTIMIZE_RUN_TAG, PROMOTE_RUN_TAG, RegistryEvents
from kiln.infra.registry_poller import RegistryPoller
from kiln.infra.starter import OPTIMIZE, Started
from kiln.settings import Settings
from kiln.tasks.core import tags as vocab
from kiln.tasks.lifecycle import approvals
from kiln.tasks.lifecycle.approvals import DecisionStatement
from tests.keys import DIGEST, Keyring

SECRET = "s3cret"


class RecordingStarter:
    """Records start requests; the same idempotency key gets the same run back, as from Prefect."""

    api_url = None

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict, str | None, list[str]]] = []
        self.runs: dict[str, str] = {}
        self.fail = False

    def start_sync(self, deployment, parameters, *, idempotency_key=None, tags=None):
        if self.fail:
            raise ConnectionError("Prefect is down")
        self.calls.append((deployment, parameters, idempotency_key, tags or []))
        run_id = self.runs.setdefault(idempotency_key, f"run-{len(self.runs) + 1}")
        return Started(run_id, f"name-{run_id}", deployment)


class FakePromotions:
    def __init__(self) -> None:
        self.waiting: list[PausedPromotion] = []
        self.resumed: list[tuple[str, dict]] = []

    def paused(self, model=None):
        return [p for p in self.waiting if model is None or p.model == model]

    def resume(self, flow_run_id, answer):
        self.resumed.append((flow_run_id, answer))
        self.waiting = [p for p in self.waiting if p.flow_run_id != flow_run_id]
        return True


class Registry:
    """A SQLite MLflow registry with versions that point at a (never read) artifact folder."""

    _names = itertools.count()

    def __init__(self, root) -> None:
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        self.client = MlflowClient(self.uri)
        self.experiment = self.client.create_experiment("t", artifact_location=(root / "artifacts").as_uri())

    def model(self, prefix: str = "m") -> str:
        name = f"{prefix}{next(self._names)}"
        self.client.create_registered_model(name)
        return name

    def version(self, name: str, tags: dict | None = None, run_tags: dict | None = None) -> str:
        run = self.client.create_run(self.experiment, tags=run_tags or {})
        mv = self.client.create_model_version(name, f"{run.info.artifact_uri}/model", run.info.run_id, tags=tags)
        return str(mv.version)


@pytest.fixture(scope="module")
def reg(tmp_path_factory) -> Registry:
    return Registry(tmp_path_factory.mktemp("registry"))


@pytest.fixture
def starter() -> RecordingStarter:
    return RecordingStarter()


@pytest.fixture
def promotions() -> FakePromotions:
    return FakePromotions()


def make_settings(tmp_path, reg: Registry, watch: list[str], **kw) -> Settings:
    values = {"home": tmp_path / "kiln", "tracking_uri": reg.uri, "watch_models": watch,
              "mlflow_webhook_secret": SECRET, "webhook_max_body": 4096} | kw
    return Settings(**values)


def receiver(settings, starter, promotions, reg) -> TestClient:
    events = RegistryEvents(settings, starter, promotions=promotions, client=reg.client)
    return TestClient(create_app(settings, starter, events=events))


def deliver(http: TestClient, event: str, data: dict, *, secret: str = SECRET, timestamp: float | None = None,
            delivery_id: str | None = None, headers: dict | None = None, skew_s: float = 0.0):
    """POST like ``mlflow.webhooks.delivery``: same envelope, same signature function (MLflow's own)."""
    from mlflow.webhooks.delivery import _generate_hmac_signature

    entity, action = event.split(".")
    body = json.dumps({"entity": entity, "action": action, "timestamp": "2026-11-26T00:00:00+00:00", "data": data})
    delivery_id = delivery_id or str(uuid.uuid4())
    # ``skew_s`` is applied at send time: a timestamp computed when pytest collects goes stale in a long run.
    ts = str(int((time.time() if timestamp is None else timestamp) + skew_s))
    sent = {"Content-Type": "application/json", "X-MLflow-Delivery-Id": delivery_id, "X-MLflow-Timestamp": ts,
            "X-MLflow-Signature": _generate_hmac_signature(secret, delivery_id, ts, body)} | (headers or {})
    return http.post("/hooks/mlflow", content=body.encode(), headers={k: v for k, v in sent.items() if v is not None})


def created(name: str, version: str, tags: dict | None = None) -> dict:
    return {"name": name, "version": version, "source": "models:/m-1", "run_id": None, "tags": tags or {},
            "description": None}


# ── the webhook ──────────────────────────────────────────────────────────────────────────────────────
def test_signature_is_mlflows_own():
    from mlflow.webhooks.delivery import _generate_hmac_signature

    body = json.dumps({"data": {"name": "modèle ✓"}})
    assert sign("k", "d-1", "1700000000", body.encode()) == _generate_hmac_signature("k", "d-1", "1700000000", body)


def test_new_version_of_a_watched_model_starts_optimize_and_a_redelivery_does_not(tmp_path, reg, starter, promotions):
    name = reg.model()
    version = reg.version(name)
    http = receiver(make_settings(tmp_path, reg, [name]), starter, promotions, reg)
    first = deliver(http, "model_version.created", created(name, version), delivery_id="d-1")
    assert first.status_code == 200, first.text
    assert first.json() | {"delivery": "d-1"} == {"event": "model_version.created", "delivery": "d-1",
                                                  "status": "started", "reason": f"{OPTIMIZE} for {name}/{version}",
                                                  "flow_runs": ["run-1"]}
    assert starter.calls == [(OPTIMIZE, {"params": {"model": f"{name}/{version}"}}, f"mlflow:{name}:{version}:optimize",
                              ["kiln", "trigger:mlflow-webhook", f"model:{name}"])]
    again = deliver(http, "model_version.created", created(name, version), delivery_id="d-1")
    assert again.json() == {"status": "duplicate", "delivery": "d-1"}
    assert len(starter.calls) == 1
    # A new delivery of the same event (MLflow re-sent it) reaches Prefect with the same key: still one run.
    assert deliver(http, "model_version.created", created(name, version)).json()["flow_runs"] == ["run-1"]


@pytest.mark.parametrize("change, status, says", [
    ({"secret": "wrong"}, 401, "does not match"),
    ({"skew_s": -301}, 401, "s old"),
    ({"skew_s": 400}, 401, "in the future"),
    ({"headers": {"X-MLflow-Signature": None}}, 400, "missing header(s) X-MLflow-Signature"),
    ({"headers": {"X-MLflow-Delivery-Id": None, "X-MLflow-Timestamp": None}}, 400, "X-MLflow-Delivery-Id"),
    ({"headers": {"X-MLflow-Timestamp": "yesterday"}}, 401, "does not match"),  # signed over the real one
])
def test_refuses_unsigned_forged_stale_and_future_deliveries(tmp_path, reg, starter, promotions, change, status, says):
    http = receiver(make_settings(tmp_path, reg, ["m"]), starter, promotions, reg)
    response = deliver(http, "model_version.created", created("m", "1"), **change)
    assert response.status_code == status
    assert says in response.json()["error"]
    assert starter.calls == []


def test_bodies_over_the_limit_are_refused_before_they_are_read(tmp_path, reg, starter, promotions):
    http = receiver(make_settings(tmp_path, reg, ["m"]), starter, promotions, reg)
    big = created("m", "1", tags={"pad": "x" * 5000})
    assert deliver(http, "model_version.created", big).status_code == 413
    # No Content-Length (chunked): the stream is cut at the limit, not read to the end.
    chunks = (b"x" * 1024 for _ in range(100))
    response = http.post("/hooks/mlflow", content=chunks, headers={"X-MLflow-Delivery-Id": "d"})
    assert response.status_code == 413 and "KILN_WEBHOOK_MAX_BODY" in response.json()["error"]
    assert starter.calls == []


def test_without_a_secret_the_route_says_how_to_turn_it_on(tmp_path, reg, starter, promotions):
    http = receiver(make_settings(tmp_path, reg, ["m"], mlflow_webhook_secret=None), starter, promotions, reg)
    response = deliver(http, "model_version.created", created("m", "1"))
    assert response.status_code == 503 and "KILN_MLFLOW_WEBHOOK_SECRET" in response.json()["error"]


def test_signed_garbage_is_a_400(tmp_path, reg, starter, promotions):
    http = receiver(make_settings(tmp_path, reg, ["m"]), starter, promotions, reg)
    body, ts = b"not json", str(int(time.time()))
    response = http.post("/hooks/mlflow", content=body, headers={
        "X-MLflow-Delivery-Id": "g", "X-MLflow-Timestamp": ts, "X-MLflow-Signature": sign(SECRET, "g", ts, body)})
    assert response.status_code == 400 and "not an MLflow webhook event" in response.json()["error"]


def test_ignores_other_models_other_events_and_versions_kiln_registered(tmp_path, reg, starter, promotions):
    name = reg.model()
    plain, tagged = reg.version(name), reg.version(name, tags={"kiln.candidate_key": "abc"})
    from_optimize = reg.version(name, run_tags={OPTIMIZE_RUN_TAG: f"{name}@champion"})
    http = receiver(make_settings(tmp_path, reg, [name]), starter, promotions, reg)

    def reason(event, data):
        response = deliver(http, event, data)
        assert response.status_code == 200 and response.json()["status"] == "ignored", response.text
        return response.json()["reason"]

    assert "not watched" in reason("model_version.created", created("other", "1"))
    assert "does not act on model_version_alias.created" in reason(
        "model_version_alias.created", {"name": name, "alias": "champion", "version": plain})
    # The candidate tag in the event, on the version only (set just after creation), or on its optimize run.
    assert "registered by Kiln" in reason("model_version.created", created(name, plain, {"kiln.candidate_key": "k"}))
    assert "registered by Kiln" in reason("model_version.created", created(name, tagged))
    assert "registered by Kiln" in reason("model_version.created", created(name, from_optimize))
    assert "is not an approval" in reason("model_version_tag.set",
                                          {"name": name, "version": plain, "key": "kiln.gate", "value": "passed"})
    assert starter.calls == []


def test_when_prefect_is_down_mlflow_is_told_to_retry_and_the_retry_goes_through(tmp_path, reg, starter, promotions):
    name = reg.model()
    version = reg.version(name)
    http = receiver(make_settings(tmp_path, reg, [name]), starter, promotions, reg)
    starter.fail = True
    failed = deliver(http, "model_version.created", created(name, version), delivery_id="r-1")
    assert failed.status_code == 503 and "Prefect is down" in failed.json()["error"]
    starter.fail = False  # MLflow's retry re-sends the same delivery id: it must not count as a duplicate
    retried = deliver(http, "model_version.created", created(name, version), delivery_id="r-1")
    assert retried.json()["status"] == "started"


def test_deliveries_remember_successes_and_let_failures_be_retried():
    seen = Deliveries()
    assert seen.claim("a") == "new" and seen.claim("a") == "busy"
    seen.finish("a", ok=False)
    assert seen.claim("a") == "new"
    seen.finish("a", ok=True)
    assert seen.claim("a") == "done"
    forgetful = Deliveries(ttl_s=-1)  # past the replay window, the timestamp check refuses a replay instead
    forgetful.claim("b")
    forgetful.finish("b", ok=True)
    assert forgetful.claim("b") == "new"


def decide(reg: Registry, name: str, version: str, **tags) -> None:
    """Tags written by hand, as anyone with access to the MLflow UI or API can."""
    for key, value in tags.items():
        reg.client.set_model_version_tag(name, version, key, value)


def signed_decision(reg: Registry, name: str, version: str, keys: Keyring, who: str, decision: str = "approved",
                    reason: str = "ok", *, key_of: str | None = None, slot_of: str | None = None) -> str:
    """A decision signed with ``key_of``'s key (default: ``who``'s), written in the order `kiln approve` writes it
    (kiln.approval last), in ``slot_of``'s slot (default: the signer's); returns its token."""
    statement = DecisionStatement(model=name, version=version, digest=DIGEST, decision=decision, reason=reason,
                                  at="2026-11-30T12:00:00.000+00:00", nomination="n" * 32, signer=who)
    signed = approvals.sign(statement, keys.key(key_of or who))
    decide(reg, name, version, **{"kiln.approver": who, "kiln.approval_reason": reason})
    decide(reg, name, version, **{vocab.decision_tag(slot_of or who): signed.tag(), "kiln.approval": decision})
    return signed.token()


def test_a_signed_decision_resumes_the_paused_promote_run_linked_to_that_version(tmp_path, reg, starter,
                                                                                 promotions):
    name = reg.model()
    v1, v2 = reg.version(name), reg.version(name)
    decide(reg, name, v2, **{PROMOTE_RUN_TAG: "fr-2"})
    promotions.waiting = [PausedPromotion("fr-2", name), PausedPromotion("fr-other", reg.model())]
    settings = make_settings(tmp_path, reg, [])
    keys = Keyring(tmp_path / "keys", settings.signers_file())
    http = receiver(settings, starter, promotions, reg)

    def tag_set(version, key):
        return deliver(http, "model_version_tag.set", {"name": name, "version": version, "key": key, "value": "x"})

    decide(reg, name, v2, **{"kiln.approval": "approved"})  # approver and reason not set yet
    assert "no decision yet" in tag_set(v2, "kiln.approval").json()["reason"]
    # Plain tags naming an approver, as typed into the MLflow UI: no signed statement, no decision.
    decide(reg, name, v2, **{"kiln.approver": "alice", "kiln.approval_reason": "looks good"})
    assert "no decision yet" in tag_set(v2, "kiln.approval_reason").json()["reason"]
    # "alice" signed with mallory's key, and alice's real decision on v1 copied onto v2: neither resumes it.
    signed_decision(reg, name, v2, keys, "alice", key_of="mallory")
    assert "decision not verified on" in tag_set(v2, "kiln.approval").json()["reason"]
    signed_decision(reg, name, v1, keys, "alice")
    copied = reg.client.get_model_version(name, v1).tags[vocab.decision_tag("alice")]
    decide(reg, name, v2, **{vocab.decision_tag("alice"): copied})
    assert f"signed for {name} v{v1}" in tag_set(v2, "kiln.approval").json()["reason"]
    assert "no paused promote run waits on" in tag_set(v1, "kiln.approval").json()["reason"]
    assert promotions.resumed == []
    token = signed_decision(reg, name, v2, keys, "alice", reason="looks good")
    response = tag_set(v2, "kiln.approval")
    assert response.json()["status"] == "resumed" and response.json()["flow_runs"] == ["fr-2"]
    assert promotions.resumed == [("fr-2", {"token": token})]  # the flow verifies it again, every rule
    assert tag_set(v2, "kiln.approval_at").json()["status"] == "ignored"  # resumed already


def test_without_a_link_only_the_current_challenger_resumes_and_a_rejection_is_passed_on(tmp_path, reg, starter,
                                                                                         promotions):
    name = reg.model()
    v1, v2 = reg.version(name), reg.version(name)
    reg.client.set_registered_model_alias(name, "challenger", v2)
    promotions.waiting = [PausedPromotion("fr", name)]
    settings = make_settings(tmp_path, reg, [])
    keys = Keyring(tmp_path / "keys", settings.signers_file())
    events = RegistryEvents(settings, starter, promotions=promotions, client=reg.client)
    signed_decision(reg, name, v1, keys, "bob", "rejected", "old")
    assert events.resume_decided(name, v1).status == "ignored"
    token = signed_decision(reg, name, v2, keys, "bob", "rejected", "slow")
    assert events.resume_decided(name, v2).flow_runs == ["fr"]
    assert promotions.resumed == [("fr", {"token": token})]


# ── the poller ───────────────────────────────────────────────────────────────────────────────────────
def test_poller_records_history_then_starts_each_new_version_once_across_restarts(tmp_path, reg, starter,
                                                                                   promotions):
    name, later = reg.model(), "not-yet-created"
    old = reg.version(name)
    settings = make_settings(tmp_path, reg, [name, later])

    def poller():
        return RegistryPoller(settings, starter,
                              events=RegistryEvents(settings, starter, promotions=promotions, client=reg.client))

    first = poller().poll_once()
    assert (first.started, first.errors) == ([], [])  # what existed at the first look is history
    assert json.loads((settings.home / "events" / "registry-poller.json").read_text()) == {
        "seen": {name: [old], later: []}}
    new = [reg.version(name), reg.version(name), reg.version(name, tags={"kiln.candidate_key": "c"})]
    report = poller().poll_once()
    assert report.started == [f"{name}/{new[0]}", f"{name}/{new[1]}"] and report.ignored == [f"{name}/{new[2]}"]
    assert [c[2] for c in starter.calls] == [f"mlflow:{name}:{v}:optimize" for v in new[:2]]
    assert all(c[3][1] == "trigger:mlflow-poller" for c in starter.calls)
    assert poller().poll_once().started == []  # a restart remembers
    reg.client.create_registered_model(later)
    first_of_later = reg.version(later)
    assert poller().poll_once().started == [f"{later}/{first_of_later}"]  # watched before it existed
    assert len(starter.calls) == 3


def test_poller_retries_a_version_it_could_not_start(tmp_path, reg, starter, promotions):
    name = reg.model()
    settings = make_settings(tmp_path, reg, [name])
    poller = RegistryPoller(settings, starter,
                            events=RegistryEvents(settings, starter, promotions=promotions, client=reg.client))
    poller.poll_once()
    version = reg.version(name)
    starter.fail = True
    report = poller.poll_once()
    assert report.started == [] and "Prefect is down" in report.errors[0]
    starter.fail = False
    assert poller.poll_once().started == [f"{name}/{version}"]


def test_poller_resumes_paused_promotions_whose_version_is_decided(tmp_path, reg, starter, promotions):
    name = reg.model()
    version = reg.version(name)
    decide(reg, name, version, **{PROMOTE_RUN_TAG: "fr-9"})
    promotions.waiting = [PausedPromotion("fr-9", name)]
    settings = make_settings(tmp_path, reg, [])
    keys = Keyring(tmp_path / "keys", settings.signers_file())
    poller = RegistryPoller(settings, starter,
                            events=RegistryEvents(settings, starter, promotions=promotions, client=reg.client))
    assert poller.poll_once().resumed == []
    decide(reg, name, version, **{"kiln.approval": "approved", "kiln.approver": "a", "kiln.approval_reason": "r"})
    assert poller.poll_once().resumed == []  # tags alone decide nothing
    signed_decision(reg, name, version, keys, "alice")
    assert poller.poll_once().resumed == ["fr-9"]
    assert poller.poll_once().resumed == []
