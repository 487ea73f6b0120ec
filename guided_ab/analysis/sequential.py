"""Sequential, budget-capped A/B decisions: judged at every look on repeated confidence intervals.

Why a module of its own: a fixed-size interval looked at after every batch of pairs and acted on
as soon as it clears a margin is wrong far more often than its level says (measured: wrong
switches 2.7 % -> 9 % with 6 looks). Here every criterion is a repeated confidence interval of a
group-sequential design (groupseq.py: alpha spent over the looks, Lan-DeMets), valid at all looks
at once, so the A/B may stop at the first look that settles it, or be continued with more pairs
(from a reserve of alpha kept for that), without inflating the error rates.

The units are *schemas*: within a schema the per-pair differences (candidate - control) are
averaged first, so repeats of one schema count once, and the standard error is the schema-level
(cluster) one. Per candidate, two intervals:
- success difference: mean over schemas of (candidate success - control success);
- latency log-ratio: mean over schemas of log(candidate latency / control latency), reported as
  the ratio exp(.) (a geometric-mean ratio). Timeouts and connection errors are right-censored
  at the workload's `timeout_s` (counted as that latency, never dropped: a candidate that times
  out is slow, not missing); answered requests count with their latency (capped at timeout_s).
  Pairs where an arm failed fast (a refusal, a server error: a few milliseconds that say nothing
  of speed) leave the latency comparison, as in pairs.py; their failure counts in the success one.
  Pairs the server refused for the workload's own sake (context overflow, an invalid request:
  records.WORKLOAD_OUTCOMES) leave both comparisons, as in the fixed-size evaluation.
Information time is pairs / the design's planned pairs. Each interval is at alpha / candidates
(two-sided): a wrong verdict needs one interval to miss the truth on the side the verdict rests on,
and with two metrics those one-sided misses add up to at most alpha per candidate.
The success interval's sd is floored at 1/sqrt(schemas), the sd one disagreeing schema would give:
when every schema so far agrees, the normal interval would otherwise shrink to a point (a
zero-width interval from 10 schemas), where a binomial bound says a few-point difference is
still plausible (rule of three: 3/n).

The rule at each look, per candidate (margins from `DecisionRule`, gains from `Sequential`):
1. "keep" as soon as a guardrail is clearly broken: the success interval lies entirely below
   -success_margin, or the latency-ratio interval entirely above 1 + latency_margin;
2. "switch" as soon as every guardrail is met (success low > -success_margin, latency-ratio high
   < 1 + latency_margin) and a primary gain is shown (latency-ratio high < 1, or success low > 0);
3. "keep" by futility: the intervals exclude the pre-registered minimal worthwhile gain on every
   primary (latency-ratio low > 1 - min_latency_gain and success high < min_success_gain);
4. otherwise continue. A candidate kept at a look stays kept. The A/B stops when any candidate
   earns a switch (the fastest of those that do) or every candidate is kept; at the cap
   (max_pairs or max_usd) it stops "inconclusive".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from guided_ab.analysis import stats as S
from guided_ab.analysis.groupseq import MIN_UNITS, critical_values, half_width
from guided_ab.analysis.pairs import ANSWERED_OUTCOMES, CENSORED_OUTCOMES
from guided_ab.config import DecisionRule
from guided_ab.records import WORKLOAD_OUTCOMES

METHOD = ("group-sequential repeated confidence intervals (Lan-DeMets alpha spending, Hwang-Shih-DeCani "
          "gamma -2, 10% of alpha kept for continuations); units = schemas")
CENSORED = CENSORED_OUTCOMES
ANSWERED = ANSWERED_OUTCOMES


@dataclass(frozen=True)
class Design:
    """What a sequential A/B fixed before its first sequential look (kept in sequential.json)."""

    planned_pairs: int  # information fraction 1: the pairs the design spends alpha over (the first cap)
    pairs_per_look: int
    max_pairs: int
    max_usd: float | None
    min_latency_gain: float
    min_success_gain: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Design:
        d = {**d, "planned_pairs": d.get("planned_pairs") or d["max_pairs"]}  # runs from before planned_pairs
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    def fractions(self, end_pairs: list[int]) -> list[float]:
        """Information fractions of looks ending at these pairs."""
        return [e / max(1, self.planned_pairs) for e in end_pairs]


def criticals(design: Design, end_pairs: list[int], alpha: float) -> list[float]:
    """The two-sided critical value of each look (looks ending at `end_pairs`, in order)."""
    return critical_values(design.fractions(end_pairs), alpha)


def alpha_per_interval(rule: DecisionRule, candidates: int) -> float:
    return float(rule.alpha) / max(1, candidates)


# -- units -----------------------------------------------------------------------------------------
def _latency(df: pd.DataFrame, timeout_s: float) -> np.ndarray:
    """Latency for the comparison: answered as measured (capped at timeout_s), timeouts and
    connection errors censored at timeout_s, fast failures NaN (left out)."""
    lat = pd.to_numeric(df["latency_s"], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    censored = df["outcome"].isin(CENSORED).to_numpy()
    answered = df["outcome"].isin(ANSWERED).to_numpy()
    lat = np.where(censored | (answered & ~np.isfinite(lat)), timeout_s, np.minimum(lat, timeout_s))
    return np.where(censored | answered, np.clip(lat, 1e-6, None), np.nan)


def schema_units(records: pd.DataFrame, control: str, candidate: str, timeout_s: float,
                 end_pair: int | None = None) -> pd.DataFrame:
    """One row per schema: the mean paired success difference and latency log-ratio over its
    pairs (both arms recorded) with pair_index < end_pair; `pairs` and `censored` count them."""
    ab = records[(records["phase"] == "ab") & ~records["warmup"].astype(bool)]
    if end_pair is not None:
        ab = ab[ab["pair_index"] < end_pair]
    ab = ab.sort_values(["attempt", "sent_at"]).drop_duplicates(["arm", "pair_index"], keep="last")
    side = {}
    for arm in (control, candidate):
        a = ab[ab["arm"] == arm]
        side[arm] = pd.DataFrame({
            "pair_index": a["pair_index"].to_numpy(), "schema_id": a["schema_id"].to_numpy(),
            "ok": (a["outcome"] == "success").to_numpy(dtype=float), "lat": _latency(a, timeout_s),
            "cens": a["outcome"].isin(CENSORED).to_numpy(dtype=int),
            "wl": a["outcome"].isin(WORKLOAD_OUTCOMES).to_numpy(),
        })
    m = side[control].merge(side[candidate].drop(columns="schema_id"), on="pair_index", suffixes=("_k", "_c"))
    m = m[~(m["wl_k"] | m["wl_c"])]  # refused for the workload's own sake: no backend to judge (pairs.py)
    m["d"] = m["ok_c"] - m["ok_k"]
    m["lr"] = np.log(m["lat_c"] / m["lat_k"])
    m["cens"] = m["cens_k"] + m["cens_c"]
    g = m.groupby("schema_id", sort=True)
    return pd.DataFrame({"success_diff": g["d"].mean(), "log_ratio": g["lr"].mean(),  # NaN-skipping: fast failures out
                         "pairs": g["d"].size(), "censored": g["cens"].sum()}).reset_index()


# -- one candidate at one look ---------------------------------------------------------------------
def _iv(est: float | None, lo: float, hi: float, f=lambda v: v) -> dict[str, float | None]:
    return {"estimate": S.num(None if est is None else f(est)), "ci_low": S.num(f(lo)), "ci_high": S.num(f(hi))}


def _units_needed(x: np.ndarray, bound: float, c: float, side: int, floor: bool = False) -> int | None:
    """Units at which the interval (critical value c) would clear `bound` on `side` (+1: above,
    -1: below), if the current mean and sd were the truth (floor: the success interval's sd floor,
    1/sqrt(t)); None when the mean is on the other side or there is no sd yet."""
    x = x[np.isfinite(x)]
    if x.size < 2 or side * (float(x.mean()) - bound) <= 0 or not math.isfinite(c):
        return None
    gap, sd = abs(float(x.mean()) - bound), float(x.std(ddof=1))
    t = (c * sd / gap) ** 2  # c sd / sqrt(t) < gap
    if floor:
        t = max(t, c / gap)  # c (1/sqrt(t)) / sqrt(t) < gap
    return max(MIN_UNITS, int(x.size), math.ceil(t))


def mean_interval(x: np.ndarray, c: float) -> tuple[float | None, float, float]:
    """(estimate, low, high) of the repeated confidence interval for the mean of the units `x`."""
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return None, -math.inf, math.inf
    m = float(x.mean())
    r = half_width(float(x.std(ddof=1)) if x.size > 1 else math.inf, int(x.size), c)
    return m, m - r, m + r


def success_interval(d: np.ndarray, c: float) -> tuple[float | None, float, float]:
    """mean_interval of the per-schema success differences, with the sd floored at 1/sqrt(t)
    (module docstring: all-agreeing schemas must not give a zero-width interval)."""
    est, lo, hi = mean_interval(d, c)
    t = int(np.isfinite(d).sum())
    if est is None or t < 2:
        return est, lo, hi
    r = half_width(max(float(np.nanstd(d, ddof=1)), 1 / math.sqrt(t)), t, c)
    return est, est - r, est + r


def _settle_units(d: np.ndarray, lr: np.ndarray, succ_bound: float, lat_bound: float, futile_succ: float,
                  futile_lat: float, c: float) -> int | None:
    """Units (schemas) at which the rule would settle if the current means and sds were the truth:
    the soonest of its three ways (switch, a broken guardrail, futility); None if none is in sight."""
    def need(x: np.ndarray, bound: float, side: int) -> int | None:
        return _units_needed(x, bound, c, side, floor=x is d)

    def all_of(*ks: int | None) -> int | None:
        return None if any(k is None for k in ks) else max(k for k in ks if k is not None)

    lb, lf = math.log(lat_bound), math.log(futile_lat)
    gains = [k for k in (need(lr, 0.0, -1), need(d, 0.0, +1)) if k is not None]
    paths = [
        all_of(need(d, succ_bound, +1), need(lr, lb, -1), min(gains) if gains else None),  # switch
        need(d, succ_bound, -1), need(lr, lb, +1),  # a guardrail broken
        all_of(need(lr, lf, +1), need(d, futile_succ, -1)),  # futility
    ]
    found = [k for k in paths if k is not None]
    return min(found) if found else None


def judge_candidate(units: pd.DataFrame, candidate: str, rule: DecisionRule, design: Design,
                    c: float) -> dict[str, Any]:
    """The intervals of one candidate at one look (critical value c) and the rule's verdict:
    switch / keep / continue."""
    d, lr = units["success_diff"].to_numpy(float), units["log_ratio"].to_numpy(float)
    s_est, s_lo, s_hi = success_interval(d, c)
    l_est, l_lo, l_hi = mean_interval(lr, c)
    ratio = (math.exp(l_lo), math.exp(l_hi))
    succ_bound, lat_bound = -float(rule.success_margin), 1 + float(rule.latency_margin)
    futile_lat, futile_succ = 1 - design.min_latency_gain, design.min_success_gain
    guards = {
        "success": "met" if s_lo > succ_bound else ("not met" if s_hi < succ_bound else "unclear"),
        "latency": "met" if ratio[1] < lat_bound else ("not met" if ratio[0] > lat_bound else "unclear"),
    }
    faster, better = ratio[1] < 1, s_lo > 0
    futile = ratio[0] > futile_lat and s_hi < futile_succ
    if "not met" in guards.values():
        verdict, why = "keep", "guardrail"
    elif all(v == "met" for v in guards.values()) and (faster or better):
        verdict, why = "switch", "gain"
    elif futile:
        verdict, why = "keep", "futility"
    else:
        verdict, why = "continue", ""
    s_iv, l_iv = _iv(s_est, s_lo, s_hi), _iv(l_est, l_lo, l_hi, math.exp)
    crit = _criteria(candidate, s_iv, l_iv, guards, faster, better, futile, rule, design)
    needed = None
    if verdict == "continue":
        settle = _settle_units(d, lr, succ_bound, lat_bound, futile_succ, futile_lat, c)
        needed = None if settle is None else max(0, settle - int(d.size))
    return {"candidate": candidate, "verdict": verdict, "why": why, "units": int(d.size),
            "pairs": int(units["pairs"].sum()), "censored": int(units["censored"].sum()),
            "success_diff": s_iv, "latency_ratio": l_iv, "guardrails": guards,
            "gains": [g for g, ok in (("faster", faster), ("more successful", better)) if ok],
            "futile": bool(futile), "criteria": crit, "units_needed": needed}


def _criteria(cand: str, s_iv: dict, l_iv: dict, guards: dict, faster: bool, better: bool, futile: bool,
              rule: DecisionRule, design: Design) -> list[dict]:
    """decision.py's criterion rows, with the repeated confidence intervals as their intervals."""
    def row(name: str, role: str, iv: dict, margin: float, verdict: str, metric: str) -> dict:
        return {"name": name, "role": role, "candidate": cand, **iv, "margin": margin, "verdict": verdict,
                "metric": metric, "interval": "repeated confidence interval"}

    unclear = lambda ok: "met" if ok else "unclear"  # noqa: E731
    return [
        row("success_noninferiority", "guardrail", s_iv, -float(rule.success_margin), guards["success"],
            "success difference (candidate - control), mean over schemas"),
        row("latency_noninferiority", "guardrail", l_iv, 1 + float(rule.latency_margin), guards["latency"],
            "latency ratio (candidate / control), geometric mean over schemas, timeouts censored at timeout_s"),
        row("latency_superiority", "primary", l_iv, 1.0, unclear(faster), "latency ratio < 1"),
        row("success_superiority", "primary", s_iv, 0.0, unclear(better), "success difference > 0"),
        row("latency_futility", "futility", l_iv, 1 - design.min_latency_gain, "met" if futile else "unclear",
            "latency ratio low > 1 - min_latency_gain (no worthwhile speed-up)"),
        row("success_futility", "futility", s_iv, design.min_success_gain, "met" if futile else "unclear",
            "success difference high < min_success_gain (no worthwhile success gain)"),
    ]


