"""The pre-registered decision: switch / keep / inconclusive / invalid, from an evaluation.

The rule (thresholds from `DecisionRule`; the defaults are the seed's criteria):

1. Any failed validity gate -> "invalid" (the reasons are the gates' details).
2. Guardrails, each judged on its (1 - alpha) interval against its margin:
   - success: candidate - control difference (Newcombe, paired); met when ci_low > -success_margin;
   - latency: p50 ratio candidate/control (paired bootstrap); met when ci_high < 1 + latency_margin;
   - variability: CV ratio candidate/control (paired bootstrap); met when ci_high <= max_cv_ratio.
   A guardrail is "not met" when its whole interval lies beyond the margin, else "unclear".
3. Primary (any one suffices): faster (p50 ratio ci_high < 1), more successful (difference
   ci_low > 0), each also significant after Holm over the pre-declared family (McNemar for
   success, Wilcoxon for latency, x candidates); or cheaper per 1k successful requests.
4. Verdict per candidate:
   - a guardrail not met (clearly worse beyond the margin) -> "keep";
   - every guardrail met and a primary gain -> "switch";
   - every guardrail met, no demonstrated gain -> "keep": the control is the default and a
     switch has to earn its change (ties go to the status quo);
   - otherwise (some guardrail unclear): if the candidate is demonstrably worse than the
     control on a guardrail metric (interval entirely on the worse side of no-difference) and
     shows no gain anywhere -> "keep" (a deterioration test, as in Spotify's risk-aware rule:
     more data cannot make such a candidate worth switching to unless the gain appears, which
     the data already argue against); else -> "inconclusive", with the minimum detectable
     effect at this n and the pairs that would settle every unclear guardrail (normal
     approximation: the pairs at which the interval clears the margin with the configured
     power, if the current estimate were the truth).
5. Several candidates: "switch" to the one with the lowest p50 ratio among those that earn a
   switch; else "inconclusive" if any is; else "keep".

The backend-share expectation and the TOST equivalence are reported as informational criteria;
they never change the verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from guided_ab.analysis import stats as S
from guided_ab.config import DecisionRule

VERDICTS = ("switch", "keep", "inconclusive", "invalid")


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:+.1%}" if pct else f"{x:.3f}"


def _fmt_abs(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _fmt_p(p: float | None) -> str:
    return "n/a" if p is None else ("<0.001" if p < 0.001 else f"{p:.3f}")


def _ci(c: dict, pct: bool = False) -> str:
    return f"{_fmt(c.get('estimate'), pct)} [{_fmt(c.get('ci_low'), pct)}, {_fmt(c.get('ci_high'), pct)}]"


def _crit(name: str, role: str, candidate: str, iv: dict, margin: float | None, verdict: str, **extra: Any) -> dict:
    return {
        "name": name, "role": role, "candidate": candidate,
        "estimate": S.num(iv.get("estimate")), "ci_low": S.num(iv.get("ci_low")), "ci_high": S.num(iv.get("ci_high")),
        "margin": S.num(margin), "verdict": verdict, **extra,
    }


def _judge_upper(iv: dict, bound: float, strict: bool = True) -> str:
    """Smaller is better: met when ci_high is below the bound, not met when ci_low is above."""
    lo, hi = iv.get("ci_low"), iv.get("ci_high")
    if lo is None or hi is None:
        return "unclear"
    if hi < bound or (not strict and hi <= bound):
        return "met"
    if lo > bound:
        return "not met"
    return "unclear"


def _judge_lower(iv: dict, bound: float) -> str:
    """Larger is better: met when ci_low is above the bound, not met when ci_high is below."""
    lo, hi = iv.get("ci_low"), iv.get("ci_high")
    if lo is None or hi is None:
        return "unclear"
    if lo > bound:
        return "met"
    if hi < bound:
        return "not met"
    return "unclear"


# -- one candidate: the steps of the rule ---------------------------------------------------------
@dataclass(frozen=True)
class _Comparison:
    """The parts of one candidate's comparison with the control that the rule reads."""

    cand: str
    control: str
    n: int  # pairs in which both arms have a record
    n_lat: int  # pairs in which both arms answered
    succ: dict  # success-rate difference candidate - control, with its interval
    p50: dict  # p50 latency ratio candidate / control
    cvr: dict  # latency CV ratio candidate / control
    comp: dict  # the whole comparison
    alpha: float  # the level the intervals were computed at
    power: float

    @classmethod
    def read(cls, ev: dict, cand: str, rule: DecisionRule) -> _Comparison:
        comp = ev["comparisons"][cand]
        return cls(
            cand=cand, control=comp["control"], n=int(comp["n_pairs"]), n_lat=int(comp["latency"]["n_pairs"]),
            succ=comp["success"]["diff"], p50=comp["latency"]["ratio_p50"], cvr=comp["cv_ratio"], comp=comp,
            alpha=float(ev.get("settings", {}).get("alpha", rule.alpha)), power=float(rule.power),
        )


