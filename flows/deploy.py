"""Phase 1: deploy — start one endpoint per arm and wait until every one answers (all at once).

The start and wait tasks get time limits from the config (guided_ab/limits.py)."""

from __future__ import annotations

from prefect import flow

from guided_ab.limits import limits
from tasks.endpoints import start_endpoints, teardown, wait_endpoints

from ._common import DEFAULT_STORE, open_run


@flow(name="deploy", log_prints=True)
def deploy(run_id: str, store: str = DEFAULT_STORE) -> dict[str, float]:
    """Start every arm of the run; if one fails to come up, stop the others before failing."""
    rs, cfg = open_run(run_id, store)
    lim = limits(cfg)
    try:
        start_endpoints.with_options(timeout_seconds=lim.start_s)(cfg, rs)
        return wait_endpoints.with_options(timeout_seconds=lim.wait_s)(cfg, rs)
    except BaseException:
        teardown(rs)
        raise
