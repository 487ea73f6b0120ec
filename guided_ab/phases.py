"""The experiment phases, Prefect-free: deploy, observe, A/B, evaluate, decide, teardown.

Each phase reads what it needs from the run store and writes its results there, so any phase
can be re-run alone with a run id. Prefect flows (flows/) call these through thin tasks.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from guided_ab.arms.base import Endpoint
from guided_ab.arms.cores import allocate as allocate_cores
from guided_ab.arms.targets import check_on_this_machine, prepare_arm, start_arm, stop_endpoint, target_for, wait_arm
from guided_ab.config import DecisionOverrides, ExperimentConfig
from guided_ab.errors import PhaseInterrupted as PhaseInterrupted  # defined here before guided_ab.errors
from guided_ab.errors import RunStateError
from guided_ab.load.arrivals import planned_pairs
from guided_ab.load.runner import PhaseResult, Progress, run_plan
from guided_ab.load.send_clock import loop_runner
from guided_ab.load.server_metrics import scraped
from guided_ab.plan import Plan, make_plan
from guided_ab.store import RunStore
from guided_ab.workload import WARMUP_ITEM, WorkItem, load_workload

Log = Callable[[str], None]


# -- deploy ------------------------------------------------------------------------------------
def start_endpoints(cfg: ExperimentConfig, store: RunStore, log: Log = print) -> dict[str, Endpoint]:
    """Start every arm (not yet waiting); endpoints.json is written after each start, so a
    failure half-way still leaves a record of what must be torn down."""
    endpoints = load_endpoints(store, missing_ok=True)
    started_locally: dict[str, float] = {}
    # Local servers share this machine's cores. With a core per arm, each server gets its own
    # (an arm's requests never slow the other's, and the two requests of a pair can run at
    # once); with fewer cores than arms they share all cores and start one after the other
    # (at once, their start-up threads would fight for the CPUs: several times slower). Cores
    # other runs on this machine hold are not given out (arms/cores.py).
    local_arms = [a.name for a in cfg.arms if target_for(a.target).shares_local_cores and a.name not in endpoints]
    cores, own_core = allocate_cores(store.run_id, local_arms, log=log) if local_arms else ({}, False)
    for arm in cfg.arms:
        if arm.name in endpoints:
            continue  # idempotent re-run of deploy: keep what is already up
        prepare_arm(arm, log=log)
        log(f"starting arm '{arm.name}' ({arm.target}, backend={arm.backend})"
            + (f" on core {cores[arm.name]}" if arm.name in cores else ""))
        endpoints[arm.name] = ep = start_arm(arm, store, cores=cores.get(arm.name))
        save_endpoints(store, endpoints)
        if target_for(ep.target).shares_local_cores and not own_core:
            t0 = time.monotonic()
            wait_arm(ep, cfg.server_start_timeout_s)
            started_locally[arm.name] = time.monotonic() - t0
            log(f"arm '{arm.name}' ready at {ep.base_url} after {started_locally[arm.name]:.1f} s")
    if started_locally:
        store.write_json("startup.json", started_locally)
    return endpoints


def wait_endpoints(cfg: ExperimentConfig, store: RunStore, endpoints: dict[str, Endpoint], log: Log = print) -> dict[str, float]:
    """Wait for every arm at once (one thread each): arms cold-start side by side, so no arm sits
    ready and idle while another starts. The first arm that fails ends the wait (its error is
    raised; the other threads are daemons and stop at their own deadlines)."""
    waited: dict[str, float] = {}
    # local arms that start_endpoints already waited for (one after the other): their start-up time
    started_before = store.read_json("startup.json", default={})
    done: queue.Queue[tuple[str, float | BaseException]] = queue.Queue()

    def wait_one(name: str, ep: Endpoint) -> None:
        try:
            deadline = target_for(ep.target).start_deadline(cfg, name)  # Modal: its (longer) startup timeout
            done.put((name, wait_arm(ep, deadline)))
        except BaseException as err:  # handed to the caller's thread
            done.put((name, err))

    for name, ep in endpoints.items():
        threading.Thread(target=wait_one, args=(name, ep), name=f"wait-{name}", daemon=True).start()
    for _ in endpoints:
        name, result = done.get()
        if isinstance(result, BaseException):
            raise result
        waited[name] = result + started_before.get(name, 0.0)
        log(f"arm '{name}' ready at {endpoints[name].base_url} after {waited[name]:.1f} s")
    waited = {name: waited[name] for name in endpoints}
    store.write_json("deploy.json", {"ready_after_s": waited, "at": time.time()})
    return waited


def save_endpoints(store: RunStore, endpoints: dict[str, Endpoint]) -> None:
    store.write_json("endpoints.json", {k: v.model_dump() for k, v in endpoints.items()})


def load_endpoints(store: RunStore, *, missing_ok: bool = False, anywhere: bool = False) -> dict[str, Endpoint]:
    """The run's endpoints, for a phase that uses or stops them: live local arms started on another
    machine stop it here (arms/targets.py check_on_this_machine). `anywhere`: only read them."""
    if not store.has("endpoints.json"):
        if missing_ok:
            return {}
        raise RunStateError(f"run {store.run_id} has no endpoints.json: run the deploy phase first")
    data = store.read_json("endpoints.json")
    try:
        endpoints = {k: Endpoint.model_validate(v) for k, v in data.items()}
    except (AttributeError, ValueError) as err:  # a damaged endpoints.json: name it, never a traceback
        raise RunStateError(f"{store.where('endpoints.json')} is damaged ({str(err)[:200]}); "
                            "restore it or re-run the deploy phase") from None
    if not anywhere:
        check_on_this_machine(store, endpoints)
    return endpoints


# -- plans -------------------------------------------------------------------------------------
def workload_items(cfg: ExperimentConfig, base_dir: Path | None = None) -> tuple[list[WorkItem], list[WorkItem]]:
    """(observe items, A/B items): disjoint, from the config's workload and seed."""
    items = load_workload(cfg.workload, base_dir)
    return items[: cfg.workload.observe_size], items[cfg.workload.observe_size :]


