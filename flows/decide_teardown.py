"""Phase 5: decide / teardown — stop every endpoint the run started, then apply the decision rule."""

from __future__ import annotations

from prefect import flow

from guided_ab.config import DecisionOverrides
from tasks.analysis import decide_run
from tasks.artifacts import publish_results
from tasks.endpoints import teardown

from ._common import DEFAULT_STORE, open_run


@flow(name="decide-teardown", log_prints=True)
def decide_teardown(run_id: str, store: str = DEFAULT_STORE, thresholds: DecisionOverrides | None = None) -> dict:
    """Teardown is idempotent (a no-op when the experiment already stopped everything)."""
    rs, _ = open_run(run_id, store)
    teardown(rs)
    decision = decide_run(rs, thresholds)
    publish_results(rs)
    return decision
