"""Bad-input catalogue, git push webhooks: every hostile or malformed delivery gets a clear JSON error with the
right status, and nothing changes — no flow run started, no delivery claimed or remembered, no file under
KILN_HOME touched (:mod:`tests.integration.catalogue`).

One receiver for the module, served by uvicorn on loopback; a recorder stands in for the Prefect API.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from urllib.parse import urlencode

import httpx
import pytest

from kiln.infra.background import serving
from kiln.infra.starter import Started
from kiln.infra.webhooks import create_app
from kiln.settings import load_settings
from tests.integration.catalogue import snapshot, unchanged

pytestmark = pytest.mark.catalogue

SECRET, TOKEN = "hook-secret", "gitlab-token"
SHA = "0123456789abcdef0123456789abcdef01234567"
ALLOWED = "https://github.com/acme/models.git"


class RecordingStarter:
    def __init__(self) -> None:
        self.calls: list[dict] = []

    async def start(self, deployment, parameters, *, idempotency_key=None, tags=None) -> Started:
        self.calls.append({"parameters": parameters, "key": idempotency_key})
        return Started(f"run-{len(self.calls)}", f"name-{len(self.calls)}", deployment)


def _receiver(home, **overrides):
    settings = load_settings(home=home, webhook_secret=SECRET, gitlab_token=TOKEN, webhook_max_body=65536,
                             webhook_repository="acme/models", **overrides)
    settings.ensure_dirs()
    starter = RecordingStarter()
    return create_app(settings, starter), starter


@pytest.fixture(scope="module")
def hook(tmp_path_factory):
    """KILN_REPO unset, one allow-listed clone URL; one push of SHA already accepted (for the replay cases)."""
    home = tmp_path_factory.mktemp("hooks") / ".kiln"
    app, starter = _receiver(home, webhook_repositories=[ALLOWED])
    with serving(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        body, headers = signed(push())
        assert client.post("/hooks/github", content=body, headers=headers).status_code == 202
        yield client, starter, app.state.receiver, home


def push(**changes) -> dict:
    payload = {"ref": "refs/heads/main", "before": "0" * 40, "after": SHA,
               "repository": {"full_name": "acme/models", "clone_url": ALLOWED}}
    for key, value in changes.items():
        if key.startswith("repository."):
            payload["repository"] = payload["repository"] | {key.split(".", 1)[1]: value}
        else:
            payload[key] = value
    return payload


def signed(payload, *, content_type="application/json", secret=SECRET, **headers) -> tuple[bytes, dict]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signature = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return body, {"X-Hub-Signature-256": signature, "X-GitHub-Event": "push", "X-GitHub-Delivery": str(uuid.uuid4()),
                  "Content-Type": content_type} | headers


def form(*pairs: tuple[str, str]) -> bytes:
    return urlencode(pairs).encode()


_FORM = "application/x-www-form-urlencoded"
# (id, body or payload, signing/header changes, status, words the error must contain)
GITHUB_CASES = [
    ("unsigned", push(), {"X-Hub-Signature-256": ""}, 401, "missing X-Hub-Signature-256"),
    ("wrong-secret", push(), {"secret": "guessed"}, 401, "does not match"),
    ("non-ascii-signature", push(), {"X-Hub-Signature-256": "sha256=caf\xe9".encode("latin-1")}, 401,
     "does not match"),
    ("signature-not-hex", push(), {"X-Hub-Signature-256": "sha256=zz"}, 401, "does not match"),
    ("missing-event", push(), {"X-GitHub-Event": ""}, 400, "missing X-GitHub-Event"),
    ("missing-delivery", push(), {"X-GitHub-Delivery": ""}, 400, "missing X-GitHub-Delivery"),
    ("delivery-path", push(), {"X-GitHub-Delivery": "../../etc"}, 400, "is not a delivery id"),
    ("content-type-text", push(), {"content_type": "text/plain"}, 415, "not application/json"),
    ("not-utf8", b'{"ref": "\xff\xfe"}', {}, 400, "not valid JSON"),
    ("bad-json", b'{"ref": ', {}, 400, "not valid JSON"),
    ("json-array", b"[1, 2]", {}, 400, "must be a JSON object"),
    ("nested-json", b"[" * 20000 + b"]" * 20000, {}, 400, "nested too deeply"),
    ("nan", b'{"ref": "refs/heads/main", "after": NaN}', {}, 400, "not valid JSON"),
    ("oversized", push(padding="x" * 70000), {}, 413, "KILN_WEBHOOK_MAX_BODY"),
    ("form-empty-payload", form(("payload", "")), {"content_type": _FORM}, 400, "not valid JSON"),
    ("form-no-payload", form(("data", json.dumps(push()))), {"content_type": _FORM}, 400, "exactly one field"),
    ("form-two-payloads", form(("payload", "{}"), ("payload", "{}")), {"content_type": _FORM}, 400,
     "exactly one field"),
    ("form-not-ascii", b"payload=\xff", {"content_type": _FORM}, 400, "not URL-encoded"),
    ("after-number", push(after=12345), {}, 400, "after must be a string"),
    ("after-short-sha", push(after="0123456"), {}, 400, "not a full commit SHA"),
    ("after-ref-name", push(after="HEAD~1"), {}, 400, "not a full commit SHA"),
    ("after-missing", push(after=None), {}, 400, "has no after"),
    ("ref-list", push(ref=["refs/heads/main"]), {}, 400, "ref must be a string"),
    ("ref-control-char", push(ref="refs/heads/main\n"), {}, 400, "ref must be printable"),
    ("ref-lone-surrogate", push(ref="refs/heads/\ud800"), {}, 400, "ref must be printable"),
    ("repository-string", push(repository="acme/models"), {}, 400, "repository must be an object"),
    ("full-name-number", push(**{"repository.full_name": 7}), {}, 400, "full_name must be a string"),
    ("full-name-path", push(**{"repository.full_name": "../../etc"}), {}, 400, "is not owner/name"),
    ("clone-url-object", push(**{"repository.clone_url": {"href": ALLOWED}}), {}, 400,
     "clone_url must be a string"),
    ("clone-url-link-local", push(**{"repository.clone_url": "http://169.254.169.254/latest/meta-data"}), {}, 400,
     "not in KILN_WEBHOOK_REPOSITORIES"),
    ("deleted-string", push(deleted="yes"), {}, 400, "deleted must be true or false"),
    ("replay-fresh-delivery-id", push(), {}, 409, "was already received"),
    ("replay-other-case-sha", push(after=SHA.upper()), {}, 409, "was already received"),
]


@pytest.mark.parametrize(("body", "changes", "status", "words"), [c[1:] for c in GITHUB_CASES],
                         ids=[c[0] for c in GITHUB_CASES])
def test_github_refusals_change_nothing(hook, body, changes, status, words):
    client, starter, receiver, home = hook
    changes = dict(changes)
    content_type, secret = changes.pop("content_type", "application/json"), changes.pop("secret", SECRET)
    raw, headers = signed(body, content_type=content_type, secret=secret, **changes)
    headers = {k: v for k, v in headers.items() if v != ""}
    before, calls, seen = snapshot(home), len(starter.calls), dict(receiver.deliveries.seen)
    answer = client.post("/hooks/github", content=raw, headers=headers)
    assert answer.status_code == status, answer.text
    assert words in answer.json()["error"], answer.json()
    assert len(starter.calls) == calls and receiver.deliveries.seen == seen and not receiver.deliveries.pending
    unchanged(before, home)


GITLAB_CASES = [
    ("wrong-token", {}, {"X-Gitlab-Token": "nope"}, 401, "X-Gitlab-Token is wrong"),
    ("non-ascii-token", {}, {"X-Gitlab-Token": "caf\xe9".encode("latin-1")}, 401, "X-Gitlab-Token is wrong"),
    ("no-delivery-id", {}, {"X-Gitlab-Event-UUID": ""}, 400, "X-Gitlab-Event-UUID"),
    ("project-path-number", {"project": {"path_with_namespace": 1}}, {}, 400, "must be a string"),
    ("checkout-sha-bad", {"checkout_sha": "not-a-sha"}, {}, 400, "checkout_sha"),
    ("git-http-url-list", {"project": {"path_with_namespace": "acme/models", "git_http_url": [ALLOWED]}}, {}, 400,
     "git_http_url must be a string"),
]


@pytest.mark.parametrize(("changes", "headers", "status", "words"), [c[1:] for c in GITLAB_CASES],
                         ids=[c[0] for c in GITLAB_CASES])
def test_gitlab_refusals_change_nothing(hook, changes, headers, status, words):
    client, starter, receiver, home = hook
    payload = {"object_kind": "push", "ref": "refs/heads/main", "after": "f" * 40, "checkout_sha": "f" * 40,
               "project": {"path_with_namespace": "acme/models", "git_http_url": ALLOWED}} | changes
    sent = {"X-Gitlab-Token": TOKEN, "X-Gitlab-Event": "Push Hook", "X-Gitlab-Event-UUID": str(uuid.uuid4())} | headers
    before, calls = snapshot(home), len(starter.calls)
    answer = client.post("/hooks/gitlab", json=payload, headers={k: v for k, v in sent.items() if v != ""})
    assert answer.status_code == status and words in answer.json()["error"], answer.text
    assert len(starter.calls) == calls and not receiver.deliveries.pending
    unchanged(before, home)


def test_without_kiln_repo_or_an_allow_list_pushes_are_refused(tmp_path):
    """KILN_REPO unset and no KILN_WEBHOOK_REPOSITORIES: the payload's clone URL is never cloned instead."""
    home = tmp_path / ".kiln"
    app, starter = _receiver(home)
    before = snapshot(home)
    with serving(app) as server:
        body, headers = signed(push(**{"repository.clone_url": "http://169.254.169.254/"}))
        answer = httpx.post(f"{server.url}/hooks/github", content=body, headers=headers, timeout=30)
    assert answer.status_code == 503 and "KILN_REPO" in answer.json()["error"]
    assert "KILN_WEBHOOK_REPOSITORIES" in answer.json()["error"]
    assert starter.calls == [] and not app.state.receiver.deliveries.pending
    unchanged(before, home)
