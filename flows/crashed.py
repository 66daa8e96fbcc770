"""Flow runs whose process died: marked Crashed by the next run of the same flow on this host.

A process killed with SIGKILL runs no handler, so nothing tells Prefect (no worker watches a flow started
from the command line) and its flow run stays "Running" forever. Each Kiln flow therefore claims its run
when it starts (:func:`claim_run`): a lease file ``<KILN_HOME>/runs/<flow>/<flow run id>.json`` names the
host, the pid and the process's start time (a pid is reused, a pid with its start time is not). Once
claimed, the new run looks at the other leases of the same flow on this host: a run still Running or
Pending whose process is gone is set Crashed (forced: no engine will report on it again), with a message
naming the host and pid; leases of finished runs are removed. A flow's own lease goes when its run ends
(:data:`RELEASE_HOOKS`), or, where a flow has no hooks, at the next run's sweep.

A lease is written by the flow's body, so a kill between Prefect marking the run Running and that first line
would leave no lease. The command line closes that gap: it starts each flow inside :func:`owned`, which tags
the run at creation with this host and this process (``kiln-host:<host>``, ``kiln-pid:<pid>:<start>``), and
the sweep also finds Running/Pending runs of the flow carrying this host's tag whose process is gone.

Nothing here may fail a flow: an unreachable Prefect API or an unreadable lease is logged and skipped.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from kiln.settings import Settings

log = logging.getLogger(__name__)

_UNFINISHED = ("RUNNING", "PENDING")


@dataclass(frozen=True)
class Claim:
    """Who runs a flow run: the host, the pid and that process's start time (seconds since the epoch)."""

    flow_run: str
    flow: str
    host: str
    pid: int
    started: float

    def process_gone(self) -> bool:
        """True when the process that claimed the run no longer exists on this host (a reused pid does not count)."""
        try:
            return abs(psutil.Process(self.pid).create_time() - self.started) > 1.0
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return True
        except psutil.Error:  # e.g. access denied: it exists, so it is not gone
            return False


def _this_process(flow_run: str, flow: str) -> Claim:
    pid = os.getpid()
    return Claim(flow_run, flow, socket.gethostname(), pid, psutil.Process(pid).create_time())


def _folder(home: Path, flow: str) -> Path:
    return home / "runs" / "".join(c if c.isalnum() or c in "-_" else "_" for c in flow)


def _current() -> tuple[str, str] | None:
    """(flow run id, flow name) of the flow run this code runs in, or None outside one."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None or ctx.flow is None:
        return None
    return str(ctx.flow_run.id), ctx.flow.name


def _host_tag(host: str) -> str:
    return f"kiln-host:{host}"


def owned() -> Any:
    """A context in which the flow runs this process starts carry its host and pid as tags (see the module doc)."""
    from prefect import tags

    me = _this_process("", "")
    return tags(_host_tag(me.host), f"kiln-pid:{me.pid}:{me.started:.2f}")


def _tagged_claim(run: Any, flow: str) -> Claim | None:
    """The claim a run's tags make (None without Kiln's pid tag)."""
    for tag in run.tags or ():
        kind, _, rest = tag.partition(":")
        pid, _, started = rest.partition(":")
        if kind == "kiln-pid" and pid.isdigit():
            try:
                return Claim(str(run.id), flow, socket.gethostname(), int(pid), float(started))
            except ValueError:
                return None
    return None


def sweep_tagged(flow: str, current: str | None = None) -> list[str]:
    """Set Crashed the Running/Pending runs of ``flow`` tagged with this host whose tagged process is gone."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType

    crashed = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING])),
                tags=FlowRunFilterTags(all_=[_host_tag(socket.gethostname())])), limit=200)
        for run in runs:
            claim = _tagged_claim(run, flow)
            if claim is None or claim.flow_run == current or not claim.process_gone():
                continue
            _crash(client, claim, current)
            crashed.append(claim.flow_run)
    return crashed


def _crash(client: Any, claim: Claim, current: str | None) -> None:
    from prefect.states import Crashed

    message = (f"process {claim.pid} on {claim.host} that ran this flow run is gone (killed or crashed); "
               f"marked Crashed by flow run {current or 'a later run'}; run the flow again to resume")
    client.set_flow_run_state(claim.flow_run, Crashed(message=message), force=True)
    log.warning("flow run %s of %s: %s", claim.flow_run, claim.flow, message)


def claim_run(settings: Settings) -> None:
    """Record that this process runs this flow run, then mark this flow's runs whose process is gone Crashed.

    Call it first in a flow's body; outside a flow run it does nothing.
    """
    current = _current()
    if current is None:
        return
    flow_run, flow = current
    folder = _folder(settings.home, flow)
    try:  # own lease first, the sweep (API calls) after: a kill in between still leaves this run findable
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{flow_run}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(_this_process(flow_run, flow))))
        tmp.replace(path)
        sweep(folder, flow_run)
        sweep_tagged(flow, flow_run)
    except Exception as exc:  # noqa: BLE001 - bookkeeping must never fail the flow it serves
        log.warning("could not check for crashed %s runs (%s); a killed run may still show as Running", flow, exc)


def sweep(folder: Path, current: str | None = None) -> list[str]:
    """Set Crashed every Running/Pending run leased in ``folder`` whose process is gone from this host; remove
    the leases of runs that ended. Returns the ids of the runs marked Crashed."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    host = socket.gethostname()
    claims = {}
    for path in folder.glob("*.json") if folder.is_dir() else ():
        try:
            claim = Claim(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            log.warning("ignoring the unreadable run lease %s (%s)", path, exc)
            continue
        if claim.flow_run != current and claim.host == host:
            claims[claim.flow_run] = (claim, path)
    if not claims:
        return []
    crashed = []
    with get_client(sync_client=True) as client:
        runs = {str(r.id): r for r in client.read_flow_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(claims))), limit=len(claims))}
        for run_id, (claim, path) in claims.items():
            run = runs.get(run_id)
            state = run.state.type.value if run is not None and run.state is not None else None
            gone = claim.process_gone()
            if (state in _UNFINISHED or state is None) and not gone:
                continue  # still being run (or run against another Prefect API by a live process)
            if state in _UNFINISHED:
                _crash(client, claim, current)
                crashed.append(run_id)
            path.unlink(missing_ok=True)
    return crashed


def release(flow: Any, flow_run: Any, state: Any) -> None:
    """A flow-run hook: this run ended, so its lease goes (``on_completion``/``on_failure``/...)."""
    from kiln.settings import load_settings

    try:
        (_folder(load_settings().home, flow.name) / f"{flow_run.id}.json").unlink(missing_ok=True)
    except Exception as exc:  # noqa: BLE001 - a hook must not change how the run ended
        log.debug("could not remove the lease of flow run %s: %s", flow_run.id, exc)


# For ``@flow(..., **RELEASE_HOOKS)``: every way a run can end in its own process removes its lease.
RELEASE_HOOKS: dict[str, list] = {"on_completion": [release], "on_failure": [release],
                                  "on_cancellation": [release], "on_crashed": [release]}
