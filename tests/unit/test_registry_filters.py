"""Model names in registry searches (tasks/registry/client.py): refused where MLflow's filter grammar cannot
express them; references parsed strictly (versions from 1). Searches against a real store:
tests/integration/test_registry_filters.py."""

from __future__ import annotations

import pytest

from kiln.errors import ConfigError
from kiln.tasks.registry import client as registry
from kiln.tasks.registry.client import ModelRef


def test_a_name_with_both_quotes_is_refused_not_searched_for_as_something_else():
    with pytest.raises(ConfigError, match="holds both ' and \", which an MLflow registry search cannot express"):
        registry.literal("it's \"x\"")
    with pytest.raises(ConfigError, match="tag value"):
        registry.versions_of(None, "fine", **{"kiln.k": "a'b\"c"})


@pytest.mark.parametrize(("text", "expected"), [
    ("o'brien", ModelRef("o'brien", alias="champion")),
    ("o'brien/2", ModelRef("o'brien", version="2")),
    ("ünïcødé@challenger", ModelRef("ünïcødé", alias="challenger")),
    ("team/sentiment", ModelRef("team/sentiment", alias="champion")),
    ("name/abc", ModelRef("name/abc", alias="champion")),
])
def test_references_that_parse(text, expected):
    assert ModelRef.parse(text) == expected


@pytest.mark.parametrize(("text", "match"), [
    ("tiny/0", "versions are whole numbers from 1"), ("tiny/-1", "versions are whole numbers from 1"),
    ("tiny/01", "versions are whole numbers from 1"), ("tiny/2.0", "versions are whole numbers from 1"),
    ("tiny@", "NAME@ALIAS"), ("@champion", "NAME@ALIAS"), ("tiny@chämpion", "NAME@ALIAS"),
    ("ti\x00ny", "may not contain"), ("both'\"", "cannot express"), ("tiny /3", "starts or ends with spaces"),
])
def test_references_that_are_refused(text, match):
    with pytest.raises(ConfigError, match=match):
        ModelRef.parse(text)


@pytest.mark.parametrize("name", ["a/b", "a:b", "tab\there"])
def test_a_new_name_follows_mlflows_rules(name):
    assert registry.check_name(name.replace("/", "").replace(":", "").replace("\t", ""))
    with pytest.raises(ConfigError, match="may not contain"):
        registry.check_name(name, new=True)
