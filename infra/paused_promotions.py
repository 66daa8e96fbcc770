"""Paused ``promote`` flow runs on the Prefect server, and resuming one with an approval form's answer.

A promote run with ``approval="ui"`` pauses for a reviewer; :mod:`kiln.infra.registry_actions` resumes it
when the reviewed version carries a complete, signed decision (the form's answer is its token). Prefect is
imported inside each method, so the webhook receiver imports this module without starting a Prefect client.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID


@dataclass(frozen=True)
class PausedPromotion:
    """A promote flow run waiting for a reviewer, and the model it would promote."""

    flow_run_id: str
    model: str


class PrefectPromotions:
    """Paused ``promote`` flow runs (``approval="ui"``) and resuming them with an approval form's answer."""

    def __init__(self, api_url: str | None = None) -> None:
        self.api_url = api_url

    @contextlib.contextmanager
    def _client(self) -> Iterator[Any]:
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        scope = temporary_settings({PREFECT_API_URL: self.api_url}) if self.api_url else contextlib.nullcontext()
        with scope, get_client(sync_client=True) as client:
            yield client

    def paused(self, model: str | None = None) -> list[PausedPromotion]:
        """Every paused promote run (of ``model`` when given) that names the model it promotes."""
        from prefect.client.schemas.filters import (
            FlowFilter,
            FlowFilterName,
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType

        with self._client() as client:
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["promote"])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.PAUSED]))), limit=200)
        found = [PausedPromotion(str(r.id), ((r.parameters or {}).get("params") or {}).get("model", "")) for r in runs]
        return [p for p in found if p.model and (model is None or p.model == model)]

    def resume(self, flow_run_id: str, answer: dict[str, str]) -> bool:
        """True when resumed, False when the run is no longer paused; raises when Prefect refuses the answer."""
        from prefect.client.schemas.responses import SetStateStatus

        with self._client() as client:
            result = client.resume_flow_run(UUID(flow_run_id), run_input=answer)
        if result.status == SetStateStatus.ACCEPT:
            return True
        if result.status == SetStateStatus.ABORT:  # resumed already (a second event for the same decision)
            return False
        raise RuntimeError(f"Prefect refused to resume {flow_run_id}: {getattr(result.details, 'reason', result)}")
