"""The decision rule's criteria: each claim judged on the interval that fits the claim, and how many
more schemas would settle an unclear one.

Why its own module: decision.py states the rule and writes the verdict; what "met", "not met" and
"unclear" mean for each kind of claim, at which level, lives here once, so that the rule, the
criteria rows of the report and "how many more" can never use different intervals:

- a guardrail is *met* when its nominal (1 - alpha) interval lies on the good side of its margin:
  a switch needs every guardrail, an intersection-union claim, which needs no adjustment;
- a guardrail is *not met* (clearly broken) when its Bonferroni interval over the guardrail family
  (1 - alpha/k_G) lies beyond the margin: any one broken guardrail keeps the control, a union
  claim over the family, so it is adjusted;
- a primary criterion is a *gain* ("met") when its Bonferroni interval over the primary family
  (1 - alpha/k_P) lies on the better side of no difference (cost: of the pre-registered saving):
  any one gain can earn a switch, a union claim;
- a primary criterion is *futile* ("not met") when its nominal interval rules out the minimal
  worthwhile gain: a keep by futility needs every primary futile, an intersection-union claim.
The evaluation stores each judged interval's Bonferroni intervals (`adjusted`, by family size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from guided_ab.analysis import stats as S
from guided_ab.analysis.bootstrap import TAIL_EXPAND
from guided_ab.config import DecisionRule


@dataclass(frozen=True)
class Families:
    """The Bonferroni family sizes of the rule: guardrails and primary criteria, x candidates."""

    guard: int
    primary: int

    @classmethod
    def of(cls, rule: DecisionRule, candidates: int) -> Families:
        m = max(1, candidates)
        return cls(m * (3 + (rule.backend_expectation == "guardrail")), m * (2 + (rule.min_cost_saving is not None)))


def adjusted(iv: dict, k: int) -> dict:
    """The Bonferroni interval (1 - alpha/k) stored with `iv`; the nominal one (with level None) for
    evaluations written before intervals carried `adjusted`."""
    adj = (iv.get("adjusted") or {}).get(str(k))
    if adj:
        return adj
    return {"ci_low": iv.get("ci_low"), "ci_high": iv.get("ci_high"), "level": None}


@dataclass
class Claim:
    """One criterion of one candidate: the interval, the bound, the verdict and what settles it."""

    key: str  # success, latency, variability, backend | faster, better, cheaper
    name: str  # the criterion row's name
    role: str  # guardrail | primary | informational
    iv: dict  # the nominal interval (estimate, ci_low, ci_high)
    adj: dict  # the Bonferroni interval the union claim is judged on
    bound: float | None  # guardrail: the margin; primary: no difference (cost: the saving)
    lower_is_better: bool
    metric: str
    verdict: str = "unclear"
    futility_bound: float | None = None  # primary: the minimal worthwhile gain's bound
    log: bool = False  # ratios: effects on the log scale
    alpha_scale: float = 1.0  # intervals computed at alpha / alpha_scale (the CV's expansion)
    more: int | None = None  # schemas beyond the current ones that would settle it
    gain: bool = False
    futile: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def has_interval(self) -> bool:
        return self.iv.get("ci_low") is not None and self.iv.get("ci_high") is not None

    def row(self, candidate: str) -> dict:
        """The criterion row (decision.json `criteria`; the keys reports read, plus the adjusted interval)."""
        out = {
            "name": self.name, "role": self.role, "candidate": candidate,
            "estimate": S.num(self.iv.get("estimate")), "ci_low": S.num(self.iv.get("ci_low")),
            "ci_high": S.num(self.iv.get("ci_high")), "margin": S.num(self.bound), "verdict": self.verdict,
            "metric": self.metric,
        }
        if self.role != "informational":
            out.update(adjusted_ci_low=S.num(self.adj.get("ci_low")), adjusted_ci_high=S.num(self.adj.get("ci_high")),
                       adjusted_level=S.num(self.adj.get("level")), pairs_needed=self.more if self.verdict == "unclear" else 0)
        if self.futility_bound is not None:
            out["futility_bound"] = S.num(self.futility_bound)
        return {**out, **self.extra}


def _beyond(lo: Any, hi: Any, bound: float, lower_is_better: bool) -> bool:
    """The whole interval on the bad side of `bound`."""
    if lo is None or hi is None:
        return False
    return lo > bound if lower_is_better else hi < bound


def _within(lo: Any, hi: Any, bound: float, lower_is_better: bool, strict: bool = True) -> bool:
    """The whole interval on the good side of `bound`."""
    if lo is None or hi is None:
        return False
    if lower_is_better:
        return hi < bound or (not strict and hi <= bound)
    return lo > bound


def judge_guardrail(c: Claim, strict: bool = True) -> Claim:
    """met: nominal interval on the good side; not met: Bonferroni interval beyond the margin."""
    assert c.bound is not None
    if _within(c.iv.get("ci_low"), c.iv.get("ci_high"), c.bound, c.lower_is_better, strict):
        c.verdict = "met"
    elif _beyond(c.adj.get("ci_low"), c.adj.get("ci_high"), c.bound, c.lower_is_better):
        c.verdict = "not met"
    else:
        c.verdict = "unclear"
    return c


def judge_primary(c: Claim) -> Claim:
    """met (a gain): Bonferroni interval on the better side of the bound; not met (futile): nominal
    interval beyond the minimal worthwhile gain; else unclear."""
    assert c.bound is not None and c.futility_bound is not None
    c.gain = _within(c.adj.get("ci_low"), c.adj.get("ci_high"), c.bound, c.lower_is_better)
    c.futile = not c.gain and _beyond(c.iv.get("ci_low"), c.iv.get("ci_high"), c.futility_bound, c.lower_is_better)
    c.verdict = "met" if c.gain else ("not met" if c.futile else "unclear")
    return c


def _effect(est: float | None, bound: float, log: bool) -> float | None:
    if est is None:
        return None
    if log:
        return None if est <= 0 or bound <= 0 else math.log(est) - math.log(bound)
    return est - bound


def _more(effect: float | None, sd_unit: float | None, alpha: float, power: float, n: int) -> int | None:
    """Schemas beyond `n` at which an interval at level 1 - alpha clears a bound `effect` away, with
    the configured power, if the current estimate were the truth (normal approximation)."""
    if effect is None or sd_unit is None or effect == 0:
        return None
    total = S.n_needed(effect, sd_unit, alpha, power)
    return None if total is None else max(0, total - n)


def settle_guardrail(c: Claim, sd_unit: float | None, n: int, alpha: float, k: int, power: float) -> Claim:
    """For an unclear guardrail: the schemas at which it would be met (estimate on the good side:
    nominal level) or clearly not met (estimate beyond the margin: Bonferroni level)."""
    assert c.bound is not None
    eff = _effect(S.num(c.iv.get("estimate")), c.bound, c.log)
    if eff is None:
        c.more = None
        return c
    good = eff < 0 if c.lower_is_better else eff > 0
    level_alpha = (alpha if good else alpha / k) / c.alpha_scale
    c.more = _more(eff, sd_unit, level_alpha, power, n)
    return c


def settle_primary(c: Claim, sd_unit: float | None, n: int, alpha: float, k: int, power: float) -> tuple[int | None, int | None]:
    """(schemas to a gain, schemas to futility) for an unclear primary criterion, each None when the
    current estimate points the other way (more data would not get there if it were the truth)."""
    assert c.bound is not None and c.futility_bound is not None
    est = S.num(c.iv.get("estimate"))
    to_gain = to_futile = None
    eff_gain = _effect(est, c.bound, c.log)
    if eff_gain is not None and (eff_gain < 0 if c.lower_is_better else eff_gain > 0):
        to_gain = _more(eff_gain, sd_unit, alpha / k, power, n)
    eff_fut = _effect(est, c.futility_bound, c.log)
    if eff_fut is not None and (eff_fut > 0 if c.lower_is_better else eff_fut < 0):
        to_futile = _more(eff_fut, sd_unit, alpha, power, n)
    c.more = min((v for v in (to_gain, to_futile) if v is not None), default=None)
    return to_gain, to_futile


# -- the claims of one candidate --------------------------------------------------------------------
def guardrail_claims(comp: dict, backend_iv: dict | None, rule: DecisionRule, fam: Families) -> list[Claim]:
    """Success, latency and variability (and the backend share when it is a guardrail), unjudged."""
    succ, p50, cvr = comp["success"]["diff"], comp["latency"]["ratio_p50"], comp["cv_ratio"]
    claims = [
        Claim("success", "success_noninferiority", "guardrail", succ, adjusted(succ, fam.guard), -float(rule.success_margin),
              False, "success rate difference (candidate - control)"),
        Claim("latency", "latency_p50_noninferiority", "guardrail", p50, adjusted(p50, fam.guard), 1 + float(rule.latency_margin),
              True, "p50 latency ratio (candidate / control)", log=True),
        Claim("variability", "variability_cv_ratio", "guardrail", cvr, adjusted(cvr, fam.guard), float(rule.max_cv_ratio),
              True, "latency CV ratio (candidate / control)", log=True, alpha_scale=TAIL_EXPAND),
    ]
    if rule.backend_expectation == "guardrail" and backend_iv is not None:
        claims.append(Claim("backend", "backend_share", "guardrail", backend_iv, adjusted(backend_iv, fam.guard),
                            float(rule.backend_share_min), False, f"share of requests resolved to '{rule.expected_backend}'"))
    return claims


def primary_claims(comp: dict, rule: DecisionRule, fam: Families) -> list[Claim]:
    """Faster, more successful (and cheaper when a cost saving is pre-registered), unjudged."""
    succ, p50 = comp["success"]["diff"], comp["latency"]["ratio_p50"]
    p_holm = comp.get("p_holm", {})
    claims = [
        Claim("faster", "latency_p50_superiority", "primary", p50, adjusted(p50, fam.primary), 1.0, True,
              "p50 latency ratio (candidate / control) < 1", futility_bound=1 - float(rule.min_latency_gain), log=True,
              extra={"p_holm": S.num(p_holm.get("latency"))}),
        Claim("better", "success_superiority", "primary", succ, adjusted(succ, fam.primary), 0.0, False,
              "success rate difference > 0", futility_bound=float(rule.min_success_gain),
              extra={"p_holm": S.num(p_holm.get("success"))}),
    ]
    if rule.min_cost_saving is not None:
        cost = (comp.get("cost") or {}).get("ratio") or S.NO_INTERVAL.to_dict()
        bound = 1 - float(rule.min_cost_saving)
        claims.append(Claim("cheaper", "cost_saving", "primary", cost, adjusted(cost, fam.primary), bound, True,
                            f"cost per successful A/B request, candidate / control < {bound:.3f}",
                            futility_bound=bound, log=True))
    return claims


def informational_rows(ev: dict, comp: dict, cand: str, rule: DecisionRule) -> list[dict]:
    """Rows that never decide: the whole-run cost per 1k successes, the cost ratio when cost is not
    pre-registered, the TOST equivalence, and the latency explain metrics."""
    ck = ev["arms"].get(comp["control"], {}).get("cost", {}).get("per_1k_success")
    cc = ev["arms"].get(cand, {}).get("cost", {}).get("per_1k_success")
    tost = comp["latency"].get("tost", {})
    rows = [
        Claim("cost", "cost_per_1k_success", "informational", {"estimate": cc}, {}, ck, True,
              "USD per 1k successful requests over the whole run (margin = the control's)", verdict="info").row(cand),
    ]
    if rule.min_cost_saving is None:
        cost = (comp.get("cost") or {}).get("ratio") or S.NO_INTERVAL.to_dict()
        rows.append(Claim("cost", "cost_saving", "informational", cost, {}, None, True,
                          "cost per successful A/B request, candidate / control (not pre-registered)", verdict="info").row(cand))
    rows.append(Claim("tost", "latency_equivalence", "informational", tost.get("geometric_mean_ratio", {}), {}, tost.get("margin"),
                      True, "geometric-mean latency ratio, TOST on log latency", verdict="info",
                      extra={"pvalue": S.num(tost.get("pvalue")), "equivalent": tost.get("equivalent")}).row(cand))
    ex = comp.get("explain") or {}
    for key, metric in (("ttft_p50_ratio", "time to first token p50 ratio"), ("tpot_p50_ratio", "time per output token p50 ratio"),
                        ("tokens_mean_ratio", "output tokens per answer, mean ratio")):
        if key in ex:
            rows.append(Claim(key, f"explain_{key}", "informational", ex[key], {}, 1.0, True, metric, verdict="info").row(cand))
    if "truncation" in ex:
        rows.append(Claim("truncation", "explain_truncation_diff", "informational", ex["truncation"]["diff"], {}, 0.0, True,
                          "share of answers cut at max_tokens, candidate - control", verdict="info").row(cand))
    return rows
