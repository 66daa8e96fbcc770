"""The monitor's verdict on hand-built windows: healthy traffic is healthy, each kind of breach is caught and sets
off the policy's actions, and too little evidence is inconclusive, never healthy. Also the two sources' shapes:
the gateway's ``/admin/state`` JSON and Prometheus (a stand-in for ``/api/v1/query``)."""

from __future__ import annotations

import json
import random
from collections import Counter

import httpx
import pytest

from kiln.tasks.monitor.evaluate import evaluate, wilson_interval
from kiln.tasks.monitor.policy import parse_policy
from kiln.tasks.monitor.snapshot import LiveSnapshot, snapshot_from_gateway, snapshot_from_prometheus
from kiln.tasks.rollout.drift import reference_profile
from kiln.tasks.rollout.prometheus import KILN, PrometheusWindows
from kiln.tasks.rollout.stats import Check

WORDS = "the movie was good bad great awful fine dull lovely plot actors ending music long short".split()


def _texts(n: int, seed: int, scale: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24) * scale)) for _ in range(n)]


@pytest.fixture(scope="module")
def reference():
    texts = _texts(400, seed=0)
    return reference_profile(texts, ["positive" if i % 2 else "negative" for i in range(len(texts))])


def _snapshot(requests: int = 400, **changes) -> LiveSnapshot:
    texts = changes.pop("texts", None) or _texts(requests, seed=1)
    base = LiveSnapshot(version="3", seconds=60.0, requests=requests, errors=0,
                        latency_ms=[20.0 + (i % 10) for i in range(requests)],
                        labels=Counter(positive=requests // 2, negative=requests - requests // 2),
                        feedback=100, correct=90, input_chars=[len(t) for t in texts],
                        input_words=[len(t.split()) for t in texts], texts=texts)
    for key, value in changes.items():
        setattr(base, key, value)
    return base


POLICY = {
    "min_requests": 100,
    "slo": {"max_error_rate": 0.01, "max_p95_ms": 200},
    "input_drift": {"max_kl": 0.2, "min_rows": 50},
    "content_drift": {},
    "embedding_drift": {},
    "prediction_drift": {"max_kl": 0.2, "max_psi": 0.2, "min_rows": 50},
    "quality": {"min_accuracy": 0.8, "min_feedback": 30},
    "actions": {"slo": ["notify", "rollback"], "quality": ["retrain", "notify"], "input_drift": ["notify"],
                "content_drift": ["notify", "retrain"], "embedding_drift": ["retrain"],
                "prediction_drift": ["notify"]},
}
OK_EXTRA = [("content_drift", Check("token_psi", "ok", "token_psi: 0.03 <= 0.2: ok")),
            ("embedding_drift", Check("embedding_drift", "ok", "embedding_drift: T2 1.2 <= 9.8: ok"))]


def _verdict(snapshot: LiveSnapshot, reference, extra=OK_EXTRA, **policy):
    return evaluate(parse_policy(POLICY | policy), snapshot, reference, extra_checks=extra)


def test_healthy_traffic_is_healthy_with_every_check_spelled_out(reference):
    verdict = _verdict(_snapshot(), reference)
    assert verdict.status == "healthy", verdict.reasons
    assert verdict.breaches == [] and verdict.actions == [] and verdict.reasons == []
    names = [c.name for c in verdict.checks]
    assert names == ["min_requests", "error_rate", "latency_p95", "input_drift", "token_psi", "embedding_drift",
                     "prediction_drift", "prediction_psi", "accuracy"]
    assert verdict.metrics["requests"] == 400 and verdict.metrics["accuracy"] == 0.9
    assert verdict.metrics["error_rate"] == 0 and 20 <= verdict.metrics["p95_ms"] <= 30
    assert "prediction_psi" in verdict.metrics and verdict.metrics["checks_failed"] == 0
    data = json.loads(json.dumps(verdict.to_dict()))
    assert data["status"] == "healthy"
    assert {c["name"]: c["kind"] for c in data["checks"]}["token_psi"] == "content_drift"


@pytest.mark.parametrize(("change", "kind", "check", "actions"), [
    ({"errors": 40}, "slo", "error_rate", ["notify", "rollback"]),
    ({"latency_ms": [450.0] * 400}, "slo", "latency_p95", ["notify", "rollback"]),
    ({"texts": _texts(400, seed=2, scale=4)}, "input_drift", "input_drift", ["notify"]),
    ({"labels": Counter(positive=390, negative=10)}, "prediction_drift", "prediction_drift", ["notify"]),
    ({"correct": 50}, "quality", "accuracy", ["notify", "retrain"]),
], ids=["errors", "latency", "longer-inputs", "one-class", "accuracy-drop"])
def test_each_breach_kind_is_caught_and_sets_off_its_actions(reference, change, kind, check, actions):
    verdict = _verdict(_snapshot(**change), reference)
    assert verdict.status == "breach"
    assert verdict.breaches == [kind] and verdict.actions == actions
    failed = [c for c in verdict.checks if c.status == "failed"]
    assert failed[0].name == check and "FAILED" in failed[0].reason
    assert verdict.kinds[check] == kind and verdict.metrics["checks_failed"] == len(failed)


@pytest.mark.parametrize("kind", ["content_drift", "embedding_drift"])
def test_a_check_the_flow_computed_breaches_its_kind(reference, kind):
    extra = [(k, Check(c.name, "failed" if k == kind else "ok", f"{c.name}: FAILED")) for k, c in OK_EXTRA]
    verdict = _verdict(_snapshot(), reference, extra)
    assert verdict.status == "breach" and verdict.breaches == [kind]
    assert verdict.actions == (["notify", "retrain"] if kind == "content_drift" else ["retrain"])


def test_several_breaches_act_once_each_in_order(reference):
    verdict = _verdict(_snapshot(errors=40, correct=40), reference)
    assert verdict.breaches == ["slo", "quality"]
    assert verdict.actions == ["notify", "rollback", "retrain"]


def test_too_few_requests_is_inconclusive_never_healthy(reference):
    verdict = _verdict(_snapshot(requests=60), reference)
    assert verdict.status == "inconclusive"
    assert verdict.checks[0].status == "inconclusive" and "fewer than 100" in verdict.checks[0].reason
    assert {c.name: c.status for c in verdict.checks}["error_rate"] == "inconclusive"  # SLOs need min_requests
    empty = _verdict(LiveSnapshot(version=None, seconds=0.0), None, extra=())
    assert empty.status == "inconclusive" and empty.actions == []
    # ...but errors on a quiet model are no breach either: 5 of 10 failing waits for min_requests
    assert _verdict(_snapshot(requests=10, errors=5), reference).status == "inconclusive"


@pytest.mark.parametrize(("change", "extra", "reference_given", "why"), [
    ({"feedback": 10, "correct": 10}, OK_EXTRA, True, "fewer than min_feedback 30"),
    ({"input_chars": [], "input_words": []}, OK_EXTRA, True, "fewer than min_rows 50"),
    ({}, OK_EXTRA[:1], True, "embedding_drift: enabled in the policy but not computed"),
    ({}, OK_EXTRA, False, "no reference texts to compare with"),
    ({"latency_ms": [], "latency_p95_ms": None}, OK_EXTRA, True, "no latency samples or p95"),
], ids=["little-feedback", "no-input-rows", "embedding-not-computed", "no-reference", "no-latency"])
def test_a_check_without_enough_evidence_keeps_the_window_inconclusive(reference, change, extra, reference_given,
                                                                       why):
    verdict = _verdict(_snapshot(**change), reference if reference_given else None, extra)
    assert verdict.status == "inconclusive" and verdict.actions == []
    assert any(why in r for r in verdict.reasons), verdict.reasons


def test_counts_are_judged_with_an_interval_so_noise_sets_nothing_off(reference):
    # 2 errors in 400 (0.5 %) against a 1 % objective, 26/30 right against an 80 % minimum: within the noise
    verdict = _verdict(_snapshot(errors=2, feedback=30, correct=22), reference)
    assert verdict.status == "healthy", verdict.reasons
    low, high = wilson_interval(22, 30, 0.05)
    assert low < 22 / 30 < high and high > 0.8
    assert _verdict(_snapshot(errors=15), reference).breaches == ["slo"]  # 3.75 %: significantly above 1 %


def test_disabled_kinds_are_not_judged_and_unknown_kinds_are_a_bug(reference):
    policy = POLICY | {"content_drift": None, "embedding_drift": None, "quality": None}
    failed = [("content_drift", Check("token_psi", "failed", "token_psi: FAILED"))]
    verdict = evaluate(parse_policy(policy), _snapshot(correct=0), reference, extra_checks=failed)
    assert verdict.status == "healthy" and "token_psi" not in [c.name for c in verdict.checks]
    with pytest.raises(ValueError, match="unknown breach kind 'latency'"):
        evaluate(parse_policy(POLICY), _snapshot(), reference, extra_checks=[("latency", Check("x", "ok", "x"))])


# ---- the sources ---------------------------------------------------------------------------------------------


def _side(requests: int, errors: int, labels: dict[str, int], **more) -> dict:
    return {"requests": requests, "errors": errors, "labels": labels, "feedback": 4, "correct": 3,
            "latency_p95_ms": 31.5, **more}


def test_the_gateway_window_becomes_a_snapshot():
    state = {"weight": 0, "upstreams": {"champion": {"url": "http://a", "version": "7"},
                                        "challenger": {"url": "http://b", "version": None}},
             "window": {"started": 0.0, "seconds": 42.5,
                        "champion": _side(10, 1, {"positive": 6, "negative": 3}, latency_ms=[10.0, 20.0],
                                          input_chars=[12, 30], input_words=[3, 6], input_texts=["a b c", "d"]),
                        "challenger": _side(5, 0, {"positive": 5}),
                        "shadow": _side(20, 2, {"negative": 20}, input_chars=[1], input_words=[1])}}
    champion = snapshot_from_gateway(state)
    assert (champion.version, champion.seconds, champion.requests, champion.errors) == ("7", 42.5, 10, 1)
    assert champion.labels == Counter(positive=6, negative=3) and champion.texts == ["a b c", "d"]
    assert champion.latency_ms == [10.0, 20.0] and champion.p95_ms == pytest.approx(19.5)
    assert len(champion.inputs) == 2 and champion.accuracy == 0.75 and champion.error_rate == 0.1
    challenger = snapshot_from_gateway(state, "challenger")  # live plus mirrored, as the rollout counts it
    assert challenger.version is None and challenger.requests == 25 and challenger.errors == 2
    assert challenger.labels == Counter(negative=20, positive=5) and challenger.texts == []
    assert challenger.p95_ms == 31.5  # no samples: the busier side's own p95
    bare = snapshot_from_gateway({"window": {"champion": {"requests": 3}}})  # no samples=1, no upstreams
    assert bare.requests == 3 and bare.version is None and bare.texts == [] and bare.p95_ms is None
    with pytest.raises(ValueError, match="role must be"):
        snapshot_from_gateway(state, "shadow")


def _vector(labels: dict[str, str], value: float) -> dict:
    return {"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": labels, "value": [1700000000.0, str(value)]}]}}