@dataclass(frozen=True)
class _Guardrails:
    """Each guardrail's verdict (met / not met / unclear) against its bound, and its criterion."""

    verdicts: dict[str, str]  # success, latency, variability
    bounds: dict[str, float]
    more: dict[str, int | None]  # pairs beyond the current n that would settle it
    criteria: list[dict]


@dataclass(frozen=True)
class _Primary:
    """The primary criteria: a gain on any one (faster, more successful, cheaper) can earn a switch."""

    faster: bool
    better: bool
    cheaper: bool
    p_latency: float | None  # Holm-adjusted
    p_success: float | None
    cost_control: float | None  # USD per 1k successful requests
    cost_candidate: float | None
    criteria: list[dict]

    @property
    def gains(self) -> list[str]:
        return [g for g, ok in (("faster", self.faster), ("more successful", self.better), ("cheaper", self.cheaper)) if ok]


def _candidate(ev: dict, cand: str, rule: DecisionRule) -> dict:
    """The rule for one candidate: guardrails, primary criteria, informational criteria, verdict."""
    c = _Comparison.read(ev, cand, rule)
    guards = _guardrails(c, rule)
    primary = _primary(ev, c)
    verdict, reasons, pairs_needed = _verdict(c, guards, primary)
    mde = c.comp.get("mde", {})
    if verdict == "inconclusive":
        reasons.append(
            f"minimum detectable effect at n={c.n} pairs (power {c.power:.0%}): success difference "
            f"{_fmt_abs(mde.get('success_diff'))}, p50 latency ratio change {_fmt_abs(mde.get('latency_p50_ratio'))}"
        )
    return {"verdict": verdict, "reasons": reasons, "criteria": guards.criteria + primary.criteria + _informational(ev, c, rule),
            "pairs_needed": pairs_needed, "mde": mde, "n_pairs": c.n, "p50_ratio": c.p50.get("estimate")}


def _guardrails(c: _Comparison, rule: DecisionRule) -> _Guardrails:
    """Success, latency and variability judged on their intervals against the rule's margins."""
    bounds = {"success": -float(rule.success_margin), "latency": 1 + float(rule.latency_margin),
              "variability": float(rule.max_cv_ratio)}
    verdicts = {
        "success": _judge_lower(c.succ, bounds["success"]),
        "latency": _judge_upper(c.p50, bounds["latency"]),
        "variability": _judge_upper(c.cvr, bounds["variability"], strict=False),
    }
    more = _more_pairs_estimate(c, bounds)
    criteria = [
        _crit(name, "guardrail", c.cand, iv, bounds[g], verdicts[g], metric=metric,
              pairs_needed=more[g] if verdicts[g] == "unclear" else 0)
        for g, name, iv, metric in (
            ("success", "success_noninferiority", c.succ, "success rate difference (candidate - control)"),
            ("latency", "latency_p50_noninferiority", c.p50, "p50 latency ratio (candidate / control)"),
            ("variability", "variability_cv_ratio", c.cvr, "latency CV ratio (candidate / control)"),
        )
    ]
    return _Guardrails(verdicts, bounds, more, criteria)


def _more_pairs_estimate(c: _Comparison, bounds: dict[str, float]) -> dict[str, int | None]:
    """Per guardrail, the pairs beyond the current n at which its interval would clear the margin
    with the configured power, if the current estimate were the truth (normal approximation; None
    when there is nothing to extrapolate from or the estimate sits on the margin)."""

    def more(effect: float | None, sd_unit: float | None, n: int) -> int | None:
        if effect is None or sd_unit is None:
            return None
        total = S.n_needed(effect, sd_unit, c.alpha, c.power)
        return None if total is None else max(0, total - n)

    def log_effect(iv: dict, bound: float) -> float | None:
        e = iv.get("estimate")
        return None if e is None or e <= 0 else math.log(e) - math.log(bound)

    succ_est = c.succ.get("estimate")
    return {
        "success": more(None if succ_est is None else succ_est - bounds["success"], c.comp["success"].get("sd_unit"), c.n),
        "latency": more(log_effect(c.p50, bounds["latency"]), c.comp["latency"].get("sd_log_unit"), c.n_lat),
        "variability": more(log_effect(c.cvr, bounds["variability"]), c.cvr.get("sd_log_unit"), c.n_lat),
    }


