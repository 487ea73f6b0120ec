"""The monitoring window's schedule and alert, Prefect's side of phase 3 (guided_ab/monitor.py).

`promote` opens the window: it adds a schedule to the `monitor` deployment of prefect.yaml (one
per promoted run: slug `window-<run id>`, parameters {run_id, store}, every `cadence_hours`,
active); the monitoring run that ends the window (keep, or a revert recommended early) sets it
inactive. Prefect's own deployment-schedule API does this; without a `monitor` deployment (the
ephemeral API of the CLI) nothing is scheduled and the log says how to run the window by hand.

A revert recommendation emits the event ALERT_EVENT (resource `guided-ab.run.<run id>`): the
automation on the `revert` deployment in prefect.yaml fires on it (a revert flow run that waits
for a sign-off in the UI); a notification automation can match the same event.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import DeploymentScheduleCreate
from prefect.client.schemas.schedules import IntervalSchedule
from prefect.events import emit_event
from prefect.exceptions import ObjectNotFound

from guided_ab.monitor import ALERT_EVENT

MONITOR_DEPLOYMENT = "monitor/monitor"


def slug(run_id: str) -> str:
    return f"window-{run_id}"


def set_window_schedule(run_id: str, store: str, cadence_hours: float, active: bool) -> str:
    """Create/activate (or deactivate) the run's schedule on the monitor deployment; what was done."""
    log = get_run_logger()
    with get_client(sync_client=True) as client:
        try:
            dep = client.read_deployment_by_name(MONITOR_DEPLOYMENT)
        except ObjectNotFound:
            msg = (f"no `{MONITOR_DEPLOYMENT}` deployment on this Prefect API: nothing scheduled; run "
                   f"`guided-ab monitor --run-id {run_id}` every {cadence_hours:g} h (or `prefect deploy --all`)")
            log.info(msg)
            return "no deployment"
        mine = [s for s in client.read_deployment_schedules(dep.id) if s.slug == slug(run_id)]
        if mine:
            client.update_deployment_schedule(dep.id, mine[0].id, active=active)
        elif active:
            schedule = IntervalSchedule(interval=timedelta(hours=cadence_hours), anchor_date=datetime.now(UTC) + timedelta(hours=cadence_hours))
            client.create_deployment_schedules(dep.id, [DeploymentScheduleCreate(
                schedule=schedule, active=True, parameters={"run_id": run_id, "store": store}, slug=slug(run_id))])
    done = f"schedule {slug(run_id)} on {MONITOR_DEPLOYMENT}: {'active' if active else 'inactive'}"
    log.info(done)
    return done


def alert(run_id: str, store: str, result: dict[str, Any]) -> None:
    """Emit the revert recommendation as a Prefect event (what an automation fires on). The payload
    carries the store the run lives in: the revert automation passes it on (prefect.yaml), so the
    revert opens the same run the monitoring run judged, whatever store the window was opened on."""
    emit_event(event=ALERT_EVENT, resource={"prefect.resource.id": f"guided-ab.run.{run_id}", "prefect.resource.name": run_id},
               payload={"reason": result.get("reason"), "run": result.get("run"), "pairs": result.get("pairs"), "store": store})
