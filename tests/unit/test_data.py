import pandas as pd
import pytest

from kiln.errors import DataError
from kiln.tasks.data.datasets import DatasetSpec, load_splits


def _write(tmp_path, frame: pd.DataFrame, name: str = "d.csv"):
    path = tmp_path / name
    if name.endswith(".csv"):
        frame.to_csv(path, index=False)
    elif name.endswith(".parquet"):
        frame.to_parquet(path)
    else:
        frame.to_json(path, orient="records", lines=True)
    return path


def _frame(n: int = 90) -> pd.DataFrame:
    return pd.DataFrame({"body": [f"text number {i}" for i in range(n)], "y": ["a", "b", "c"] * (n // 3)})


def test_shipped_tweets_split_is_deduplicated_stratified_and_seeded():
    spec = DatasetSpec(limit=3000, seed=1)
    first, again = load_splits(spec), load_splits(spec)
    assert first.digest == again.digest
    texts = [set(first.split(s)["text"]) for s in ("train", "validation", "test")]
    assert not texts[0] & texts[1] and not texts[0] & texts[2] and not texts[1] & texts[2]
    assert first.labels == ("negative", "neutral", "positive")
    share = first.train["label"].value_counts(normalize=True)
    test_share = first.test["label"].value_counts(normalize=True)
    assert (share - test_share).abs().max() < 0.02
    assert load_splits(DatasetSpec(limit=3000, seed=2)).digest != first.digest


@pytest.mark.parametrize("name", ["d.csv", "d.parquet", "d.jsonl"])
def test_user_files_in_each_format(tmp_path, name):
    path = _write(tmp_path, _frame(), name)
    splits = load_splits(DatasetSpec(source=str(path), text_column="body", label_column="y"))
    assert len(splits.train) + len(splits.validation) + len(splits.test) == 90
    assert splits.labels == ("a", "b", "c")


def test_latin1_csv_is_read(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes(b"text,label\n" + "".join(f"caf\xe9 {i},x\n" for i in range(30)).encode("latin-1"))
    splits = load_splits(DatasetSpec(source=str(path), label_column="label"))
    assert splits.train["text"].str.contains("café").all()


def test_duplicates_are_removed_before_splitting(tmp_path):
    frame = pd.concat([_frame(), _frame()])
    splits = load_splits(DatasetSpec(source=str(_write(tmp_path, frame)), text_column="body", label_column="y"))
    assert len(splits.train) + len(splits.validation) + len(splits.test) == 90


def test_missing_column_names_what_exists(tmp_path):
    path = _write(tmp_path, _frame())
    with pytest.raises(DataError, match=r"no column\(s\) \['text'\].*has \['body', 'y'\]"):
        load_splits(DatasetSpec(source=str(path), label_column="y"))


def test_empty_dataset_is_refused(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("text,label\n")
    with pytest.raises(DataError, match="no usable rows"):
        load_splits(DatasetSpec(source=str(path), label_column="label"))


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_splits(DatasetSpec(source=str(tmp_path / "nope.csv")))
    with pytest.raises(ValueError, match="unsupported dataset file"):
        DatasetSpec(source="data.xlsx")
