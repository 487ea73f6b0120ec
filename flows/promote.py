"""Phase 3, step 1: promote the A/B's winner (guided_ab/promote.py) and open the monitoring window
(its schedule on the `monitor` deployment: flows/_monitor_window.py)."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from guided_ab import promote as P

from ._common import DEFAULT_STORE, keys_from_secret_blocks, open_run
from ._monitor_window import set_window_schedule


@flow(name="promote", log_prints=True)
def promote(run_id: str, store: str = DEFAULT_STORE, dry_run: bool = False) -> dict:
    """Deploy the switch's winner as production (Modal) or tell the operator what to change
    (external), keep the control deployable, open the monitoring window. dry_run: only show it."""
    rs, cfg = open_run(run_id, store)
    keys_from_secret_blocks(["GUIDED_AB_MODAL_API_KEY", "MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET"])
    result = P.promote(rs, dry_run=dry_run)
    print(result["text"])
    if not dry_run:
        result["schedule"] = set_window_schedule(run_id, store, result["window"]["cadence_hours"], active=True)
        create_markdown_artifact("# Promoted\n\n```\n" + result["text"] + "\n```", key=f"{cfg.name}-promotion"[:100],
                                 description=f"run {run_id}: promoted '{result['serve']}'")
    return result
