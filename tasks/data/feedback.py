"""Labelled feedback as data: the gateway's scored rows, read back, checked, pruned and frozen for a retrain.

The gateway (:mod:`kiln.infra.feedback_sink`) writes each flush as one new Parquet file, never rewritten::

    <store>/<model name>/date=YYYY-MM-DD/part-<HHMMSS>-<uuid>.parquet

with one row per labelled text row: ``text, label`` (the truth), ``predicted``, ``version`` and ``role`` of the
upstream that answered, ``source`` ("live"), ``request_id``, ``row`` (its place in the request) and ``time`` (UTC
ISO, when the label arrived). The store is a local folder or ``s3://bucket/prefix``; this module is the one that
knows the layout, so the writer and every reader agree on it. Old partitions are deleted here
(:func:`apply_retention`), by the reader's side, never by the gateway's hot path.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd

from kiln.errors import ConfigError, DataCheckFailed, DataError
from kiln.tasks.core import tags as vocab

log = logging.getLogger(__name__)

COLUMNS = ("text", "label", "predicted", "version", "role", "source", "request_id", "row", "time")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")  # a model name that is safe as one path segment
_PARTITION = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")


@dataclass(frozen=True)
class Store:
    """Where feedback lives: a local folder, or an S3 bucket and key prefix."""

    url: str

    @property
    def is_s3(self) -> bool:
        return self.url.startswith("s3://")

    @property
    def bucket(self) -> str:
        return self.url[5:].split("/", 1)[0]

    @property
    def prefix(self) -> str:
        rest = self.url[5:].split("/", 1)
        return rest[1].strip("/") + "/" if len(rest) > 1 and rest[1].strip("/") else ""

    def key(self, *parts: str) -> str:
        return self.prefix + "/".join(parts)


def store_of(settings: Any) -> str | None:
    """The feedback store the settings name: ``feedback_store``, or ``<KILN_HOME>/feedback``; None when "off"."""
    configured = getattr(settings, "feedback_store", None)
    if configured is not None and configured.strip().lower() in {"off", "none", ""}:
        return None
    return configured or str(Path(settings.home) / "feedback")


def store_and_client(settings: Any) -> tuple[str | None, Any]:
    """The settings' feedback store (None when "off") and, for ``s3://``, a boto3 client for their endpoint and
    region, made as :func:`kiln.tasks.registry.storage.s3_client` makes Kiln's other S3 clients (credentials from
    the standard AWS chain; path-style addressing for self-hosted endpoints)."""
    store = store_of(settings)
    if store is None or not store.startswith("s3://"):
        return store, None
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": 5, "mode": "standard"},
                    s3={"addressing_style": "path" if settings.s3_endpoint_url else "auto"})
    return store, boto3.client("s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region,
                               config=config)


def open_store(store: str | Path) -> Store:
    text = str(store)
    if text.startswith("s3://") and not Store(text).bucket:
        raise ConfigError(f"feedback store {text!r} names no bucket; use s3://bucket/prefix or a local folder")
    if "://" in text and not text.startswith("s3://"):
        raise ConfigError(f"feedback store {text!r} is neither a local folder nor s3://bucket/prefix")
    return Store(text)


def check_model_name(name: str) -> str:
    """``name`` as one path segment of the store, or a one-line error."""
    if not _NAME.match(name or ""):
        raise ConfigError(f"model name {name!r} cannot name a feedback partition: use letters, digits, '.', '_' "
                          "or '-' (a registered model name)")
    return name


def _s3(client: Any) -> Any:
    if client is not None:
        return client
    import boto3  # the standard credential chain; callers with settings pass tasks.registry.storage.s3_client

    return boto3.client("s3")


# ── writing (the gateway's sink calls this off its event loop) ───────────────────────────────────────
def write_part(store: str | Path, name: str, frame: pd.DataFrame, *, client: Any = None,
               now: datetime | None = None) -> str:
    """Write ``frame`` (rows of one UTC day, :data:`COLUMNS`) as a new part file of ``name``; returns its location.

    A local file appears whole or not at all (written aside, then renamed), so a reader never sees half of one.
    """
    now = now or datetime.now(UTC)
    where, model = open_store(store), check_model_name(name)
    day = str(frame["time"].iloc[0])[:10] if len(frame) else now.date().isoformat()
    file = f"part-{now:%H%M%S}-{uuid.uuid4().hex[:12]}.parquet"
    data = frame.loc[:, list(COLUMNS)]
    if where.is_s3:
        buffer = io.BytesIO()
        data.to_parquet(buffer, index=False)
        key = where.key(model, f"date={day}", file)
        _s3(client).put_object(Bucket=where.bucket, Key=key, Body=buffer.getvalue())
        return f"s3://{where.bucket}/{key}"
    folder = Path(where.url) / model / f"date={day}"
    folder.mkdir(parents=True, exist_ok=True)
    aside = folder / f".{file}.partial"
    data.to_parquet(aside, index=False)
    os.replace(aside, folder / file)
    return str(folder / file)


# ── reading and pruning ──────────────────────────────────────────────────────────────────────────────
def _partitions(where: Store, model: str, client: Any) -> dict[date, list[str]]:
    """Each day partition of ``model`` → its part files (local paths or S3 keys)."""
    found: dict[date, list[str]] = {}
    if where.is_s3:
        pages = _s3(client).get_paginator("list_objects_v2").paginate(Bucket=where.bucket, Prefix=where.key(model, ""))
        for page in pages:
            for item in page.get("Contents", []):
                parts = item["Key"][len(where.key(model, "")):].split("/")
                if len(parts) == 2 and (m := _PARTITION.match(parts[0])) and parts[1].endswith(".parquet"):
                    found.setdefault(date.fromisoformat(m[1]), []).append(item["Key"])
        return found
    root = Path(where.url) / model
    for folder in sorted(root.glob("date=*")) if root.is_dir() else []:
        if (m := _PARTITION.match(folder.name)) and folder.is_dir():
            found[date.fromisoformat(m[1])] = [str(p) for p in sorted(folder.glob("part-*.parquet"))]
    return found


def read_feedback(store: str | Path, name: str, since_days: int | None = None, *, client: Any = None,
                  now: datetime | None = None) -> pd.DataFrame:
    """The feedback rows of ``name`` (columns :data:`COLUMNS`), optionally only those of the last ``since_days``.

    An empty store gives an empty frame; an unreadable part file is a one-line :class:`DataError`.
    """
    where, model = open_store(store), check_model_name(name)
    cutoff = (now or datetime.now(UTC)) - timedelta(days=since_days) if since_days is not None else None
    frames = []
    for day, files in sorted(_partitions(where, model, client).items()):
        if cutoff is not None and day < cutoff.date():
            continue
        for file in files:
            try:
                if where.is_s3:
                    body = _s3(client).get_object(Bucket=where.bucket, Key=file)["Body"].read()
                    frames.append(pd.read_parquet(io.BytesIO(body)))
                else:
                    frames.append(pd.read_parquet(file))
            except (OSError, ValueError) as exc:
                raise DataError(f"cannot read feedback file {file}: {exc}; delete it if it is damaged") from exc
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype="int64" if c == "row" else "object") for c in COLUMNS})
    frame = pd.concat(frames, ignore_index=True).loc[:, list(COLUMNS)]
    if cutoff is not None:
        frame = frame[pd.to_datetime(frame["time"], utc=True) >= cutoff]
    return frame.sort_values(["time", "request_id", "row"], kind="stable").reset_index(drop=True)


def apply_retention(store: str | Path, name: str, days: int, *, client: Any = None,
                    now: datetime | None = None) -> int:
    """Delete the day partitions of ``name`` older than ``days`` days; returns how many were deleted."""
    if days < 1:
        raise ConfigError(f"feedback retention must be at least 1 day (got {days}); set feedback_retention_days")
    where, model = open_store(store), check_model_name(name)
    oldest = ((now or datetime.now(UTC)) - timedelta(days=days)).date()
    deleted = 0
    for day, files in _partitions(where, model, client).items():
        if day >= oldest:
            continue
        if where.is_s3:
            for start in range(0, len(files), 1000):  # DeleteObjects takes at most 1,000 keys
                _s3(client).delete_objects(Bucket=where.bucket, Delete={"Objects": [{"Key": k} for k in
                                                                                     files[start:start + 1000]]})
        else:
            shutil.rmtree(Path(where.url) / model / f"date={day.isoformat()}")
        deleted += 1
    if deleted:
        log.info("deleted %d feedback partition(s) of %s older than %d days", deleted, model, days)
    return deleted


# ── what the rows are: checks, digest, summary ───────────────────────────────────────────────────────
def digest(frame: pd.DataFrame) -> str:
    """A short content hash of the rows, independent of file layout and order: their identity in lineage tags."""
    ordered = frame.loc[:, list(COLUMNS)].sort_values(["request_id", "row"], kind="stable").astype(str)
    return hashlib.sha256(pd.util.hash_pandas_object(ordered, index=False).values.tobytes()).hexdigest()[:16]


def check_feedback(frame: pd.DataFrame, labels: tuple[str, ...] | list[str], config: Any = None) -> dict[str, Any]:
    """Validate feedback rows with the data suite (Great Expectations): text present and within the length bounds,
    every label one of ``labels``, each (request_id, row) once. Raises :class:`DataCheckFailed` naming what failed.
    """
    from kiln.tasks.data import checks

    config = config or checks.DataCheckConfig()
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    ex = gx.expectations
    suite = [ex.ExpectColumnValuesToNotBeNull(column="text"),
             ex.ExpectColumnValueLengthsToBeBetween(column="text", min_value=max(config.min_text_chars, 1),
                                                    max_value=config.max_text_chars),
             ex.ExpectColumnValuesToBeInSet(column="label", value_set=list(labels)),
             ex.ExpectCompoundColumnsToBeUnique(column_list=["request_id", "row"]),
             ex.ExpectTableRowCountToBeBetween(min_value=1)]
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    batch = context.data_sources.add_pandas("kiln").add_dataframe_asset("feedback") \
        .add_batch_definition_whole_dataframe("feedback")
    validation = gx.ValidationDefinition(data=batch, name="kiln-feedback",
                                         suite=context.suites.add(gx.ExpectationSuite(name="kiln-feedback",
                                                                                       expectations=suite)))
    data = frame.loc[:, list(COLUMNS)].astype({"text": object, "label": object, "request_id": object})
    report = checks._summarise("feedback", validation.run(batch_parameters={"dataframe": data}), data)
    failed = [r for r in report if not r["success"]]
    summary = {"success": not failed, "checks": report, "feedback_digest": digest(frame)}
    if failed:
        raise DataCheckFailed(checks.describe_failures(failed), summary)
    return summary


def summarize(frame: pd.DataFrame) -> dict[str, Any]:
    """What ``kiln feedback show`` prints: rows, labels, answering versions, accuracy and the time range."""
    rows = len(frame)
    return {"rows": rows, "requests": int(frame["request_id"].nunique()) if rows else 0,
            "labels": {str(k): int(v) for k, v in frame["label"].value_counts().sort_index().items()},
            "versions": {str(k): int(v) for k, v in frame["version"].value_counts().sort_index().items()},
            "accuracy": round(float((frame["label"] == frame["predicted"]).mean()), 4) if rows else None,
            "first": str(frame["time"].min()) if rows else None, "last": str(frame["time"].max()) if rows else None,
            "digest": digest(frame) if rows else None}


# ── a retrain's feedback: frozen when planned, added to the train split only ─────────────────────────
@dataclass(frozen=True)
class FeedbackSnapshot:
    """The feedback rows one retrain uses, kept as a content-addressed Parquet copy (the store keeps changing)."""

    path: Path
    rows: int
    digest: str
    store: str
    days: int

    @property
    def tags(self) -> dict[str, str]:
        return {vocab.FEEDBACK_ROWS: str(self.rows), vocab.FEEDBACK_DIGEST: self.digest,
                vocab.FEEDBACK_STORE: self.store, vocab.FEEDBACK_DAYS: str(self.days)}

    def read(self) -> pd.DataFrame:
        return pd.read_parquet(self.path)


def snapshot(store: str | Path, name: str, days: int, keep_in: Path, *, retention_days: int | None = None,
             min_rows: int = 1, client: Any = None, now: datetime | None = None) -> FeedbackSnapshot:
    """Read the last ``days`` of ``name``'s feedback (after pruning past ``retention_days``) and keep a copy.

    Raises :class:`DataError` when fewer than ``min_rows`` rows are found: a retrain that asked for feedback does
    not silently train without it.
    """
    if retention_days is not None:
        apply_retention(store, name, retention_days, client=client, now=now)
    frame = read_feedback(store, name, since_days=days, client=client, now=now)
    if len(frame) < min_rows:
        raise DataError(f"found {len(frame)} labelled feedback row(s) of {name} in the last {days} days at {store} "
                        f"(need at least {min_rows}); post labels to the gateway's /feedback, widen feedback_days, "
                        "or retrain without feedback_days")
    rows_digest = digest(frame)
    kept = Path(keep_in) / f"feedback-{rows_digest}.parquet"
    if not kept.is_file():
        kept.parent.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(kept.with_suffix(".partial"), index=False)
        os.replace(kept.with_suffix(".partial"), kept)
    return FeedbackSnapshot(kept, len(frame), rows_digest, str(store), days)


def snapshot_for(settings: Any, name: str, days: int) -> FeedbackSnapshot:
    """:func:`snapshot` of the settings' store, pruned to ``feedback_retention_days``, kept under KILN_HOME."""
    store, client = store_and_client(settings)
    if store is None:
        raise ConfigError("feedback_days asks for labelled feedback but feedback_store is 'off'; set "
                          "KILN_FEEDBACK_STORE to where the gateway writes it, or retrain without feedback_days")
    return snapshot(store, name, days, Path(settings.home) / "datasets", client=client,
                    retention_days=settings.feedback_retention_days)


