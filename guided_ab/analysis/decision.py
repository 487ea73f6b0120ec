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


def _more_pairs(effect: float | None, sd_unit: float | None, n: int, alpha: float, power: float) -> int | None:
    if effect is None or sd_unit is None:
        return None
    total = S.n_needed(effect, sd_unit, alpha, power)
    return None if total is None else max(0, total - n)


def _candidate(ev: dict, cand: str, rule: DecisionRule) -> dict:
    comp = ev["comparisons"][cand]
    alpha = float(ev.get("settings", {}).get("alpha", rule.alpha))  # the intervals' level
    power = float(rule.power)
    control = comp["control"]
    n = int(comp["n_pairs"])
    n_lat = int(comp["latency"]["n_pairs"])
    succ = comp["success"]["diff"]
    p50 = comp["latency"]["ratio_p50"]
    cvr = comp["cv_ratio"]
    p_holm = comp.get("p_holm", {})
    crits: list[dict] = []

    # guardrails
    s_bound = -float(rule.success_margin)
    l_bound = 1 + float(rule.latency_margin)
    c_bound = float(rule.max_cv_ratio)
    g_success = _judge_lower(succ, s_bound)
    g_latency = _judge_upper(p50, l_bound)
    g_cv = _judge_upper(cvr, c_bound, strict=False)

    def log_effect(iv: dict, bound: float) -> float | None:
        e = iv.get("estimate")
        return None if e is None or e <= 0 else math.log(e) - math.log(bound)

    more = {
        "success": _more_pairs(None if succ.get("estimate") is None else succ["estimate"] - s_bound,
                               comp["success"].get("sd_unit"), n, alpha, power),
        "latency": _more_pairs(log_effect(p50, l_bound), comp["latency"].get("sd_log_unit"), n_lat, alpha, power),
        "variability": _more_pairs(log_effect(cvr, c_bound), cvr.get("sd_log_unit"), n_lat, alpha, power),
    }
    crits.append(_crit("success_noninferiority", "guardrail", cand, succ, s_bound, g_success,
                       metric="success rate difference (candidate - control)",
                       pairs_needed=more["success"] if g_success == "unclear" else 0))
    crits.append(_crit("latency_p50_noninferiority", "guardrail", cand, p50, l_bound, g_latency,
                       metric="p50 latency ratio (candidate / control)",
                       pairs_needed=more["latency"] if g_latency == "unclear" else 0))
    crits.append(_crit("variability_cv_ratio", "guardrail", cand, cvr, c_bound, g_cv,
                       metric="latency CV ratio (candidate / control)",
                       pairs_needed=more["variability"] if g_cv == "unclear" else 0))

    # primary: faster, more successful, or cheaper
    a_lat = p_holm.get("latency")
    a_succ = p_holm.get("success")
    lat_v = _judge_upper(p50, 1.0)
    faster = lat_v == "met" and a_lat is not None and a_lat < alpha
    if lat_v == "met" and not faster:
        lat_v = "unclear"
    succ_v = _judge_lower(succ, 0.0)
    better = succ_v == "met" and a_succ is not None and a_succ < alpha
    if succ_v == "met" and not better:
        succ_v = "unclear"
    crits.append(_crit("latency_p50_superiority", "primary", cand, p50, 1.0, lat_v, p_holm=S.num(a_lat),
                       metric="p50 latency ratio (candidate / control) < 1"))
    crits.append(_crit("success_superiority", "primary", cand, succ, 0.0, succ_v, p_holm=S.num(a_succ),
                       metric="success rate difference > 0"))
    ck = ev["arms"].get(control, {}).get("cost", {}).get("per_1k_success")
    cc = ev["arms"].get(cand, {}).get("cost", {}).get("per_1k_success")
    if ck is None or cc is None or (ck == 0 and cc == 0):
        cost_v, cheaper = "info", False
    else:
        cheaper = cc < ck
        cost_v = "met" if cheaper else "not met"
    crits.append(_crit("cost_per_1k_success", "primary", cand, {"estimate": cc}, ck, cost_v,
                       metric="USD per 1k successful requests (margin = the control's)"))

    # informational: backend share and equivalence
    share = ev["arms"].get(cand, {}).get("backend", {})
    share_iv = share.get("share", {})
    if not share.get("n_known"):
        share_iv = ev.get("observe", {}).get("arms", {}).get(cand, {}).get("backend_share", share_iv)
    crits.append(_crit("backend_share", "informational", cand, share_iv, float(rule.backend_share_min),
                       _judge_lower(share_iv, float(rule.backend_share_min)) if share_iv.get("ci_low") is not None
                       else "unclear", metric=f"share of requests resolved to '{rule.expected_backend}'"))
    tost = comp["latency"].get("tost", {})
    gmr = tost.get("geometric_mean_ratio", {})
    crits.append(_crit("latency_equivalence", "informational", cand, gmr, tost.get("margin"), "info",
                       pvalue=S.num(tost.get("pvalue")), equivalent=tost.get("equivalent"),
                       metric="geometric-mean latency ratio, TOST on log latency"))

    # verdict
    guards = {"success": g_success, "latency": g_latency, "variability": g_cv}
    gains = [g for g, ok in (("faster", faster), ("more successful", better), ("cheaper", cheaper)) if ok]
    desc = {
        "success": f"success difference {_ci(succ, pct=True)} vs margin {s_bound:+.1%}",
        "latency": f"p50 latency ratio {_ci(p50)} vs margin {l_bound:.3f}",
        "variability": f"latency CV ratio {_ci(cvr)} vs max {c_bound:.3f}",
    }
    reasons: list[str] = []
    pairs_needed = 0
    failed = [g for g, v in guards.items() if v == "not met"]
    unclear = [g for g, v in guards.items() if v == "unclear"]
    regress = []
    if (succ.get("ci_high") is not None) and succ["ci_high"] < 0:
        regress.append(f"less successful ({_ci(succ, pct=True)})")
    if (p50.get("ci_low") is not None) and p50["ci_low"] > 1:
        regress.append(f"slower (p50 ratio {_ci(p50)})")
    if (cvr.get("ci_low") is not None) and cvr["ci_low"] > 1:
        regress.append(f"more variable (CV ratio {_ci(cvr)})")
    if failed:
        verdict = "keep"
        reasons += [f"'{cand}' is worse than the margin allows: {desc[g]}" for g in failed]
    elif not unclear:
        if gains:
            verdict = "switch"
            reasons.append(f"'{cand}' is non-inferior on every guardrail and {' and '.join(gains)} than '{control}'")
            if faster:
                reasons.append(f"faster: p50 ratio {_ci(p50)}, Holm-adjusted Wilcoxon p={_fmt_p(a_lat)}")
            if better:
                reasons.append(f"more successful: difference {_ci(succ, pct=True)}, Holm-adjusted McNemar p={_fmt_p(a_succ)}")
            if cheaper:
                reasons.append(f"cheaper: {_fmt(cc)} vs {_fmt(ck)} USD per 1k successful requests")
        else:
            verdict = "keep"
            reasons.append(
                f"'{cand}' meets every guardrail but shows no demonstrated gain (p50 ratio {_ci(p50)}, "
                f"success difference {_ci(succ, pct=True)}, not cheaper): the control stays"
            )
    elif regress and not gains:
        verdict = "keep"
        reasons.append(f"'{cand}' is demonstrably {' and '.join(regress)} than '{control}' with no demonstrated gain")
        reasons += [f"unclear against its margin (would need more data): {desc[g]}" for g in unclear]
    else:
        verdict = "inconclusive"
        ivs = {"success": succ, "latency": p50, "variability": cvr}
        for g in unclear:
            k = more[g]
            if ivs[g].get("ci_low") is None or ivs[g].get("ci_high") is None:
                reasons.append(f"{desc[g]}: no interval at n={n} pairs (too few pairs or values)")
                continue
            tail = (f"about {k} more pairs would settle it" if k is not None
                    else "more pairs cannot settle it while the estimate sits on the margin")
            reasons.append(f"{desc[g]}: the interval straddles the margin; {tail}")
        ks = [more[g] for g in unclear if more[g] is not None]
        pairs_needed = max(ks) if ks else None  # None: no interval yet to extrapolate from
        if gains:
            reasons.append(f"a gain is demonstrated ({' and '.join(gains)}), the guardrails are not yet")
    mde = comp.get("mde", {})
    if verdict == "inconclusive":
        reasons.append(
            f"minimum detectable effect at n={n} pairs (power {power:.0%}): success difference "
            f"{_fmt_abs(mde.get('success_diff'))}, p50 latency ratio change {_fmt_abs(mde.get('latency_p50_ratio'))}"
        )
    return {"verdict": verdict, "reasons": reasons, "criteria": crits, "pairs_needed": pairs_needed, "mde": mde,
            "n_pairs": n, "p50_ratio": p50.get("estimate")}


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
        pairs_needed = 0
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
