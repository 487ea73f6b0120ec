"""Phase 3, the watch: after a promotion, each monitoring run sends a small *paired* sample to
production (the new configuration) and to a live control (the old one), and the whole window so
far is judged as ONE sequential A/B.

Why not judge each day alone (the old canary): ten requests a day say nothing, and a week of days
judged separately is seven chances to be wrong. Why a live control, not the experiment's stored
numbers: a model update, a traffic change or a slower GPU moves both arms alike and cancels in a
paired difference; against last month's numbers it reads as a regression (or hides one).

How: every monitoring run appends one look to ONE record set (phase `monitor`: plan-monitor.json,
records/monitor.jsonl, one record per request, resumable like the A/B) and the look is judged on
the repeated confidence intervals of analysis/sequential.py (`schema_units`, `criticals`,
`judge_candidate`): alpha spent over `production.planned_pairs` (information fraction = pairs so
far / planned pairs), so the intervals hold at every run of the window at once. Production is the
"candidate", the old configuration the "control"; the margins are the decision rule's.
- a guardrail clearly broken (success interval entirely below -success_margin, or latency-ratio
  interval entirely above 1 + latency_margin) at any run: `revert` recommended now (the window
  stops early; promotion.json status `revert-recommended`);
- at the window's end (its planned runs done, or its time over): `keep` when both guardrails are
  met over the whole window, `revert` when one is broken, else `production.if_unclear`; a `keep`
  stops the live control (promote.end_window).
Production that does not answer is evidence, not an error: the run waits for the control, sends
anyway, and production's failed requests count against it (`_wait_endpoints`).
Requests come from the team's traffic when the workload replays a file (`workload.suite: x.jsonl`),
else from the suite; each run draws its own seeded sample, and repeats of a schema across runs are
one unit (sequential.py).

monitoring.json: design, one entry per monitoring run (its pairs, the run's own point estimates,
the running intervals, verdict), and the window's `verdict` once it ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from guided_ab import phases, promote
from guided_ab.analysis import sequential as Q
from guided_ab.analysis.stats import jsonable
from guided_ab.arms.base import Endpoint
from guided_ab.arms.targets import wait_arm
from guided_ab.errors import ArmNotReady
from guided_ab.load.runner import run_plan
from guided_ab.load.server_metrics import scraped
from guided_ab.plan import Plan, extend_plan
from guided_ab.store import RunStore
from guided_ab.workload import more_items

Log = Callable[[str], None]
PHASE = "monitor"
STATE = "monitoring.json"
PLAN = "plan-monitor.json"
ALERT_EVENT = "guided-ab.monitor.revert-recommended"
PRODUCTION_ANSWER_S = 15.0  # an external production endpoint that does not answer this long is down (_wait_endpoints)


def state(store: RunStore) -> dict[str, Any]:
    return dict(store.read_json(STATE, default={}))


def _design(store: RunStore) -> Q.Design:
    cfg = store.load_config()
    prod = promote.production_of(cfg, store)
    return Q.Design(planned_pairs=prod.window_pairs, pairs_per_look=prod.pairs_per_run, max_pairs=prod.window_pairs,
                    max_usd=None, min_latency_gain=cfg.decision.min_latency_gain, min_success_gain=cfg.decision.min_success_gain)


def _plan(store: RunStore, rec: dict[str, Any]) -> Plan:
    if store.has(PLAN):
        return Plan.model_validate(store.read_json(PLAN))
    cfg = store.load_config()
    return Plan(phase=PHASE, seed=cfg.workload.seed, arms=[rec["control"], rec["serve"]], items={}, requests=[])


def _next_run_plan(store: RunStore, plan: Plan, run: int) -> Plan:
    """The plan with monitoring run `run` added (saved before anything is sent: a killed run re-sends
    only what is unrecorded). Its sample: pairs_per_run requests of the workload, seeded per run."""
    cfg = store.load_config()
    prod = promote.production_of(cfg, store)
    wl = cfg.workload.model_copy(update={"seed": cfg.workload.seed + 1000 * run})
    items = more_items(wl, set(), prod.pairs_per_run)
    if len(items) < prod.pairs_per_run:  # a small pool: draw it again (repeats of a schema are one unit)
        items = (items * (prod.pairs_per_run // max(1, len(items)) + 1))[: prod.pairs_per_run]
    new = extend_plan(plan, items, look=run, stream_share=cfg.workload.stream_share,
                      warmup_items=phases._warmups(cfg.workload.warmup))
    store.write_json(PLAN, new.model_dump())
    return new


def _wait_endpoints(endpoints: dict[str, Endpoint], rec: dict[str, Any], start_s: float, modal_start_s: float, log: Log) -> None:
    """Wait for the live control (scaled to zero, it cold-starts), then for production. A Modal
    production app may be scaling up from zero too: it gets the same wait. An external production
    endpoint serves users right now: one that does not answer within PRODUCTION_ANSWER_S is down,
    and that is what this run must record (its requests fail: a regression the window sees), not
    a reason to end the monitoring run with an error while users get no answers."""
    def deadline(ep: Endpoint) -> float:
        return max(start_s, modal_start_s if ep.target == "modal" else 0)

    wait_arm(endpoints[rec["control"]], deadline(endpoints[rec["control"]]))  # the control must answer: else nothing compares
    prod = endpoints[rec["serve"]]
    try:
        wait_arm(prod, deadline(prod) if prod.target == "modal" else min(start_s, PRODUCTION_ANSWER_S))
    except ArmNotReady as err:
        log(f"production ({prod.base_url}) does not answer: {err}; its requests are sent anyway and recorded as failures")


def _records(store: RunStore) -> pd.DataFrame:
    # sequential.schema_units reads the A/B phase's records: the monitor phase is the same shape
    return store.records((PHASE,)).assign(phase="ab")


def _point(df: pd.DataFrame, control: str, prod: str, timeout_s: float, first: int, end: int) -> dict[str, float | None]:
    """One run's own estimates (its pairs only): the dots of the report."""
    units = Q.schema_units(df[(df["pair_index"] >= first) | (df["pair_index"] < 0)], control, prod, timeout_s, end)
    d, lr = units["success_diff"].to_numpy(float), units["log_ratio"].to_numpy(float)
    lr = lr[np.isfinite(lr)]
    return {"success_diff": float(d.mean()) if d.size else None, "latency_ratio": float(np.exp(lr.mean())) if lr.size else None}


