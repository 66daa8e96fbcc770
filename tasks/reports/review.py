"""The page a reviewer reads before approving: one self-contained HTML file per optimize run.

Candidates with every metric and the gate's verdict, each failed and passed clause, parity with the
source, the data-check summary, and the Pareto plots (embedded, so the file works when downloaded from
MLflow or opened from a mail). Logged to the run as ``report.html``; the promotion review links to it.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from kiln.tasks.reports.tables import COLUMNS, DELTA_ROWS, VERDICTS, cell, delta_cell, noise_line

REPORT_FILE = "report.html"

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:1rem 0;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}
th:first-child,td:first-child{text-align:left}
.pass{color:#1a7f37;font-weight:600}.fail{color:#cf222e;font-weight:600}
.muted{color:#666}.undecided{color:#9a6700;font-weight:600}img{max-width:100%;border:1px solid #eee}
"""


def _verdict(status: str | bool) -> str:
    status = {True: "pass", False: "fail"}.get(status, status) if isinstance(status, bool) else status
    css = {"pass": "pass", "fail": "fail"}.get(status, "undecided")
    return f'<span class="{css}">{VERDICTS.get(status, status.upper())}</span>'


def _candidates(summary: dict[str, Any]) -> str:
    intervals = summary.get("intervals") or {}
    rows = [("source", "fp32", summary["source"], intervals.get("source"), None, "baseline")]
    if summary.get("champion") and summary["champion"] != summary["source"]:
        rows.append(("champion", "", summary["champion"], intervals.get("champion"), None, "baseline"))
    registered = (summary.get("registered") or {}).get("recipe")
    for name, cand in summary["candidates"].items():
        verdict = _verdict(cand.get("verdict", cand["passed"])) + (" → challenger" if name == registered else "")
        rows.append((name, cand["precision"], cand["metrics"], cand.get("intervals"), cand.get("vs_baseline"),
                     verdict))
    columns = [c for c in COLUMNS if any(c[0] in r[2] for r in rows)]
    deltas = [d for d in DELTA_ROWS if any(r[4] and d[0] in r[4] for r in rows)]
    heads = ["model", "precision", *[h for _, h, _ in columns], *[h for _, h in deltas], "gate"]
    head = "".join(f"<th>{html.escape(h)}</th>" for h in heads)
    body = ""
    for name, precision, metrics, ivs, vs, verdict in rows:
        cells = "".join(f"<td>{html.escape(cell(m, fmt, metrics, ivs))}</td>" for m, _, fmt in columns)
        cells += "".join(f"<td>{html.escape(delta_cell(m, (vs or {}).get(m)) if vs else '')}</td>" for m, _ in deltas)
        body += f"<tr><td>{html.escape(name)}</td><td>{html.escape(precision)}</td>{cells}<td>{verdict}</td></tr>"
    return f"<table><tr>{head}</tr>{body}</table>"


def _clauses(summary: dict[str, Any]) -> str:
    parts = []
    for name, cand in summary["candidates"].items():
        clauses = cand.get("clauses") or [{"status": "pass" if cand["passed"] else "fail", "reason": r}
                                          for r in cand["reasons"]]
        items = "".join(f'<li class="{ {"pass": "muted", "fail": "fail"}.get(c["status"], "undecided") }">'
                        f"{html.escape(c['reason'])}</li>" for c in clauses)
        parts.append(f"<h3>{html.escape(name)} — {_verdict(cand.get('verdict', cand['passed']))}</h3><ul>{items}</ul>")
    return "".join(parts)


def _evidence(summary: dict[str, Any]) -> str:
    ev = summary.get("evidence")
    if not ev:
        return ""
    noise = noise_line(summary) or ""
    return (f"<p>{HOW_JUDGED.format(**ev)}</p><p class=\"muted\">{html.escape(noise)}</p>")


HOW_JUDGED = (
    "Every number is shown with its 95 % interval. Quality clauses compare the candidate with the baseline on "
    "the same {rows} rows (McNemar's test and Newcombe's paired interval for accuracy, paired bootstrap otherwise) "
    "and pass only when the whole interval at α={alpha:g} clears the threshold; an interval across the "
    "threshold is <i>inconclusive</i>. Latency clauses compare samples timed in {rounds} interleaved rounds and "
    "fail only when the candidate is significantly (α={latency_alpha:g}) and materially "
    "(by more than {latency_tolerance:.0%}) slower."
)


def _datachecks(report: dict[str, Any] | None) -> str:
    if not report:
        return '<p class="muted">No data-check report.</p>'
    rows = "".join(
        f"<tr><td>{html.escape(c['split'])}</td><td>{html.escape(c['expectation'])}</td>"
        f"<td>{html.escape(str(c.get('column') or ''))}</td><td>{_verdict(c['success'])}</td>"
        f"<td>{'' if c.get('unexpected_count') is None else c['unexpected_count']}</td></tr>"
        for c in report.get("checks", []))
    return ("<table><tr><th>split</th><th>expectation</th><th>column</th><th>result</th><th>unexpected rows</th>"
            f"</tr>{rows}</table>")


def render(summary: dict[str, Any], *, model: str, run_id: str, datachecks: dict[str, Any] | None,
           pareto_png: Path | None) -> str:
    """The report as one HTML string."""
    plot = ""
    if pareto_png is not None and pareto_png.is_file():
        data = base64.b64encode(pareto_png.read_bytes()).decode()
        plot = f'<img alt="Pareto front" src="data:image/png;base64,{data}">'
    registered = summary.get("registered")
    undecided = any(c.get("verdict") == "inconclusive" for c in summary["candidates"].values())
    outcome = (f"Registered <b>{html.escape(registered['name'])} v{registered['version']}</b> "
               f"({html.escape(registered['recipe'])}) as <code>@{registered.get('alias', 'challenger')}</code>."
               if registered else
               '<span class="fail">No candidate passed the gate; nothing was registered.</span>' + (
                   ' <span class="undecided">Some were inconclusive: the evaluation rows could not tell (not '
                   'enough evidence).</span>' if undecided else ""))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Kiln review — {html.escape(model)}</title>
<style>{_STYLE}</style></head><body>
<h1>Kiln optimize review: {html.escape(model)}</h1>
<p class="muted">MLflow run {html.escape(run_id)}</p>
<p>{outcome}</p>
<h2>Candidates</h2>{_candidates(summary)}
{_evidence(summary)}
<p>Pareto front (accuracy, latency, size): {html.escape(", ".join(summary.get("pareto_front") or []) or "–")}</p>
<h2>Trade-offs</h2>{plot}
<h2>Gate clauses</h2>{_clauses(summary)}
<h2>Data checks</h2>{_datachecks(datachecks)}
</body></html>
"""


def write(path: Path, **kwargs: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(**kwargs), encoding="utf-8")
    return path
