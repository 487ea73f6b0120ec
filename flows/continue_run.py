"""`continue`: give a finished inconclusive run more A/B pairs, then decide again.

A fixed-size A/B becomes look 1 of a sequential one (repeated confidence intervals from then on,
spending the share of alpha kept for continuations); a sequential one gets a higher cap. Arms a teardown stopped start again
(deploy is idempotent), the new looks are sent, the arms are torn down again (also when the
flow crashes or is cancelled), and the run is evaluated and decided: decision.json records
`continued: {from_pairs, to_pairs, at}`. Local arms hold this machine's cores (the global
concurrency limit of flows/_concurrency.py) while they run, as in the experiment flow; a
relative store root resolves against $GUIDED_AB_DATA on a worker (flows/_common.py), in the
crash hook too.
"""

from __future__ import annotations

from prefect import flow

from guided_ab import looks, phases
from guided_ab.store import RunStore
from tasks.endpoints import teardown
from tasks.looks import run_looks

from ._common import DEFAULT_STORE, open_run, store_root
from ._concurrency import local_cores_slot
from .decide_teardown import decide_teardown
from .deploy import deploy
from .evaluate import evaluate


def _teardown_on_crash(flow, flow_run, state) -> None:
    """on_crashed / on_cancellation: stop the arms this continuation started, if the process still can.
    Not flows._common.teardown_on_crash: a continuation names its run in its parameters and writes
    no run index entry."""
    params = flow_run.parameters or {}
    if params.get("run_id"):
        phases.teardown(RunStore.open(store_root(params.get("store", DEFAULT_STORE)), params["run_id"]), log=print)


@flow(name="continue", log_prints=True, on_crashed=[_teardown_on_crash], on_cancellation=[_teardown_on_crash])
def continue_run(run_id: str, max_pairs: int, store: str = DEFAULT_STORE, pairs_per_look: int | None = None,
                 force: bool = False) -> dict:
    """Raise the run's cap to `max_pairs` A/B pairs in all, send looks until settled or capped, decide."""
    rs, cfg = open_run(run_id, store)
    info = looks.begin_continuation(rs, max_pairs, pairs_per_look, force=force)
    if not info["settled"]:
        with local_cores_slot(cfg):
            try:
                looks.reopen_arms(rs)
                deploy(run_id, store)
                run_looks(cfg, rs)
            finally:
                teardown(rs)
    evaluate(run_id, store, decide=False)
    decision = decide_teardown(run_id, store)
    return {"run_id": run_id, "decision": decision["verdict"], "store": rs.location, "continued": decision.get("continued")}
