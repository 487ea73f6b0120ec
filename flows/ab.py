"""Phase 3: A/B — the same schemas to every arm, in counterbalanced interleaved order."""

from __future__ import annotations

from prefect import flow

from tasks.requests import send_requests

from ._common import DEFAULT_STORE, open_run


@flow(name="ab", log_prints=True)
def ab(run_id: str, store: str = DEFAULT_STORE) -> dict:
    """Send the A/B plan; re-running with the same run id resumes without duplicates."""
    rs, cfg = open_run(run_id, store)
    return send_requests(cfg, rs, "ab")
