"""In-memory Great Expectations checks: one ephemeral context, opened on first use, for the drift checks.

Importing GX takes seconds, so nothing here imports it until a check is actually judged (an analysis window with
too little traffic never pays for it). The frames are built by Kiln, so a metric GX cannot compute is a bug in
Kiln, raised as such, never a verdict.
"""

from __future__ import annotations

import os
from typing import Any

import pandas as pd


def expectations_module() -> Any:
    """``great_expectations.expectations``, imported on first use (with GX's analytics off)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations.expectations as ex  # slow import (~2-4 s, once per process)

    return ex


class GxValidator:
    """Validates pandas frames against lists of expectations in one ephemeral GX context."""

    def __init__(self, source_name: str) -> None:
        self.source_name = source_name
        self._gx: Any = None
        self._source: Any = None

    def validate(self, name: str, frame: pd.DataFrame, expectations: list[Any]) -> list[Any]:
        """GX's results for ``frame`` (an asset called ``name``), one per expectation, in order.

        Raises:
            RuntimeError: GX could not compute a metric of a frame Kiln built.
        """
        if self._gx is None:
            expectations_module()
            import great_expectations as gx

            context = gx.get_context(mode="ephemeral")
            context.variables.progress_bars = {"globally": False}
            self._gx, self._source = gx, context.data_sources.add_pandas(self.source_name)
        suite = self._gx.ExpectationSuite(name=f"{self.source_name}-{name}", expectations=expectations)
        batch = self._source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name).get_batch(
            batch_parameters={"dataframe": frame})
        results = batch.validate(suite).results
        for r in results:
            error = gx_error(r.exception_info)
            if error:
                raise RuntimeError(f"GX could not validate {name}: {error}")
        return results


def gx_error(info: Any) -> str | None:
    """The first exception message in a GX result's ``exception_info`` (flat, or keyed by metric)."""
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    return next((m for v in info.values() if (m := gx_error(v))), None)
