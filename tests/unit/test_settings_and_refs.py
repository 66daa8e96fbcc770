import pytest

from kiln.errors import ConfigError
from kiln.settings import load_settings
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
