"""Phase 4: evaluate — metrics, intervals, tests and validity gates from the stored records.

Touches no endpoint: re-run it from the UI or CLI with other thresholds at no GPU cost.
"""

from __future__ import annotations

from prefect import flow

from guided_ab.config import DecisionOverrides
from tasks.analysis import evaluate_run

from ._common import DEFAULT_STORE, open_run


@flow(name="evaluate", log_prints=True)
def evaluate(run_id: str, store: str = DEFAULT_STORE, thresholds: DecisionOverrides | None = None) -> dict:
    rs, _ = open_run(run_id, store)
    return evaluate_run(rs, thresholds)