def _primary(ev: dict, c: _Comparison) -> _Primary:
    """Faster (p50 ratio ci_high < 1) or more successful (difference ci_low > 0), each also significant
    after Holm; or cheaper per 1k successful requests."""
    p_holm = c.comp.get("p_holm", {})
    a_lat, a_succ = p_holm.get("latency"), p_holm.get("success")
    lat_v = _judge_upper(c.p50, 1.0)
    faster = lat_v == "met" and a_lat is not None and a_lat < c.alpha
    if lat_v == "met" and not faster:
        lat_v = "unclear"
    succ_v = _judge_lower(c.succ, 0.0)
    better = succ_v == "met" and a_succ is not None and a_succ < c.alpha
    if succ_v == "met" and not better:
        succ_v = "unclear"
    ck = ev["arms"].get(c.control, {}).get("cost", {}).get("per_1k_success")
    cc = ev["arms"].get(c.cand, {}).get("cost", {}).get("per_1k_success")
    if ck is None or cc is None or (ck == 0 and cc == 0):
        cost_v, cheaper = "info", False
    else:
        cheaper = cc < ck
        cost_v = "met" if cheaper else "not met"
    criteria = [
        _crit("latency_p50_superiority", "primary", c.cand, c.p50, 1.0, lat_v, p_holm=S.num(a_lat),
              metric="p50 latency ratio (candidate / control) < 1"),
        _crit("success_superiority", "primary", c.cand, c.succ, 0.0, succ_v, p_holm=S.num(a_succ),
              metric="success rate difference > 0"),
        _crit("cost_per_1k_success", "primary", c.cand, {"estimate": cc}, ck, cost_v,
              metric="USD per 1k successful requests (margin = the control's)"),
    ]
    return _Primary(faster, better, cheaper, a_lat, a_succ, ck, cc, criteria)


def _informational(ev: dict, c: _Comparison, rule: DecisionRule) -> list[dict]:
    """Backend share (A/B, else the observe phase) and TOST equivalence: reported, never deciding."""
    share = ev["arms"].get(c.cand, {}).get("backend", {})
    share_iv = share.get("share", {})
    if not share.get("n_known"):
        share_iv = ev.get("observe", {}).get("arms", {}).get(c.cand, {}).get("backend_share", share_iv)
    floor = float(rule.backend_share_min)
    tost = c.comp["latency"].get("tost", {})
    return [
        _crit("backend_share", "informational", c.cand, share_iv, floor,
              _judge_lower(share_iv, floor) if share_iv.get("ci_low") is not None else "unclear",
              metric=f"share of requests resolved to '{rule.expected_backend}'"),
        _crit("latency_equivalence", "informational", c.cand, tost.get("geometric_mean_ratio", {}), tost.get("margin"),
              "info", pvalue=S.num(tost.get("pvalue")), equivalent=tost.get("equivalent"),
              metric="geometric-mean latency ratio, TOST on log latency"),
    ]


# -- one candidate: the verdict and its text -------------------------------------------------------
def _verdict(c: _Comparison, guards: _Guardrails, primary: _Primary) -> tuple[str, list[str], int | None]:
    """(verdict, reasons, pairs needed) for one candidate, as in the module docstring's step 4."""
    desc = _guardrail_text(c, guards.bounds)
    failed = [g for g, v in guards.verdicts.items() if v == "not met"]
    unclear = [g for g, v in guards.verdicts.items() if v == "unclear"]
    gains = primary.gains
    if failed:
        return "keep", [f"'{c.cand}' is worse than the margin allows: {desc[g]}" for g in failed], 0
    if not unclear:
        if gains:
            return "switch", _switch_reasons(c, primary), 0
        return "keep", [
            f"'{c.cand}' meets every guardrail but shows no demonstrated gain (p50 ratio {_ci(c.p50)}, "
            f"success difference {_ci(c.succ, pct=True)}, not cheaper): the control stays"
        ], 0
    regress = _regressions(c)
    if regress and not gains:
        reasons = [f"'{c.cand}' is demonstrably {' and '.join(regress)} than '{c.control}' with no demonstrated gain"]
        return "keep", reasons + [f"unclear against its margin (would need more data): {desc[g]}" for g in unclear], 0
    reasons = _unclear_reasons(c, guards, unclear, desc)
    ks = [m for g in unclear if (m := guards.more[g]) is not None]
    if gains:
        reasons.append(f"a gain is demonstrated ({' and '.join(gains)}), the guardrails are not yet")
    return "inconclusive", reasons, (max(ks) if ks else None)  # None: no interval yet to extrapolate from


