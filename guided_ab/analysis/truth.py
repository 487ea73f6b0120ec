"""The truth of a synthetic scenario: every statistic the evaluation and the sequential rule
estimate, computed from a very large sample of the same generator (`scenarios.py`).

Why by Monte Carlo and not by formula: the generator couples outcome, length, latency and
censoring (truncated answers are the slow ones, timeouts are censored at timeout_s), so the
closed forms are out of reach; and a truth derived by hand drifts from the generator the first
time either changes. Here the estimand of each statistic is *the same computation* the evaluation
does (per-arm values from `pairs.ArmPairs`, the sequential rule's units from
`sequential.schema_units`), applied to `TRUTH_PAIRS` pairs instead of 30-200. The Monte-Carlo
standard error of each truth comes from 10 batches of schemas and is reported with it; at the
default size it is < 0.003 on every statistic, small next to any interval the simulation checks.

A truth depends on the *layout* of the pairs as well as on the scenario: with repeats, a prefix
of the plan (a fixed-size run of 60 pairs over 50 schemas, a sequential look) has first requests
(grammar compile) in another share than the whole plan. `layout` is that share, pairs per
schema, and the truth sample has it exactly (`plan_schemas`).

`calibrate` sets a scenario's candidate threshold so that the true success difference is the
scenario's `success_diff` (on the margin means on it, not near it); `verdict` says which
decision is right for a truth (`keep`, `switch`, or `either` where both are defensible).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from guided_ab.analysis.pairs import ArmPairs, Columns
from guided_ab.analysis.scenarios import CANDIDATE, CONTROL, Scenario, draw_pairs, plan_schemas
from guided_ab.analysis.sequential import schema_units
from guided_ab.config import DecisionRule, Sequential

TRUTH_PAIRS = 400_000
BATCHES = 10


def _cv(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1) / np.mean(x))


def _ratio_of(f: Any, k: np.ndarray, c: np.ndarray) -> float:
    return float(f(c) / f(k))


def _paired(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ok = np.isfinite(a) & np.isfinite(b)
    return a[ok], b[ok]


# estimand name -> (view attribute, statistic over the paired values); the evaluation's intervals
# of these are checked by the simulation (simulate.INTERVALS maps each to its place in the JSON)
RATIO_ESTIMANDS: dict[str, tuple[str, Any]] = {
    "latency_p50_ratio": ("latency", np.median),
    "latency_mean_ratio": ("latency", np.mean),
    "latency_p95_ratio": ("latency", lambda x: np.quantile(x, 0.95)),
    "cv_ratio": ("latency", _cv),
    "ttft_p50_ratio": ("ttft", np.median),
    "tpot_p50_ratio": ("tpot", np.median),
    "tokens_mean_ratio": ("tokens", np.mean),
    "tokens_p50_ratio": ("tokens", np.median),
}


class _View:
    """Both arms of a sample as the evaluation sees them (pairs.ArmPairs)."""

    def __init__(self, arms: dict[str, dict[str, np.ndarray]], first: np.ndarray, sop: np.ndarray, timeout_s: float):
        n = first.size
        self.arm: dict[str, ArmPairs] = {}
        for role, r in arms.items():
            cols = Columns({
                "pair_index": np.arange(n, dtype=np.int64), "outcome": r["outcome"], "latency_s": r["latency_s"],
                "ttft_s": r["ttft_s"], "completion_tokens": r["tokens"], "first_for_schema": first,
                "stream": np.ones(n, bool), "schema_id": sop.astype(object),
            })
            self.arm[role] = ArmPairs(cols, np.arange(n, dtype=np.int64), timeout_s)

    def values(self, attr: str, role: str) -> np.ndarray:
        return getattr(self.arm[role], attr)


class _Sample:
    """A large sample of a scenario at one layout, seen as the evaluation and the sequential rule see
    it; statistics over any subset of its schemas (the Monte-Carlo batches) cost little."""

    def __init__(self, scn: Scenario, layout: float, pairs: int, seed: int):
        n_schemas = max(1, int(round(pairs / layout))) if layout > 1 else pairs
        self.sop = plan_schemas(n_schemas, pairs)
        self.arms = draw_pairs(scn, self.sop, n_schemas, np.random.default_rng(seed))
        self.first = np.zeros(pairs, bool)
        self.first[np.unique(self.sop, return_index=True)[1]] = True
        self.timeout_s = scn.world.timeout_s
        self.price_ratio = scn.candidate.usd_per_hour / scn.control.usd_per_hour
        self.view = _View(self.arms, self.first, self.sop, self.timeout_s)

    def units(self, pairs: np.ndarray | None = None) -> pd.DataFrame:
        """The sequential rule's schema units over all pairs, or over the pairs `pairs` only."""
        arms, sop = self.arms, self.sop
        if pairs is not None:
            arms = {role: {k: v[pairs] for k, v in r.items()} for role, r in arms.items()}
            sop = sop[pairs]
        return schema_units(_units_frame(arms, sop), CONTROL, CANDIDATE, self.timeout_s)

    def stats(self, pairs: np.ndarray, units: pd.DataFrame) -> dict[str, float]:
        """Every estimand over the pairs selected by the mask `pairs` and the given units."""
        v = self.view
        k, c = v.arm[CONTROL], v.arm[CANDIDATE]
        out = {"success_diff": float(np.mean(c.success[pairs]) - np.mean(k.success[pairs])),
               "truncation_diff": float(np.mean(c.truncated[pairs]) - np.mean(k.truncated[pairs])),
               # cost per successful request, candidate / control, both arms held alike (comparison.py)
               "cost_ratio": float(self.price_ratio * np.mean(k.success[pairs]) / np.mean(c.success[pairs]))}
        for name, (attr, f) in RATIO_ESTIMANDS.items():
            a, b = _paired(v.values(attr, CONTROL)[pairs], v.values(attr, CANDIDATE)[pairs])
            out[name] = _ratio_of(f, a, b) if a.size else math.nan
        out["seq_success_diff"] = float(units["success_diff"].mean())
        out["seq_latency_ratio"] = float(math.exp(units["log_ratio"].mean()))
        return out


