"""Resuming a run when its experiment flow run is retried (the UI's "Retry", or the API).

A retry of the same flow run continues the same run: the run id comes from the flow run
(flows/_common.py), so the store, the pre-registered config, the saved plans and the records so
far are found again, and each planned request is sent until it has exactly one record. Arms
still up are kept. Arms that a teardown stopped (the failed attempt's `finally`, the crash hook
or the crash automation) and servers that died are started again: their teardown entries move
to `earlier` (their cost still counts) and they leave endpoints.json, so the idempotent deploy
phase starts them. A run that has sent everything is not deployed again: it goes straight to
teardown, evaluate and decide.
"""

from __future__ import annotations

from collections.abc import Callable

from guided_ab import looks, phases
from guided_ab.arms.targets import stop_endpoint, wait_arm
from guided_ab.errors import ArmError
from guided_ab.plan import Plan
from guided_ab.store import RunStore

Log = Callable[[str], None]
PROBE_S = 3.0  # a quick look at an arm recorded as up: a dead local server fails at once


def started(store: RunStore) -> bool:
    """Has this run been started before (plans saved): is this a resume?"""
    return store.has("plan-ab.json") or store.has("plan-observe.json")


def sending_done(store: RunStore) -> bool:
    """Has every planned request of observe and A/B a record (a sequential A/B: has it stopped)?"""
    cfg = store.load_config()
    for phase in ("observe", "ab"):
        if phase == "ab" and looks.is_sequential(cfg, store):
            if not looks.state(store).get("stopped_because"):
                return False
            continue
        name = f"plan-{phase}.json"
        if not store.has(name):
            return False
        planned = {r.request_id for r in Plan.model_validate(store.read_json(name)).requests}
        if planned - store.recorded_ids(phase):
            return False
    return True


def reopen(store: RunStore, log: Log = print) -> list[str]:
    """Make the arms of a resumed run startable again; the arms that will start again."""
    endpoints = phases.load_endpoints(store, missing_ok=True)
    down = store.read_json("teardown.json", default={})
    torn_down = [e["arm"] for e in down.get("arms", []) if e["arm"] in endpoints]
    if torn_down and looks.is_sequential(store.load_config(), store):
        looks.reopen_arms(store, log)  # the same, plus a warm-up of the restarted arms before the next look
    elif down.get("arms"):
        store.write_json("teardown.json", {"arms": [], "earlier": [*down.get("earlier", []), *down["arms"]],
                                           "at": down.get("at")})
    dead, leftovers = [], []
    for name, ep in endpoints.items():
        if name in torn_down:
            continue
        try:
            wait_arm(ep, PROBE_S)
        except ArmError as err:
            if err.transient:
                continue  # still starting (e.g. a Modal cold start): the deploy phase waits for it
            dead.append(name)
            leftovers.append({**stop_endpoint(ep), "reason": f"dead on resume: {err}"})
    if leftovers:
        down = store.read_json("teardown.json", default={})
        store.write_json("teardown.json", {**down, "arms": down.get("arms", []),
                                           "earlier": [*down.get("earlier", []), *leftovers]})
    gone = torn_down + dead
    if gone:
        phases.save_endpoints(store, {k: v for k, v in endpoints.items() if k not in gone})
        log(f"run {store.run_id} resumes: arm(s) {gone} start again; {sorted(set(endpoints) - set(gone))} are still up")
    return gone
