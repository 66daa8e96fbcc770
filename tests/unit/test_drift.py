"""Drift checks of a canary interval, and the gateway recording the input lengths they judge."""

from __future__ import annotations

import time
from collections import Counter

import httpx
import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from kiln.errors import DataError
from kiln.infra.background import serving
from kiln.infra.gateway import create_app
from kiln.infra.gateway_proxy import Gateway, Upstream
from kiln.infra.server import create_app as server_app
from kiln.tasks.rollout.drift import (
    DriftChecks,
    DriftReference,
    InputLengths,
    drift_checks,
    load_reference,
    observed_from_state,
    reference_profile,
)
from tests.fakes import FastFake

WORDS = ["good", "bad", "day", "traffic", "awful", "great", "the", "a", "is", "very", "lovely", "late"]
CLASSES, SHARES = ["negative", "neutral", "positive"], [0.3, 0.3, 0.4]


def _texts(n: int, seed: int, scale: int = 1) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(3, 25)) * scale)) for _ in range(n)]


def _labels(n: int, seed: int) -> Counter:
    return Counter(np.random.default_rng(seed).choice(CLASSES, n, p=SHARES).tolist())


def _lengths(texts: list[str]) -> InputLengths:
    return InputLengths([len(t) for t in texts], [len(t.split()) for t in texts])


@pytest.fixture(scope="module")
def reference() -> DriftReference:
    texts = _texts(2000, seed=0)
    labels = np.random.default_rng(1).choice(CLASSES, len(texts), p=SHARES)
    return reference_profile(texts, labels)


def _by_name(checks):
    return {c.name: c for c in checks}


def test_same_distribution_passes(reference):
    checks = _by_name(drift_checks(DriftChecks(), reference, _lengths(_texts(400, seed=2)), _labels(400, 3),
                                   _labels(400, 4)))
    assert set(checks) == {"input_drift", "class_drift"}
    assert all(c.status == "ok" for c in checks.values()), checks
    assert "400 rows" in checks["input_drift"].reason and "champion's 400 predictions" in checks["class_drift"].reason


def test_ten_times_longer_inputs_fail_with_the_kl_in_the_reason(reference):
    check = _by_name(drift_checks(DriftChecks(), reference, _lengths(_texts(400, seed=2, scale=10)),
                                  _labels(400, 3)))["input_drift"]
    assert check.status == "failed"
    kl = float(check.reason.split("KL of input lengths ")[1].split(" ")[0])
    assert kl > 0.2 and "> 0.2 over 400 rows" in check.reason and "FAILED" in check.reason


@pytest.mark.parametrize("champion", [Counter({"negative": 150, "neutral": 140, "positive": 210}), None],
                         ids=["vs-champion", "vs-reference-labels"])
def test_predictions_collapsed_to_one_class_fail(reference, champion):
    check = _by_name(drift_checks(DriftChecks(), reference, _lengths(_texts(400, seed=2)), Counter(positive=400),
                                  champion))["class_drift"]
    assert check.status == "failed" and "positive 100%" in check.reason
    assert ("champion's 500" if champion else "reference's 2000 labels") in check.reason


def test_too_few_rows_is_inconclusive_never_ok(reference):
    checks = drift_checks(DriftChecks(min_rows=50), reference, _lengths(_texts(49, seed=2)), _labels(49, 3),
                          _labels(400, 4))
    assert [c.status for c in checks] == ["inconclusive", "inconclusive"]
    assert all("min_rows 50" in c.reason for c in checks)


def test_missing_comparisons_are_not_judged_and_switched_off_checks_are_left_out():
    unlabelled = reference_profile(_texts(300, seed=0))
    checks = _by_name(drift_checks(DriftChecks(), None, _lengths(_texts(100, seed=2)), Counter(positive=100), None))
    assert checks["input_drift"].status == "ok" and "not judged" in checks["input_drift"].reason
    assert checks["class_drift"].status == "ok" and "not judged" in checks["class_drift"].reason
    few = _by_name(drift_checks(DriftChecks(), unlabelled, _lengths(_texts(100, seed=2)), Counter(positive=100),
                                Counter(positive=5)))["class_drift"]
    assert few.status == "inconclusive"
    only_classes = drift_checks(DriftChecks(max_input_kl=None), unlabelled, _lengths([]), _labels(100, 3),
                                _labels(100, 4))
    assert [c.name for c in only_classes] == ["class_drift"]
    assert drift_checks(DriftChecks(max_input_kl=None, max_class_kl=None), None, _lengths([]), Counter()) == []


