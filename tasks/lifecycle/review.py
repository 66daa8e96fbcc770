"""What an approver reads before deciding: the gate's verdict with its reasons, champion against challenger
metric by metric, and how to sign a decision."""

from __future__ import annotations

import contextlib
import json

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from kiln.tasks.core import tags as vocab
from kiln.tasks.registry import client as registry


def metrics_table(champion: dict[str, float] | None, challenger: dict[str, float], champion_label: str = "champion",
                  challenger_label: str = "challenger") -> str:
    """A Markdown table: one row per metric, champion vs challenger, relative change."""
    rows = [f"| metric | {champion_label} | {challenger_label} | change |", "|---|---:|---:|---:|"]
    for key in sorted(set(challenger) | set(champion or {})):
        new, old = challenger.get(key), (champion or {}).get(key)
        change = f"{(new - old) / abs(old):+.1%}" if new is not None and old not in (None, 0) else "—"
        rows.append(f"| {key} | {_num(old)} | {_num(new)} | {change} |")
    return "\n".join(rows)


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def champion_metrics(client: MlflowClient, challenger: ModelVersion, champion: ModelVersion | None) -> dict | None:
    """The champion's metrics as measured in the challenger's own optimize run (same data, same machine),
    else the champion's ``kiln.metrics`` tag."""
    run_id = challenger.tags.get(vocab.RUN_ID)
    if run_id:
        with contextlib.suppress(Exception):  # no run, no summary: fall back to the tag
            summary = mlflow.artifacts.load_dict(f"{client.get_run(run_id).info.artifact_uri}/summary.json")
            if summary.get("champion"):
                return summary["champion"]
    if champion is not None and vocab.METRICS in champion.tags:
        return json.loads(champion.tags[vocab.METRICS])
    return None


def review_markdown(client: MlflowClient, name: str, challenger: ModelVersion) -> str:
    """What an approver needs: gate verdict with its reasons and the metric comparison."""
    now = registry.aliases_of(client, name)
    champion = client.get_model_version(name, now[vocab.CHAMPION]) if vocab.CHAMPION in now else None
    tags = challenger.tags
    reasons = json.loads(tags.get(vocab.GATE_REASONS, "[]"))
    table = metrics_table(champion_metrics(client, challenger, champion), json.loads(tags.get(vocab.METRICS, "{}")),
                          f"champion v{champion.version}" if champion else "champion (none)",
                          f"challenger v{challenger.version}")
    lines = [f"## Promote {name} v{challenger.version} ({tags.get(vocab.RECIPE, '?')}) to champion?", "",
             f"Gate: **{tags.get(vocab.GATE, 'unknown')}**", ""] + [f"- {r}" for r in reasons] + ["", table]
    if tags.get(vocab.RUN_ID):
        report = f"{client.get_run(tags[vocab.RUN_ID]).info.artifact_uri}/report.html"
        lines += ["", f"Full review (candidates, gate clauses, Pareto plots, data checks): [report.html]({report})"]
    lines += ["", f"Decide with your SSH key: `kiln approve {name} {challenger.version} --reason \"...\"` (or "
              f"`kiln reject ...`); add `--print-token` to paste the decision into this form instead."]
    return "\n".join(lines)