def _units_frame(arms: dict[str, dict[str, np.ndarray]], sop: np.ndarray) -> pd.DataFrame:
    """The columns `sequential.schema_units` reads, for a large sample (no request ids)."""
    n = sop.size
    parts = []
    for role, r in arms.items():
        parts.append(pd.DataFrame({
            "phase": "ab", "warmup": False, "arm": role, "pair_index": np.arange(n), "attempt": 1,
            "sent_at": np.arange(n, dtype=float), "schema_id": sop, "outcome": r["outcome"],
            "latency_s": r["latency_s"],
        }))
    return pd.concat(parts, ignore_index=True)


@dataclass(frozen=True)
class Truth:
    """The true value of every estimand at one layout, with its Monte-Carlo standard error."""

    scenario: str
    layout: float  # pairs per schema
    values: dict[str, float]
    mc_se: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "layout": self.layout, "values": self.values, "mc_se": self.mc_se}


def truth(scn: Scenario, layout: float = 1.0, *, pairs: int = TRUTH_PAIRS, seed: int = 20261130) -> Truth:
    """The truth of `scn` at `layout` pairs per schema (<= 1: every pair a new schema), with the
    Monte-Carlo standard error from BATCHES batches of whole schemas."""
    smp = _Sample(scn, layout, pairs, seed)
    units = smp.units()
    values = smp.stats(np.ones(pairs, bool), units)
    batch_of, unit_batch = smp.sop % BATCHES, units["schema_id"].to_numpy() % BATCHES
    per: dict[str, list[float]] = {k: [] for k in values}
    for b in range(BATCHES):
        for k, val in smp.stats(batch_of == b, units[unit_batch == b]).items():
            per[k].append(val)
    se = {k: float(np.std(v, ddof=1) / math.sqrt(BATCHES)) for k, v in per.items()}
    return Truth(scn.name, float(layout), values, se)


@dataclass(frozen=True)
class SequentialParts:
    """The sequential units' expectations on an arm's first request of a schema and on a repeat:
    by linearity, the truth of the units' mean at any layout (a look of a plan with repeats)."""

    first: dict[str, float]  # success_diff, log_ratio
    repeat: dict[str, float]

    def at(self, layout: float) -> dict[str, float]:
        """seq_success_diff and seq_latency_ratio at `layout` pairs per schema (the plan's passes:
        a share f of the schemas has m + 1 pairs, the others m)."""
        m = max(1, int(math.floor(layout + 1e-9)))
        f = max(0.0, layout - m) if layout > 1 else 0.0
        def unit(key: str, k: int) -> float:
            return (self.first[key] + (k - 1) * self.repeat[key]) / k
        mix = {key: f * unit(key, m + 1) + (1 - f) * unit(key, m) for key in self.first}
        return {"seq_success_diff": mix["success_diff"], "seq_latency_ratio": math.exp(mix["log_ratio"])}


