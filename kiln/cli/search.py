"""``kiln optimize --search``: the options that turn a search on, and the table of its trials.

Exists so that app.py only gains the options; the parsing (a budget such as ``20m``) and the printing live here.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from kiln.errors import ConfigError


def search_params(enabled: bool, budget: str | None, trials: int | None, space: str, seed: int):
    """The optimize form's ``search`` section, or None without ``--search``; a bad budget is one line (exit 2)."""
    from kiln.tasks.optimize.search import SearchParams, parse_budget, space_named

    if not enabled:
        if budget is not None or trials is not None:
            raise ConfigError("--budget and --trials apply to a search; add --search")
        return None
    parse_budget(budget or "20m")  # "--budget 20x" → "budget '20x' is not a duration; write e.g. ..."
    space_named(space)
    if trials is not None and trials < 1:
        raise ConfigError(f"--trials {trials}: give at least 1")
    return SearchParams(budget=budget or "20m", trials=trials, space=space, seed=seed)


def print_search(summary: dict[str, Any], console: Console | None = None) -> None:
    """One row per trial of the study (this run's and earlier ones), front members marked ★."""
    search = summary.get("search")
    if not search:
        return
    console = console or Console()
    front = set(search["front"])
    table = Table(title=f"search {search['study']} — {search['trials_this_run']} trials this run "
                        f"({', '.join(f'{n} {s}' for s, n in search['states'].items())}), budget {search['budget']}")
    for column in ("trial", "state", "accuracy", "p50 ms", "b32 /s", "MB", "s", "recipe"):
        table.add_column(column, justify="left" if column in ("state", "recipe") else "right")
    for t in search["trials"]:
        m = t.get("metrics") or {}
        mark = "★ " if t.get("recipe") in front else ""
        table.add_row(f"{mark}{t['number']}", t["state"], _num(m.get("accuracy"), 4), _num(m.get("latency_p50_ms"), 2),
                      _num(m.get("throughput_per_s"), 0), _num(m.get("size_mb"), 1), _num(t.get("seconds"), 0),
                      (t.get("description") or "") if t["state"] == "complete" else (t.get("reason") or "")[:60])
    console.print(table)


def _num(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"