def judge(store: RunStore, plan: Plan, rec: dict[str, Any]) -> list[dict[str, Any]]:
    """Every monitoring run so far judged on the window's repeated confidence intervals."""
    cfg = store.load_config()
    design = _design(store)
    df = _records(store)
    ends = [lk.end_pair for lk in plan.looks]
    crit = Q.criticals(design, ends, Q.alpha_per_interval(cfg.decision, 1))
    out = []
    for lk, c in zip(plan.looks, crit):
        units = Q.schema_units(df, rec["control"], rec["serve"], cfg.workload.timeout_s, lk.end_pair)
        j = Q.judge_candidate(units, rec["serve"], cfg.decision, design, c)
        out.append({"run": lk.look, "first_pair": lk.first_pair, "pairs": lk.end_pair, "information": lk.end_pair / design.planned_pairs,
                    "critical_value": c, "schemas": j["units"], "success_diff": j["success_diff"],
                    "latency_ratio": j["latency_ratio"], "guardrails": j["guardrails"],
                    "point": _point(df, rec["control"], rec["serve"], cfg.workload.timeout_s, lk.first_pair, lk.end_pair)})
    return out


def _ci(iv: dict[str, Any], pct: bool) -> str:
    def f(v: float | None) -> str:
        return "unbounded" if v is None else (f"{v:+.1%}" if pct else f"{v:.3f}")
    return f"{f(iv.get('estimate'))} [{f(iv.get('ci_low'))}, {f(iv.get('ci_high'))}]"


def _verdict(j: dict[str, Any], final: bool, if_unclear: str) -> tuple[str, str]:
    g = j["guardrails"]
    broken = [k for k, v in g.items() if v == "not met"]
    s, lt = j["success_diff"], j["latency_ratio"]
    both = f"success difference {_ci(s, True)}, latency ratio {_ci(lt, False)} over {j['pairs']} pairs"
    if broken:
        return "revert", f"production is worse than the margin allows on {' and '.join(broken)}: {both}"
    if not final:
        return "continue", f"no guardrail broken so far: {both}"
    if all(v == "met" for v in g.values()):
        return "keep", f"non-inferior on every guardrail over the whole window: {both}"
    return if_unclear, f"the window ended with a guardrail unclear ({g}); pre-registered if_unclear: {if_unclear}: {both}"


