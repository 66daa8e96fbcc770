"""tasks/data/feedback.py: the feedback store's layout (local folder and S3 via moto), reading a window of days,
retention, the data checks on feedback rows, their digest, and adding them to the train split only."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from kiln.errors import ConfigError, DataCheckFailed, DataError
from kiln.settings import Settings
from kiln.tasks.core import tags as vocab
from kiln.tasks.data import feedback
from kiln.tasks.data.datasets import Splits, digest_frames

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def _rows(request_id: str, texts: list[str], labels: list[str], when: datetime, predicted: str = "negative",
          version: str = "3") -> pd.DataFrame:
    n = len(texts)
    return pd.DataFrame({"text": texts, "label": labels, "predicted": [predicted] * n, "version": [version] * n,
                         "role": ["champion"] * n, "source": ["live"] * n, "request_id": [request_id] * n,
                         "row": list(range(n)), "time": [when.isoformat()] * n})


def _fill(store: str, client=None) -> None:
    """Three days of feedback: 100 days ago, 3 days ago, today."""
    for days, request_id in ((100, "old"), (3, "recent"), (0, "today")):
        frame = _rows(request_id, [f"{request_id} text {i}" for i in range(2)], ["positive", "negative"],
                      NOW - timedelta(days=days))
        feedback.write_part(store, "sentiment", frame, client=client, now=NOW)


def test_parts_are_partitioned_by_model_and_day_and_read_back(tmp_path):
    store = str(tmp_path / "fb")
    _fill(store)
    parts = sorted(p.relative_to(tmp_path / "fb").parts[:2] for p in (tmp_path / "fb").rglob("*.parquet"))
    assert parts == [("sentiment", "date=2026-08-22"), ("sentiment", "date=2026-11-27"),
                     ("sentiment", "date=2026-11-30")]
    assert not list((tmp_path / "fb").rglob("*.partial"))  # written aside, then renamed
    everything = feedback.read_feedback(store, "sentiment", now=NOW)
    assert list(everything.columns) == list(feedback.COLUMNS) and len(everything) == 6
    recent = feedback.read_feedback(store, "sentiment", since_days=7, now=NOW)
    assert set(recent["request_id"]) == {"recent", "today"}
    assert feedback.read_feedback(store, "other", now=NOW).empty
    summary = feedback.summarize(recent)
    assert summary["rows"] == 4 and summary["labels"] == {"negative": 2, "positive": 2}
    assert summary["versions"] == {"3": 4} and summary["accuracy"] == 0.5


def test_retention_deletes_old_day_partitions_only(tmp_path):
    store = str(tmp_path / "fb")
    _fill(store)
    assert feedback.apply_retention(store, "sentiment", 90, now=NOW) == 1
    assert set(feedback.read_feedback(store, "sentiment", now=NOW)["request_id"]) == {"recent", "today"}
    assert feedback.apply_retention(store, "sentiment", 90, now=NOW) == 0
    with pytest.raises(ConfigError, match="at least 1 day"):
        feedback.apply_retention(store, "sentiment", 0)


def test_bad_names_and_stores_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot name a feedback partition"):
        feedback.read_feedback(str(tmp_path), "../etc")
    with pytest.raises(ConfigError, match="neither a local folder nor s3://"):
        feedback.read_feedback("gs://bucket/x", "sentiment")
    assert feedback.store_of(Settings(home=tmp_path, feedback_store="off")) is None
    assert feedback.store_of(Settings(home=tmp_path)) == str(tmp_path / "feedback")


def test_checks_catch_unknown_labels_empty_texts_and_duplicates():
    good = _rows("r1", ["fine", "bad"], ["positive", "negative"], NOW)
    assert feedback.check_feedback(good, ("negative", "positive"))["success"]
    bad = pd.concat([good, _rows("r1", ["", "x"], ["positive", "neutralish"], NOW)], ignore_index=True)
    with pytest.raises(DataCheckFailed) as failed:
        feedback.check_feedback(bad, ("negative", "positive"))
    message = str(failed.value)
    assert "expect_column_values_to_be_in_set(label)" in message and "neutralish" in message
    assert "expect_compound_columns_to_be_unique" in message  # r1 rows 0 and 1 twice
    assert "expect_column_value_lengths_to_be_between(text)" in message  # the empty text


def test_the_digest_follows_the_rows_not_their_order():
    frame = _rows("r1", ["a", "b"], ["positive", "negative"], NOW)
    assert feedback.digest(frame) == feedback.digest(frame.iloc[::-1])
    assert feedback.digest(frame) != feedback.digest(frame.assign(label="positive"))


def test_feedback_goes_to_the_train_split_only():
    frames = {"train": pd.DataFrame({"text": ["t1", "t2"], "label": ["positive", "negative"]}),
              "validation": pd.DataFrame({"text": ["v1"], "label": ["positive"]}),
              "test": pd.DataFrame({"text": ["x1"], "label": ["negative"]})}
    splits = Splits(**frames, labels=("negative", "positive"), digest=digest_frames(frames))
    rows = _rows("r1", ["new one", "x1", "t1", "new two"], ["positive", "negative", "positive", "negative"], NOW)
    out = feedback.add_feedback(splits, rows)
    assert list(out.train["text"]) == ["t1", "t2", "new one", "new two"]  # not the test text, not a known row
    assert out.test.equals(splits.test) and out.validation.equals(splits.validation)
    assert out.digest != splits.digest  # caches keyed by the splits' digest train again
    with pytest.raises(DataError, match="none of the 1 feedback rows can be added"):
        feedback.add_feedback(splits, _rows("r2", ["x1"], ["negative"], NOW))


def test_a_snapshot_needs_rows_and_records_its_lineage(tmp_path):
    store = str(tmp_path / "fb")
    with pytest.raises(DataError, match=r"found 0 labelled feedback row\(s\) of sentiment in the last 7 days"):
        feedback.snapshot(store, "sentiment", 7, tmp_path / "keep", now=NOW)
    _fill(store)
    snap = feedback.snapshot(store, "sentiment", 7, tmp_path / "keep", retention_days=90, now=NOW)
    assert snap.rows == 4 and snap.path.is_file() and len(snap.read()) == 4
    assert snap.tags == {vocab.FEEDBACK_ROWS: "4", vocab.FEEDBACK_DIGEST: snap.digest,
                         vocab.FEEDBACK_STORE: store, vocab.FEEDBACK_DAYS: "7"}
    assert not (Path(store) / "sentiment" / "date=2026-08-22").exists()  # pruned past the retention first


def test_the_s3_store_has_the_same_layout(monkeypatch):
    moto = pytest.importorskip("moto", reason="moto is missing: pip install -e '.[test]'")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with moto.mock_aws():
        store, client = feedback.store_and_client(Settings(feedback_store="s3://kiln-fb/team", s3_region="us-east-1"))
        client.create_bucket(Bucket="kiln-fb")
        _fill(store, client)
        keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="kiln-fb")["Contents"])
        assert [k.rsplit("/", 1)[0] for k in keys] == ["team/sentiment/date=2026-08-22",
                                                        "team/sentiment/date=2026-11-27",
                                                        "team/sentiment/date=2026-11-30"]
        assert len(feedback.read_feedback(store, "sentiment", since_days=7, client=client, now=NOW)) == 4
        assert feedback.apply_retention(store, "sentiment", 90, client=client, now=NOW) == 1
        assert len(feedback.read_feedback(store, "sentiment", client=client, now=NOW)) == 4
