"""Pushes coalesce on repository + commit, a claim is always released or recorded, and only KILN_REPO or an
allow-listed clone URL is ever handed to a worker. Served by uvicorn on loopback; a recorder stands in for Prefect.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from kiln.infra.background import serving
from kiln.infra.starter import Started
from kiln.infra.webhooks import create_app
from kiln.settings import load_settings
from kiln.tasks.lifecycle.checkout import same_repository, webhook_repository

SECRET = "hook-secret"
SHA = "9fceb02d0ae598e95dc970b74767f19372d61af8"
URL = "https://github.com/acme/models.git"


class SlowStarter:
    """Takes ``delay`` seconds to start a run (as a remote Prefect API does); ``fail`` raises that exception once."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[dict] = []
        self.delay = delay
        self.fail: Exception | None = None

    async def start(self, deployment, parameters, *, idempotency_key=None, tags=None) -> Started:
        await asyncio.sleep(self.delay)
        if self.fail is not None:
            exc, self.fail = self.fail, None
            raise exc
        self.calls.append({"parameters": parameters, "key": idempotency_key})
        return Started(f"run-{len(self.calls)}", f"name-{len(self.calls)}", deployment)


def _app(settings, starter, **overrides):
    values = {"home": settings.home, "webhook_secret": SECRET, "webhook_repository": "acme/models"} | overrides
    return create_app(load_settings(**values), starter)


def push(**extra) -> dict:
    repository = {"full_name": "acme/models", "clone_url": URL}
    return {"ref": "refs/heads/main", "after": SHA, "repository": repository} | extra


def signed(payload: dict, delivery: str | None = None) -> tuple[bytes, dict]:
    body = json.dumps(payload).encode()
    return body, {"X-Hub-Signature-256": "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest(),
                  "X-GitHub-Event": "push", "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
                  "Content-Type": "application/json"}


def test_two_simultaneous_deliveries_of_one_push_start_one_run(settings):
    """GitHub's redeliver (a fresh delivery id) racing the original: one 202, one 409, one start."""
    starter = SlowStarter(delay=0.3)
    with serving(_app(settings, starter, repo="/srv/git/models.git")) as server:
        async def both() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                return await asyncio.gather(*(client.post("/hooks/github", content=body, headers=headers)
                                              for body, headers in (signed(push()), signed(push()))))

        answers = asyncio.run(both())
        with ThreadPoolExecutor(4) as pool:  # and from threads: four deliveries of another push
            body = json.dumps(push(after="a" * 40)).encode()
            threaded = list(pool.map(lambda _: httpx.post(f"{server.url}/hooks/github", content=body,
                                                          headers=signed(push(after="a" * 40))[1], timeout=30),
                                     range(4)))
    assert sorted(a.status_code for a in answers) == [202, 409]
    assert "in progress" in next(a for a in answers if a.status_code == 409).json()["error"]
    assert sorted(a.status_code for a in threaded) == [202, 409, 409, 409]
    assert [c["key"] for c in starter.calls] == [f"push:acme/models@{SHA}", f"push:acme/models@{'a' * 40}"]


@pytest.mark.parametrize("failure", [RuntimeError("boom"), ValueError("bad")])
def test_a_claim_is_released_whatever_fails_after_it(settings, failure):
    """An unexpected exception while starting is a 503 and forgets the claim: the redelivery starts the run."""
    starter = SlowStarter()
    starter.fail = failure
    with serving(_app(settings, starter, repo="/srv/git/models.git")) as server:
        first = httpx.post(f"{server.url}/hooks/github", content=signed(push())[0], headers=signed(push())[1])
        again = httpx.post(f"{server.url}/hooks/github", content=signed(push())[0], headers=signed(push())[1])
    assert first.status_code == 503 and "could not start" in first.json()["error"]
    assert again.status_code == 202 and len(starter.calls) == 1


def test_a_malformed_push_never_blocks_the_good_one(settings):
    """A non-string clone_url used to answer 500 and then 409 "in progress" forever for that delivery."""
    starter = SlowStarter()
    with serving(_app(settings, starter, webhook_repositories=[URL])) as server:
        body, headers = signed(push(repository={"full_name": "acme/models", "clone_url": {"x": 1}}), "d-1")
        bad = httpx.post(f"{server.url}/hooks/github", content=body, headers=headers)
        body, headers = signed(push(), "d-1")
        good = httpx.post(f"{server.url}/hooks/github", content=body, headers=headers)
    assert bad.status_code == 400 and "clone_url must be a string" in bad.json()["error"]
    assert good.status_code == 202 and starter.calls[0]["parameters"]["params"]["repo"] == URL


def test_an_ignored_push_does_not_block_the_same_commit_on_the_watched_branch(settings):
    starter = SlowStarter()
    with serving(_app(settings, starter, repo="/srv/git/models.git")) as server:
        feature = httpx.post(f"{server.url}/hooks/github", content=signed(push(ref="refs/heads/x"))[0],
                             headers=signed(push(ref="refs/heads/x"))[1])
        main = httpx.post(f"{server.url}/hooks/github", content=signed(push())[0], headers=signed(push())[1])
    assert feature.status_code == 202 and "ignored" in feature.json()
    assert main.status_code == 202 and len(starter.calls) == 1


def test_a_form_body_with_an_empty_payload_is_a_bad_request(settings):
    starter = SlowStarter()
    body = b"payload="
    headers = signed(push())[1] | {"Content-Type": "application/x-www-form-urlencoded",
                                   "X-Hub-Signature-256": "sha256=" + hmac.new(SECRET.encode(), body,
                                                                               hashlib.sha256).hexdigest()}
    with serving(_app(settings, starter, repo="/srv/git/models.git")) as server:
        answer = httpx.post(f"{server.url}/hooks/github", content=body, headers=headers)
    assert answer.status_code == 400 and "not valid JSON" in answer.json()["error"] and starter.calls == []


def test_a_ping_with_a_strange_zen_is_answered(settings):
    with serving(_app(settings, SlowStarter(), repo="/srv/git/models.git")) as server:
        body, headers = signed({"zen": "\ud800", "hook_id": {"deep": [1]}})
        answer = httpx.post(f"{server.url}/hooks/github", content=body, headers=headers | {"X-GitHub-Event": "ping"})
    assert answer.status_code == 200 and answer.json() == {"pong": True, "zen": None}


@pytest.mark.parametrize(("a", "b", "same"), [
    ("https://github.com/acme/models.git", "https://GitHub.com/acme/models/", True),
    ("https://ci:tok@github.com/acme/models", "https://github.com/acme/models.git", True),
    ("https://github.com/acme/models", "https://github.com/acme/other", False),
    ("https://github.com/acme/models", "http://169.254.169.254/acme/models", False),
    ("https://github.com/acme/models", "http://[::1", False),
])
def test_same_repository(a, b, same):
    assert same_repository(a, b) is same


def test_a_webhook_run_may_clone_only_kiln_repo_or_the_allow_list():
    settings = load_settings(repo="/srv/git/models.git", webhook_repositories=[URL])
    assert webhook_repository("/srv/git/models.git", settings) and webhook_repository(URL, settings)
    assert not webhook_repository("http://169.254.169.254/latest", settings)
