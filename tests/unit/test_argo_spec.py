"""Argo Rollouts' ``strategy.canary.steps`` read as a Kiln rollout spec (tasks/rollout/argo_spec.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from kiln.errors import ConfigError
from kiln.tasks.rollout.argo_spec import duration_s, from_argo, to_steps
from kiln.tasks.rollout.judge import Step, load_spec

ROOT = Path(__file__).resolve().parents[2]
ANALYSIS = {"analysis": {"templates": [{"templateName": "kiln-judge"}]}}
MIRROR = {"setMirrorRoute": {"name": "kiln-mirror", "percentage": 50, "match": [{"method": {"exact": "POST"}}]}}


def steps(*argo: dict) -> list[tuple[float, float, float, bool]]:
    return [(s.weight, s.shadow, s.analysis_s, s.manual_gate) for s in to_steps(list(argo))]


def test_weight_and_timed_pauses_become_analysed_steps() -> None:
    assert steps({"setWeight": 10}, {"pause": {"duration": "5m"}}, {"setWeight": 50}, {"pause": {"duration": 90}},
                 {"pause": {"duration": "30s"}}) == [(10, 0, 300, False), (50, 0, 120, False)]


def test_an_analysis_step_judges_its_weight_for_the_default_interval_when_no_pause_says() -> None:
    default = Step.model_fields["analysis_s"].default
    assert steps({"setWeight": 20}, ANALYSIS) == [(20, 0, default, False)]
    assert steps({"setWeight": 20}, {"pause": {"duration": "2m"}}, ANALYSIS) == [(20, 0, 120, False)]


def test_an_indefinite_pause_judges_its_weight_and_gates_the_next_step() -> None:
    default = Step.model_fields["analysis_s"].default
    assert steps({"setWeight": 50}, {"pause": {}}, {"setWeight": 100}, {"pause": {"duration": "1m"}}) == [
        (50, 0, default, False), (100, 0, 60, True)]
    # Before any traffic: a gate on the first step.
    assert steps({"pause": {}}, {"setWeight": 10}, {"pause": {"duration": 60}}) == [(10, 0, 60, True)]


def test_weights_passed_through_at_once_are_no_steps_as_in_argo() -> None:
    # Argo goes through 10 and 20 at once; after the last step it sends everything to the new version (= promote).
    assert steps({"setWeight": 10}, {"setWeight": 20}, {"pause": {"duration": "1m"}}, {"setWeight": 100}) == [
        (20, 0, 60, False)]


def test_a_mirror_route_is_a_shadow_share_until_removed() -> None:
    assert steps(MIRROR, {"pause": {"duration": "2m"}}, {"setMirrorRoute": {"name": "kiln-mirror"}},
                 {"setWeight": 10}, {"pause": {"duration": "5m"}}) == [(0, 0.5, 120, False), (10, 0, 300, False)]
    unset = {"setMirrorRoute": {"name": "m", "match": [{"path": {"prefix": "/v2"}}]}}  # percentage unset: all
    assert steps(unset, ANALYSIS) == [(0, 1.0, 60, False)]


def test_set_canary_scale_is_ignored_and_a_pause_before_traffic_is_no_step() -> None:
    assert steps({"pause": {"duration": "1m"}}, {"setCanaryScale": {"replicas": 2}}, {"setWeight": 10},
                 ANALYSIS) == [(10, 0, 60, False)]


@pytest.mark.parametrize(("argo", "message"), [
    ([{"setHeaderRoute": {"name": "h"}}], "setHeaderRoute has no Kiln equivalent"),
    ([{"experiment": {"templates": []}}], "experiment has no Kiln equivalent"),
    ([{"plugin": {"name": "p"}}], "plugin has no Kiln equivalent"),
    ([{"setWeigth": 10}], "unknown step 'setWeigth'"),
    ([{"setWeight": 150}], "must be a percentage"),
    ([{"setWeight": 10, "pause": {}}], "one key"),
    ([{"setWeight": 10}, {"pause": {"duration": "5 minutes"}}], "duration like 30s"),
    ([{"setWeight": 10}, {"pause": "5m"}], "pause must be a mapping"),
    ([{"setMirrorRoute": {"percentage": 50}}], "needs a name"),
    ([{"setWeight": 10}, {"setWeight": 20}], "no step sends the canary traffic and waits"),
    ([{"pause": {"duration": "1m"}}, ANALYSIS], "no step sends the canary traffic and waits"),
])
def test_what_kiln_cannot_follow_is_an_error_naming_the_step(argo: list, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        to_steps(argo)


def test_go_durations() -> None:
    assert [duration_s(v, "d") for v in (30, "30", "45s", "5m", "1h30m", "1.5h", "500ms")] == [
        30, 30, 45, 300, 5400, 5400, 0.5]
    for bad in ("", True, 1.5, "m", "5d", "5m3"):
        with pytest.raises(ConfigError):
            duration_s(bad, "d")


def test_a_spec_file_in_argo_form_keeps_kilns_own_keys() -> None:
    spec = load_spec("strategy:\n  canary:\n    steps:\n      - setWeight: 25\n      - pause: {duration: 10m}\n"
                     "metrics: {max_error_rate: 0.02}\nfailure_limit: 2\nmin_samples: 50\n")
    assert [(s.weight, s.analysis_s) for s in spec.steps] == [(25, 600)]
    assert (spec.metrics.max_error_rate, spec.failure_limit, spec.min_samples) == (0.02, 2, 50)
    with pytest.raises(ConfigError, match="unknown key 'failure_limt'"):
        load_spec({"strategy": {"canary": {"steps": [{"setWeight": 5}, ANALYSIS]}}, "failure_limt": 1})
    with pytest.raises(ConfigError, match="keep one"):
        from_argo({"steps": [], "strategy": {"canary": {"steps": [{"setWeight": 5}, ANALYSIS]}}})
    with pytest.raises(ConfigError, match="must be a non-empty list"):
        load_spec({"strategy": {"blueGreen": {}}})


def test_the_example_rollout_means_kilns_default_steps_with_a_gate_before_100() -> None:
    rollout = yaml.safe_load((ROOT / "infra" / "k8s" / "progressive" / "rollout.yaml").read_text())
    spec = from_argo(rollout)
    assert [(s.weight, s.analysis_s, s.manual_gate) for s in spec.steps] == [
        (10, 300, False), (25, 300, False), (50, 300, False), (100, 300, True)]
    preset = load_spec(ROOT / "tasks" / "presets" / "rollout-default.yaml")
    assert [(s.weight, s.analysis_s) for s in preset.steps if s.weight] == [
        (s.weight, s.analysis_s) for s in spec.steps]


def test_kiln_judge_spec_prints_the_converted_spec(tmp_path: Path, monkeypatch) -> None:
    from kiln.cli.app import app

    monkeypatch.setenv("KILN_HOME", str(tmp_path / ".kiln"))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["judge", "spec", str(ROOT / "infra" / "k8s" / "progressive" / "rollout.yaml")])
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.output)
    assert [s["weight"] for s in printed["steps"]] == [10, 25, 50, 100] and printed["steps"][3]["manual_gate"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("strategy:\n  canary:\n    steps:\n      - setHeaderRoute: {name: h}\n")
    result = CliRunner().invoke(app, ["judge", "spec", str(bad)])
    assert result.exit_code == 2 and "setHeaderRoute has no Kiln equivalent" in result.output


def test_kiln_judge_serve_without_its_token_exits_2(tmp_path: Path, monkeypatch) -> None:
    from kiln.cli.app import app

    monkeypatch.setenv("KILN_HOME", str(tmp_path / ".kiln"))
    monkeypatch.delenv("KILN_JUDGE_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["judge", "serve"])
    assert result.exit_code == 2 and "KILN_JUDGE_TOKEN" in result.output
    monkeypatch.setenv("KILN_JUDGE_TOKEN", "t")
    monkeypatch.delenv("KILN_GATEWAY_TOKEN", raising=False)
    result = CliRunner().invoke(app, ["judge", "serve", "--metrics", "nope"])
    assert result.exit_code == 2 and "unknown metrics source 'nope'" in result.output
    result = CliRunner().invoke(app, ["judge", "serve"])
    assert result.exit_code == 2 and "KILN_GATEWAY_TOKEN" in result.output


_SCALARS = st.none() | st.booleans() | st.integers(-5, 200) | st.floats(allow_nan=True) | st.sampled_from(
    ["", "5m", "1h30m", "x", "pass", "kiln-mirror"])
_KEYS = st.sampled_from(["setWeight", "pause", "analysis", "setMirrorRoute", "setCanaryScale", "duration",
                         "percentage", "match", "name", "templates", "strategy", "canary", "steps", "kind", "spec"])
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner,
                                                                                              max_size=3),
                       max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(st.dictionaries(_KEYS, _VALUES, min_size=0, max_size=2), max_size=6), outer=_VALUES)
def test_any_argo_form_is_a_spec_or_one_config_error(steps: list, outer: object) -> None:
    for raw in ({"strategy": {"canary": {"steps": steps}}}, {"kind": "Rollout", "spec": outer},
                {"strategy": outer}):
        try:
            spec = from_argo(raw)
        except ConfigError:
            continue
        assert spec.steps and all(isinstance(s, Step) for s in spec.steps)
