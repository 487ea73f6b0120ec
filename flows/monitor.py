"""Phase 3, step 2 (scheduled during the window): one paired monitoring run against the live
control, the whole window judged as one sequential A/B (guided_ab/monitor.py). A revert
recommendation emits the alert event; the window's end (or an early revert) turns its schedule off."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from guided_ab import monitor as M
from guided_ab import promote as P

from ._common import DEFAULT_STORE, keys_from_secret_blocks, open_run
from ._monitor_window import alert, set_window_schedule


@flow(name="monitor", log_prints=True)
def monitor(run_id: str, store: str = DEFAULT_STORE) -> dict:
    rs, cfg = open_run(run_id, store)
    prod = P.production_of(cfg, rs)
    keys_from_secret_blocks([e for e in (prod.api_key_env, prod.control_api_key_env, "GUIDED_AB_MODAL_API_KEY") if e])
    result = M.monitor_once(rs)
    if result["final"]:
        set_window_schedule(run_id, store, prod.cadence_hours, active=False)
    if result["alert"]:
        alert(run_id, store, result)
    if result["ran"]:
        create_markdown_artifact(
            f"# Monitoring run {result['run']}/{result['planned_runs']}: {result['verdict']}\n\n{result['reason']}\n\n"
            f"Report: `{rs.where('monitor-report.html')}`", key=f"{cfg.name}-monitoring"[:100],
            description=f"run {run_id}: {result['verdict']}")
    return result
