"""Phase 3: A/B — the same schemas to every arm, in counterbalanced interleaved order.

With `decision.sequential` in the config (or after `guided-ab continue`), the A/B runs look
after look (`ab-look` tasks) until the repeated confidence intervals settle the verdict or a cap is hit.
"""

from __future__ import annotations

from prefect import flow

from guided_ab import looks
from tasks.looks import run_looks
from tasks.requests import send_requests

from ._common import DEFAULT_STORE, open_run


@flow(name="ab", log_prints=True)
def ab(run_id: str, store: str = DEFAULT_STORE) -> dict:
    """Send the A/B plan (sequential: look after look); re-running with the same run id resumes
    without duplicates."""
    rs, cfg = open_run(run_id, store)
    if looks.is_sequential(cfg, rs):
        return run_looks(cfg, rs)
    return send_requests(cfg, rs, "ab")
