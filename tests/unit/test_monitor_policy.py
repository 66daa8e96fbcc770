"""The monitoring policy as a user writes it: the shipped preset loads, and every mistake is one line naming it."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import given

from kiln.errors import ConfigError, ExitCode
from kiln.tasks.evaluate.content_drift import ContentDriftConfig
from kiln.tasks.evaluate.embedding_drift import EmbeddingDriftConfig
from kiln.tasks.monitor.policy import BREACH_KINDS, DEFAULT_POLICY, MonitorPolicy, load_policy, parse_policy
from tests.unit.test_fuzz_files import FUZZ, check, documents


def test_the_shipped_preset_judges_every_kind_and_says_what_each_breach_does():
    policy = load_policy(None)
    assert DEFAULT_POLICY.is_file()
    assert policy.enabled() == list(BREACH_KINDS)
    assert isinstance(policy.content_drift, ContentDriftConfig)
    assert isinstance(policy.embedding_drift, EmbeddingDriftConfig)
    assert set(policy.actions) == set(BREACH_KINDS)
    assert policy.actions["slo"] == ["notify", "rollback"] and "retrain" in policy.actions["quality"]
    assert policy.notify_url is None and policy.action_timeout_s > 0 and policy.retrain_feedback_days > 0


def test_every_field_is_described():
    def undocumented(model: type) -> list[str]:
        out = []
        for name, f in model.model_fields.items():
            if not f.description:
                out.append(f"{model.__name__}.{name}")
            for sub in getattr(f.annotation, "__args__", (f.annotation,)):
                if isinstance(sub, type) and hasattr(sub, "model_fields") and sub is not model:
                    out += undocumented(sub)
        return out

    assert undocumented(MonitorPolicy) == []


def test_actions_come_once_each_in_a_fixed_order():
    policy = parse_policy({"actions": {"quality": ["retrain", "notify"], "slo": ["rollback", "notify"]}})
    assert policy.actions_for(["quality", "slo"]) == ["notify", "rollback", "retrain"]
    assert policy.actions_for(["input_drift"]) == []  # a kind not listed sets off nothing
    assert policy.actions_for([]) == []


def test_a_section_set_to_null_is_not_judged():
    policy = parse_policy({"slo": None, "input_drift": None, "prediction_drift": None})
    assert policy.enabled() == []
    assert parse_policy({}).enabled() == ["slo", "input_drift", "prediction_drift"]  # model defaults


@pytest.mark.parametrize(("text", "expected"), [
    ("slo: {max_error_rat: 0.01}", "slo: unknown key 'max_error_rat' (did you mean 'max_error_rate'?)"),
    ("min_request: 10", "unknown key 'min_request' (did you mean 'min_requests'?)"),
    ("slo: {max_error_rate: 2}", "slo.max_error_rate: Input should be less than or equal to 1"),
    ("min_requests: 0", "min_requests: Input should be greater than or equal to 1"),
    ("actions: {slo: [page]}", "actions.slo.0: Input should be 'notify', 'rollback' or 'retrain'"),
    ("actions: {latency: [notify]}", "actions.latency.[key]: Input should be 'slo'"),
    ("quality: {min_feedback: 10}", "quality.min_accuracy: Field required"),
    ("prediction_drift: {max_kl: null}", "set max_kl or max_psi"),
    ("notify_url: ftp://example.com/hook", "notify_url: 'ftp://example.com/hook' is not an http(s) URL"),
    ("content_drift: {top_k: 0}", "content_drift.top_k: Input should be greater than or equal to 1"),
    ("embedding_drift: {margin: 0.5}", "embedding_drift.margin: Input should be greater than or equal to 1"),
    ("reference: data.xlsx", "unsupported reference file 'data.xlsx'"),
], ids=["misspelt-nested", "misspelt-top", "rate>1", "zero-requests", "unknown-action", "unknown-kind",
        "quality-needs-minimum", "prediction-no-test", "notify-scheme", "content-config", "embedding-config",
        "reference-format"])
def test_a_wrong_key_or_value_is_one_line_naming_it(tmp_path, text, expected):
    path = tmp_path / "monitor.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as caught:
        load_policy(path)
    message = str(caught.value)
    assert message.startswith(f"monitor policy {path} is invalid: ")
    assert expected in message
    assert "\n" not in message and caught.value.exit_code == ExitCode.BAD_INPUT


def test_a_missing_file_or_a_file_that_is_no_mapping_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist; pass an existing YAML file"):
        load_policy(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- slo\n")
    with pytest.raises(ConfigError, match=r"must be a mapping of sections"):
        load_policy(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("slo: {max_error_rate: 0.01\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML at line"):
        load_policy(broken)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_policy(empty) == MonitorPolicy()


@FUZZ
@given(data=documents(yaml.safe_load(DEFAULT_POLICY.read_text())))
def test_any_mutation_of_the_preset_loads_or_is_one_line_naming_the_file(tmp_path, data):
    check(load_policy, tmp_path / "monitor.yaml", data)
