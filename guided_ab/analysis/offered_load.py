"""The load a phase offered the arms, as it was run: its profile (a closed loop, or an open loop at
a rate), the arrival rate its schedule held, the rate its requests really went out at, and how
late they went out (send lag). The report's "Load as offered" block reads it
(evaluation["offered_load"][phase]).

An open loop (workload.load.<phase>.profile constant / poisson; guided_ab/load/runner.py) records
each request's `scheduled_at` (both arms of a pair: one instant, one arrival) and `send_lag_s`
(sent_at - scheduled_at). From those records:
- target_rate: the config's `rate` (arrivals = pairs per second, i.e. requests/s per arm);
- offered_rate: the schedule as drawn, (arrivals - 1) / (last - first scheduled instant);
- achieved_rate: the arrivals as sent, (arrivals - 1) / (last - first send), each arrival counted
  at its first send (of any arm);
- per arm: (its requests - 1) / the span of its sends, and its send lag p50 / p99 / max in ms,
  and how many of its requests went out more than LATE_MS late.
Warm-ups count: they are the schedule's first arrivals and loaded the servers like the rest. A
resumed phase (and a sequential A/B's looks) spans the pause between its runs: both rates then
average over that pause, so they stay comparable with each other, not with the target.

A closed loop (the default) has no schedule and no lag: only its `workload.concurrency`.
Records written before open loops existed have neither field: an open-loop config with such
records gets no block (None), never an error.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from guided_ab.config import ExperimentConfig, LoadProfile

# A request sent more than this late is counted: the bar the open loop is held to (issue 18:
# send lag p99 <= 2 ms at 500 requests/s, bench/open_loop_accuracy.py)
LATE_MS = 2.0


def _rate(times: np.ndarray) -> float | None:
    """(n - 1) / span: events per second over the span they cover (None under two, or no span)."""
    if times.size < 2:
        return None
    span = float(times.max() - times.min())
    return (times.size - 1) / span if span > 0 else None


def send_lag_ms(lag_s: np.ndarray) -> dict[str, float]:
    """Send lag p50 / p99 / max in ms from lags in seconds ({} without any)."""
    if not lag_s.size:
        return {}
    ms = lag_s * 1e3
    return {"p50": float(np.quantile(ms, 0.5)), "p99": float(np.quantile(ms, 0.99)), "max": float(ms.max())}


def offered_load(records: pd.DataFrame | None, load: LoadProfile, concurrency: int, phase: str = "ab") -> dict[str, Any] | None:
    """The phase's load as run (see the module docstring); None when the phase has no records, or
    an open-loop phase's records carry no schedule (written before open loops)."""
    if records is None or not len(records) or "phase" not in records:
        return None
    df = records[records["phase"] == phase]
    if df.empty:
        return None
    sched = pd.to_numeric(df["scheduled_at"], errors="coerce") if "scheduled_at" in df else pd.Series(np.nan, index=df.index)
    if not sched.notna().any():
        if load.open_loop:
            return None
        return {"phase": phase, "profile": "closed", "open_loop": False, "concurrency": int(concurrency),
                "requests": int(len(df))}
    df = df.assign(_sched=sched, _sent=pd.to_numeric(df["sent_at"], errors="coerce"))
    df = df[df["_sched"].notna() & df["_sent"].notna()]
    lag = pd.to_numeric(df["send_lag_s"], errors="coerce") if "send_lag_s" in df else pd.Series(np.nan, index=df.index)
    df = df.assign(_lag=lag.fillna(df["_sent"] - df["_sched"]))  # a record without the field: the same difference
    arrivals = df.groupby("_sched")["_sent"].min()  # one arrival per scheduled instant (a pair), at its first send
    late = df["_lag"].to_numpy(float) * 1e3 > LATE_MS
    arms = {}
    for arm, g in df.groupby("arm", sort=False):
        arms[str(arm)] = {
            "requests": int(len(g)),
            "achieved_rate": _rate(g["_sent"].to_numpy(float)),
            "send_lag_ms": send_lag_ms(g["_lag"].to_numpy(float)),
            "late": int((g["_lag"].to_numpy(float) * 1e3 > LATE_MS).sum()),
        }
    return {
        "phase": phase,
        # records with a schedule under a closed-loop config: the config was changed after the run
        "profile": load.profile if load.open_loop else "open loop",
        "open_loop": True,
        "target_rate": load.rate,
        "max_in_flight": load.max_in_flight,
        "arrivals": int(arrivals.size),
        "requests": int(len(df)),
        "offered_rate": _rate(arrivals.index.to_numpy(float)),
        "achieved_rate": _rate(arrivals.to_numpy(float)),
        "send_lag_ms": send_lag_ms(df["_lag"].to_numpy(float)),
        "late": int(late.sum()),
        "late_ms": LATE_MS,
        "arms": arms,
    }


def offered_loads(records: pd.DataFrame | None, cfg: ExperimentConfig) -> dict[str, dict[str, Any]]:
    """phase -> its load as run, for the phases that sent (observe, ab)."""
    out = {}
    for phase in ("observe", "ab"):
        block = offered_load(records, getattr(cfg.workload.load, phase), cfg.workload.concurrency, phase)
        if block is not None:
            out[phase] = block
    return out
