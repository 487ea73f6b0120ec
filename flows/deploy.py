"""Phase 1: deploy — start one endpoint per arm and wait until each answers."""

from __future__ import annotations

from prefect import flow

from tasks.endpoints import start_endpoints, teardown, wait_endpoints

from ._common import DEFAULT_STORE, open_run


@flow(name="deploy", log_prints=True)
def deploy(run_id: str, store: str = DEFAULT_STORE) -> dict[str, float]:
    """Start every arm of the run; if one fails to come up, stop the others before failing."""
    rs, cfg = open_run(run_id, store)
    try:
        start_endpoints(cfg, rs)
        return wait_endpoints(cfg, rs)
    except BaseException:
        teardown(rs)
        raise