def monitor_once(store: RunStore, *, log: Log = print, now: float | None = None) -> dict[str, Any]:
    """One monitoring run: send (or resume) the next paired sample, judge the window so far,
    record it. Returns {ran, run, verdict, final, alert, reasons, ...}; `ran` False once the window
    is closed (nothing is sent)."""
    rec = promote.load(store)
    if rec.get("status") != "monitoring":
        log(f"run {store.run_id}: the monitoring window is closed ({rec.get('status')}); nothing sent")
        return {"ran": False, "status": rec.get("status"), "verdict": state(store).get("verdict"), "final": True, "alert": False}
    cfg = store.load_config()
    prod = promote.production_of(cfg, store)
    st = state(store) or {"design": _design(store).to_dict(), "runs": [], "verdict": None}
    plan = _plan(store, rec)
    if len(plan.looks) <= len(st["runs"]):  # else: the last run was interrupted: resume it
        plan = _next_run_plan(store, plan, len(plan.looks) + 1)
    look = plan.looks[-1]
    endpoints = promote.monitor_endpoints(store, rec)
    t0 = time.time()
    _wait_endpoints(endpoints, rec, cfg.server_start_timeout_s, cfg.control.modal.startup_timeout_s, log)
    with store.phase_lock(PHASE):
        try:
            asyncio.run(scraped(run_plan(plan, endpoints, store, cfg.workload), store, PHASE, endpoints,
                                interval_s=cfg.workload.metrics_interval_s))  # the servers' /metrics beside it
        finally:
            store.finalize_records(PHASE)
    sent_s = time.time() - t0
    judged = judge(store, plan, rec)
    j = judged[-1]
    now = time.time() if now is None else now
    final = look.look >= rec["window"]["planned_runs"] or now >= rec["window"]["ends_at"]
    verdict, reason = _verdict(j, final, prod.if_unclear)
    ctl = endpoints[rec["control"]]
    # a Modal control is scaled to zero between runs: paid while it answers, plus its scale-down window
    held_s = sent_s + (cfg.control.modal.scaledown_window_s if ctl.target == "modal" else 0.0)
    control_cost = held_s / 3600 * ctl.cost_per_hour
    entry = {**j, "at": now, "sent_s": sent_s, "control_cost_usd": control_cost, "verdict": verdict, "reason": reason}
    runs = [r for r in st["runs"] if r["run"] < look.look] + [entry]
    ended = verdict != "continue"
    early = ended and not final
    st = {**st, "runs": runs, "verdict": verdict if ended else None,
          "stopped_because": ("regression" if early else "window end") if ended else None,
          "method": Q.METHOD + "; production = candidate, the old configuration = control"}
    store.write_json(STATE, jsonable(st))
    log(f"monitoring run {look.look}/{rec['window']['planned_runs']} ({j['pairs']} pairs): {verdict}: {reason}")
    if verdict == "keep":
        promote.end_window(store, "kept", reason, log=log)
    elif verdict == "revert":
        rec = {**promote.load(store), "status": "revert-recommended", "recommended": {"at": now, "reason": reason, "early": early}}
        store.write_json(promote.STATE, rec)
        log(f"revert recommended: `guided-ab revert --run-id {store.run_id}` re-deploys '{rec['control']}'")
    write_report(store)
    return jsonable({"ran": True, "run": look.look, "planned_runs": rec["window"]["planned_runs"], "verdict": verdict,
                     "final": ended, "early": early, "alert": verdict == "revert", "reason": reason,
                     "success_diff": j["success_diff"], "latency_ratio": j["latency_ratio"], "pairs": j["pairs"]})


def write_report(store: RunStore) -> str:
    """monitor-report.html beside report.html (the week's points and running intervals)."""
    from guided_ab.reports.monitor_report import write

    return str(write(store))
