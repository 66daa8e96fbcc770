"""The git push receiver, served by uvicorn on loopback and called with httpx; a recorder stands in for Prefect."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import uuid

import httpx
import pytest
from starlette.requests import Request

from kiln.infra.background import serving
from kiln.infra.starter import RETRAIN, Started, TriggerError
from kiln.infra.webhooks import DeliveryLog, Reject, create_app, read_body
from kiln.settings import load_settings

SECRET, TOKEN = "hook-secret", "gitlab-token"
SHA = "9fceb02d0ae598e95dc970b74767f19372d61af8"


class RecordingStarter:
    """Records each start; ``fail`` makes the next start fail as an unreachable Prefect API would."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.fail = False

    async def start(self, deployment, parameters, *, idempotency_key=None, tags=None) -> Started:
        if self.fail:
            self.fail = False
            raise TriggerError("cannot reach the Prefect API at http://127.0.0.1:9/api")
        self.calls.append({"deployment": deployment, "parameters": parameters, "key": idempotency_key, "tags": tags})
        return Started(f"run-{len(self.calls)}", f"name-{len(self.calls)}", deployment)


def _settings(**overrides):
    values = {"webhook_secret": SECRET, "gitlab_token": TOKEN, "webhook_repository": "acme/models",
              "webhook_max_body": 2048, "repo": "/srv/git/models.git"} | overrides
    return load_settings(**values)


@pytest.fixture
def hook(settings):
    starter = RecordingStarter()
    with serving(create_app(_settings(), starter)) as server, httpx.Client(base_url=server.url) as client:
        yield client, starter


def github_push(ref="refs/heads/main", repo="acme/models", after=SHA, **extra) -> dict:
    return {"ref": ref, "before": "0" * 40, "after": after, "repository": {"full_name": repo},
            "head_commit": {"id": after, "message": "more data"}} | extra


def signed(payload, event="push", delivery=None, secret=SECRET) -> tuple[bytes, dict]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signature = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return body, {"X-Hub-Signature-256": signature, "X-GitHub-Event": event,
                  "X-GitHub-Delivery": delivery or str(uuid.uuid4()), "Content-Type": "application/json"}


def post_github(client, payload, **kwargs) -> httpx.Response:
    body, headers = signed(payload, **kwargs)
    return client.post("/hooks/github", content=body, headers=headers)


def test_signed_push_starts_the_retrain_deployment_once_per_push(hook):
    client, starter = hook
    body, headers = signed(github_push(), delivery="d-1")
    answer = client.post("/hooks/github", content=body, headers=headers)
    assert answer.status_code == 202
    assert answer.json() == {"flow_run_id": "run-1", "flow_run_name": "name-1", "deployment": RETRAIN, "sha": SHA,
                             "delivery": "d-1"}
    (call,) = starter.calls
    assert call["deployment"] == RETRAIN and call["key"] == f"push:acme/models@{SHA}"
    assert call["parameters"] == {"params": {"sha": SHA, "repo": "/srv/git/models.git", "branch": "main",
                                             "config_path": "kiln-train.yaml", "chain_optimize": True,
                                             "triggered_by": "webhook:github:d-1"}}
    replay = client.post("/hooks/github", content=body, headers=headers)
    assert replay.status_code == 409 and "was already received (delivery d-1: started)" in replay.json()["error"]
    # GitHub's "redeliver" sends the same push with a new delivery id: coalesced on repository + commit.
    redelivered = client.post("/hooks/github", content=body, headers=headers | {"X-GitHub-Delivery": "d-2"})
    assert redelivered.status_code == 409 and f"push {SHA[:12]} of acme/models" in redelivered.json()["error"]
    assert len(starter.calls) == 1


@pytest.mark.parametrize("repo", [None, "https://ci:repo-token@git.example.com/acme/models.git"])
def test_the_run_parameter_carries_the_repository_without_credentials(settings, repo):
    """Credentials in KILN_REPO (or a pushed, allow-listed clone URL) stay out of the flow run."""
    starter = RecordingStarter()
    clone = "https://ci:clone-token@github.com/acme/models.git"
    overrides = {"repo": repo, "webhook_repositories": ["https://GitHub.com/acme/models"]}
    with serving(create_app(_settings(**overrides), starter)) as server, httpx.Client(base_url=server.url) as client:
        assert post_github(client, github_push(repository={"full_name": "acme/models", "clone_url": clone}),
                           delivery="creds-1").status_code == 202
    (call,) = starter.calls
    assert call["parameters"]["params"]["repo"] == ("https://git.example.com/acme/models.git" if repo else
                                                    "https://GitHub.com/acme/models")  # the listed URL
    assert "token" not in json.dumps(call["parameters"])


