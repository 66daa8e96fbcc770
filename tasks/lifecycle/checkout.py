"""Checking out one commit of a git repository for retraining: a temporary clone, credentials out of sight.

The repository URL a run names carries no credentials (:class:`kiln.tasks.lifecycle.retrain.RetrainParams`
refuses them); the worker adds its own ``repo_token`` (:func:`clone_credentials`), and git receives it as an
HTTP header in its environment (:func:`_auth_env`), never in a URL on its command line.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from kiln.credentials import same_origin
from kiln.errors import ConfigError

if TYPE_CHECKING:
    from kiln.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checkout:
    """A commit checked out in a temporary folder."""

    path: Path
    sha: str  # full SHA
    repo: str


# ── git ──────────────────────────────────────────────────────────────────────────────────────────────
def _git(*args: str | Path, cwd: Path | None = None,
         auth: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = os.environ | {
        "GIT_TERMINAL_PROMPT": "0",  # a worker must fail, not wait for a password nobody will type
        "GIT_ALLOW_PROTOCOL": "file:git:http:https:ssh",  # no ext:: (runs commands) in a repo URL
    } | (auth or {})
    return subprocess.run(["git", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600, check=False)


def public_repo(repo: str) -> str:
    """``repo`` without credentials (``https://user:token@host/x`` → ``https://host/x``), for tags and logs."""
    parts = urlsplit(repo)
    if parts.scheme and "@" in parts.netloc:
        return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    return repo


def same_repository(url: str, other: str) -> bool:
    """One repository, whatever the credentials, the case of scheme and host, a trailing slash or ``.git``."""
    def norm(value: str) -> tuple[str, str, str]:
        parts = urlsplit(public_repo(value))
        return parts.scheme.lower(), parts.netloc.lower(), parts.path.rstrip("/").removesuffix(".git")

    try:
        return norm(url) == norm(other)
    except ValueError:  # an unparsable URL (bad port, bracket) is nobody's repository
        return False


def webhook_repository(repo: str, settings: Settings) -> bool:
    """May a run a webhook started clone ``repo``? Only KILN_REPO or one of KILN_WEBHOOK_REPOSITORIES: a push's
    payload never names what a worker clones on its own."""
    allowed = ([settings.repo] if settings.repo else []) + list(settings.webhook_repositories)
    return any(same_repository(repo, url) for url in allowed)


def clone_credentials(repo: str, settings: Settings) -> str | None:
    """What the worker clones ``repo`` with: its ``repo_token``, and only for KILN_REPO's scheme, host and port.

    From the worker's settings, never from the run: a URL typed into a form cannot send the token elsewhere.
    """
    if settings.repo_token is None or not settings.repo or not same_origin(repo, settings.repo):
        return None
    return settings.repo_token.get_secret_value()


def _auth_env(url: str, credentials: str) -> dict[str, str]:
    """Git configuration, in the environment, sending ``credentials`` to ``url`` (and below) as HTTP Basic auth.

    Not in the URL, where git would show them on its command line and its helpers' (``ps``), write them
    into the clone's config and quote them in errors. A token alone goes as ``x-access-token:TOKEN``.
    """
    pair = credentials if ":" in credentials else f"x-access-token:{credentials}"
    n = int(os.environ.get("GIT_CONFIG_COUNT") or 0)  # keep configuration the worker's environment gives git
    return {"GIT_CONFIG_COUNT": str(n + 1), f"GIT_CONFIG_KEY_{n}": f"http.{url}.extraHeader",
            f"GIT_CONFIG_VALUE_{n}": "Authorization: Basic " + base64.b64encode(pair.encode()).decode()}


@contextmanager
def checkout(repo: str, sha: str, root: Path, credentials: str | None = None) -> Iterator[Checkout]:
    """Clone ``repo`` into a temporary folder under ``root`` and check out ``sha`` (detached); removed after.

    ``credentials`` (``USER:TOKEN`` or a token, see :func:`clone_credentials`) reach git in its environment.
    """
    remote = "://" in repo or re.match(r"^[\w.-]+@[\w.-]+:", repo) is not None
    if not remote:
        repo = str(Path(repo).expanduser().resolve())  # recorded in kiln.git_repo: no relative paths
    root.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{sha[:12]}-", dir=root))
    auth = _auth_env(repo, credentials) if credentials and remote else None
    try:
        # Remote: fetch trees now, blobs on checkout (only the commit's files cross the network).
        clone = _git("clone", "--quiet", "--no-checkout", *(["--filter=blob:none"] if remote else []), "--",
                     repo, path, auth=auth)
        if clone.returncode != 0:
            raise ConfigError(f"cannot clone {public_repo(repo)}: {_last_line(clone.stderr)}; set --repo or "
                              "KILN_REPO to a git repository this worker can read (over http(s) with the "
                              "worker's KILN_REPO_TOKEN when it is private)")
        full = _resolve_commit(path, sha)
        if full is None:
            _git("fetch", "--quiet", "origin", sha, cwd=path, auth=auth)  # commits outside branches and tags
            full = _resolve_commit(path, sha)
        if full is None:
            raise ConfigError(f"commit {sha} does not exist in {public_repo(repo)} (searched its branches and "
                              "tags); push it first, or pass the SHA of an existing commit")
        done = _git("checkout", "--quiet", "--detach", full, cwd=path, auth=auth)  # fetches the blobs
        if done.returncode != 0:
            raise ConfigError(f"cannot check out {full} of {public_repo(repo)}: {_last_line(done.stderr)}")
        log.info("checked out %s of %s", full[:12], public_repo(repo))
        yield Checkout(path, full, repo)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _resolve_commit(path: Path, sha: str) -> str | None:
    got = _git("rev-parse", "--verify", "--quiet", f"{sha}^{{commit}}", cwd=path)
    return got.stdout.strip() if got.returncode == 0 else None


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no message from git"
