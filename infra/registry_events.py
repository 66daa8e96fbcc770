"""Registry events: a new version of a watched model starts optimize; an approval resumes a paused promotion.

    python -m kiln.infra.registry_events [--once]      (the poller; settings: KILN_WATCH_MODELS, ...)

Two ways to hear the registry, one meaning for both (:class:`~kiln.infra.registry_actions.RegistryEvents`):

- **webhooks** (MLflow 3.3+ server, SQL store): MLflow POSTs ``model_version.created`` and
  ``model_version_tag.set`` to ``/hooks/mlflow`` (:mod:`kiln.infra.mlflow_webhook`), signed as
  :mod:`kiln.infra.mlflow_signature` checks;
- **polling** (:mod:`kiln.infra.registry_poller`, this module's command): the embedded SQLite store sends
  no webhooks, and MLflow drops a delivery after its retries, so polling is also the backstop.

Both start optimize with the idempotency key ``mlflow:{name}:{version}:optimize``: whichever comes second
gets the run the first one created. Versions that Kiln registered itself (its optimize flow's challengers)
never start optimize, or optimize would feed on its own output forever. Paused promote runs are found and
resumed through Prefect by :mod:`kiln.infra.paused_promotions`.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
from dataclasses import asdict

from kiln.errors import KilnError
from kiln.infra.registry_poller import RegistryPoller
from kiln.infra.starter import DeploymentStarter


def main(argv: list[str] | None = None) -> int:
    """``python -m kiln.infra.registry_events [--once]``: poll the registry (for stores that send no webhooks)."""
    from kiln.logs import setup_logging
    from kiln.settings import load_settings

    parser = argparse.ArgumentParser(prog="python -m kiln.infra.registry_events", description=main.__doc__)
    parser.add_argument("--once", action="store_true", help="poll once, print what happened, exit")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        settings = load_settings()
        poller = RegistryPoller(settings, DeploymentStarter(settings.prefect_api_url))
        if args.once:
            report = poller.poll_once()
            print(json.dumps(asdict(report), indent=2))
            return 1 if report.errors else 0
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        poller.run(stop)
    except KilnError as exc:
        print(f"error: {exc}")
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
