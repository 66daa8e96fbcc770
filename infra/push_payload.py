"""A push event, whichever forge sent it: read from its JSON payload with every field's type checked (a wrong
type is a 400 naming the field, never a 500), and the two decisions it leads to: whether it retrains at all
(:func:`why_ignored`) and what the worker would clone (:func:`clone_url`, never a URL only the payload names).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from kiln.credentials import redact, split_credentials
from kiln.infra.webhook_body import Reject, field, optional_text, text
from kiln.settings import Settings
from kiln.tasks.lifecycle.checkout import same_repository

_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # SHA-1, or SHA-256 object format
_REPOSITORY = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+){1,20}")  # owner/name, GitLab's groups/sub/name


@dataclass(frozen=True)
class Push:
    """What a push event says, whichever forge sent it."""

    provider: str
    delivery: str
    repository: str  # owner/name
    ref: str
    sha: str
    clone_url: str | None
    deleted: bool


def _commit(value: Any, name: str) -> str:
    sha = text(value, name, limit=64).lower()
    if not _SHA.fullmatch(sha):
        raise Reject(400, f"push payload's {name} {sha[:80]!r} is not a full commit SHA")
    return sha


def _repository(value: Any, name: str) -> str:
    repository = text(value, name, limit=255)
    if not _REPOSITORY.fullmatch(repository) or any(set(part) == {"."} for part in repository.split("/")):
        raise Reject(400, f"push payload's {name} {repository[:80]!r} is not owner/name")
    return repository


def _deleted(payload: dict[str, Any]) -> bool:
    value = payload.get("deleted", False)
    if not isinstance(value, bool):
        raise Reject(400, f"push payload's deleted must be true or false, not {type(value).__name__}")
    return value


def _repo_object(payload: dict[str, Any], key: str) -> dict[str, Any]:
    value = payload.get(key)
    if not isinstance(value, dict):
        raise Reject(400, f"push payload's {key} must be an object")
    return value


def github_push(payload: dict[str, Any], delivery: str) -> Push:
    after = _commit(field(payload, "after"), "after")
    repository = _repo_object(payload, "repository")
    return Push("github", delivery, _repository(field(payload, "repository", "full_name"), "repository.full_name"),
                text(field(payload, "ref"), "ref", limit=255), after,
                optional_text(repository, "repository", "clone_url"), _deleted(payload) or set(after) == {"0"})


def gitlab_push(payload: dict[str, Any], delivery: str) -> Push:
    after = _commit(field(payload, "after"), "after")
    sha = _commit(payload["checkout_sha"], "checkout_sha") if payload.get("checkout_sha") else after
    project = _repo_object(payload, "project")
    return Push("gitlab", delivery, _repository(field(payload, "project", "path_with_namespace"),
                                                "project.path_with_namespace"),
                text(field(payload, "ref"), "ref", limit=255), sha, optional_text(project, "project", "git_http_url"),
                set(sha) == {"0"})


def clone_url(push: Push, settings: Settings) -> str:
    """What the worker will clone for ``push``: KILN_REPO, or the allow-listed URL equal to the push's clone URL.

    Never a URL only the payload names (a signed payload may still point at a link-local metadata address).
    """
    if settings.repo:
        return settings.repo
    if not settings.webhook_repositories:
        raise Reject(503, "retraining from pushes needs KILN_REPO (the repository the worker clones) or "
                          "KILN_WEBHOOK_REPOSITORIES (the clone URLs a push may name); set one")
    named = "repository.clone_url" if push.provider == "github" else "project.git_http_url"
    if push.clone_url is None:
        raise Reject(400, f"push payload has no {named} and KILN_REPO is unset; set KILN_REPO")
    for allowed in settings.webhook_repositories:
        if same_repository(allowed, push.clone_url):
            return split_credentials(allowed)[0]
    raise Reject(400, f"push payload's {named} {redact(push.clone_url)[:200]!r} is not in "
                      "KILN_WEBHOOK_REPOSITORIES; add it there, or set KILN_REPO")


def why_ignored(push: Push, settings: Settings) -> str | None:
    """Why this push starts nothing (another repository or branch, a deletion), or None to retrain."""
    wanted = settings.webhook_repository
    if wanted and push.repository.lower() != wanted.lower():
        return f"repository {push.repository} is not {wanted} (KILN_WEBHOOK_REPOSITORY)"
    if push.ref != f"refs/heads/{settings.webhook_branch}":
        return f"ref {push.ref} is not refs/heads/{settings.webhook_branch} (KILN_WEBHOOK_BRANCH)"
    if push.deleted:
        return f"{push.ref} was deleted"
    return None
