"""Settings (defaults, kiln.yaml, KILN_* variables, overrides) and model references."""

import getpass

import pytest

from kiln.errors import ConfigError
from kiln.settings import load_settings
from kiln.tasks.lifecycle.promotion import ApprovalPolicy, load_approval_policy
from kiln.tasks.registry.audit import current_user
from kiln.tasks.registry.client import ModelRef


def test_defaults_live_under_one_project_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = load_settings()
    assert s.home == tmp_path / ".kiln"
    assert s.effective_tracking_uri == f"sqlite:///{tmp_path / '.kiln' / 'mlflow.db'}" and s.embedded


def test_file_then_environment_then_overrides(tmp_path, monkeypatch):
    cfg = tmp_path / "kiln.yaml"
    cfg.write_text("threads: 4\nexperiment: from-file\n")
    monkeypatch.setenv("KILN_THREADS", "8")
    s = load_settings(cfg)
    assert (s.threads, s.experiment) == (8, "from-file")
    assert load_settings(cfg, experiment="cli").experiment == "cli"
    monkeypatch.setenv("KILN_TRACKING_URI", "http://mlflow:5000")
    assert not load_settings(cfg).embedded


def test_bad_settings_name_the_field(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_THREADS", "zero")
    with pytest.raises(ConfigError, match="threads"):
        load_settings()
    monkeypatch.delenv("KILN_THREADS")
    bad = tmp_path / "k.yaml"
    bad.write_text("[1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.yaml")


@pytest.mark.parametrize(("text", "expected"), [
    ("sentiment", ModelRef("sentiment", alias="champion")),
    ("sentiment@challenger", ModelRef("sentiment", alias="challenger")),
    ("sentiment/3", ModelRef("sentiment", version="3")),
    ("models:/team/sentiment/12", ModelRef("team/sentiment", version="12")),
])
def test_model_refs(text, expected):
    assert ModelRef.parse(text) == expected


def test_bad_model_ref():
    with pytest.raises(ConfigError, match="NAME@ALIAS"):
        ModelRef.parse("sentiment@")


# ── who acts and who may approve: settings, so kiln.yaml can hold them and KILN_* still work ──────────
@pytest.fixture
def no_identity_env(tmp_path, monkeypatch):
    for key in ("KILN_USER", "KILN_APPROVERS", "KILN_FOUR_EYES", "KILN_APPROVAL_POLICY", "KILN_CONFIG", "KILN_HOME"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def test_kiln_yaml_holds_approvers_four_eyes_and_user(tmp_path, no_identity_env):
    (tmp_path / "kiln.yaml").write_text("approvers: [alice, bob]\nfour_eyes: true\nuser: ci-bot\n")
    s = load_settings()
    assert (s.approvers, s.four_eyes, s.user) == (["alice", "bob"], True, "ci-bot")
    assert load_approval_policy(settings=s) == ApprovalPolicy(approvers=["alice", "bob"], four_eyes=True)
    assert current_user(s) == "ci-bot"
    # Without settings passed in, the functions read the same settings (here: ./kiln.yaml) themselves.
    assert load_approval_policy() == ApprovalPolicy(approvers=["alice", "bob"], four_eyes=True)
    assert current_user() == "ci-bot"


def test_identity_variables_still_work_and_beat_kiln_yaml(tmp_path, no_identity_env):
    (tmp_path / "kiln.yaml").write_text("approvers: alice\nuser: ci-bot\n")  # one name, or a comma list
    no_identity_env.setenv("KILN_APPROVERS", " carol, dave ,")
    no_identity_env.setenv("KILN_FOUR_EYES", "true")
    no_identity_env.setenv("KILN_USER", "erin")
    s = load_settings()
    assert (s.approvers, s.four_eyes, s.user) == (["carol", "dave"], True, "erin")
    assert load_approval_policy() == ApprovalPolicy(approvers=["carol", "dave"], four_eyes=True)
    assert current_user() == "erin"
    no_identity_env.setenv("KILN_APPROVERS", '["frank"]')  # JSON, as other list settings are written
    assert load_settings().approvers == ["frank"]


def test_settings_beat_the_approval_policy_file_which_fills_in_the_rest(tmp_path, no_identity_env):
    policy = tmp_path / "team.yaml"
    policy.write_text("approvers: [grace]\nfour_eyes: true\n")
    (tmp_path / "kiln.yaml").write_text(f"approval_policy: {policy}\n")
    assert load_approval_policy() == ApprovalPolicy(approvers=["grace"], four_eyes=True)
    no_identity_env.setenv("KILN_FOUR_EYES", "false")
    assert load_approval_policy() == ApprovalPolicy(approvers=["grace"], four_eyes=False)
    policy.write_text("approvers: [grace]\nfour_eyes: maybe\n")
    no_identity_env.delenv("KILN_FOUR_EYES")
    with pytest.raises(ConfigError, match=r"invalid approval policy .*team.yaml \(four_eyes: .*\); fix the file"):
        load_approval_policy()
    no_identity_env.setenv("KILN_APPROVAL_POLICY", str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="missing.yaml is unreadable"):
        load_approval_policy()


def test_nothing_set_means_the_login_name_and_nobody_approves(tmp_path, no_identity_env):
    s = load_settings()
    assert (s.user, s.approvers, s.four_eyes, s.approval_policy) == (None, None, None, None)
    assert current_user(s) == getpass.getuser()
    assert load_approval_policy(settings=s) == ApprovalPolicy()
    no_identity_env.setenv("KILN_FOUR_EYES", "maybe")
    with pytest.raises(ConfigError, match="invalid settings .*four_eyes"):
        load_settings()


def test_rollout_gateways_are_an_allow_list_of_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KILN_ROLLOUT_GATEWAYS", raising=False)
    monkeypatch.delenv("KILN_GATEWAY_PORT", raising=False)
    assert load_settings().gateways() == {"default": "http://127.0.0.1:8080"}  # the local gateway, by default
    assert load_settings(gateway_port=9090).gateway_url("default") == "http://127.0.0.1:9090"
    (tmp_path / "kiln.yaml").write_text("rollout_gateways: {prod: 'http://gw.internal:8080/', staging: "
                                        "'https://gw.staging:443'}\n")
    s = load_settings()
    assert s.gateway_url("prod") == "http://gw.internal:8080"
    with pytest.raises(ConfigError, match=r"unknown gateway 'default'; .*rollout_gateways setting: prod, staging"):
        s.gateway_url("default")  # configured gateways replace the default one
    monkeypatch.setenv("KILN_ROLLOUT_GATEWAYS", '{"ci": "http://127.0.0.1:18080"}')
    assert load_settings().gateways() == {"ci": "http://127.0.0.1:18080"}
    monkeypatch.setenv("KILN_ROLLOUT_GATEWAYS", "ci=http://127.0.0.1:18080, lab=http://10.0.0.2:8080")
    assert load_settings().gateways() == {"ci": "http://127.0.0.1:18080", "lab": "http://10.0.0.2:8080"}


@pytest.mark.parametrize(("gateways", "problem"), [
    ('{"prod": "http://admin:pw@gw:8080"}', "no credentials in the URL"),
    ('{"prod": "ftp://gw"}', "rollout_gateways.prod"),
    ('{"two words": "http://gw"}', "gateway name 'two words'"),
    ("http://gw:8080", "write name=URL pairs"),
])
def test_bad_rollout_gateways_are_refused(tmp_path, monkeypatch, gateways, problem):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KILN_ROLLOUT_GATEWAYS", gateways)
    with pytest.raises(ConfigError, match=f"invalid settings .*{problem}"):
        load_settings()


def test_a_rollout_names_its_gateway_never_a_url():
    from pydantic import ValidationError

    from kiln.tasks.rollout.params import RolloutParams

    assert RolloutParams(model="m").gateway == "default"
    with pytest.raises(ValidationError, match="looks like a URL; name a gateway from the rollout_gateways setting"):
        RolloutParams(model="m", gateway="http://attacker.example:8080")
