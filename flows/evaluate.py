"""Phase 4: evaluate — metrics, intervals, tests and validity gates from the stored records,
then the decision rule and the report artifacts.

Touches no endpoint: re-run it from the UI or CLI with other thresholds at no GPU cost.
"""

from __future__ import annotations

from prefect import flow

from guided_ab.config import DecisionOverrides
from tasks.analysis import evaluate_run

from ._approval import decide_and_publish
from ._common import DEFAULT_STORE, open_run


@flow(name="evaluate", log_prints=True)
def evaluate(
    run_id: str, store: str = DEFAULT_STORE, thresholds: DecisionOverrides | None = None, decide: bool = True,
) -> dict:
    """Re-compute evaluation.json and, unless decide=False (the experiment flow decides in its
    next phase), decision.json and the reports. Thresholds override the config's, recorded as such."""
    rs, cfg = open_run(run_id, store)
    evaluation = evaluate_run(rs, thresholds)
    if not decide:
        return {"gates": evaluation.get("gates", []), "valid": evaluation.get("valid")}
    return decide_and_publish(rs, cfg, thresholds)