def add_to_train(splits: Any, frame: pd.DataFrame) -> tuple[Any, int]:
    """``splits`` with the feedback rows appended to the TRAIN split only; returns it and how many rows were added.

    Rows whose text is in the validation or test split are left out (they would leak what the gate judges on), as
    are texts already in train with the same label. The digest changes with the rows, so caches keyed by it retrain.
    """
    from dataclasses import replace

    from kiln.tasks.data.datasets import digest_frames

    held_out = set(splits.validation["text"]) | set(splits.test["text"])
    rows = frame.loc[~frame["text"].isin(held_out), ["text", "label"]].drop_duplicates()
    known = set(zip(splits.train["text"], splits.train["label"], strict=True))
    rows = rows.loc[pd.Series([(t, lab) not in known for t, lab in zip(rows["text"], rows["label"], strict=True)],
                              index=rows.index, dtype=bool)]
    if len(rows) < len(frame):
        log.info("feedback: %d of %d rows added to train (the rest are held-out texts or already in train)",
                 len(rows), len(frame))
    train = pd.concat([splits.train, rows.astype(splits.train.dtypes.to_dict())], ignore_index=True)
    frames = {"train": train, "validation": splits.validation, "test": splits.test}
    return replace(splits, train=train, digest=digest_frames(frames)), len(rows)


def add_feedback(splits: Any, frame: pd.DataFrame, config: Any = None) -> Any:
    """Check the feedback rows against ``splits``' labels (:func:`check_feedback`) and add them to its train split.

    Raises :class:`DataError` when none is left to add (every row a held-out text or already in train).
    """
    check_feedback(frame, splits.labels, config)
    out, added = add_to_train(splits, frame)
    if not added:
        raise DataError(f"none of the {len(frame)} feedback rows can be added to the train split: each is a "
                        "validation/test text or already in train; retrain without feedback_days or collect new rows")
    log.info("added %d labelled feedback rows to the train split (%d rows now)", added, len(out.train))
    return out
