"""Data checks with Great Expectations (GX Core 1.x): a dataset passes its suite before it is used.

Each split gets the same suite (non-null text, length bounds, known labels) and the evaluation splits
get two more: class balance close to training's (KL divergence) and no text that also occurs in
training (by hash). A failure raises :class:`DataCheckFailed` whose report names each failed
expectation, how many rows broke it, and a few examples.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

import pandas as pd
from pydantic import BaseModel, Field

from kiln.errors import DataCheckFailed
from kiln.tasks.data.datasets import Splits

log = logging.getLogger(__name__)


class DataCheckConfig(BaseModel):
    """Thresholds of the data suite."""

    min_text_chars: int = Field(1, ge=0, description="Shortest acceptable text, in characters.")
    max_text_chars: int = Field(2000, gt=0, description="Longest acceptable text, in characters.")
    max_label_kl: float = Field(
        0.05, gt=0, description="Largest KL divergence of an eval split's label mix from training's."
    )
    check_overlap: bool = Field(True, description="Fail when an evaluation text also occurs in training.")


def _hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()


def _suite(gx: Any, name: str, splits: Splits, config: DataCheckConfig, *, is_eval: bool) -> Any:
    ex = gx.expectations
    items: list[Any] = [
        ex.ExpectColumnValuesToNotBeNull(column="text"),
        ex.ExpectColumnValueLengthsToBeBetween(
            column="text", min_value=config.min_text_chars, max_value=config.max_text_chars
        ),
        ex.ExpectTableRowCountToBeBetween(min_value=1),
    ]
    if splits.labels:
        items.append(ex.ExpectColumnValuesToBeInSet(column="label", value_set=list(splits.labels)))
        if is_eval:
            shares = splits.train["label"].value_counts(normalize=True)
            partition = {"values": list(shares.index), "weights": [float(w) for w in shares.values]}
            items.append(
                ex.ExpectColumnKLDivergenceToBeLessThan(
                    column="label", partition_object=partition, threshold=config.max_label_kl
                )
            )
    if is_eval and config.check_overlap:
        train_hashes = sorted({_hash(t) for t in splits.train["text"]})
        items.append(ex.ExpectColumnValuesToNotBeInSet(column="text_hash", value_set=train_hashes))
    return gx.ExpectationSuite(name=name, expectations=items)


def _summarise(split_name: str, result: Any, frame: pd.DataFrame) -> list[dict[str, Any]]:
    rows = []
    for r in result.results:
        cfg = r.expectation_config
        res = r.result or {}
        examples = [str(v)[:80] for v in (res.get("partial_unexpected_list") or [])[:3]]
        if cfg.kwargs.get("column") == "text_hash" and examples:
            lookup = dict(zip(frame["text_hash"], frame["text"], strict=False))
            examples = [lookup.get(h, h)[:80] for h in examples]
        rows.append(
            {
                "split": split_name,
                "expectation": cfg.type,
                "column": cfg.kwargs.get("column"),
                "success": bool(r.success),
                "unexpected_count": res.get("unexpected_count"),
                "observed": _plain(res.get("observed_value")),
                "examples": examples,
            }
        )
    return rows


def _plain(value: Any) -> Any:
    if isinstance(value, float | int | str | type(None)):
        return value
    return str(value)[:200]


def check_splits(splits: Splits, config: DataCheckConfig | None = None) -> dict[str, Any]:
    """Validate every split; return the report, or raise :class:`DataCheckFailed` naming what failed."""
    config = config or DataCheckConfig()
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx  # slow import (~2 s): only when data is actually checked

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    source = context.data_sources.add_pandas("kiln")
    report: list[dict[str, Any]] = []
    for name in ("train", "validation", "test"):
        frame = splits.split(name).copy()
        frame["text_hash"] = frame["text"].map(_hash)
        frame["text"] = frame["text"].astype(object)
        if "label" in frame:
            frame["label"] = frame["label"].astype(object)
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        suite = context.suites.add(_suite(gx, f"kiln-{name}", splits, config, is_eval=name != "train"))
        validation = gx.ValidationDefinition(data=batch, suite=suite, name=f"kiln-{name}")
        result = validation.run(batch_parameters={"dataframe": frame})
        report.extend(_summarise(name, result, frame))
    failed = [r for r in report if not r["success"]]
    summary = {"success": not failed, "checks": report, "dataset_digest": splits.digest}
    if failed:
        raise DataCheckFailed(describe_failures(failed), summary)
    log.info("data checks passed: %d expectations over 3 splits", len(report))
    return summary


def describe_failures(failed: list[dict[str, Any]]) -> str:
    """One readable line per failed expectation, prefixed by a headline."""
    parts = []
    for r in failed:
        detail = f"{r['unexpected_count']} rows" if r["unexpected_count"] is not None else f"observed {r['observed']}"
        examples = f", e.g. {r['examples']}" if r["examples"] else ""
        parts.append(f"{r['split']}: {r['expectation']}({r['column'] or ''}) failed, {detail}{examples}")
    return "dataset failed its data checks — " + "; ".join(parts) + " — fix the data or the check thresholds"
