"""The rate sweep: per arm, the most it sustains, a ladder of open-loop rates up to it, and the knee.

Why: an A/B at one closed-loop concurrency hides queueing (the client slows its own sending when
the server falls behind). Production traffic arrives at a rate; a structured-output backend that
compiles a grammar per request delays the batch it joins, and that shows as the knee of the
latency-vs-rate curve moving left. `guided-ab sweep CONFIG` (flows/sweep.py: deploy -> sweep ->
teardown) measures it per arm, one arm at a time, so one arm's load never slows another's
measurement (shared cores, one client):

1. saturation (phase `sweep-<arm>-saturation`): a closed loop of `sweep.saturation_concurrency`
   requests in flight, `sweep.saturation_requests` requests (warm-ups first). The arm's maximum
   rate is its completions per second while the loop was full (see `max_rate`).
2. the ladder (phases `sweep-<arm>-01`, ...): open-loop arrivals at `low`..`high` x that maximum
   (or `sweep.rates`), each step `duration_s` long (at least `min_requests` arrivals) or exactly
   `count` arrivals, sent by the product's runner (load/runner.py: a dispatcher on its own clock,
   a request the in-flight cap held back recorded with its lag) on load/arrivals.py's seeded
   schedule; the arm's /metrics scraped beside every step (load/server_metrics.py).
3. sweep.json: per arm and rate, the target, offered and achieved rate, success share, TTFT /
   latency / time-per-output-token p50/p90/p99 with intervals, send lag, the server's time split
   (queue / prefill / decode) when it exports metrics; and the knee (see `knee`).
   sweep-report.html draws it (reports/sweep_report.py).

Every step is its own phase of the run store: its plan (plan-<phase>.json) is saved before
anything is sent, every request sent gets one record, and a re-run resumes: complete steps are
skipped, a partial one sends the rest on its own schedule. The ladder is fixed once the arm's
saturation step is complete (sweep-ladder.json), so a resumed sweep climbs the same rates.
Requests cycle through the workload's suite (a seeded order per step): a sweep measures a workload
of mostly repeated schemas, the steady state of a grammar cache, not first compilations.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from guided_ab.analysis.offered_load import send_lag_ms
from guided_ab.arms.base import Endpoint
from guided_ab.config import ConfigError, ExperimentConfig, LoadProfile, Sweep
from guided_ab.errors import PhaseInterrupted, RunStateError
from guided_ab.load.arrivals import arrivals_within, schedule_seed
from guided_ab.load.runner import run_plan
from guided_ab.load.send_clock import loop_runner
from guided_ab.load.server_metrics import phase_time_split, scraped
from guided_ab.plan import Plan, make_plan
from guided_ab.records import TRANSIENT_OUTCOMES
from guided_ab.store import RunStore
from guided_ab.workload import WARMUP_ITEM, WorkItem, more_items

Log = Callable[[str], None]
RESULT = "sweep.json"
LADDER = "sweep-ladder.json"
QUANTILES = (0.5, 0.9, 0.99)
METHOD = (
    "maximum rate: completions per second between the saturation loop's first completion and its last send "
    "(the loop full all that time); offered rate: a step's arrivals over its realized schedule (first arrival to "
    "last, plus one mean gap); achieved rate: the step's requests answered by the schedule's end plus the lowest "
    "rate's p90 latency (the unloaded latency: a server that keeps up answers in time, one that falls behind does "
    "not), over the same span; percentile intervals: 95% distribution-free (order statistics, scipy.stats."
    "quantile_test), unbounded where too few requests; latency counts timeouts at timeout_s (censored); time per "
    "output token: (latency - TTFT) / (output tokens - 1), streamed answers only; success: Wilson 95%."
)


def settings(cfg: ExperimentConfig) -> Sweep:
    """The config's sweep block, or the defaults (fit for the embedded default's local CPU arms)."""
    return cfg.sweep or Sweep()


def saturation_phase(arm: str) -> str:
    return f"sweep-{arm}-saturation"


def step_phase(arm: str, k: int) -> str:
    return f"sweep-{arm}-{k:02d}"


# -- plans -----------------------------------------------------------------------------------------
def _pool(cfg: ExperimentConfig) -> list[WorkItem]:
    """Every schema of the workload's suite, checked, in a seeded order."""
    pool = more_items(cfg.workload, set(), 1_000_000)
    if not pool:
        raise ConfigError(f"workload.suite {cfg.workload.suite!r}: no schema to send in a sweep")
    return pool


