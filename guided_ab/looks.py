"""The sequential A/B, Prefect-free: grow the plan one look at a time, send the look, judge it on
repeated confidence intervals (analysis/sequential.py), stop when settled or capped; and `continue`, which gives a finished
inconclusive run (fixed-size or sequential) more pairs.

Separate from phases.py because a sequential A/B is a loop over phases' steps (plan, send,
judge) with its own state. That state is `sequential.json` in the run store:
    design           fixed before the first sequential look (analysis.sequential.Design)
    source           "config" (decision.sequential) or "continue" (a fixed-size run continued)
    looks            one entry per judged look: its pairs, intervals and verdict, its spend
    stopped_because  null while looks remain, "settled" or "cap"
    continued        one entry per `continue`: from_pairs, max_pairs, at
    warmup_next      the arms were restarted: the next look starts with warm-ups
plan-ab.json holds every look's requests (its `looks` list gives their pair ranges), saved
before a look's first request is sent: a process killed mid-look re-runs the same look and
sends only what is unrecorded (the journal in store.py, the runner in load/runner.py).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from guided_ab import phases
from guided_ab.analysis import sequential as Q
from guided_ab.analysis.stats import jsonable
from guided_ab.config import ExperimentConfig, Sequential
from guided_ab.errors import RunStateError
from guided_ab.load.runner import Progress
from guided_ab.plan import Look, Plan, extend_plan, first_look, next_look_items
from guided_ab.store import RunStore
from guided_ab.workload import WorkItem, more_items

Log = Callable[[str], None]
STATE = "sequential.json"


def is_sequential(cfg: ExperimentConfig, store: RunStore) -> bool:
    """Is (or has become, by `continue`) this run's A/B sequential?"""
    return cfg.decision.sequential is not None or store.has(STATE)


def state(store: RunStore) -> dict[str, Any]:
    """sequential.json ({} before the first sequential look)."""
    return dict(store.read_json(STATE, default={}))


def look_table(store: RunStore) -> list[dict[str, Any]]:
    """One row per judged look and candidate (for tables: Prefect artifacts, the console)."""
    return Q.look_rows(state(store).get("looks", []))


def _plan(store: RunStore) -> Plan:
    return Plan.model_validate(store.read_json("plan-ab.json"))


def _fresh(cfg: ExperimentConfig, plan: Plan | None, n: int, base_dir: Path | None = None) -> list[WorkItem]:
    """Up to n schemas never sent in this A/B: the workload's A/B schemas first, then the suite's
    others (never the observe phase's)."""
    observe, ab = phases.workload_items(cfg, base_dir)
    used = set(plan.items) if plan else set()
    out = [it for it in ab if it.schema_id not in used][:n]
    if len(out) < n:
        skip = used | {it.schema_id for it in observe} | {it.schema_id for it in ab}
        out += more_items(cfg.workload, skip, n - len(out), base_dir)
    return out


def first_look_plan(cfg: ExperimentConfig, warmups: list[WorkItem], base_dir: Path | None = None) -> Plan:
    """Look 1 of a sequential A/B (phases.build_plans saves it with the observe plan)."""
    seq = cfg.decision.sequential
    assert seq is not None
    n = min(seq.pairs_per_look, seq.max_pairs)
    empty = Plan(phase="ab", seed=cfg.workload.seed, arms=[a.name for a in cfg.arms], items={}, requests=[])
    items = next_look_items(empty, _fresh(cfg, None, n, base_dir), n)
    return first_look("ab", empty.arms, items, seed=cfg.workload.seed, warmup_items=warmups,
                      stream_share=cfg.workload.stream_share)


def _design(cfg: ExperimentConfig, seq: Sequential, planned_pairs: int | None = None) -> Q.Design:
    """The design fixed at the first sequential look: alpha is spent over `planned_pairs` (the
    cap; a continued fixed-size run: its own pairs, so continuing spends the reserve)."""
    return Q.Design(planned_pairs=planned_pairs or seq.max_pairs, pairs_per_look=seq.pairs_per_look,
                    max_pairs=seq.max_pairs, max_usd=seq.max_usd, min_latency_gain=seq.min_latency_gain,
                    min_success_gain=seq.min_success_gain)


def _ensure_state(cfg: ExperimentConfig, store: RunStore) -> dict[str, Any]:
    st = state(store)
    if "design" not in st:
        if cfg.decision.sequential is None:
            raise RunStateError(f"run {store.run_id} is not sequential: `guided-ab continue --run-id {store.run_id} "
                                "--max-pairs N` makes a finished fixed-size run sequential")
        st = {"design": _design(cfg, cfg.decision.sequential).to_dict(), "source": "config", "looks": [],
              "stopped_because": None, "continued": []}
        store.write_json(STATE, st)
    return st