def sequential_parts(scn: Scenario, *, pairs: int = TRUTH_PAIRS, seed: int = 20261130) -> SequentialParts:
    """SequentialParts from a sample where every schema is sent twice (first pass, second pass)."""
    smp = _Sample(scn, 2.0, pairs, seed)
    half = pairs // 2
    out = []
    for sel in (np.arange(half), np.arange(half, pairs)):
        u = smp.units(sel)
        out.append({"success_diff": float(u["success_diff"].mean()), "log_ratio": float(u["log_ratio"].mean())})
    return SequentialParts(out[0], out[1])


def calibrate(scn: Scenario, *, pairs: int = TRUTH_PAIRS, seed: int = 20261130) -> Scenario:
    """The scenario with the candidate's threshold set so that its true success difference is
    `scn.success_diff` (unchanged when that is None). The truth sample and this one share a seed,
    so the calibration is exact on it up to one request in `pairs`."""
    if scn.success_diff is None:
        return scn
    arms = _Sample(scn, 1.0, pairs, seed).arms
    p_control = float(np.mean(arms[CONTROL]["outcome"] == "success"))
    c = arms[CANDIDATE]
    q = np.sort(c["q"][c["complete"]])
    want = int(round((p_control + scn.success_diff) * pairs))
    if not 0 < want < q.size:
        raise ValueError(f"scenario {scn.name}: a success difference of {scn.success_diff} is out of reach")
    theta = float((q[want - 1] + q[want]) / 2)
    return replace(scn, candidate=replace(scn.candidate, theta=theta))


def route(t: Truth, rule: DecisionRule, seq: Sequential) -> tuple[str, str]:
    """The right decision for a truth and the way to it: ("keep", "guardrail") when a guardrail is
    broken (on the margin counts as broken: non-inferiority is not true there); ("switch", "gain")
    when every guardrail holds and a worthwhile gain (>= the sequential design's minimal gains) is
    there (`min_gains`); ("keep", "futility") when the candidate shows no gain at all; ("either", "") in between
    (a gain too small to be worth it): neither decision is scored wrong there. Comparisons allow 3
    Monte-Carlo standard errors.

    The latency gain and guardrail read both the p50 ratio (the fixed-size rule's) and the
    geometric-mean ratio (the sequential rule's): a verdict is "keep"/"switch" only if both agree."""
    v, se = t.values, t.mc_se
    tol = {k: 3 * se.get(k, 0.0) + 1e-9 for k in v}
    succ, succ_tol = v["success_diff"], tol["success_diff"]
    ratios = [(v["latency_p50_ratio"], tol["latency_p50_ratio"]), (v["seq_latency_ratio"], tol["seq_latency_ratio"])]
    broken = (succ <= -rule.success_margin + succ_tol or v["cv_ratio"] > rule.max_cv_ratio + tol["cv_ratio"]
              or any(r >= 1 + rule.latency_margin - e for r, e in ratios))
    if broken:
        return "keep", "guardrail"
    held = (succ > -rule.success_margin + succ_tol and v["cv_ratio"] <= rule.max_cv_ratio - tol["cv_ratio"]
            and all(r < 1 + rule.latency_margin - e for r, e in ratios))
    lat_gain, succ_gain = min_gains(rule, seq)
    gain = all(r <= 1 - lat_gain - e for r, e in ratios) or succ >= succ_gain + succ_tol
    if held and gain:
        return "switch", "gain"
    no_gain = all(r >= 1 - e for r, e in ratios) and succ <= succ_tol
    return ("keep", "futility") if no_gain else ("either", "")


def min_gains(rule: DecisionRule, seq: Sequential) -> tuple[float, float]:
    """The smallest worthwhile latency and success gains: the rule's (fixed size), else the
    sequential design's."""
    return (float(getattr(rule, "min_latency_gain", seq.min_latency_gain)),
            float(getattr(rule, "min_success_gain", seq.min_success_gain)))


def verdict(t: Truth, rule: DecisionRule, seq: Sequential) -> str:
    """The right decision for a truth: `route`'s first part."""
    return route(t, rule, seq)[0]


def differs(t: Truth) -> bool:
    """Do the arms truly differ (success or p50 latency beyond 3 Monte-Carlo standard errors)?"""
    v, se = t.values, t.mc_se
    return (abs(v["success_diff"]) > 3 * se["success_diff"] + 1e-3
            or abs(v["latency_p50_ratio"] - 1) > 3 * se["latency_p50_ratio"] + 1e-3)