def _cycled(pool: Sequence[WorkItem], n: int, salt: str, seed: int) -> list[WorkItem]:
    """n requests' items: the pool cycled from a seeded start (each step starts elsewhere)."""
    start = random.Random(f"{seed}-{salt}").randrange(len(pool))
    return [pool[(start + i) % len(pool)] for i in range(n)]


def _saved_plan(store: RunStore, phase: str, make: Callable[[], Plan]) -> Plan:
    """The phase's plan as saved (a resumed sweep sends the same requests), or a new one, saved
    before anything is sent."""
    name = f"plan-{phase}.json"
    if store.has(name):
        return Plan.model_validate(store.read_json(name))
    plan = make()
    store.write_json(name, plan.model_dump())
    return plan


def step_requests(s: Sweep, rate: float, seed: int, phase: str) -> int:
    """Arrivals of one ladder step: `count`, or what its schedule holds within the duration (at
    least `min_requests`): the same schedule the runner sends (seeded by the workload seed and
    the phase), so the count and the arrivals agree."""
    if s.count is not None:
        return s.count
    duration = s.step_duration_s
    assert duration is not None
    return max(s.min_requests, len(arrivals_within(s.profile, rate, duration, schedule_seed(seed, phase))))


def _saturation_plan(cfg: ExperimentConfig, arm: str, pool: Sequence[WorkItem]) -> Plan:
    s, wl = settings(cfg), cfg.workload
    phase = saturation_phase(arm)
    warm = [WARMUP_ITEM.model_copy(update={"schema_id": f"warmup-{i}"}) for i in range(wl.warmup)]
    return make_plan(phase, [arm], _cycled(pool, s.saturation_requests, phase, wl.seed), seed=wl.seed,
                     warmup_items=warm, stream_share=wl.stream_share)


def _step_plan(cfg: ExperimentConfig, arm: str, k: int, rate: float, pool: Sequence[WorkItem]) -> Plan:
    wl = cfg.workload
    phase = step_phase(arm, k)
    n = step_requests(settings(cfg), rate, wl.seed, phase)
    # one arm: every request its own pair, so the runner gives each request its own arrival
    return make_plan(phase, [arm], _cycled(pool, n, phase, wl.seed), seed=wl.seed, stream_share=wl.stream_share)


# -- sending ---------------------------------------------------------------------------------------
def _send(cfg: ExperimentConfig, store: RunStore, plan: Plan, ep: Endpoint, load: LoadProfile | None,
          concurrency: int | None = None) -> bool:
    """Send the plan's unrecorded requests (with the arm's /metrics scraped beside them); False when
    every request already had its record (nothing sent)."""
    if not {r.request_id for r in plan.requests} - store.recorded_ids(plan.phase):
        return False
    wl = cfg.workload if concurrency is None else cfg.workload.model_copy(update={"concurrency": concurrency})
    endpoints = {ep.arm: ep}
    with store.phase_lock(plan.phase):  # one writer per phase: a second sweep of the run gets PhaseLocked
        try:
            loop_runner(load is not None and load.open_loop)(scraped(run_plan(plan, endpoints, store, wl, load=load), store, plan.phase, endpoints,
                              interval_s=wl.metrics_interval_s))
        except asyncio.CancelledError:
            raise PhaseInterrupted(f"sweep phase {plan.phase} of run {store.run_id} was stopped; "
                                   f"`guided-ab sweep <config> --run-id {store.run_id}` resumes it") from None
        finally:
            store.finalize_records(plan.phase)  # whatever was recorded is kept, also on failure
    return True


