"""One logging setup for the CLI, flows and servers."""

from __future__ import annotations

import logging
import os
import sys
import warnings

# Library chatter that says nothing to an operator of Kiln: tracer notes from ONNX export of
# Hugging Face models (the export is checked numerically afterwards), MLflow's advice on input
# examples (Kiln logs explicit signatures), ONNX Runtime's pre-processing hint.
_QUIET_WARNINGS = (
    "Converting a tensor to a Python boolean",
    "Exporting aten::index operator",
    "An input example was not provided",
    "Add type hints to the `predict` method",
    "Failed to infer signature from type hint",
)
_QUIET_LOG_MESSAGES = ("Please consider to run pre-processing before quantization",)


class _DropChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in str(record.msg) for text in _QUIET_LOG_MESSAGES)


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record, not at set-up (test runners swap it)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001 - logging assigns it in __init__; ignore
        pass


def setup_logging(level: str | None = None) -> None:
    """Log Kiln's own modules at ``level`` (default ``$KILN_LOG_LEVEL`` or INFO); quiet the noisy ones."""
    level = (level or os.environ.get("KILN_LOG_LEVEL", "INFO")).upper()
    root = logging.getLogger()
    if not any(isinstance(h, _CurrentStderr) for h in root.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
        handler.addFilter(_DropChatter())
        root.addHandler(handler)
    if not any(isinstance(f, _DropChatter) for f in root.filters):
        root.addFilter(_DropChatter())  # records logged on the root logger itself (ONNX Runtime does)
    for text in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{text}")
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    for name in ("kiln",):
        logging.getLogger(name).setLevel(level)
    for noisy in ("mlflow", "alembic", "urllib3", "great_expectations", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
