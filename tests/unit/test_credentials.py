"""Credentials in URLs: redacted where shown, split off where recorded, never in a run's parameters or argv."""

from __future__ import annotations

import asyncio
import base64
import json
import sys

import pytest
from pydantic import SecretStr, ValidationError

from kiln.credentials import redact, redact_text, same_origin, split_credentials
from kiln.errors import ConfigError
from kiln.infra.stack import Stack
from kiln.infra.stack_databases import database_urls
from kiln.infra.stack_services import Service, services
from kiln.infra.starter import DeploymentStarter, TriggerError
from kiln.settings import load_settings
from kiln.tasks.lifecycle.checkout import _auth_env, clone_credentials
from kiln.tasks.lifecycle.retrain import RetrainParams

SHA = "9fceb02d0ae598e95dc970b74767f19372d61af8"


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://kiln:s3cret@db:5432/kiln", "postgresql://kiln:***@db:5432/kiln"),
    ("postgresql+psycopg://kiln:s%40cret@db.internal:5433/kiln?sslmode=require",
     "postgresql+psycopg://kiln:***@db.internal:5433/kiln?sslmode=require"),
    ("https://ci:ghp_token@github.com/acme/models.git", "https://ci:***@github.com/acme/models.git"),
    ("https://ghp_token@github.com/acme/models.git", "https://***@github.com/acme/models.git"),  # token as user
    ("https://user:@host/x", "https://user:***@host/x"),
    ("https://github.com/acme/models.git", "https://github.com/acme/models.git"),
    ("ssh://git@github.com/acme/models.git", "ssh://git@github.com/acme/models.git"),  # a user name, no secret
    ("git@github.com:acme/models.git", "git@github.com:acme/models.git"),
    ("/srv/git/models.git", "/srv/git/models.git"),
    ("sqlite:////home/me/.kiln/mlflow.db", "sqlite:////home/me/.kiln/mlflow.db"),
    ("s3://bucket/mlflow", "s3://bucket/mlflow"),
    ("http://[::1", "http://[::1"),  # not a URL anything could use: left alone, no error
])
def test_redact_replaces_the_password(url, shown):
    assert redact(url) == shown
    assert redact(shown) == shown  # idempotent: redacting what is shown changes nothing


def test_redact_text_finds_urls_inside_lines_and_options():
    line = ("mlflow server --backend-store-uri=postgresql://kiln:pw1@db/kiln --artifacts-destination s3://b/m "
            "'https://tok@github.com/x.git' (cannot clone http://a:pw2@127.0.0.1:9/r.git)")
    shown = redact_text(line)
    assert "pw1" not in shown and "tok" not in shown and "pw2" not in shown
    assert "postgresql://kiln:***@db/kiln" in shown and "s3://b/m" in shown
    assert "http://a:***@127.0.0.1:9/r.git" in shown


def test_split_credentials_keeps_the_url_and_decodes_the_secret():
    assert split_credentials("https://ci:t%40ken@git.example.com:8443/x.git") == (
        "https://git.example.com:8443/x.git", "ci:t@ken")
    assert split_credentials("https://TOKEN@github.com/x") == ("https://github.com/x", "TOKEN:")
    assert split_credentials("git@github.com:acme/x.git") == ("git@github.com:acme/x.git", None)
    assert split_credentials("/srv/x") == ("/srv/x", None)


def test_same_origin_is_scheme_host_and_port():
    assert same_origin("https://github.com/acme/a.git", "https://github.com/other/b.git")
    assert not same_origin("https://github.com/acme/a.git", "https://evil.example.com/acme/a.git")
    assert not same_origin("http://github.com/acme/a.git", "https://github.com/acme/a.git")
    assert not same_origin("https://github.com:8443/a.git", "https://github.com/a.git")
    assert not same_origin("/srv/a.git", "/srv/a.git")  # no host: no credentials go there


def test_credentials_in_kiln_repo_move_to_a_secret_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    monkeypatch.setenv("KILN_REPO", "https://ci:pw-in-url@git.example.com/acme/models.git")
    settings = load_settings()
    assert settings.repo == "https://git.example.com/acme/models.git"
    assert settings.repo_token.get_secret_value() == "ci:pw-in-url"
    assert "pw-in-url" not in repr(settings) and "pw-in-url" not in str(settings.model_dump())
    monkeypatch.setenv("KILN_REPO_TOKEN", "another")
    with pytest.raises(ConfigError, match="repo carries credentials and repo_token is set too") as raised:
        load_settings()
    assert "pw-in-url" not in str(raised.value) and "another" not in str(raised.value)


