"""The monitor's reference: issue 19's acceptance (another domain at equal lengths is caught by content AND
embedding drift, the champion's own test split is not), cached per model version; and the live texts it is
compared with, as the gateway keeps them (bounded, admin-only)."""

from __future__ import annotations

import time

import httpx
import pytest

from kiln.infra.background import serving
from kiln.infra.gateway import create_app, parse_args
from kiln.infra.gateway_proxy import Gateway, Upstream
from kiln.infra.gateway_stats import TrafficWindow, Window
from kiln.infra.server import create_app as server_app
from kiln.tasks.core.cache import StageCache
from kiln.tasks.data.planted import another_domain
from kiln.tasks.evaluate.embedding_drift import EmbeddingDriftConfig, open_embedder
from kiln.tasks.evaluate.monitor_reference import (
    MonitorReference,
    build_reference,
    load_or_build_reference,
    monitor_content_checks,
    recorded_split,
    texts_digest,
)
from tests.fakes import FastFake


@pytest.fixture(scope="module")
def model(tiny_models):
    return tiny_models["bert"]


@pytest.fixture(scope="module")
def embedder(model):
    return open_embedder(model)


@pytest.fixture(scope="module")
def tokenizer(model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model))


@pytest.fixture(scope="module")
def reference(model, embedder, tiny_spec) -> MonitorReference:
    texts, labels = recorded_split(tiny_spec.model_dump_json(), "train")  # as a version's kiln.dataset tag reads
    return build_reference(model, texts, labels, embedder=embedder)


def statuses(checks) -> dict[str, str]:
    return {c.name: c.status for c in checks}


def test_other_domain_at_equal_lengths_is_caught_by_content_and_embedding_the_test_split_is_not(
        reference, embedder, tokenizer, tiny_spec):
    test_split, _ = recorded_split(tiny_spec.model_dump(), "test")
    validation, _ = recorded_split(tiny_spec.model_dump(), "validation")
    held_out = validation + test_split  # 80 texts: the content checks' min_tokens needs more than the 40 of test
    cfg = EmbeddingDriftConfig(min_rows=40)

    healthy = monitor_content_checks(reference, held_out, tokenizer=tokenizer, embedder=embedder, embedding=cfg)
    assert statuses(healthy) == {"token_psi": "ok", "token_kl": "ok", "oov_share": "ok", "embedding_drift": "ok"}
    alone = monitor_content_checks(reference, test_split, tokenizer=tokenizer, embedder=embedder, embedding=cfg)
    assert statuses(alone)["embedding_drift"] == "ok"  # the champion's own test split, on its own

    shifted = another_domain(held_out)
    drifted = monitor_content_checks(reference, shifted, tokenizer=tokenizer, embedder=embedder, embedding=cfg)
    assert statuses(drifted) == {"token_psi": "failed", "token_kl": "failed", "oov_share": "ok",
                                 "embedding_drift": "failed"}, drifted


def test_reference_holds_statistics_not_texts(reference, tiny_splits):
    train = tiny_splits.train
    assert reference.rows == len(train) == reference.embedding.rows  # 320 <= max_rows: every text embedded
    assert reference.texts_digest == texts_digest(train["text"].tolist())
    assert reference.chars == [len(t) for t in train["text"]] and len(reference.words) == len(train)
    assert set(reference.classes) == set(tiny_splits.labels) and reference.labelled_rows == len(train)
    assert sum(reference.classes.values()) == pytest.approx(1)


def test_cached_per_model_version(model, embedder, tiny_splits, tmp_path):
    texts = tiny_splits.train["text"].tolist()[:150]
    calls = []

    class Counting:
        kind = embedder.kind

        def embed(self, batch, batch_size=64):
            calls.append(len(batch))
            return embedder.embed(batch, batch_size)

    cache = StageCache(tmp_path / "cache")
    cfg = EmbeddingDriftConfig(max_rows=100, bootstrap=20)  # a seeded sample of the split is embedded
    first = load_or_build_reference(cache, model, texts, model="sentiment", version="3", embedding=cfg,
                                    embedder=Counting())
    again = load_or_build_reference(cache, model, texts, model="sentiment", version="3", embedding=cfg,
                                    embedder=Counting())
    assert calls == [100]  # the second monitor run read the NPZ/JSON back
    assert again.texts_digest == first.texts_digest and again.content == first.content
    assert (again.embedding.mean == first.embedding.mean).all() and again.chars == first.chars
    load_or_build_reference(cache, model, texts, model="sentiment", version="4", embedding=cfg, embedder=Counting())
    assert calls == [100, 100]  # a new version is a new reference


# ---- the live sample: the gateway keeps the most recent texts, admin-only --------------------------------------


def test_traffic_window_keeps_a_bounded_sample_of_recent_texts_only_with_samples():
    window = TrafficWindow(max_samples=10, text_sample=3)
    window.record_inputs(["a b", "c", "d e f", "g"])
    assert window.to_dict(samples=True)["input_texts"] == ["c", "d e f", "g"]  # the most recent three
    assert "input_texts" not in window.to_dict(samples=False)
    assert window.to_dict(samples=True)["input_chars"] == [3, 1, 5, 1]  # lengths keep their own, larger bound
    none = TrafficWindow(max_samples=10)  # a window built without the setting keeps no texts
    none.record_inputs(["x"])
    assert none.to_dict(samples=True)["input_texts"] == []
    assert Window(text_sample=0).live["champion"].text_sample == 0
    assert parse_args(["--champion", "http://a", "--challenger", "http://b", "--text-sample", "5"]).text_sample == 5


def test_gateway_serves_live_texts_only_to_the_admin_and_a_reset_window_keeps_the_size():
    texts = ["great day", "an awful lot of traffic today", "ok"]
    body = {"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": texts}]}
    with serving(server_app({"tiny": FastFake("negative")})) as champion, \
            serving(server_app({"tiny": FastFake("positive")})) as challenger:
        gateway = Gateway(Upstream(champion.url), Upstream(challenger.url), "t", text_sample=2)
        with serving(create_app(gateway)) as server, httpx.Client(base_url=server.url) as c:
            assert c.post("/v2/models/tiny/infer", json=body).status_code == 200
            admin = {"Authorization": "Bearer t"}
            assert c.get("/admin/state", params={"samples": 1}).status_code == 401
            for _ in range(500):
                window = c.get("/admin/state", params={"samples": 1}, headers=admin).json()["window"]
                if window["champion"]["input_rows"] >= 3:
                    break
                time.sleep(0.01)
            assert window["champion"]["input_texts"] == texts[1:]
            assert "input_texts" not in c.get("/admin/state", headers=admin).json()["window"]["champion"]
    assert gateway.reset_window()["champion"]["input_texts"] == texts[1:]
    assert gateway.window.text_sample == 2 and gateway.state(True)["window"]["champion"]["input_texts"] == []