def test_prometheus_figures_become_a_snapshot_over_a_look_back():
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        query = request.url.params["query"]
        seen.append(query)
        if "by (version)" in query:
            return httpx.Response(200, json=_vector({"version": "7"}, 900))
        if 'code=~"5.."' in query:
            return httpx.Response(200, json=_vector({}, 9))
        if "histogram_quantile(0.95" in query:
            return httpx.Response(200, json=_vector({}, 42.5))  # the template multiplies by 1000
        if 'result="correct"' in query:
            return httpx.Response(200, json=_vector({}, 40))
        if "kiln_gateway_feedback_total" in query:
            return httpx.Response(200, json=_vector({}, 50))
        if "kiln_gateway_requests_total" in query:
            return httpx.Response(200, json=_vector({}, 900))
        return httpx.Response(200, json={"status": "success", "data": {"resultType": "vector", "result": []}})

    windows = PrometheusWindows("http://prometheus.test:9090", KILN, clock=lambda: 1_700_000_000.0,
                                transport=httpx.MockTransport(answer))
    snapshot = snapshot_from_prometheus(windows, "sentiment", seconds=600)
    windows.close()
    assert (snapshot.version, snapshot.requests, snapshot.errors) == ("7", 900, 9)
    assert snapshot.feedback == 50 and snapshot.correct == 40 and snapshot.seconds == 600
    assert snapshot.latency_ms == [] and snapshot.p95_ms == 42.5
    assert snapshot.labels == Counter() and snapshot.texts == [] and snapshot.source == "prometheus:sentiment"
    assert all("[600000ms]" in q for q in seen) and all('role="champion"' in q for q in seen)
    verdict = evaluate(parse_policy({"min_requests": 100}), snapshot, None)
    # counts judged; no classes or input lengths in Prometheus: drift inconclusive, never passed
    assert verdict.status == "inconclusive" and verdict.breaches == []
    assert {c.name: c.status for c in verdict.checks}["error_rate"] == "ok"
