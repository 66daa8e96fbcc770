"""infra/feedback_sink.py and the texts PredictionLog keeps for it: rows of the live answer only, buffered,
written per model and day, kept when a write fails, flushed when the gateway stops."""

from __future__ import annotations

import asyncio

import pytest

from kiln.infra.feedback_sink import FeedbackSink, sink_from_settings
from kiln.infra.gateway_stats import PredictionLog
from kiln.settings import Settings
from kiln.tasks.data.feedback import read_feedback

ENTRY = {"live": ("champion", "3", ["negative", "positive"]), "shadow": ("challenger", "4", ["positive", "positive"])}


def test_the_log_keeps_texts_only_for_a_sink_and_within_its_budget():
    plain = PredictionLog()
    plain.add("r1", "live", "champion", "3", ["negative"])
    assert plain.text_keepers("r1") == []  # without a sink, texts are never held

    log = PredictionLog(capacity=2, keep_texts=True, max_text_chars=10)
    for rid in ("r1", "r2"):
        log.add(rid, "live", "champion", "3", ["negative"])
        (keeper,) = log.text_keepers(rid)
        keeper.record_inputs([f"{rid}-abc"])  # 6 characters each
    assert log.pop_texts("r1") is None  # r2's texts pushed r1's out of the 10-character budget
    assert log.pop_texts("r2") == ["r2-abc"] and log.pop_texts("r2") is None  # taken once
    log.add("r3", "live", "champion", "3", ["negative"])
    log.add_texts("r3", ["x"])
    log.add("r4", "live", "champion", "3", ["negative"])
    log.add("r5", "live", "champion", "3", ["negative"])  # capacity 2: r3 is evicted, its texts with it
    assert log.pop_texts("r3") is None
    log.add_texts("gone", ["never predicted"])
    assert log.pop_texts("gone") is None


def test_rows_are_the_live_answer_per_text_row_and_land_per_day(tmp_path):
    sink = FeedbackSink(str(tmp_path / "fb"), flush_rows=100)
    assert sink.add("sentiment", "r1", ENTRY, ["positive", "positive"], ["so good", "really good"]) == 2
    assert sink.add("sentiment", "r2", ENTRY, ["positive"], None) == 0  # texts not known: nothing to keep
    assert sink.add("sentiment", "r3", {"shadow": ENTRY["shadow"]}, ["positive", "positive"], ["a", "b"]) == 0
    (written,) = sink.flush()
    assert "sentiment/date=" in written and sink.flush() == []
    rows = read_feedback(tmp_path / "fb", "sentiment")
    assert list(rows["text"]) == ["so good", "really good"] and list(rows["predicted"]) == ["negative", "positive"]
    assert set(rows["version"]) == {"3"} and set(rows["role"]) == {"champion"} and set(rows["source"]) == {"live"}
    assert list(rows["row"]) == [0, 1] and rows["time"].str.endswith("+00:00").all()


def test_a_failed_write_keeps_the_rows_for_the_next_flush(tmp_path):
    blocker = tmp_path / "fb"
    blocker.write_text("a file where the store's folder should be")
    sink = FeedbackSink(str(blocker), max_rows=3)
    sink.add("sentiment", "r1", ENTRY, ["positive", "positive"], ["a", "b"])
    assert sink.flush() == [] and sink.written == 0
    sink.add("sentiment", "r2", ENTRY, ["positive", "positive"], ["c", "d"])  # 4 rows > max_rows: the oldest goes
    assert sink.dropped == 1
    blocker.unlink()
    sink.flush()
    assert list(read_feedback(blocker, "sentiment")["text"]) == ["b", "c", "d"] and sink.written == 3


def test_the_background_writer_flushes_by_count_and_on_stop(tmp_path):
    sink = FeedbackSink(str(tmp_path / "fb"), flush_rows=2, flush_s=60)

    async def scenario() -> tuple[int, int]:
        async with sink.running():
            sink.add("sentiment", "r1", ENTRY, ["positive", "positive"], ["a", "b"])  # reaches flush_rows
            for _ in range(100):
                await asyncio.sleep(0.02)
                if sink.written:
                    break
            by_count = sink.written
            sink.add("sentiment", "r2", ENTRY, ["negative", "positive"], ["c", "d"])
        return by_count, sink.written

    assert asyncio.run(scenario()) == (2, 4)
    assert len(sink.files) == 2  # one new file per flush, never rewritten


def test_settings_choose_the_store(tmp_path):
    assert sink_from_settings(Settings(home=tmp_path, feedback_store="off")) is None
    sink = sink_from_settings(Settings(home=tmp_path, feedback_flush_rows=7))
    assert sink.store == str(tmp_path / "feedback") and sink.flush_rows == 7
    with pytest.raises(ValueError, match="flush_rows must be >= 1"):
        FeedbackSink(str(tmp_path), flush_rows=0)