def _records(store: RunStore, phase: str) -> pd.DataFrame:
    df = store.records((phase,))
    return df[df["phase"] == phase] if len(df) else df


def ladder_rates(s: Sweep, max_rate: float) -> list[float]:
    """The ladder: `sweep.rates`, or `steps` rates evenly from low to high x the maximum."""
    if s.rates is not None:
        return list(s.rates)
    return [float(f * max_rate) for f in np.linspace(s.low, s.high, s.steps)]


def run_sweep(cfg: ExperimentConfig, store: RunStore, *, log: Log = print) -> dict[str, Any]:
    """Saturation then the ladder, arm after arm (resuming what a run already recorded); writes
    sweep.json after every arm and sweep-report.html at the end. Returns sweep.json's content."""
    from guided_ab import phases

    s = settings(cfg)
    endpoints = phases.load_endpoints(store)
    missing = [a.name for a in cfg.arms if a.name not in endpoints]
    if missing:
        raise RunStateError(f"run {store.run_id}: no endpoint for arm(s) {missing}; re-run the deploy phase")
    pool = _pool(cfg)
    ladders: dict[str, Any] = store.read_json(LADDER, default={})
    result: dict[str, Any] = {}
    for arm in cfg.arms:
        ep = endpoints[arm.name]
        plan = _saved_plan(store, saturation_phase(arm.name), partial(_saturation_plan, cfg, arm.name, pool))
        t0 = time.monotonic()
        if _send(cfg, store, plan, ep, None, concurrency=s.saturation_concurrency):
            log(f"{arm.name}: saturation, {len(plan.requests)} requests at {s.saturation_concurrency} in flight, "
                f"{time.monotonic() - t0:.0f} s")
        if arm.name not in ladders:
            sat = max_rate(_records(store, plan.phase))
            if not sat["max_rate"]:
                raise RunStateError(f"arm {arm.name!r}: no request of the saturation step was answered "
                                    f"({sat['outcomes']}); nothing to climb to: check the arm's server (logs/)")
            ladders[arm.name] = {"max_rate": sat["max_rate"], "rates": ladder_rates(s, sat["max_rate"])}
            store.write_json(LADDER, ladders)  # fixed from here on: a resumed sweep climbs the same rates
        rates = ladders[arm.name]["rates"]
        log(f"{arm.name}: maximum {ladders[arm.name]['max_rate']:.3g} requests/s; ladder "
            + ", ".join(f"{r:.3g}" for r in rates))
        for k, rate in enumerate(rates, 1):
            plan = _saved_plan(store, step_phase(arm.name, k), partial(_step_plan, cfg, arm.name, k, rate, pool))
            load = LoadProfile(profile=s.profile, rate=rate, max_in_flight=s.max_in_flight,
                               count=len(plan.requests))
            t0 = time.monotonic()
            if _send(cfg, store, plan, ep, load):
                step = step_summary(_records(store, plan.phase), rate, _reference_latency(store, arm.name),
                                    cfg.workload.timeout_s)
                log(f"{arm.name}: step {k}/{len(rates)} at {rate:.3g}/s: {len(plan.requests)} requests in "
                    f"{time.monotonic() - t0:.0f} s, achieved {_fmt(step['achieved_rate'])}/s, "
                    f"p50 latency {_fmt(step['latency']['p50']['estimate'])} s")
        result = summarize(store, cfg)  # after each arm: the arms swept so far, readable while the next runs
        store.write_json(RESULT, result)
    from guided_ab.reports.sweep_report import write

    write(store, result)
    return result


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


# -- statistics ------------------------------------------------------------------------------------
def _answered(df: pd.DataFrame) -> pd.DataFrame:
    """Requests the server answered whole (any class but the transient ones: a timeout, a reset or a
    5xx is no completed request)."""
    return df[~df["outcome"].isin(TRANSIENT_OUTCOMES) & df["latency_s"].notna()]