def test_database_url_is_a_secret_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    monkeypatch.setenv("KILN_DATABASE_URL", "postgresql://kiln:db-pw@db:5432/kiln")
    settings = load_settings()
    assert isinstance(settings.database_url, SecretStr) and "db-pw" not in repr(settings)
    assert database_urls(settings.database_url)[0] == "postgresql+psycopg://kiln:db-pw@db:5432/kiln"
    with pytest.raises(ConfigError, match="is not a database URL") as raised:
        database_urls("postgresql://kiln:db-pw@db:notaport/kiln")
    assert "db-pw" not in str(raised.value)


def test_the_mlflow_server_gets_its_database_url_in_its_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    monkeypatch.setenv("KILN_DATABASE_URL", "postgresql://kiln:db-pw@db:5432/kiln")
    by_name = {s.name: s for s in services(load_settings())}
    for svc in by_name.values():
        assert "db-pw" not in " ".join(svc.argv), svc.name
        assert "KILN_DATABASE_URL" not in svc.env, svc.name  # each server gets its own URL, nobody else any
    assert by_name["mlflow"].env["MLFLOW_BACKEND_STORE_URI"] == "postgresql+psycopg://kiln:db-pw@db:5432/kiln"
    assert "db-pw@db:5432/kiln_prefect" in by_name["prefect"].env["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    others = [s for name, s in by_name.items() if name not in ("mlflow", "prefect")]
    assert not [s.name for s in others if "db-pw" in json.dumps(s.env)]


def test_pid_file_and_log_header_show_a_redacted_command_line(tmp_path):
    argv = [sys.executable, "-c", "import time; time.sleep(60)", "postgresql://kiln:argv-pw@db/kiln"]
    stack = Stack(tmp_path / "stack", [Service("sleeper", argv, {})])
    try:
        stack._spawn(stack.services[0])
        record = stack.pid_path("sleeper").read_text()
        header = stack.log_path("sleeper").read_text()
        assert "argv-pw" not in record and "argv-pw" not in header
        assert "postgresql://kiln:***@db/kiln" in record and "postgresql://kiln:***@db/kiln" in header
        assert (tmp_path / "stack").stat().st_mode & 0o077 == 0  # the stack's folder is its owner's alone
    finally:
        stack.stop("sleeper", grace_s=5)


def test_a_run_parameter_never_carries_repository_credentials():
    with pytest.raises(ValidationError, match="carries credentials") as raised:
        RetrainParams(sha=SHA, repo="https://ci:param-pw@github.com/acme/models.git")
    assert "param-pw" not in str(raised.value.errors()[0]["msg"])
    assert RetrainParams(sha=SHA, repo="git@github.com:acme/models.git").repo == "git@github.com:acme/models.git"


def test_the_starter_refuses_parameters_with_credentials_before_calling_prefect():
    starter = DeploymentStarter("http://127.0.0.1:9/api")  # nothing listens: a call would fail differently
    params = {"params": {"sha": SHA, "repo": "https://ci:start-pw@github.com/acme/models.git"}}
    with pytest.raises(TriggerError, match="carries credentials in a URL") as raised:
        asyncio.run(starter.start("retrain/kiln-retrain", params))
    assert "start-pw" not in str(raised.value)


def test_the_worker_sends_its_token_only_to_kiln_repos_host(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    monkeypatch.delenv("GIT_CONFIG_COUNT", raising=False)
    settings = load_settings(repo="https://git.example.com/acme/models.git", repo_token="ci:tok")
    assert clone_credentials("https://git.example.com/acme/other.git", settings) == "ci:tok"
    assert clone_credentials("https://evil.example.com/acme/models.git", settings) is None  # typed into a form
    assert clone_credentials("/srv/git/models.git", settings) is None
    env = _auth_env("https://git.example.com/acme/models.git", "ci:tok")
    assert env["GIT_CONFIG_KEY_0"] == "http.https://git.example.com/acme/models.git.extraHeader"
    assert env["GIT_CONFIG_VALUE_0"] == "Authorization: Basic " + base64.b64encode(b"ci:tok").decode()
    token_only = _auth_env("https://github.com/a/b.git", "ghp_x")["GIT_CONFIG_VALUE_0"]
    assert base64.b64decode(token_only.split()[-1]) == b"x-access-token:ghp_x"
    monkeypatch.setenv("GIT_CONFIG_COUNT", "2")  # the worker's own git configuration stays
    assert _auth_env("https://github.com/a/b.git", "t")["GIT_CONFIG_COUNT"] == "3"