def build_plans(cfg: ExperimentConfig, store: RunStore, base_dir: Path | None = None) -> dict[str, Plan]:
    """The observe and A/B plans, saved once; a re-run reads the saved plans (same order, same ids)."""
    plans = {}
    for phase in ("observe", "ab"):
        name = f"plan-{phase}.json"
        if store.has(name):
            plans[phase] = Plan.model_validate(store.read_json(name))
    if len(plans) == 2:
        return plans
    observe_items, ab_items = workload_items(cfg, base_dir)
    wl = cfg.workload
    # an open-loop phase sends the pairs its load profile pre-registered (count, or duration_s at
    # the rate), cycling the phase's schemas; a closed loop (None) sends the plan's own size
    pairs = {ph: planned_pairs(getattr(wl.load, ph), wl.seed, ph) for ph in ("observe", "ab")}
    plans["observe"] = _first_pairs(make_plan(
        "observe", [a.name for a in cfg.candidates], observe_items, seed=wl.seed, stream_share=wl.stream_share,
        repeats=_cycles(pairs["observe"], len(observe_items)),
    ), pairs["observe"])
    if cfg.decision.sequential is not None:  # a sequential A/B plans one look at a time (guided_ab/looks.py)
        from guided_ab.looks import first_look_plan

        plans["ab"] = first_look_plan(cfg, _warmups(wl.warmup), base_dir)
    else:
        plans["ab"] = _first_pairs(make_plan(
            "ab", [a.name for a in cfg.arms], ab_items, seed=wl.seed, warmup_items=_warmups(wl.warmup),
            stream_share=wl.stream_share, repeats=_cycles(pairs["ab"], len(ab_items)) if pairs["ab"] else wl.repeats,
        ), pairs["ab"])
    for phase, plan in plans.items():
        store.write_json(f"plan-{phase}.json", plan.model_dump())
    return plans


