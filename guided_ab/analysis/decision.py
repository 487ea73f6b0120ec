"""The pre-registered decision: switch / keep / inconclusive / invalid, from an evaluation.

The rule (thresholds from `DecisionRule`; the defaults are the seed's criteria). Every judgement is
read off an interval the evaluation computed and the report shows; the schema is the unit (with
repeats the intervals are schema-level, and "more" is counted in schemas). What each verdict of a
criterion means, at which level, is in criteria.py.

1. Any failed validity gate -> "invalid" (the reasons are the gates' details).
2. Guardrails, each against its margin: success difference candidate - control (Newcombe, paired;
   at the design effect of schemas when they repeat) > -success_margin; p50 latency ratio
   candidate/control (cluster bootstrap; timeouts censored at timeout_s, not dropped) <
   1 + latency_margin; latency CV ratio (expanded cluster-bootstrap interval) <= max_cv_ratio; and,
   with `backend_expectation: guardrail`, the expected backend's share > backend_share_min.
   Met: the nominal (1 - alpha) interval on the good side. Not met (clearly broken): the Bonferroni
   interval over the guardrail family (1 - alpha/k_G, k_G = guardrails x candidates) beyond the
   margin. Else unclear.
3. Primary criteria, any one suffices: faster (p50 ratio < 1), more successful (difference > 0),
   and, only when `min_cost_saving` pre-registers it, cheaper (cost per successful A/B request,
   candidate/control, < 1 - min_cost_saving; prices per hour x A/B successes, warm-ups and observe
   excluded). A gain: the Bonferroni interval over the primary family (1 - alpha/k_P) on the
   better side. Futile: the nominal interval rules out the minimal worthwhile gain (p50 ratio
   ci_low > 1 - min_latency_gain; success difference ci_high < min_success_gain; cost ratio
   ci_low > 1 - min_cost_saving, or no prices to judge it on). The McNemar (mid-p) and Wilcoxon
   p-values, Holm-adjusted, are reported and decide nothing: one interval, one judgement.
4. Verdict per candidate:
   - a guardrail clearly broken -> "keep" (a latency guardrail says why: slower computation or
     longer outputs, explain.py);
   - every guardrail met and a gain -> "switch";
   - every primary futile (no worthwhile gain is possible at the intervals' resolution) -> "keep";
   - otherwise -> "inconclusive", with the minimum detectable effect at the current schemas and
     about how many more schemas would settle it (normal approximation, if the current estimates
     were the truth: the fewer of reaching a keep by futility and of reaching a switch, i.e. every
     unclear guardrail met and the nearest gain), capped by the workload's unused schemas
     ("beyond the pool only repeats remain"). A low-powered candidate that looks faster is
     inconclusive, never a keep: ties no longer go to the status quo without evidence.
5. Several candidates: "switch" to the one with the lowest p50 ratio among those that earn a
   switch; else "inconclusive" if any is; else "keep".

The backend expectation (>= backend_share_min of a candidate's requests on expected_backend) is a
pre-registered hypothesis by default: it changes nothing, and the reasons (and the report header)
state its outcome, true / false / unclear from its Wilson interval; the TOST equivalence and the
explain metrics are informational rows.
"""

from __future__ import annotations

import math
from typing import Any

from guided_ab.analysis import criteria as C
from guided_ab.analysis import stats as S
from guided_ab.analysis.explain import latency_cause
from guided_ab.config import DecisionRule

VERDICTS = ("switch", "keep", "inconclusive", "invalid")


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:+.1%}" if pct else f"{x:.3f}"


