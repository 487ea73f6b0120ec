"""Phase 5: decide / teardown — stop every endpoint the run started, then apply the decision rule
(with a human sign-off before a `switch` when the config asks for it: flows/_approval.py)."""

from __future__ import annotations

from prefect import flow

from guided_ab.config import DecisionOverrides
from tasks.endpoints import teardown

from ._approval import decide_and_publish
from ._common import DEFAULT_STORE, open_run


@flow(name="decide-teardown", log_prints=True)
def decide_teardown(run_id: str, store: str = DEFAULT_STORE, thresholds: DecisionOverrides | None = None) -> dict:
    """Teardown is idempotent (a no-op when the experiment already stopped everything)."""
    rs, cfg = open_run(run_id, store)
    teardown(rs)
    return decide_and_publish(rs, cfg, thresholds)