def _cycles(pairs: int | None, items: int) -> int:
    """Passes over a phase's schemas that `pairs` pairs take (1: the plan's own size)."""
    return 1 if pairs is None or items == 0 else -(-pairs // items)


def _first_pairs(plan: Plan, pairs: int | None) -> Plan:
    """The plan cut to its warm-ups and first `pairs` pairs (None: all of it)."""
    if pairs is None:
        return plan
    requests = [r for r in plan.requests if r.pair_index < pairs]
    used = {r.schema_id for r in requests}
    return plan.model_copy(update={"requests": requests, "items": {k: v for k, v in plan.items.items() if k in used}})


def _warmups(n: int) -> list[WorkItem]:
    return [WARMUP_ITEM.model_copy(update={"schema_id": f"warmup-{i}"}) for i in range(n)]


def plan_arm_counts(plans: dict[str, Plan]) -> dict[str, dict[str, int]]:
    """phase -> arm -> requests planned: what evaluate's accounting compares the records with."""
    out: dict[str, dict[str, int]] = {}
    for phase, plan in plans.items():
        counts: dict[str, int] = {}
        for r in plan.requests:
            counts[r.arm] = counts.get(r.arm, 0) + 1
        out[phase] = counts
    return out


# -- observe / A/B -----------------------------------------------------------------------------
def run_requests(
    cfg: ExperimentConfig, store: RunStore, phase: str, progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> PhaseResult:
    """Send (the rest of) a phase's plan; finalize its records as parquet.

    Setting `stop` (from another thread) cancels the requests in flight at once: they were
    sent but are not recorded, so a re-run of the phase sends them again (as attempt 2).
    """
    if phase == "ab":
        preflight(cfg, store)
    plan = build_plans(cfg, store)[phase]
    endpoints = load_endpoints(store)
    missing = sorted(set(plan.arms) - set(endpoints))
    if missing:
        raise RunStateError(f"run {store.run_id}: no endpoint for arm(s) {missing}; re-run the deploy phase")
    load = getattr(cfg.workload.load, phase)
    # an open loop runs on asyncio's own loop, where the send clock times it; otherwise uvloop
    runner: Callable[[Coroutine[Any, Any, PhaseResult]], PhaseResult] = loop_runner(load is not None and load.open_loop)
    async def main() -> PhaseResult:
        task = asyncio.ensure_future(run_plan(plan, {a: endpoints[a] for a in plan.arms}, store, cfg.workload, progress=progress,
                                              load=load))
        while stop is not None and not task.done():
            if stop.is_set():
                task.cancel()
                break
            await asyncio.wait({task}, timeout=0.2)
        return await task

    with store.phase_lock(phase):  # one writer per phase of a run: a second one gets PhaseLocked naming this one
        try:
            # the servers' own /metrics beside the load (load/server_metrics.py): never slows or fails it
            result = runner(scraped(main(), store, phase, {a: endpoints[a] for a in plan.arms},
                                    interval_s=cfg.workload.metrics_interval_s))
        except asyncio.CancelledError:
            raise PhaseInterrupted(
                f"phase {phase} of run {store.run_id} was stopped; `guided-ab {phase} --run-id {store.run_id}` resumes it"
            ) from None
        finally:
            store.finalize_records(phase)  # whatever was recorded is kept, also on failure
    return result


# -- pre-flight --------------------------------------------------------------------------------
def preflight(cfg: ExperimentConfig, store: RunStore, log: Log = print) -> dict:
    """Before the A/B: count every planned A/B prompt with the served model's tokenizer
    (load/preflight.py) and say how many cannot fit `max_model_len - max_tokens`; with
    `workload.preflight: drop` (a fixed-size A/B not yet begun) those are replaced by other
    requests of the pool that fit, and the A/B plan is re-made (recorded in preflight.json).
    Once per run: preflight.json is read back on a resume."""
    from guided_ab.arms.base import resolve_key
    from guided_ab.load.preflight import count_prompts, summary

    if store.has("preflight.json"):
        return store.read_json("preflight.json")
    plans = build_plans(cfg, store)
    plan = plans["ab"]
    endpoints = load_endpoints(store, missing_ok=True)
    ep = endpoints.get(plan.arms[0]) if plan.arms else None
    if ep is None or ep.target == "external":
        result: dict = {"counted": 0, "skipped": "external endpoint (may not serve /tokenize)" if ep else "no endpoint"}
        store.write_json("preflight.json", result)
        return result
    wl = cfg.workload
    ab_ids = list(dict.fromkeys(r.schema_id for r in plan.requests if not r.warmup))
    result = count_prompts([plan.items[sid] for sid in ab_ids], ep.base_url, ep.model, wl,
                           api_key=resolve_key(ep.key_ref), timeout_s=min(10.0, wl.timeout_s))
    result["policy"] = wl.preflight
    too_long = {t["schema_id"] for t in result["too_long"]}
    if too_long and wl.preflight == "drop":
        if cfg.decision.sequential is not None or store.recorded_ids("ab"):
            result["drop_skipped"] = "a sequential A/B, or one already begun: kept (sent and classified)"
        else:
            plans["ab"], result["dropped"], result["replaced_by"] = _replace_too_long(cfg, store, plans, too_long, ep)
            store.write_json("plan-ab.json", plans["ab"].model_dump())
    store.write_json("preflight.json", result)
    log(summary(result))
    return result


def _replace_too_long(cfg: ExperimentConfig, store: RunStore, plans: dict[str, Plan], too_long: set[str],
                      ep: Endpoint) -> tuple[Plan, list[str], list[str]]:
    """The A/B plan re-made with the requests that cannot fit replaced by others of the pool that do."""
    from guided_ab.arms.base import resolve_key
    from guided_ab.load.preflight import count_prompts
    from guided_ab.workload import more_items

    wl = cfg.workload
    plan = plans["ab"]
    used = set(plan.items) | set(plans["observe"].items)
    kept = [plan.items[sid] for sid in dict.fromkeys(r.schema_id for r in plan.requests if not r.warmup)
            if sid not in too_long]
    candidates = more_items(wl, used, 4 * len(too_long))
    counted = count_prompts(candidates, ep.base_url, ep.model, wl, api_key=resolve_key(ep.key_ref),
                            timeout_s=min(10.0, wl.timeout_s))
    unfit = {t["schema_id"] for t in counted["too_long"]}
    fits = [it for it in candidates if it.schema_id in counted["tokens"] and it.schema_id not in unfit][: len(too_long)]
    warm = [plan.items[r.schema_id] for r in plan.requests if r.warmup and r.arm == plan.arms[0]]
    new = make_plan("ab", plan.arms, kept + fits, seed=wl.seed, warmup_items=warm, stream_share=wl.stream_share,
                    repeats=wl.repeats)
    return new, sorted(too_long), [it.schema_id for it in fits]


# -- teardown ----------------------------------------------------------------------------------
def teardown(store: RunStore, log: Log = print) -> list[dict]:
    """Stop every endpoint this run started. Safe to call repeatedly and after any failure."""
    endpoints = load_endpoints(store, missing_ok=True)
    try:
        before = store.read_json("teardown.json", default={"arms": []})
    except RunStateError as err:  # a damaged teardown.json never keeps the endpoints running
        log(f"{err}: stopping the endpoints anyway; it is written anew")
        before = {"arms": []}
    previous = {e["arm"]: e for e in before.get("arms", [])}
    entries = []
    for name, ep in endpoints.items():
        if name in previous and previous[name].get("stopped") is not None and not target_for(ep.target).stop_again:
            entries.append(previous[name])
            continue
        entry = stop_endpoint(ep)
        if name in previous:  # a repeated teardown keeps the first stop time (the cost clock)
            entry = {**entry, **{k: previous[name][k] for k in ("stopped", "stopped_at", "held_s", "cost_usd") if k in previous[name]}}
        entries.append(entry)
        log(f"arm '{name}': {'stopped' if entry['stopped'] else 'already stopped'} ({ep.target})")
    # `earlier`: arms stopped before `guided-ab continue` started them again (their cost counts)
    earlier = {"earlier": before["earlier"]} if before.get("earlier") else {}
    store.write_json("teardown.json", {"arms": entries, "at": time.time(), **earlier})
    return entries


# -- evaluate / decide -------------------------------------------------------------------------
def _rule_config(store: RunStore, overrides: DecisionOverrides | None) -> ExperimentConfig:
    cfg = store.load_config()
    if overrides is None:
        return cfg
    return cfg.model_copy(update={"decision": overrides.apply(cfg.decision)})


def evaluate_run(store: RunStore, overrides: DecisionOverrides | None = None) -> dict:
    """evaluation.json from the stored records; touches no endpoint."""
    from guided_ab.analysis.evaluation import evaluate

    cfg = _rule_config(store, overrides)
    endpoints = {k: v.model_dump() for k, v in load_endpoints(store, missing_ok=True, anywhere=True).items()}
    # accounting compares with the plans saved before any request was sent (never re-made here)
    plans = {ph: Plan.model_validate(store.read_json(f"plan-{ph}.json")) for ph in ("observe", "ab") if store.has(f"plan-{ph}.json")}
    evaluation = evaluate(
        store.records(), cfg, planned=plan_arm_counts(plans) if plans else None, costs=costs(store), endpoints=endpoints,
        schema_pool=_schema_pool(cfg),
    )
    if store.has("preflight.json"):  # the pre-flight token count, for the report's workload-problems section
        evaluation["preflight"] = {k: v for k, v in store.read_json("preflight.json").items() if k != "tokens"}
    from guided_ab.load.server_metrics import phase_time_split

    # the servers' own time split over the A/B phase, for the report's server-metrics section
    evaluation["server_metrics"] = phase_time_split(store, "ab")
    # ... and over the observe phase (the candidates alone, before the A/B): a second, smaller table
    evaluation["server_metrics_observe"] = phase_time_split(store, "observe")
    from guided_ab.analysis.offered_load import offered_loads

    # each phase's load as run (profile, offered / achieved rate, send lag), for "Load as offered"
    evaluation["offered_load"] = offered_loads(store.records(("observe", "ab")), cfg)
    store.write_json("evaluation.json", evaluation)
    return evaluation


def _schema_pool(cfg: ExperimentConfig) -> int | None:
    """How many schemas the workload's suite holds ("more pairs needed" is capped by what is left);
    None when the suite cannot be read here (e.g. re-evaluating on another machine)."""
    from guided_ab.workload import suite_pool

    try:
        return len(suite_pool(cfg.workload))
    except (OSError, ValueError):
        return None


def decide_run(store: RunStore, overrides: DecisionOverrides | None = None) -> dict:
    """decision.json and report.md from evaluation.json and the (possibly overridden) rule."""
    from guided_ab.analysis.decision import decide
    from guided_ab.reports.files import write_reports

    cfg = _rule_config(store, overrides)
    evaluation = store.read_json("evaluation.json")
    from guided_ab import looks

    if looks.is_sequential(cfg, store):  # the looks replayed on repeated confidence intervals (analysis/sequential.py)
        decision = looks.decide(store, cfg, evaluation)
    else:
        decision = decide(evaluation, cfg.decision)
    decision["thresholds"] = cfg.decision.model_dump()
    # the config snapshot stays the pre-registration; changed thresholds are recorded as such
    decision["overridden"] = overrides.model_dump(exclude_none=True) if overrides else {}
    decision["decided_at"] = time.time()
    from guided_ab import approval

    if approval.needs_approval(cfg, decision):  # no reader ever sees `switch` before the sign-off
        approval.mark_pending(store, cfg, decision)
        return decision
    store.write_json("decision.json", decision)
    write_reports(store, cfg, evaluation, decision)
    return decision


def costs(store: RunStore) -> dict[str, float]:
    """USD per arm from teardown.json, the holdings before a `continue` restarted it included."""
    down = store.read_json("teardown.json", default={"arms": []})
    out: dict[str, float] = {}
    for e in [*down.get("earlier", []), *down["arms"]]:
        out[e["arm"]] = out.get(e["arm"], 0.0) + e.get("cost_usd", 0.0)
    return out

