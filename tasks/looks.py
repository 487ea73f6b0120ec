"""The task that runs one look of a sequential A/B (`ab-look`): plan it (or resume a look a killed
process left half-sent), send it, judge it on repeated confidence intervals, and publish a progress
artifact (pairs so far against the cap) and a table artifact (every look so far)."""

from __future__ import annotations

from typing import Any, cast
from uuid import UUID

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from guided_ab import looks
from guided_ab.config import ExperimentConfig
from guided_ab.store import RunStore

from .requests import send_requests
from .retry import retry_if_transient


# NO_CACHE: every call has the same inputs (config, store) and must still run the next look
@task(name="ab-look", retries=1, retry_delay_seconds=10, retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
def ab_look(cfg: ExperimentConfig, store: RunStore) -> dict[str, Any]:
    """One look: None planned (the A/B has stopped) returns {"stop": True, ...} at once."""
    log = get_run_logger()
    look = looks.plan_look(cfg, store, log=log.info)
    if look is None:
        return {"stop": True, "stopped_because": looks.state(store).get("stopped_because")}
    cap = looks.state(store)["design"]["max_pairs"]
    key = f"{cfg.name}-ab-look-progress"
    art = cast(UUID, create_progress_artifact(
        100.0 * look.first_pair / cap, key=key, description=f"look {look.look}: sending pairs {look.first_pair}-{look.end_pair - 1} (cap {cap})"))
    send_requests.fn(cfg, store, "ab")  # the requests' own progress artifact; this task's retry covers it
    result = looks.judge(cfg, store, log=log.info)
    done = 100.0 if result["stop"] else 100.0 * look.end_pair / cap
    update_progress_artifact(art, done, description=f"look {look.look}: {result['verdict']} at {look.end_pair} pairs"
                             + (f", stopped ({result['stopped_because']})" if result["stop"] else ""))
    create_table_artifact(looks.look_table(store), key=f"{cfg.name}-ab-looks",
                          description=f"run {store.run_id}: the sequential A/B's looks (repeated confidence intervals over schemas)")
    return result


def run_looks(cfg: ExperimentConfig, store: RunStore) -> dict[str, Any]:
    """`ab-look` after `ab-look` until the A/B is settled or capped (a re-run resumes); a summary."""
    while True:
        result = ab_look(cfg, store)
        if result["stop"]:
            break
    st = looks.state(store)
    last = st["looks"][-1] if st.get("looks") else {}
    return {"looks": len(st.get("looks", [])), "pairs": last.get("pairs", 0), "verdict": last.get("verdict"),
            "stopped_because": st.get("stopped_because")}