def max_rate(df: pd.DataFrame) -> dict[str, Any]:
    """The saturation step's completion rate. A closed loop is full from its first completion to
    its last send (each completion sends the next request), so the completions in that window over
    its length are the arm's rate at that concurrency: the ramp-up before the first answer and the
    drain after the last send (fewer in flight) are left out. Too short a window: all answered
    requests over the whole span."""
    out: dict[str, Any] = {"requests": int(len(df)), "outcomes": df["outcome"].value_counts().to_dict() if len(df) else {}}
    ans = _answered(df)
    if ans.empty:
        return {**out, "max_rate": None, "window_s": None, "method": "nothing answered"}
    done = (ans["sent_at"] + ans["latency_s"]).to_numpy(float)
    t_a, t_b = float(done.min()), float(df["sent_at"].max())
    inside = int(((done > t_a) & (done <= t_b)).sum())
    if t_b > t_a and inside >= 2:
        return {**out, "max_rate": inside / (t_b - t_a), "window_s": t_b - t_a, "method": "steady window"}
    span = float(done.max() - df["sent_at"].min())
    return {**out, "max_rate": len(ans) / span if span > 0 else None, "window_s": span, "method": "whole span"}


def quantile_ci(values: np.ndarray, q: float) -> dict[str, float | None]:
    """The q-quantile and its 95% distribution-free interval (order statistics: scipy's
    quantile_test), None for a bound the sample cannot give (e.g. p99 of 20 requests)."""
    if values.size == 0:
        return {"estimate": None, "ci_low": None, "ci_high": None}
    from scipy.stats import quantile_test

    est = float(np.quantile(values, q))
    try:
        ci = quantile_test(values, q=est, p=q).confidence_interval(0.95)
        lo, hi = float(ci.low), float(ci.high)
    except ValueError:  # too few values for any interval
        lo = hi = math.nan
    return {"estimate": est, "ci_low": None if math.isnan(lo) else lo, "ci_high": None if math.isnan(hi) else hi}


def _quantiles(values: np.ndarray) -> dict[str, Any]:
    v = values[np.isfinite(values)]
    return {"n": int(v.size), **{f"p{round(q * 100)}": quantile_ci(v, q) for q in QUANTILES}}