def test_reference_survives_json_and_loads_from_an_eval_file(tmp_path, reference):
    assert DriftReference.model_validate_json(reference.model_dump_json()) == reference
    assert len(reference.inputs["chars"].weights) == len(reference.inputs["chars"].edges) + 1
    assert reference.classes.keys() == set(CLASSES) and reference.labelled_rows == 2000
    path = tmp_path / "eval.csv"
    pd.DataFrame({"text": _texts(200, seed=5), "label": ["positive"] * 200}).to_csv(path, index=False)
    loaded = load_reference(path)
    assert loaded.rows == len(set(_texts(200, seed=5))) and loaded.classes == {"positive": 1.0}
    pd.DataFrame({"sentence": ["hi"]}).to_csv(path, index=False)
    with pytest.raises(DataError, match="text"):
        load_reference(path)


@pytest.mark.parametrize(("kwargs", "field"), [({"max_input_kl": -1}, "max_input_kl"), ({"min_rows": 0}, "min_rows"),
                                               ({"reference": "eval.txt"}, "reference"),
                                               ({"max_class_kl": "high"}, "max_class_kl"),
                                               ({"max_kl": 0.1}, "max_kl")])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValidationError) as info:
        DriftChecks(**kwargs)
    assert field in str(info.value)


def test_observed_from_state_merges_live_and_mirrored_challenger_traffic():
    state = {"window": {"champion": {"labels": {"negative": 7}, "input_chars": [1], "input_words": [1]},
                        "challenger": {"labels": {"positive": 2}, "input_chars": [10, 20], "input_words": [2, 4]},
                        "shadow": {"labels": {"positive": 1, "negative": 3}, "input_chars": [30],
                                   "input_words": [6]}}}
    inputs, challenger, champion = observed_from_state(state)
    assert inputs == InputLengths([10, 20, 30], [2, 4, 6])
    assert challenger == Counter(positive=3, negative=3) and champion == Counter(negative=7)
    assert observed_from_state({"window": {}})[2] is None


# ---- the gateway records what it sees ---------------------------------------------------------------------------


def _wait_for(client: httpx.Client, done, timeout_s: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while not done(window := client.get("/admin/state", params={"samples": 1},
                                        headers={"Authorization": "Bearer t"}).json()["window"]):
        assert time.monotonic() < deadline, window
        time.sleep(0.02)
    return window


def test_gateway_records_input_lengths_and_skips_malformed_bodies():
    texts = ["great day", "an awful lot of traffic today", ""]
    body = {"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": texts}]}
    with serving(server_app({"tiny": FastFake("negative")})) as champion, \
            serving(server_app({"tiny": FastFake("positive")})) as challenger:
        gateway = Gateway(Upstream(champion.url), Upstream(challenger.url), "t")
        with serving(create_app(gateway)) as server, httpx.Client(base_url=server.url) as c:
            assert c.post("/v2/models/tiny/infer", json=body).status_code == 200
            for bad in (b"{not json", b'{"inputs": [{"name": "text"}]}', b"\xff\xfe"):
                assert c.post("/v2/models/tiny/infer", content=bad).status_code == 400
            assert c.post("/v2/models/tiny/infer", content=b"[" * 100_000).status_code == 400  # nesting bomb
            assert c.get("/v2/models/tiny").status_code == 200  # not an infer request: nothing to record
            window = _wait_for(c, lambda w: w["champion"]["input_rows"] >= 3)
            assert window["champion"]["input_chars"] == [9, 29, 0]
            assert window["champion"]["input_words"] == [2, 6, 0]
            # only inference is canary evidence: the 4 refused bodies are 4xx (not requests), the GET not counted
            assert window["champion"]["requests"] == 1 and window["champion"]["refused"] == 4
            assert window["challenger"]["input_rows"] == 0

            gateway.set_routing(shadow=1.0)  # mirrored inputs are seen by the challenger too, with its labels
            assert c.post("/v2/models/tiny/infer", json=body).status_code == 200
            window = _wait_for(c, lambda w: w["shadow"]["labels"].get("positive") == 3)
            assert window["shadow"]["input_chars"] == [9, 29, 0]
            assert window["champion"]["input_chars"] == [9, 29, 0] * 2
    inputs, labels, champion_labels = observed_from_state({"window": window})
    assert len(inputs) == 3 and labels == Counter(positive=3) and champion_labels == Counter(negative=6)