def _fmt_abs(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _ci(c: dict, pct: bool = False) -> str:
    return f"{_fmt(c.get('estimate'), pct)} [{_fmt(c.get('ci_low'), pct)}, {_fmt(c.get('ci_high'), pct)}]"


def _adj_ci(c: C.Claim, pct: bool = False) -> str:
    lvl = c.adj.get("level")
    where = f"{lvl:.1%} interval" if lvl is not None else "interval"
    return f"{where} [{_fmt(c.adj.get('ci_low'), pct)}, {_fmt(c.adj.get('ci_high'), pct)}]"


# -- the backend expectation: a hypothesis --------------------------------------------------------------
def hypothesis(ev: dict, cand: str, rule: DecisionRule) -> dict[str, Any] | None:
    """The pre-registered backend expectation for one candidate and its outcome (true / false /
    unclear from the share's Wilson interval against backend_share_min); None without a share."""
    share = ev["arms"].get(cand, {}).get("backend", {})
    iv, phase = share.get("share", {}), "A/B"
    if not share.get("n_known"):
        iv, phase = ev.get("observe", {}).get("arms", {}).get(cand, {}).get("backend_share", iv), "observe"
    if iv.get("estimate") is None:
        return None
    floor = float(rule.backend_share_min)
    lo, hi = iv.get("ci_low"), iv.get("ci_high")
    outcome = "true" if lo is not None and lo > floor else ("false" if hi is not None and hi < floor else "unclear")
    backend = ev["arms"].get(cand, {}).get("configured_backend") or cand
    statement = f"'{cand}' ({backend}) serves more than {floor:.0%} of its requests with '{rule.expected_backend}'"
    ci = f" [{lo:.0%}, {hi:.0%}]" if lo is not None and hi is not None else ""
    text = (f"the expectation that '{cand}' ({backend}) serves >{floor:.0%} with {rule.expected_backend} is "
            f"{outcome}: {iv['estimate']:.0%}{ci} ({phase} phase)")
    return {"name": "backend_expectation", "candidate": cand, "statement": statement, "outcome": outcome,
            "estimate": S.num(iv.get("estimate")), "ci_low": S.num(lo), "ci_high": S.num(hi), "threshold": floor,
            "phase": phase, "role": rule.backend_expectation, "text": text}


# -- one candidate ----------------------------------------------------------------------------------
def _judge(ev: dict, cand: str, rule: DecisionRule, fam: C.Families) -> tuple[list[C.Claim], list[C.Claim], dict]:
    """Guardrails and primary criteria judged, each unclear one with the schemas that would settle it;
    and {"to_switch", "to_keep"}: schemas to a switch and to a keep by futility (None: not in view)."""
    comp = ev["comparisons"][cand]
    alpha = float(ev.get("settings", {}).get("alpha", rule.alpha))
    power = float(rule.power)
    n = int(comp.get("n_schemas", comp["n_pairs"]))
    n_lat = int(comp["latency"].get("n_schemas", comp["latency"]["n_pairs"]))
    hyp = hypothesis(ev, cand, rule)
    backend_iv = None if hyp is None else {k: hyp[k] for k in ("estimate", "ci_low", "ci_high")} | {
        "adjusted": _backend_adjusted(ev, cand)}
    sds = {"success": (comp["success"].get("sd_unit"), n), "latency": (comp["latency"].get("sd_log_unit"), n_lat),
           "variability": (comp["cv_ratio"].get("sd_log_unit"), n_lat)}
    guards = [C.judge_guardrail(g, strict=g.key != "variability") for g in C.guardrail_claims(comp, backend_iv, rule, fam)]
    for g in guards:
        if g.verdict == "unclear":
            sd, units = sds.get(g.key, (None, n))
            C.settle_guardrail(g, sd, units, alpha, fam.guard, power)
    prims = [C.judge_primary(p) for p in C.primary_claims(comp, rule, fam)]
    cost_iv = (comp.get("cost") or {}).get("ratio") or {}
    sds["faster"], sds["better"] = sds["latency"], sds["success"]
    sds["cheaper"] = (S.sd_unit_from_interval(cost_iv.get("ci_low"), cost_iv.get("ci_high"), n, alpha, log=True), n)
    to_gain, to_futile = [], []
    for p in prims:
        if p.key == "cheaper" and not p.has_interval:  # no prices: cost can never earn a switch
            p.futile, p.verdict = True, "not met"
            p.extra["note"] = "no prices per hour (nor USD totals) to compare: cost cannot be judged"
        if p.verdict == "unclear":
            sd, units = sds[p.key]
            g_, f_ = C.settle_primary(p, sd, units, alpha, fam.primary, power)
            to_gain.append(g_)
            to_futile.append(f_)
        else:
            to_futile.append(0 if p.futile else None)
    guard_more = [g.more for g in guards if g.verdict == "unclear"]
    guard_need = None if any(v is None for v in guard_more) else max((v for v in guard_more if v is not None), default=0)
    gains = any(p.gain for p in prims)
    gain_need = 0 if gains else min((v for v in to_gain if v is not None), default=None)
    to_switch = None if guard_need is None or gain_need is None else max(guard_need, gain_need)
    to_keep = None if any(v is None for v in to_futile) else max((v for v in to_futile if v is not None), default=0)
    return guards, prims, {"to_switch": to_switch, "to_keep": to_keep, "hypothesis": hyp}


def _backend_adjusted(ev: dict, cand: str) -> dict:
    share = ev["arms"].get(cand, {}).get("backend", {})
    if share.get("n_known"):
        return share.get("share", {}).get("adjusted") or {}
    return ev.get("observe", {}).get("arms", {}).get(cand, {}).get("backend_share", {}).get("adjusted") or {}


def _candidate(ev: dict, cand: str, rule: DecisionRule, fam: C.Families) -> dict:
    """The rule for one candidate: guardrails, primary criteria, informational rows, verdict."""
    comp = ev["comparisons"][cand]
    guards, prims, settle = _judge(ev, cand, rule, fam)
    p50 = comp["latency"]["ratio_p50"]
    est = p50.get("estimate")
    direction = 0 if est is None else (1 if est > 1 else -1)
    cause = latency_cause(comp, direction) if direction else None
    verdict, reasons, need = _verdict(ev, cand, guards, prims, settle, cause)
    hyp = settle["hypothesis"]
    if hyp is not None and rule.backend_expectation == "hypothesis":
        reasons.append(f"pre-registered hypothesis: {hyp['text']}")
    mde = comp.get("mde", {})
    if verdict == "inconclusive":
        reasons.append(
            f"minimum detectable effect at {comp.get('n_schemas', comp['n_pairs'])} schemas (power {rule.power:.0%}): "
            f"success difference {_fmt_abs(mde.get('success_diff'))}, p50 latency ratio change {_fmt_abs(mde.get('latency_p50_ratio'))}"
        )
    rows = [g.row(cand) for g in guards] + [p.row(cand) for p in prims]
    if hyp is not None and rule.backend_expectation == "hypothesis":
        floor = float(rule.backend_share_min)
        rows.append({"name": "backend_share", "role": "informational", "candidate": cand, "estimate": hyp["estimate"],
                     "ci_low": hyp["ci_low"], "ci_high": hyp["ci_high"], "margin": floor,
                     "verdict": {"true": "met", "false": "not met"}.get(hyp["outcome"], "unclear"),
                     "hypothesis": hyp["outcome"], "metric": f"share of requests resolved to '{rule.expected_backend}'"})
    rows += C.informational_rows(ev, comp, cand, rule)
    return {"verdict": verdict, "reasons": reasons, "criteria": rows, "pairs_needed": need, "mde": mde,
            "n_pairs": comp["n_pairs"], "n_schemas": comp.get("n_schemas", comp["n_pairs"]), "p50_ratio": est,
            "explain": cause, "hypothesis": hyp,
            "futile": all(p.futile for p in prims), "to_switch": settle["to_switch"], "to_keep": settle["to_keep"]}


def _desc(c: C.Claim) -> str:
    pct = c.key in ("success", "better", "backend")
    margin = (f"{c.bound:+.1%}" if c.key == "success" else f"{c.bound:.1%}") if pct else f"{c.bound:.3f}"
    what = {"success": "success difference", "latency": "p50 latency ratio", "variability": "latency CV ratio",
            "backend": "backend share", "faster": "p50 latency ratio", "better": "success difference",
            "cheaper": "cost ratio per successful request"}[c.key]
    est = _ci(c.iv, pct=pct) if c.key != "backend" else (
        f"{_fmt_abs(c.iv.get('estimate'))} [{_fmt_abs(c.iv.get('ci_low'))}, {_fmt_abs(c.iv.get('ci_high'))}]")
    return f"{what} {est} vs {'max' if c.key == 'variability' else 'margin'} {margin}"


def _verdict(ev: dict, cand: str, guards: list[C.Claim], prims: list[C.Claim], settle: dict,
             cause: dict | None) -> tuple[str, list[str], int | None]:
    """(verdict, reasons, schemas needed) for one candidate, as in the module docstring's step 4."""
    control = ev["comparisons"][cand]["control"]
    why_slower = f"; why: {cause['text']}" if cause and cause["direction"] > 0 else ""
    broken = [g for g in guards if g.verdict == "not met"]
    if broken:
        return "keep", [f"'{cand}' is clearly worse than the margin allows ({_adj_ci(g, g.key == 'success')} beyond it): "
                        f"{_desc(g)}" + (why_slower if g.key == "latency" else "") for g in broken], 0
    unclear = [g for g in guards if g.verdict == "unclear"]
    gains = [p for p in prims if p.gain]
    if gains and not unclear:
        return "switch", _switch_reasons(cand, control, gains, cause), 0
    if all(p.futile for p in prims):
        reasons = [f"'{cand}' cannot bring a worthwhile gain: " + "; ".join(_futility_text(p) for p in prims)]
        if why_slower:
            reasons[0] += why_slower
        return "keep", reasons, 0
    reasons = [_unclear_text(g, ev) + (why_slower if g.key == "latency" else "") for g in unclear]
    if gains:
        reasons.append(f"a gain is demonstrated ({', '.join(_gain_name(p) for p in gains)}), the guardrails are not yet")
    else:
        open_ = [p for p in prims if not p.futile]
        reasons.append("no gain demonstrated yet, and a worthwhile one is not ruled out: "
                       + "; ".join(f"{_desc(p)} (minimal worthwhile gain: {_min_gain(p)})" for p in open_))
    need = min((v for v in (settle["to_switch"], settle["to_keep"]) if v is not None), default=None)
    reasons.append(_more_text(need, ev, cand))
    return "inconclusive", reasons, _capped(need, ev)


def _gain_name(p: C.Claim) -> str:
    return {"faster": "faster", "better": "more successful", "cheaper": "cheaper"}[p.key]


def _min_gain(p: C.Claim) -> str:
    assert p.futility_bound is not None
    if p.key == "better":
        return f"{p.futility_bound:+.1%}"
    return f"ratio {p.futility_bound:.3f}"


def _futility_text(p: C.Claim) -> str:
    if p.extra.get("note"):
        return str(p.extra["note"])
    return f"{_desc(p)} rules out the minimal worthwhile gain ({_min_gain(p)})"


def _switch_reasons(cand: str, control: str, gains: list[C.Claim], cause: dict | None) -> list[str]:
    reasons = [f"'{cand}' is non-inferior on every guardrail and {' and '.join(_gain_name(p) for p in gains)} than '{control}'"]
    for p in gains:
        line = f"{_gain_name(p)}: {_desc(p)}, {_adj_ci(p, p.key == 'better')} on the better side"
        if p.key == "faster" and cause and cause["direction"] < 0:
            line += f"; why: {cause['text']}"
        reasons.append(line)
    return reasons


def _unclear_text(g: C.Claim, ev: dict) -> str:
    if not g.has_interval:
        return f"{_desc(g)}: no interval yet (too few schemas or values)"
    tail = "more schemas cannot settle it while the estimate sits on the margin" if g.more is None else \
        f"about {g.more} more would settle it on its own"
    return f"{_desc(g)}: the interval straddles the margin; {tail}"


def _pool(ev: dict) -> tuple[int | None, int]:
    pool = ev.get("pool") or {}
    return pool.get("left"), int(pool.get("used") or 0)


def _more_text(need: int | None, ev: dict, cand: str) -> str:
    """About how many more would settle it: in schemas (= pairs without repeats), against the pool."""
    if need is None:
        return "more data cannot settle it while the estimates sit on the bounds (or there is no interval yet)"
    comp = ev["comparisons"][cand]
    schemas, pairs = int(comp.get("n_schemas", comp["n_pairs"]) or 0), int(comp["n_pairs"] or 0)
    repeats = pairs / schemas if schemas else 1.0
    if repeats <= 1.0:
        text = f"about {need} more pairs would settle it (new schemas: the schema is the unit)"
    else:
        text = (f"about {need} more schemas would settle it (at {repeats:.3g} pairs per schema: "
                f"about {math.ceil(need * repeats)} more pairs)")
    left, _ = _pool(ev)
    if left is not None and need > left:
        text += (f"; the workload has {left} unused schemas: beyond the pool only repeats remain, "
                 "which add little (at temperature 0 almost nothing)")
    return text


def _capped(need: int | None, ev: dict) -> int | None:
    left, _ = _pool(ev)
    return need if need is None or left is None else min(need, left)


# -- all candidates --------------------------------------------------------------------------------
def decide(evaluation: dict, rule: DecisionRule) -> dict:
    """The verdict for an evaluation under a (possibly re-thresholded) pre-registered rule."""
    control = evaluation["control"]
    cands = list(evaluation.get("candidates", []))
    comps = evaluation.get("comparisons", {})
    fam = C.Families.of(rule, len(cands))
    per = {c: _candidate(evaluation, c, rule, fam) for c in cands if c in comps}
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
    pool = evaluation.get("pool") or {}
    out = {
        "verdict": verdict,
        "control": control,
        "candidate": chosen,
        "serve": chosen if verdict == "switch" else control,
        "reasons": reasons,
        "criteria": criteria,
        "mde": per[chosen]["mde"] if chosen in per else {},
        "pairs_needed": pairs_needed,
        "needed_unit": "schemas",
        "pool": {"schemas": pool.get("schemas"), "used": pool.get("used"), "left": pool.get("left")},
        "families": {"guardrails": fam.guard, "primary": fam.primary, "method": "bonferroni"},
        "hypotheses": [p["hypothesis"] for p in per.values() if p["hypothesis"] is not None],
        "per_candidate": {c: {k: p[k] for k in ("verdict", "reasons", "pairs_needed", "mde", "n_pairs", "n_schemas",
                                                "explain", "futile", "to_switch", "to_keep")}
                          for c, p in per.items()},
    }
    return S.jsonable(out)