def step_summary(df: pd.DataFrame, rate: float, latency_ref_s: float | None, timeout_s: float) -> dict[str, Any]:
    """One step's numbers from its records (see METHOD)."""
    from guided_ab.analysis.stats import wilson

    out: dict[str, Any] = {"target_rate": rate, "requests": int(len(df)),
                           "outcomes": df["outcome"].value_counts().to_dict() if len(df) else {}}
    if df.empty:
        return {**out, "offered_rate": None, "achieved_rate": None, "success": None,
                **{m: _quantiles(np.array([])) for m in ("latency", "ttft", "tpot")}, "send_lag_ms": {}}
    sched = pd.to_numeric(df["scheduled_at"], errors="coerce") if "scheduled_at" in df else df["sent_at"]
    sched = sched.fillna(df["sent_at"])
    t0 = float(sched.min())
    span = float(sched.max()) - t0 + 1.0 / rate  # the realized schedule, plus the gap after its last arrival
    ans = _answered(df)
    done = (ans["sent_at"] + ans["latency_s"]).to_numpy(float)
    ref = latency_ref_s if latency_ref_s is not None else float(np.quantile(ans["latency_s"], 0.9)) if len(ans) else 0.0
    in_time = int((done <= t0 + span + ref).sum())
    ok = int((df["outcome"] == "success").sum())
    lat = np.where(df["outcome"] == "timeout", timeout_s, pd.to_numeric(df["latency_s"], errors="coerce"))
    lat = lat[~df["outcome"].isin(TRANSIENT_OUTCOMES - {"timeout"}).to_numpy()]
    ttft = pd.to_numeric(ans["ttft_s"], errors="coerce").to_numpy(float)
    toks = pd.to_numeric(ans["completion_tokens"], errors="coerce").to_numpy(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(toks > 1, (ans["latency_s"].to_numpy(float) - ttft) / (toks - 1), np.nan)
    lag = pd.to_numeric(df["send_lag_s"], errors="coerce").dropna().to_numpy(float) if "send_lag_s" in df else np.array([])
    return {
        **out,
        "offered_rate": len(df) / span,
        "achieved_rate": in_time / span,
        "answered": int(len(ans)),
        "answered_in_time": in_time,
        "span_s": span,
        "latency_ref_s": ref,
        "success": wilson(ok, len(df)).to_dict(),
        "latency": _quantiles(lat.astype(float)),
        "ttft": _quantiles(ttft),
        "tpot": _quantiles(tpot),
        "send_lag_ms": send_lag_ms(lag),
    }


def _reference_latency(store: RunStore, arm: str) -> float | None:
    """The arm's unloaded latency: the p90 latency of its lowest ladder step (None before it ran)."""
    ans = _answered(_records(store, step_phase(arm, 1)))
    return float(np.quantile(ans["latency_s"].to_numpy(float), 0.9)) if len(ans) else None


def knee(steps: list[dict[str, Any]], s: Sweep) -> dict[str, Any]:
    """The highest rate up to which every step is sustained: achieved >= knee_achieved_share x the
    offered rate (the server kept up with the arrivals) and p50 latency <= knee_latency_factor x
    the lowest rate's p50 (no queue built up). Marks each step `sustained` with `why_not`.

    A pre-registered rule rather than a curve-fitting library (kneed's Kneedle finds the point of
    maximum curvature of a smooth curve): on 6-8 noisy points that point moves with the noise, and a
    curvature means no latency a team can hold a server to; this rule says what "sustains" means.
    Offered, not target rate: a Poisson schedule of ~10 arrivals realizes a rate ±30 % off its target.
    """
    ref = steps[0]["latency"]["p50"]["estimate"] if steps else None
    knee_step: dict[str, Any] | None = None
    broken = False
    for st in steps:
        why = []
        p50 = st["latency"]["p50"]["estimate"]
        if st.get("offered_rate") is None or st.get("achieved_rate") is None:
            why.append("no records")
        else:
            if st["achieved_rate"] < s.knee_achieved_share * st["offered_rate"]:
                why.append(f"achieved {st['achieved_rate']:.3g}/s < {s.knee_achieved_share:.0%} of offered "
                           f"{st['offered_rate']:.3g}/s")
            if p50 is None or ref is None or p50 > s.knee_latency_factor * ref:
                why.append(f"p50 latency {_fmt(p50)} s > {s.knee_latency_factor:g} x {_fmt(ref)} s")
        st["sustained"], st["why_not"] = not why, "; ".join(why) or None
        if why:
            broken = True
        elif not broken:
            knee_step = st
    if knee_step is None:
        return {"rate": None, "achieved_rate": None, "step": None,
                "why": "not even the lowest rate was sustained" if steps else "no ladder step ran"}
    k = steps.index(knee_step) + 1
    last = k == len(steps)
    return {"rate": knee_step["target_rate"], "achieved_rate": knee_step["achieved_rate"], "step": k,
            "latency_p50_s": knee_step["latency"]["p50"]["estimate"], "at_least": last,
            "why": ("every step was sustained: the knee is at or above the highest rate" if last else
                    f"step {k + 1} ({steps[k]['target_rate']:.3g}/s) was not sustained: {steps[k]['why_not']}")}


def _server(store: RunStore, phase: str, arm: str) -> dict[str, Any] | None:
    """The server's own time split over a step (load/server_metrics.py), or None without metrics."""
    split = phase_time_split(store, phase)
    return None if split is None else split["arms"].get(arm)


def summarize(store: RunStore, cfg: ExperimentConfig) -> dict[str, Any]:
    """sweep.json from the run store alone (plans, records, metrics): re-made after every step."""
    from guided_ab.analysis.stats import jsonable

    s = settings(cfg)
    ladders = store.read_json(LADDER, default={})
    arms: dict[str, Any] = {}
    for arm in cfg.arms:
        sat_df = _records(store, saturation_phase(arm.name))
        entry: dict[str, Any] = {
            "backend": arm.backend,
            "saturation": {**(max_rate(sat_df) if len(sat_df) else {"max_rate": None}),
                           "concurrency": s.saturation_concurrency, "server": _server(store, saturation_phase(arm.name), arm.name)},
            "ladder": ladders.get(arm.name, {}).get("rates", []),
        }
        ref = _reference_latency(store, arm.name)
        steps = []
        for k, rate in enumerate(entry["ladder"], 1):
            phase = step_phase(arm.name, k)
            df = _records(store, phase)
            if not len(df):
                continue
            st = step_summary(df, rate, ref, cfg.workload.timeout_s)
            planned = Plan.model_validate(store.read_json(f"plan-{phase}.json")) if store.has(f"plan-{phase}.json") else None
            st.update(step=k, phase=phase, planned=len(planned.requests) if planned else None,
                      server=_server(store, phase, arm.name))
            steps.append(st)
        entry["steps"] = steps
        entry["knee"] = knee(steps, s)
        entry["complete"] = bool(entry["ladder"]) and len(steps) == len(entry["ladder"]) and all(
            st["requests"] == st["planned"] for st in steps)
        arms[arm.name] = entry
    return jsonable({"run_id": store.run_id, "name": cfg.name, "at": time.time(), "settings": s.model_dump(),
                     "timeout_s": cfg.workload.timeout_s, "method": METHOD, "arms": arms})


# -- dry run ---------------------------------------------------------------------------------------
def describe(cfg: ExperimentConfig) -> str:
    """What `guided-ab sweep CONFIG` will do (nothing is started)."""
    s = settings(cfg)
    if s.rates is not None:
        ladder = "rates " + ", ".join(f"{r:g}" for r in s.rates) + " requests/s"
    else:
        ladder = (f"{s.steps} rates from {s.low:g} to {s.high:g} x the measured maximum: "
                  + ", ".join(f"{f:.2f}" for f in np.linspace(s.low, s.high, s.steps)))
    per_step = (f"{s.count} arrivals each" if s.count is not None else
                f"{s.step_duration_s:g} s each (at least {s.min_requests} arrivals)")
    n_steps = len(s.rates) if s.rates is not None else s.steps
    floor = "" if s.step_duration_s is None else (
        f"At least {n_steps * s.step_duration_s * len(cfg.arms) / 60:.0f} min of ladder in all, plus "
        "saturation, start-up and each step's last answers.")
    lines = [
        f"sweep of {cfg.name}: {len(cfg.arms)} arms, one at a time: "
        + ", ".join(f"{a.name} ({a.target}, {a.backend})" for a in cfg.arms),
        f"  saturation: closed loop, {s.saturation_concurrency} in flight, {s.saturation_requests} requests "
        f"(+{cfg.workload.warmup} warm-up) -> the arm's maximum rate",
        f"  ladder: {ladder}; {s.profile} arrivals, {per_step}, at most {s.max_in_flight} in flight",
        f"  knee: the highest rate with every step up to it achieving >= {s.knee_achieved_share:.0%} of its "
        f"offered rate and p50 latency <= {s.knee_latency_factor:g} x the lowest rate's",
        f"  requests: the suite {cfg.workload.suite!r} cycled, max_tokens {cfg.workload.max_tokens}, "
        f"timeout {cfg.workload.timeout_s:g} s; servers' /metrics every {cfg.workload.metrics_interval_s:g} s",
        f"  writes: sweep.json, sweep-report.html, sweep.png in the run store ({cfg.store}/<run id>)",
    ]
    if floor:
        lines.append("  " + floor)
    return "\n".join(lines)


def report_path(store: RunStore) -> Path:
    return store.path("sweep-report.html")
