"""One logging setup for the CLI, flows and servers."""

from __future__ import annotations

import logging
import os


def setup_logging(level: str | None = None) -> None:
    """Log Kiln's own modules at ``level`` (default ``$KILN_LOG_LEVEL`` or INFO); quiet the noisy ones."""
    level = (level or os.environ.get("KILN_LOG_LEVEL", "INFO")).upper()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    for name in ("kiln", "tasks", "flows", "infra"):
        logging.getLogger(name).setLevel(level)
    for noisy in ("mlflow", "alembic", "urllib3", "great_expectations", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