def _usd_per_hour(store: RunStore) -> float:
    return sum(ep.cost_per_hour for ep in phases.load_endpoints(store, missing_ok=True, anywhere=True).values())


def _look_spend(store: RunStore, look: Look, usd_per_hour: float) -> float:
    """The look's estimated spend: its sending time (first send to last answer) x the arms' USD/h."""
    df = store.records(("ab",))
    df = df[(df["order_index"] >= look.first_order) & (df["order_index"] < look.end_order)]
    if df.empty or usd_per_hour == 0:
        return 0.0
    ends = df["sent_at"] + df["latency_s"].fillna(0.0)
    return float(ends.max() - df["sent_at"].min()) / 3600 * usd_per_hour


def _room(design: Q.Design, plan: Plan, spent: float) -> int:
    """Pairs the caps still allow: max_pairs less those planned, and what max_usd buys at the
    spend per pair so far."""
    room = design.max_pairs - plan.n_pairs
    if design.max_usd is not None and plan.n_pairs:
        if spent >= design.max_usd:
            return 0
        per_pair = spent / plan.n_pairs
        if per_pair > 0:
            room = min(room, math.floor((design.max_usd - spent) / per_pair))
    return max(0, room)


def _unrecorded(store: RunStore, plan: Plan, look: Look) -> set[str]:
    return {r.request_id for r in plan.requests[look.first_order:look.end_order]} - store.recorded_ids("ab")


# -- one look --------------------------------------------------------------------------------------
def plan_look(cfg: ExperimentConfig, store: RunStore, log: Log = print) -> Look | None:
    """The look to send now: the last planned one if it has not been judged (a resumed look),
    else a new one (saved before anything is sent); None when the A/B has stopped."""
    st = _ensure_state(cfg, store)
    plan = phases.build_plans(cfg, store)["ab"]
    if plan.looks and len(plan.looks) > len(st["looks"]):
        return plan.looks[-1]
    if st.get("stopped_because"):
        return None
    design = Q.Design.from_dict(st["design"])
    n = min(design.pairs_per_look, _room(design, plan, sum(lk.get("spend_usd", 0.0) for lk in st["looks"])))
    if n <= 0:
        store.write_json(STATE, {**st, "stopped_because": "cap"})
        log(f"run {store.run_id}: the cap is reached ({plan.n_pairs} pairs); no new look")
        return None
    items = next_look_items(plan, _fresh(cfg, plan, n), n)
    warm = phases._warmups(cfg.workload.warmup) if st.get("warmup_next") else []
    plan = extend_plan(plan, items, look=len(plan.looks) + 1, stream_share=cfg.workload.stream_share, warmup_items=warm)
    store.write_json("plan-ab.json", plan.model_dump())
    if st.get("warmup_next"):
        store.write_json(STATE, {**st, "warmup_next": False})
    look = plan.looks[-1]
    log(f"look {look.look}: pairs {look.first_pair}-{look.end_pair - 1} planned")
    return look


def judge(cfg: ExperimentConfig, store: RunStore, log: Log = print) -> dict[str, Any]:
    """Judge the latest planned look (replaying the earlier ones) and record it in sequential.json.
    Returns the look's entry, with `stop` and `stopped_because`."""
    st = _ensure_state(cfg, store)
    plan = _plan(store)
    design = Q.Design.from_dict(st["design"])
    look = plan.looks[-1]
    missing = _unrecorded(store, plan, look)
    if missing:
        raise RunStateError(f"look {look.look} of run {store.run_id} has {len(missing)} unrecorded request(s): "
                            f"`guided-ab ab --run-id {store.run_id}` sends them, then judges the look")
    judged = Q.replay(store.records(("ab",)), cfg.control.name, [a.name for a in cfg.candidates], cfg.decision,
                      design, cfg.workload.timeout_s, [(lk.look, lk.end_pair) for lk in plan.looks])
    j = judged[-1]
    entry = {**j, "first_pair": look.first_pair, "spend_usd": _look_spend(store, look, _usd_per_hour(store)), "at": time.time()}
    looks = [lk for lk in st["looks"] if lk["look"] < look.look] + [entry]
    spent = sum(lk.get("spend_usd", 0.0) for lk in looks)
    stopped = "settled" if j["verdict"] != "continue" or j["look"] < look.look else None
    if stopped is None and _room(design, plan, spent) == 0:
        stopped = "cap"
    store.write_json(STATE, jsonable({**st, "looks": looks, "stopped_because": stopped}))
    rows = Q.look_rows([j])
    log(f"look {look.look} ({look.end_pair} pairs): {j['verdict']}"
        + "".join(f"; {r['candidate']}: success {r['success difference']}, latency ratio {r['latency ratio']}" for r in rows)
        + (f" -> stop ({stopped})" if stopped else ""))
    return {**entry, "stop": stopped is not None, "stopped_because": stopped, "max_pairs": design.max_pairs}