def test_forged_or_missing_signature_is_refused(hook):
    client, starter = hook
    body, headers = signed(github_push(), secret="guessed")
    forged = client.post("/hooks/github", content=body, headers=headers)
    assert forged.status_code == 401 and "does not match" in forged.json()["error"]
    body, headers = signed(github_push())
    tampered = client.post("/hooks/github", content=body.replace(b"acme", b"evil"), headers=headers)
    assert tampered.status_code == 401
    del headers["X-Hub-Signature-256"]
    missing = client.post("/hooks/github", content=body, headers=headers)
    assert missing.status_code == 401 and "missing X-Hub-Signature-256" in missing.json()["error"]
    assert starter.calls == []


@pytest.mark.parametrize(("payload", "reason"), [
    (github_push(ref="refs/heads/feature"), "refs/heads/feature is not refs/heads/main"),
    (github_push(ref="refs/tags/v1"), "refs/tags/v1 is not refs/heads/main"),
    (github_push(repo="someone/else"), "someone/else is not acme/models"),
    (github_push(after="0" * 40, deleted=True), "was deleted"),
])
def test_other_branches_repositories_and_deletions_are_ignored(hook, payload, reason):
    client, starter = hook
    answer = post_github(client, payload)
    assert answer.status_code == 202 and reason in answer.json()["ignored"]
    assert starter.calls == []


def test_form_encoded_payloads_are_accepted(hook):
    from urllib.parse import urlencode

    client, starter = hook
    body = urlencode({"payload": json.dumps(github_push())}).encode()
    _, headers = signed(body)
    answer = client.post("/hooks/github", content=body,
                         headers=headers | {"Content-Type": "application/x-www-form-urlencoded"})
    assert answer.status_code == 202 and starter.calls[0]["parameters"]["params"]["sha"] == SHA


def test_ping_and_other_events_start_nothing(hook):
    client, starter = hook
    ping = post_github(client, {"zen": "Keep it logically awesome.", "hook_id": 1}, event="ping")
    assert ping.status_code == 200 and ping.json()["pong"] is True
    issues = post_github(client, {"action": "opened"}, event="issues")
    assert issues.status_code == 202 and "'issues' is not a push" in issues.json()["ignored"]
    assert starter.calls == []


@pytest.mark.parametrize(("body", "error"), [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (json.dumps({"ref": "refs/heads/main", "repository": {"full_name": "acme/models"}}).encode(), "no after"),
    (json.dumps(github_push(after="HEAD")).encode(), "not a full commit SHA"),
])
def test_malformed_payloads_are_bad_requests(hook, body, error):
    client, starter = hook
    answer = post_github(client, body)
    assert answer.status_code == 400 and error in answer.json()["error"]
    assert starter.calls == []


def test_missing_headers_are_named(hook):
    client, _ = hook
    body, headers = signed(github_push())
    del headers["X-GitHub-Delivery"]
    answer = client.post("/hooks/github", content=body, headers=headers)
    assert answer.status_code == 400 and "missing X-GitHub-Delivery header" in answer.json()["error"]


def test_oversized_bodies_are_refused_with_413(hook):
    client, starter = hook
    body, headers = signed(github_push(head_commit={"message": "x" * 4096}))
    declared = client.post("/hooks/github", content=body, headers=headers)
    assert declared.status_code == 413 and "KILN_WEBHOOK_MAX_BODY" in declared.json()["error"]
    streamed = client.post("/hooks/github", content=iter([body[i:i + 512] for i in range(0, len(body), 512)]),
                           headers=headers)  # chunked: no Content-Length to go by
    assert streamed.status_code == 413
    assert starter.calls == []


def test_body_reading_stops_at_the_limit():
    pulled = []

    async def receive():
        pulled.append(1)
        return {"type": "http.request", "body": b"x" * 100, "more_body": True}  # an endless body

    request = Request({"type": "http", "method": "POST", "headers": []}, receive)
    with pytest.raises(Reject) as err:
        asyncio.run(read_body(request, limit=1000))
    assert err.value.status == 413 and len(pulled) == 11
    declared = Request({"type": "http", "method": "POST", "headers": [(b"content-length", b"5000")]}, receive)
    with pytest.raises(Reject):
        asyncio.run(read_body(declared, limit=1000))
    assert len(pulled) == 11  # refused from the header alone


