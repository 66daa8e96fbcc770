"""Bad-input catalogue, HTTP: the model server and the gateway answer every hostile or malformed request with
the right 4xx and a one-line JSON error naming the field, and nothing changes — no file under KILN_HOME (the
gateway's routing state), no traffic weight, no canary evidence (requests, errors, latency samples, labels,
feedback, input rows) (:mod:`tests.integration.catalogue`).

One module-wide stack on loopback: two model servers (the tiny BERT package, as ``--package`` serves it, so
token ids meet a real vocabulary and ``seq_len``) and a gateway in front of them at a 50 % split, its routing
state in a file under KILN_HOME. Infer cases run twice: straight at a model server, and through the gateway.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import pytest

from kiln.infra.background import serving
from kiln.infra.gateway import create_app as gateway_app
from kiln.infra.gateway_proxy import Gateway, Upstream
from kiln.infra.runtime import ServedModel
from kiln.infra.server import create_app as server_app
from kiln.tasks.engines import EngineOptions
from kiln.tasks.models.predictor import Predictor
from tests.integration.catalogue import snapshot, unchanged

pytestmark = pytest.mark.catalogue

ADMIN, FEEDBACK = "catalogue-admin-token", "catalogue-feedback-token"
MAX_BODY = 1 << 20  # a 200,000-token row (600 kB of JSON) fits: it meets the model's own limit
INFER = "/v2/models/tiny/infer"
TEXT = {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["great day"]}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_package):
    home = tmp_path_factory.mktemp("catalogue-http") / ".kiln"
    home.mkdir()
    predictor = Predictor(tiny_package, EngineOptions(threads=1))
    apps = [server_app([ServedModel("tiny", v, predictor)], max_body_bytes=MAX_BODY, max_rows=8) for v in "12"]
    with serving(apps[0]) as champion, serving(apps[1]) as challenger:
        gateway = Gateway(Upstream(champion.url), Upstream(challenger.url), ADMIN, feedback_token=FEEDBACK,
                          max_body_bytes=MAX_BODY, state_file=home / "gateway" / "state.json", poll_s=30)
        with serving(gateway_app(gateway)) as front, httpx.Client(timeout=30) as client:
            auth = {"Authorization": f"Bearer {ADMIN}"}
            assert client.post(front.url + "/admin/weight", json={"weight": 50}, headers=auth).status_code == 200
            for _ in range(4):  # some evidence on both sides, so "unchanged" compares real numbers
                answer = client.post(front.url + INFER, json={"inputs": [TEXT]})
                assert answer.status_code == 200, answer.text
            assert all(gateway.window.live[role].requests == 2 for role in ("champion", "challenger"))
            yield SimpleNamespace(home=home, client=client, gateway=gateway, urls={
                "server": champion.url, "gateway": front.url}, vocab=len(predictor.tokenizer),
                seq_len=predictor.meta.seq_len)


def evidence(gateway: Gateway) -> dict:
    """What a canary judges and what a refused request must not move: the split, and each side's counts.
    A 4xx answered by an upstream shows only in ``codes``/``refused`` (counted as refused, not as traffic)."""
    state = gateway.state()
    window = state["window"]
    sides = {role: {k: v for k, v in window[role].items() if k not in {"codes", "refused"}}
             for role in ("champion", "challenger", "shadow")}
    return {"routing": {k: state[k] for k in ("weight", "shadow", "generation", "model")}, **sides}


def ids(data, shape, datatype="INT64") -> bytes:
    return json.dumps({"inputs": [{"name": "input_ids", "shape": shape, "datatype": datatype,
                                   "data": data}]}).encode()


def body(*inputs, **extra) -> bytes:
    return json.dumps({"inputs": list(inputs) or [TEXT], **extra}).encode()


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# (id, path, body bytes, extra headers, status, what the error must name)
INFER_CASES = [
    ("not-json", INFER, b"{not json", {}, 400, "not valid JSON"),
    ("non-utf8", INFER, b'{"inputs": [{"name": "text", "data": ["caf\xe9"]}]}', {}, 400, "UnicodeDecodeError"),
    ("form-content-type", INFER, b"text=great+day", {"content-type": "application/x-www-form-urlencoded"}, 400,
     "not valid JSON"),
    ("gzip-encoding", INFER, body(), {"content-encoding": "gzip"}, 415, "Content-Encoding"),
    ("not-an-object", INFER, b"[1, 2]", {}, 400, "'inputs' list"),
    ("shape-mismatch", INFER, body(TEXT | {"shape": [3]}), {}, 400, "input text: shape [3] holds 3 elements"),
    ("unknown-datatype", INFER, body(TEXT | {"datatype": "STRING"}), {}, 400, "unknown datatype 'STRING'"),
    ("negative-shape", INFER, body(TEXT | {"shape": [-1]}), {}, 400, "shape must be a list of non-negative"),
    ("text-not-string", INFER, body(TEXT | {"data": [7]}), {}, 400, "input text: every element must be a string"),
    ("nan-literal", INFER, b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [NaN]}]}', {},
     400, "NaN"),
    ("infinity-parameter", INFER, b'{"parameters": {"t": Infinity}, "inputs": []}', {}, 400, "Infinity"),
    ("lone-surrogate-id", INFER, body(id="\ud800"), {}, 400, "id holds a lone UTF-16 surrogate"),
    ("lone-surrogate-text", INFER, body(TEXT | {"data": ["a\udfffb"]}), {}, 400, "inputs[0].data[0] holds a lone"),
    ("token-ids-not-integers", INFER, ids([1.5, 2], [1, 2]), {}, 400, "input input_ids: every element"),
    ("token-id-1e30", INFER, ids([10**30], [1, 1]), {}, 400, "input_ids: a value is out of the INT64 range"),
    ("token-id-negative", INFER, ids([3, -1], [1, 2]), {}, 400, "input_ids holds token id -1"),
    ("token-ids-length-0", INFER, ids([], [1, 0]), {}, 400, "input_ids has shape [1, 0]"),
    ("token-ids-float-type", INFER, ids([1.0], [1, 1], "FP32"), {}, 400, "input_ids: datatype must be INT64"),
    ("too-many-rows", INFER, body(TEXT | {"shape": [9], "data": ["a"] * 9}), {}, 413, "9 rows"),
    ("deeply-nested", INFER, nested(100_000), {}, 400, "nested too deeply"),
    ("unknown-output", INFER, body(outputs=[{"name": "nope"}]), {}, 400, "unknown output(s) ['nope']"),
    ("unknown-model", "/v2/models/nope/infer", body(), {}, 404, "'nope'"),
    ("unknown-version", "/v2/models/tiny/versions/9/infer", body(), {}, 404, "'9'"),
    ("oversized", INFER, b" " * (MAX_BODY + 1), {}, 413, f"at most {MAX_BODY}"),
]


@pytest.mark.parametrize("target", ["server", "gateway"])
@pytest.mark.parametrize(("path", "content", "headers", "status", "names"),
                         [case[1:] for case in INFER_CASES], ids=[case[0] for case in INFER_CASES])
def test_a_bad_infer_request_is_refused_and_changes_nothing(stack, target, path, content, headers, status, names):
    before, counted = snapshot(stack.home), evidence(stack.gateway)
    answer = stack.client.post(stack.urls[target] + path, content=content, headers=headers)
    assert answer.status_code == status, answer.text
    assert names in answer.json()["error"] and "Traceback" not in answer.text
    unchanged(before, stack.home)
    assert evidence(stack.gateway) == counted


@pytest.mark.parametrize("target", ["server", "gateway"])
@pytest.mark.parametrize("case", ["token-id-past-vocabulary", "token-ids-past-max-positions", "length-200000"])
def test_token_ids_outside_the_model_are_refused(stack, target, case):
    data, shape, names = {
        "token-id-past-vocabulary": ([1, stack.vocab], [1, 2], f"vocabulary has {stack.vocab} tokens"),
        "token-ids-past-max-positions": ([1] * (stack.seq_len + 1), [1, stack.seq_len + 1],
                                         f"at most {stack.seq_len} (its package's seq_len)"),
        "length-200000": ([1] * 200_000, [1, 200_000], f"input_ids has 200000 tokens per row; this model takes "
                                                          f"at most {stack.seq_len}"),
    }[case]
    before, counted = snapshot(stack.home), evidence(stack.gateway)
    answer = stack.client.post(stack.urls[target] + INFER, content=ids(data, shape))
    assert answer.status_code == 400 and names in answer.json()["error"], answer.text
    unchanged(before, stack.home)
    assert evidence(stack.gateway) == counted


def _chunks(total: int, size: int = 16 << 10):
    sent = 0
    while sent < total:
        yield b" " * min(size, total - sent)
        sent += size


def test_the_gateway_refuses_an_oversized_streamed_body_before_reading_it_all(stack):
    before, counted = snapshot(stack.home), evidence(stack.gateway)
    answer = stack.client.post(stack.urls["gateway"] + INFER, content=_chunks(40 << 20))  # chunked: no length
    assert answer.status_code == 413 and f"over {MAX_BODY} bytes" in answer.json()["error"]
    unchanged(before, stack.home)
    assert evidence(stack.gateway) == counted


FEEDBACK_AUTH = {"Authorization": f"Bearer {FEEDBACK}"}
# (id, body bytes, headers, status, what the error must name)
FEEDBACK_CASES = [
    ("no-credential", b'{"request_id": "x", "label": "positive"}', {}, 401, "feedback token"),
    ("forged-credential", b'{"request_id": "x", "label": "positive"}', {"Authorization": "Bearer guess"}, 401,
     "feedback token"),
    ("basic-scheme", b'{"request_id": "x", "label": "positive"}', {"Authorization": f"Basic {FEEDBACK}"}, 401,
     "feedback token"),
    ("deeply-nested", nested(100_000), FEEDBACK_AUTH, 400, "nested too deeply"),
    ("nan-label", b'{"request_id": "x", "label": NaN}', FEEDBACK_AUTH, 400, "NaN"),
    ("lone-surrogate-id", b'{"request_id": "\\ud800", "label": "positive"}', FEEDBACK_AUTH, 400,
     "request_id holds a lone UTF-16 surrogate"),
    ("non-utf8", b'{"request_id": "\xff"}', FEEDBACK_AUTH, 400, "not valid JSON"),
    ("label-not-string", b'{"request_id": "x", "label": 3}', FEEDBACK_AUTH, 400, "string 'label'"),
    ("unknown-request-id", b'{"request_id": "forged", "label": "positive"}', FEEDBACK_AUTH, 404, "'forged'"),
    ("oversized", b" " * ((1 << 20) + 1), FEEDBACK_AUTH, 413, "at most 1048576"),
]


@pytest.mark.parametrize(("content", "headers", "status", "names"), [c[1:] for c in FEEDBACK_CASES],
                         ids=[c[0] for c in FEEDBACK_CASES])
def test_bad_feedback_is_refused_and_scores_nothing(stack, content, headers, status, names):
    before, counted = snapshot(stack.home), evidence(stack.gateway)
    answer = stack.client.post(stack.urls["gateway"] + "/feedback", content=content, headers=headers)
    assert answer.status_code == status, answer.text
    assert names in answer.json()["error"]
    unchanged(before, stack.home)
    assert evidence(stack.gateway) == counted


ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}
# (id, path, body bytes, headers, status, what the error must name)
ADMIN_CASES = [
    ("no-token", "/admin/weight", b'{"weight": 100}', {}, 401, "admin token"),
    ("feedback-token-is-not-admin", "/admin/weight", b'{"weight": 100}', FEEDBACK_AUTH, 401, "admin token"),
    ("weight-nan", "/admin/weight", b'{"weight": NaN}', ADMIN_AUTH, 400, "NaN"),
    ("weight-out-of-range", "/admin/weight", b'{"weight": 150}', ADMIN_AUTH, 400, "weight must be a number"),
    ("weight-a-string", "/admin/split", b'{"weight": "50"}', ADMIN_AUTH, 400, "weight must be a number"),
    ("ttl-negative", "/admin/weight", b'{"weight": 10, "ttl_s": -1}', ADMIN_AUTH, 400, "ttl_s"),
    ("deeply-nested", "/admin/split", nested(10_000), ADMIN_AUTH, 400, "nested too deeply"),
    ("oversized", "/admin/split", b" " * ((64 << 10) + 1), ADMIN_AUTH, 413, "at most 65536"),
]


@pytest.mark.parametrize(("path", "content", "headers", "status", "names"), [c[1:] for c in ADMIN_CASES],
                         ids=[c[0] for c in ADMIN_CASES])
def test_a_bad_admin_request_leaves_the_split_alone(stack, path, content, headers, status, names):
    before, counted = snapshot(stack.home), evidence(stack.gateway)
    answer = stack.client.post(stack.urls["gateway"] + path, content=content, headers=headers)
    assert answer.status_code == status, answer.text
    assert names in answer.json()["error"]
    unchanged(before, stack.home)
    assert evidence(stack.gateway) == counted
