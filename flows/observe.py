"""Phase 2: observe — the candidate alone on its own schemas: which backend does it pick?
(Its requests have a time limit from the config: guided_ab/limits.py.)"""

from __future__ import annotations

from prefect import flow

from guided_ab.limits import limits
from tasks.requests import send_requests

from ._common import DEFAULT_STORE, open_run


@flow(name="observe", log_prints=True)
def observe(run_id: str, store: str = DEFAULT_STORE) -> dict:
    rs, cfg = open_run(run_id, store)
    return send_requests.with_options(timeout_seconds=limits(cfg).observe_s)(cfg, rs, "observe")