def test_unconfigured_secrets_answer_503_naming_the_variable(settings):
    starter = RecordingStarter()
    with serving(create_app(load_settings(), starter)) as server:
        body, headers = signed(github_push())
        github = httpx.post(f"{server.url}/hooks/github", content=body, headers=headers)
        gitlab = httpx.post(f"{server.url}/hooks/gitlab", json={}, headers={"X-Gitlab-Token": "x"})
        mlflow = httpx.post(f"{server.url}/hooks/mlflow", json={})  # registry events share the receiver
        health = httpx.get(f"{server.url}/health").json()
    assert github.status_code == 503 and "KILN_WEBHOOK_SECRET" in github.json()["error"]
    assert gitlab.status_code == 503 and "KILN_GITLAB_TOKEN" in gitlab.json()["error"]
    assert mlflow.status_code == 503 and "KILN_MLFLOW_WEBHOOK_SECRET" in mlflow.json()["error"]
    assert health == {"status": "ok", "github": False, "gitlab": False, "mlflow": False}
    assert starter.calls == []


def gitlab_push(ref="refs/heads/main", project="acme/models") -> dict:
    return {"object_kind": "push", "ref": ref, "before": "0" * 40, "after": SHA, "checkout_sha": SHA,
            "project": {"path_with_namespace": project, "git_http_url": "https://gitlab.example/acme/models.git"}}


def test_gitlab_push_with_its_token(hook):
    client, starter = hook
    headers = {"X-Gitlab-Token": TOKEN, "X-Gitlab-Event": "Push Hook", "X-Gitlab-Event-UUID": "g-1"}
    wrong = client.post("/hooks/gitlab", json=gitlab_push(), headers=headers | {"X-Gitlab-Token": "nope"})
    assert wrong.status_code == 401 and "X-Gitlab-Token is wrong" in wrong.json()["error"]
    no_id = client.post("/hooks/gitlab", json=gitlab_push(),
                        headers={k: v for k, v in headers.items() if k != "X-Gitlab-Event-UUID"})
    assert no_id.status_code == 400 and "X-Gitlab-Event-UUID" in no_id.json()["error"]
    branch = client.post("/hooks/gitlab", json=gitlab_push(ref="refs/heads/dev"), headers=headers)
    assert branch.status_code == 202 and "ignored" in branch.json()
    assert starter.calls == []

    accepted = client.post("/hooks/gitlab", json=gitlab_push(), headers=headers | {"X-Gitlab-Event-UUID": "g-2"})
    assert accepted.status_code == 202 and accepted.json()["sha"] == SHA
    assert starter.calls[0]["parameters"]["params"]["triggered_by"] == "webhook:gitlab:g-2"
    by_key = client.post("/hooks/gitlab", json=gitlab_push(),
                         headers={"X-Gitlab-Token": TOKEN, "X-Gitlab-Event": "Push Hook", "Idempotency-Key": "g-2"})
    assert by_key.status_code == 409 and len(starter.calls) == 1


def test_a_failed_start_is_not_remembered_so_a_redelivery_retries(hook):
    client, starter = hook
    starter.fail = True
    body, headers = signed(github_push(), delivery="d-retry")
    first = client.post("/hooks/github", content=body, headers=headers)
    assert first.status_code == 503 and "Prefect API" in first.json()["error"]
    again = client.post("/hooks/github", content=body, headers=headers)
    assert again.status_code == 202 and len(starter.calls) == 1


def test_deliveries_are_remembered_across_restarts(settings):
    body, headers = signed(github_push(), delivery="d-restart")
    for expected in (202, 409):  # a fresh app each time: only the file under KILN_HOME remembers
        starter = RecordingStarter()
        with serving(create_app(_settings(), starter)) as server:
            assert httpx.post(f"{server.url}/hooks/github", content=body, headers=headers).status_code == expected
    assert (settings.home / "webhooks" / "deliveries.jsonl").is_file()


def test_delivery_log_stays_bounded(tmp_path):
    path = tmp_path / "deliveries.jsonl"
    log = DeliveryLog(path, capacity=3)
    for i in range(10):
        assert log.claim(f"k{i}") is None
        log.record(f"k{i}", "started")
    assert list(log.seen) == ["k7", "k8", "k9"]
    assert len(path.read_text().splitlines()) <= 6
    reloaded = DeliveryLog(path, capacity=3)
    assert reloaded.claim("k9")["outcome"] == "started" and reloaded.claim("k0") is None
    assert reloaded.claim("k0") == {"key": "k0", "outcome": "in progress"}  # claimed, not yet recorded


def test_unknown_paths_answer_json(hook):
    client, _ = hook
    assert client.get("/nope").json() == {"error": "GET /nope: Not Found"}
    assert client.get("/hooks/github").status_code == 405