def _guardrail_text(c: _Comparison, bounds: dict[str, float]) -> dict[str, str]:
    return {
        "success": f"success difference {_ci(c.succ, pct=True)} vs margin {bounds['success']:+.1%}",
        "latency": f"p50 latency ratio {_ci(c.p50)} vs margin {bounds['latency']:.3f}",
        "variability": f"latency CV ratio {_ci(c.cvr)} vs max {bounds['variability']:.3f}",
    }


def _switch_reasons(c: _Comparison, p: _Primary) -> list[str]:
    reasons = [f"'{c.cand}' is non-inferior on every guardrail and {' and '.join(p.gains)} than '{c.control}'"]
    if p.faster:
        reasons.append(f"faster: p50 ratio {_ci(c.p50)}, Holm-adjusted Wilcoxon p={_fmt_p(p.p_latency)}")
    if p.better:
        reasons.append(f"more successful: difference {_ci(c.succ, pct=True)}, Holm-adjusted McNemar p={_fmt_p(p.p_success)}")
    if p.cheaper:
        reasons.append(f"cheaper: {_fmt(p.cost_candidate)} vs {_fmt(p.cost_control)} USD per 1k successful requests")
    return reasons


def _regressions(c: _Comparison) -> list[str]:
    """Guardrail metrics on which the candidate is demonstrably worse than the control (the interval
    entirely on the worse side of no difference)."""
    regress = []
    if (c.succ.get("ci_high") is not None) and c.succ["ci_high"] < 0:
        regress.append(f"less successful ({_ci(c.succ, pct=True)})")
    if (c.p50.get("ci_low") is not None) and c.p50["ci_low"] > 1:
        regress.append(f"slower (p50 ratio {_ci(c.p50)})")
    if (c.cvr.get("ci_low") is not None) and c.cvr["ci_low"] > 1:
        regress.append(f"more variable (CV ratio {_ci(c.cvr)})")
    return regress


def _unclear_reasons(c: _Comparison, guards: _Guardrails, unclear: list[str], desc: dict[str, str]) -> list[str]:
    ivs = {"success": c.succ, "latency": c.p50, "variability": c.cvr}
    reasons = []
    for g in unclear:
        if ivs[g].get("ci_low") is None or ivs[g].get("ci_high") is None:
            reasons.append(f"{desc[g]}: no interval at n={c.n} pairs (too few pairs or values)")
            continue
        k = guards.more[g]
        tail = (f"about {k} more pairs would settle it" if k is not None
                else "more pairs cannot settle it while the estimate sits on the margin")
        reasons.append(f"{desc[g]}: the interval straddles the margin; {tail}")
    return reasons


# -- all candidates --------------------------------------------------------------------------------
def decide(evaluation: dict, rule: DecisionRule) -> dict:
    """The verdict for an evaluation under a (possibly re-thresholded) pre-registered rule."""
    control = evaluation["control"]
    cands = list(evaluation.get("candidates", []))
    per = {c: _candidate(evaluation, c, rule) for c in cands if c in evaluation.get("comparisons", {})}
    criteria = [c for p in per.values() for c in p["criteria"]]
    failed = [g for g in evaluation.get("gates", []) if not g.get("passed")]
    chosen: str | None = cands[0] if len(cands) == 1 else None
    if failed:
        verdict = "invalid"
        reasons = [f"gate '{g['name']}' failed: {g['detail']}" for g in failed]
        pairs_needed: int | None = 0
    else:
        switch = [c for c, p in per.items() if p["verdict"] == "switch"]
        inconc = [c for c, p in per.items() if p["verdict"] == "inconclusive"]
        if switch:
            verdict = "switch"
            chosen = min(switch, key=lambda c: per[c]["p50_ratio"] if per[c]["p50_ratio"] is not None else math.inf)
        elif inconc:
            verdict = "inconclusive"
            chosen = chosen or inconc[0]
        else:
            verdict = "keep"
        reasons = []
        for c, p in per.items():
            prefix = "" if len(per) == 1 else f"[{c}: {p['verdict']}] "
            reasons += [prefix + r for r in p["reasons"]]
        if not per:
            verdict, reasons = "inconclusive", ["no candidate comparison in the evaluation"]
        needs = [per[c]["pairs_needed"] for c in inconc if per[c]["pairs_needed"] is not None]
        pairs_needed = (max(needs) if needs else None) if verdict == "inconclusive" else 0
    out = {
        "verdict": verdict,
        "control": control,
        "candidate": chosen,
        "serve": chosen if verdict == "switch" else control,
        "reasons": reasons,
        "criteria": criteria,
        "mde": per[chosen]["mde"] if chosen in per else {},
        "pairs_needed": pairs_needed,
        "per_candidate": {c: {k: p[k] for k in ("verdict", "reasons", "pairs_needed", "mde", "n_pairs")}
                          for c, p in per.items()},
    }
    return S.jsonable(out)
