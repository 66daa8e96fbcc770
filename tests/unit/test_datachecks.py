import pandas as pd
import pytest

from kiln.errors import DataCheckFailed
from kiln.tasks.data.checks import DataCheckConfig, check_splits
from kiln.tasks.data.datasets import Splits


def _with_test(splits: Splits, test: pd.DataFrame) -> Splits:
    return Splits(splits.train, splits.validation, test.reset_index(drop=True), splits.labels, "x")


def test_clean_splits_pass(tiny_splits):
    report = check_splits(tiny_splits)
    assert report["success"] and len(report["checks"]) >= 14


def test_overlap_with_training_is_reported_with_examples(tiny_splits):
    leaked = pd.concat([tiny_splits.test, tiny_splits.train.head(3)])
    with pytest.raises(DataCheckFailed) as err:
        check_splits(_with_test(tiny_splits, leaked))
    assert "test: expect_column_values_to_not_be_in_set(text_hash) failed, 3 rows" in str(err.value)
    assert tiny_splits.train["text"].iloc[0][:40] in str(err.value)
    failed = [c for c in err.value.report["checks"] if not c["success"]]
    assert [c["split"] for c in failed] == ["test"]


def test_unknown_label_and_long_text_fail(tiny_splits):
    bad = tiny_splits.test.copy()
    bad.loc[0, "label"] = "furious"
    bad.loc[1, "text"] = "x" * 50
    with pytest.raises(DataCheckFailed) as err:
        check_splits(_with_test(tiny_splits, bad), DataCheckConfig(max_text_chars=40, max_label_kl=10))
    message = str(err.value)
    assert "expect_column_values_to_be_in_set(label) failed, 1 rows" in message
    assert "expect_column_value_lengths_to_be_between(text) failed" in message


def test_class_balance_bound(tiny_splits):
    skewed = tiny_splits.test[tiny_splits.test["label"] == "negative"]
    with pytest.raises(DataCheckFailed, match="kl_divergence"):
        check_splits(_with_test(tiny_splits, skewed))