# -- looks -----------------------------------------------------------------------------------------
def judge_look(records: pd.DataFrame, control: str, candidates: list[str], rule: DecisionRule, design: Design,
               timeout_s: float, end_pair: int, critical: float,
               kept: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    """Every candidate at the look that ends before pair `end_pair`, judged with the look's
    critical value (`criticals`); `kept`: candidates kept at an earlier look (they stay kept).
    verdict: switch / keep / continue."""
    alpha = alpha_per_interval(rule, len(candidates))
    per = {}
    for c in candidates:
        j = judge_candidate(schema_units(records, control, c, timeout_s, end_pair), c, rule, design, critical)
        if c in kept and j["verdict"] != "keep":
            j = {**j, "verdict": "keep", "why": "kept at an earlier look"}
        per[c] = j
    switch = [c for c, j in per.items() if j["verdict"] == "switch"]
    chosen: str | None = None
    if switch:
        verdict = "switch"
        chosen = min(switch, key=lambda c: per[c]["latency_ratio"]["estimate"] or math.inf)
    elif per and all(j["verdict"] == "keep" for j in per.values()):
        verdict = "keep"
    else:
        verdict = "continue"
    return {"end_pair": end_pair, "alpha_per_interval": alpha, "critical_value": S.num(critical),
            "information": end_pair / max(1, design.planned_pairs), "verdict": verdict, "candidate": chosen,
            "per_candidate": per}


def replay(records: pd.DataFrame, control: str, candidates: list[str], rule: DecisionRule, design: Design,
           timeout_s: float, looks: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """The looks (look number, end pair) judged in order, up to the first that settles."""
    out: list[dict[str, Any]] = []
    kept: set[str] = set()
    crit = criticals(design, [e for _, e in looks], alpha_per_interval(rule, len(candidates)))
    for (look, end_pair), c in zip(looks, crit):
        j = judge_look(records, control, candidates, rule, design, timeout_s, end_pair, c, kept)
        out.append({"look": look, "pairs": end_pair, **j})
        kept |= {c for c, p in j["per_candidate"].items() if p["verdict"] == "keep"}
        if j["verdict"] != "continue":
            break
    return out


def look_rows(looks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One table row per look and candidate (artifact and report tables)."""
    def ci(iv: dict, pct: bool) -> str:
        f = (lambda v: "-inf" if v is None else f"{v:+.1%}") if pct else (lambda v: "n/a" if v is None else f"{v:.3f}")
        return f"{f(iv.get('estimate'))} [{f(iv.get('ci_low'))}, {f(iv.get('ci_high'))}]"

    return [{"look": lk["look"], "pairs": lk["pairs"], "candidate": c, "schemas": j["units"],
             "success difference": ci(j["success_diff"], True), "latency ratio": ci(j["latency_ratio"], False),
             "verdict": j["verdict"] + (f" ({j['why']})" if j["why"] else "")}
            for lk in looks for c, j in lk["per_candidate"].items()]


# -- the decision ----------------------------------------------------------------------------------
def _ci(iv: dict, pct: bool = False) -> str:
    def f(v: float | None) -> str:
        return "unbounded" if v is None else (f"{v:+.1%}" if pct else f"{v:.3f}")
    return f"{f(iv.get('estimate'))} [{f(iv.get('ci_low'))}, {f(iv.get('ci_high'))}]"


def _candidate_reasons(j: dict, control: str, rule: DecisionRule, design: Design, at: str) -> list[str]:
    c, s, lt = j["candidate"], j["success_diff"], j["latency_ratio"]
    both = f"success difference {_ci(s, True)}, latency ratio {_ci(lt)}"
    if j["verdict"] == "switch":
        return [f"'{c}' is non-inferior on every guardrail and {' and '.join(j['gains'])} than '{control}' {at}: {both}"]
    if j["why"] == "guardrail":
        broken = [g for g, v in j["guardrails"].items() if v == "not met"]
        return [f"'{c}' is worse than the margin allows on {' and '.join(broken)} {at}: {both} "
                f"(margins: success {-rule.success_margin:+.1%}, latency ratio {1 + rule.latency_margin:.3f})"]
    if j["why"] == "futility":
        return [f"futility {at}: the intervals exclude the minimal worthwhile gains (latency ratio low > "
                f"{1 - design.min_latency_gain:.3f} and success difference high < {design.min_success_gain:+.1%}): "
                f"{both}; more pairs cannot make '{c}' worth switching to"]
    if j["why"]:
        return [f"'{c}' was kept at an earlier look"]
    return [f"'{c}' is not settled {at}: {both}"]


def decision(looks: list[dict[str, Any]], *, control: str, candidates: list[str], rule: DecisionRule,
             design: Design, stopped_because: str | None, spend_usd: float | None,
             next_step: str = "") -> dict[str, Any]:
    """decision.py's decision shape (verdict, serve, reasons, criteria, ...) from the judged looks,
    plus a `sequential` block. stopped_because: "cap" when the cap was reached, else None (the
    verdict then is the first settled look's, or inconclusive while looks remain)."""
    last: dict[str, Any] = looks[-1] if looks else {"look": 0, "pairs": 0, "verdict": "continue",
                                                     "candidate": None, "per_candidate": {}}
    settled = last["verdict"] != "continue"
    at = f"at look {last['look']} ({last['pairs']} pairs)"
    per: dict[str, dict[str, Any]] = last["per_candidate"]
    chosen = last["candidate"] or (candidates[0] if len(candidates) == 1 else None)
    reasons: list[str] = []
    for c, j in per.items():
        prefix = "" if len(per) == 1 else f"[{c}: {j['verdict']}] "
        reasons += [prefix + r for r in _candidate_reasons(j, control, rule, design, at)]
    because: str | None
    if settled:
        verdict, because = ("switch" if last["verdict"] == "switch" else "keep"), "settled"
    else:
        verdict, because = "inconclusive", stopped_because
        if not looks:
            reasons.append("no look has been judged yet")
        elif stopped_because == "cap":
            reasons.append(_cap_sentence(last, design, spend_usd))
        else:
            reasons.append("neither settled nor capped yet" + (f": {next_step}" if next_step else ""))
    needs = [j["units_needed"] for j in per.values() if j["units_needed"] is not None]
    ref = per.get(chosen) if chosen else None
    out = {
        "verdict": verdict, "control": control, "candidate": chosen,
        "serve": chosen if verdict == "switch" else control,
        "reasons": reasons,
        "criteria": [row for j in per.values() for row in j["criteria"]],
        "mde": {"success_diff": _half(ref["success_diff"]), "latency_ratio": _half(ref["latency_ratio"])} if ref else {},
        "pairs_needed": (max(needs) if needs else None) if verdict == "inconclusive" else 0,
        "per_candidate": {c: {"verdict": "inconclusive" if j["verdict"] == "continue" else j["verdict"],
                              "reasons": _candidate_reasons(j, control, rule, design, at),
                              "pairs_needed": j["units_needed"], "mde": {}, "n_pairs": j["pairs"]}
                          for c, j in per.items()},
        "sequential": {
            "method": METHOD, "looks": looks, "stopped_because": because,
            "settled_at_look": last["look"] if settled else None,
            "pairs_used": last["pairs"],
            "cap": {"max_pairs": design.max_pairs, "max_usd": design.max_usd, "spend_usd": spend_usd},
            "design": design.to_dict(),
            "censoring": "timeouts and connection errors count as latency = workload.timeout_s (right-censored, never dropped)",
        },
    }
    return S.jsonable(out)


def _half(iv: dict) -> float | None:
    lo, hi = iv.get("ci_low"), iv.get("ci_high")
    return None if lo is None or hi is None else (hi - lo) / 2


def _cap_sentence(last: dict, design: Design, spend_usd: float | None) -> str:
    cap = f"{design.max_pairs} pairs" + (f" / ${design.max_usd:.2f}" if design.max_usd else "")
    spent = f", ~${spend_usd:.2f}" if spend_usd else ""
    parts = []
    for c, j in last["per_candidate"].items():
        s, lt = j["success_diff"], j["latency_ratio"]
        width = "no interval yet (too few schemas)" if s["ci_low"] is None else (
            f"success difference to ±{_half(s):.1%} and the latency ratio to [{lt['ci_low']:.3f}, {lt['ci_high']:.3f}]")
        more = f"; about {j['units_needed']} more schemas would settle it" if j["units_needed"] else ""
        parts.append(f"'{c}' ({j['units']} schemas): {width}{more}")
    return (f"the cap ({cap}) was reached without a settled verdict: {last['pairs']} pairs{spent} bought "
            + "; ".join(parts) + " — `guided-ab continue` adds pairs")