def run_look(cfg: ExperimentConfig, store: RunStore, progress: Progress | None = None,
             stop: threading.Event | None = None, log: Log = print) -> dict[str, Any]:
    """Plan (or resume) one look, send it, judge it."""
    look = plan_look(cfg, store, log)
    if look is None:
        st = state(store)
        return {"stop": True, "stopped_because": st.get("stopped_because"), "look": len(st.get("looks", []))}
    phases.run_requests(cfg, store, "ab", progress, stop)
    return judge(cfg, store, log)


def run_sequential_ab(cfg: ExperimentConfig, store: RunStore, progress: Progress | None = None,
                      stop: threading.Event | None = None, log: Log = print) -> list[dict[str, Any]]:
    """Look after look until the verdict settles or a cap is reached; re-running resumes."""
    results = []
    while True:
        r = run_look(cfg, store, progress, stop, log)
        results.append(r)
        if r["stop"]:
            return results


# -- the decision ----------------------------------------------------------------------------------
def decide(store: RunStore, cfg: ExperimentConfig, evaluation: dict) -> dict[str, Any]:
    """The sequential decision (decision.py's shape plus `sequential`): the looks replayed under the
    (possibly overridden) margins, stopping at the first that settles; "invalid" on a failed gate."""
    st = state(store) or _ensure_state(cfg, store)
    design = Q.Design.from_dict(st["design"])
    plan = _plan(store)
    looks = [(lk.look, lk.end_pair) for lk in plan.looks if lk.look <= len(st.get("looks", []))]
    judged = Q.replay(store.records(("ab",)), cfg.control.name, [a.name for a in cfg.candidates], cfg.decision,
                      design, cfg.workload.timeout_s, looks)
    capped = st.get("stopped_because") == "cap" and len(judged) == len(looks)
    spend = sum(lk.get("spend_usd", 0.0) for lk in st.get("looks", []))
    out = Q.decision(judged, control=cfg.control.name, candidates=[a.name for a in cfg.candidates], rule=cfg.decision,
                     design=design, stopped_because="cap" if capped else None, spend_usd=spend,
                     next_step=f"`guided-ab ab --run-id {store.run_id}` runs the next looks")
    failed = [g for g in evaluation.get("gates", []) if not g.get("passed")]
    if failed:
        out.update(verdict="invalid", serve=cfg.control.name, pairs_needed=0,
                   reasons=[f"gate '{g['name']}' failed: {g['detail']}" for g in failed])
    out["sequential"]["source"] = st.get("source", "config")
    if st.get("continued"):
        last = st["continued"][-1]
        out["continued"] = {"from_pairs": last["from_pairs"], "to_pairs": plan.n_pairs, "at": last["at"],
                            "max_pairs": last["max_pairs"]}
    return out


# -- continue --------------------------------------------------------------------------------------
def check_continuable(store: RunStore, max_pairs: int, force: bool = False) -> None:
    """Refuse (RunStateError) a run that is not finished, or whose verdict is not inconclusive
    (unless force), or a cap that adds no pair."""
    rid, how = store.run_id, f"--run-id {store.run_id} --store {store.root}"
    if not store.has("plan-ab.json"):
        raise RunStateError(f"run {rid} has no A/B plan: it never reached the A/B phase; start it with `guided-ab run`")
    plan = _plan(store)
    if not force:
        if not store.has("decision.json"):
            raise RunStateError(f"run {rid} is not finished (no decision.json): finish it first (`guided-ab ab {how}` "
                                f"resumes the A/B, then `guided-ab evaluate {how}`), or pass --force")
        verdict = store.read_json("decision.json").get("verdict")
        if verdict != "inconclusive":
            raise RunStateError(f"run {rid} is already decided ({verdict!r}); only an inconclusive run is continued "
                                "(pass --force to add pairs anyway)")
    if max_pairs <= plan.n_pairs and _interrupted(store, max_pairs) is None:
        raise RunStateError(f"--max-pairs {max_pairs} adds nothing: run {rid} already has {plan.n_pairs} A/B pairs; "
                            f"pass a larger total, e.g. --max-pairs {2 * plan.n_pairs}")


def _interrupted(store: RunStore, max_pairs: int) -> dict[str, Any] | None:
    """The last continuation if it had this cap and has not decided yet (interrupted: resume it)."""
    continued = state(store).get("continued", [])
    decided_at = store.read_json("decision.json", default={}).get("decided_at") or 0.0
    if continued and continued[-1]["max_pairs"] == max_pairs and continued[-1]["at"] > decided_at:
        return dict(continued[-1])
    return None


def begin_continuation(store: RunStore, max_pairs: int, pairs_per_look: int | None = None, *,
                       force: bool = False, log: Log = print) -> dict[str, Any]:
    """Raise the run's cap to `max_pairs`: a fixed-size A/B becomes look 1 of a sequential one.
    Returns {from_pairs, max_pairs, settled}: settled when an earlier look already settles it."""
    check_continuable(store, max_pairs, force)
    cfg = store.load_config()
    plan = _plan(store)
    st = state(store)
    resumed = _interrupted(store, max_pairs)
    previous_cap = st["design"]["max_pairs"] if "design" in st else None
    if not plan.looks:  # a fixed-size A/B: its pairs are look 1
        plan = plan.with_looks([Look(look=1, first_pair=0, end_pair=plan.n_pairs, first_order=0, end_order=len(plan.requests))])
        store.write_json("plan-ab.json", plan.model_dump())
    if "design" not in st:
        seq = cfg.decision.sequential or Sequential(
            max_pairs=max_pairs, pairs_per_look=min(pairs_per_look or plan.n_pairs, max_pairs))
        fixed = cfg.decision.sequential is None
        st = {"design": _design(cfg, seq, plan.n_pairs if fixed else None).to_dict(), "source": "continue" if fixed else "config",
              "looks": [], "stopped_because": None, "continued": []}
    design = Q.Design.from_dict(st["design"])  # planned_pairs stays: alpha was spent over it
    design = Q.Design(**{**design.to_dict(), "max_pairs": max_pairs, "pairs_per_look": pairs_per_look or design.pairs_per_look})
    continued = list(st.get("continued", []))
    if resumed is not None:
        entry = continued.pop()  # the same continuation, interrupted before it decided: resumed
    else:
        entry = {"from_pairs": plan.n_pairs, "max_pairs": max_pairs, "previous_max_pairs": previous_cap, "at": time.time()}
    st = {**st, "design": design.to_dict(), "continued": [*continued, entry],
          "stopped_because": None if st.get("stopped_because") == "cap" else st.get("stopped_because")}
    store.write_json(STATE, st)
    # a fixed-size run's look 1 is judged now (if it was sent in full; else the looks resume it first)
    if len(st["looks"]) < len(plan.looks) and not _unrecorded(store, plan, plan.looks[-1]):
        judge(cfg, store, log)
        st = state(store)
    settled = st.get("stopped_because") == "settled"
    log(f"run {store.run_id}: continuing from {entry['from_pairs']} pairs to at most {max_pairs}"
        + (" (already settled by an earlier look: nothing to send)" if settled else ""))
    return {"from_pairs": entry["from_pairs"], "max_pairs": max_pairs, "settled": settled}


def reopen_arms(store: RunStore, log: Log = print) -> list[str]:
    """Forget the endpoints a teardown stopped, so deploy starts them again (its start is idempotent
    for the others); their teardown entries move to `earlier` (their cost still counts)."""
    down = store.read_json("teardown.json", default={})
    if not down.get("arms"):
        return []
    endpoints = phases.load_endpoints(store, missing_ok=True)
    gone = [e["arm"] for e in down["arms"] if e["arm"] in endpoints]
    phases.save_endpoints(store, {k: v for k, v in endpoints.items() if k not in gone})
    store.write_json("teardown.json", {"arms": [], "earlier": [*down.get("earlier", []), *down["arms"]], "at": down.get("at")})
    store.write_json(STATE, {**state(store), "warmup_next": True})
    log(f"run {store.run_id}: arms {gone} were torn down; they start again")
    return gone


def continue_run(store: RunStore, max_pairs: int, pairs_per_look: int | None = None, *, force: bool = False,
                 log: Log = print) -> dict[str, Any]:
    """`guided-ab continue` without Prefect: raise the cap, restart torn-down arms, send looks until
    settled or capped, tear down, evaluate and re-decide (decision.json records `continued`)."""
    info = begin_continuation(store, max_pairs, pairs_per_look, force=force, log=log)
    cfg = store.load_config()
    if not info["settled"]:
        try:
            reopen_arms(store, log)
            endpoints = phases.start_endpoints(cfg, store, log)
            phases.wait_endpoints(cfg, store, endpoints, log)
            run_sequential_ab(cfg, store, log=log)
        finally:
            phases.teardown(store, log)
    phases.evaluate_run(store)
    return phases.decide_run(store)
