"""Each candidate against the control: the paired comparisons the decision rule reads.

Why its own module: the per-arm metrics (evaluation.py) describe one arm; a comparison is about
two arms on the same schemas, and every choice that makes it trustworthy lives here once:
- the *schema* is the unit: with repeats, the success difference is Newcombe's paired interval
  on the table scaled by the design effect (stats.newcombe_clustered), and every ratio is a
  cluster-bootstrap interval (the engine draws schemas); without repeats both are the pair-level
  intervals they always were. Counts that feed "how many more" (`n_schemas`, the per-unit sds)
  are in schemas;
- each interval the decision judges a claim on carries `adjusted`: its Bonferroni intervals at
  the family sizes the rule may need (bootstrap.interval_family), so the rule never judges on a
  number the report does not show;
- latency includes timeouts and connection errors, censored at the timeout (pairs.py);
- `explain` splits a latency difference into computing slower (TTFT, time per output token) and
  writing more (output tokens, answers cut at max_tokens);
- cost per successful request counts A/B pairs only (warm-ups and observe excluded: only the
  candidate gets observe requests) at the arms' prices per hour, the arms being held for the
  same A/B time; its interval is the success difference's, mapped;
- McNemar (mid-p) and Wilcoxon stay, Holm-adjusted, as *informational* tests: the decision uses
  the intervals alone, so a test and an interval can never disagree on a verdict.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from guided_ab.analysis import bootstrap as BS
from guided_ab.analysis import stats as S
from guided_ab.analysis.pairs import ArmPairs

EXPLAIN_METRICS = ("ttft", "tpot", "tokens")


@dataclass(frozen=True)
class PairedContext:
    """What every comparison of one evaluation shares: the level, the family sizes of the Bonferroni
    intervals, the schema clusters of the pair units, and the engine's one bootstrap pass."""

    control: str
    alpha: float
    power: float
    family_sizes: tuple[int, ...]
    clusters: np.ndarray | None  # unit -> schema label; None when every schema is in one pair
    sums: np.ndarray
    qdraws: list[np.ndarray]
    equivalence_margin: float

    def units(self, mask: np.ndarray) -> int:
        """Independent units (schemas; pairs without repeats) among the pair units in `mask`."""
        if self.clusters is None:
            return int(mask.sum())
        return int(np.unique(self.clusters[mask]).size)

    def cl(self, mask: np.ndarray) -> np.ndarray | None:
        return None if self.clusters is None else self.clusters[mask]


@dataclass(frozen=True)
class Price:
    """The arms' prices (USD per hour held) for the cost comparison, and where they came from."""

    control: float | None
    candidate: float | None
    basis: str


def register_candidate(eng: BS.CountBootstrap, dk: ArmPairs, dc: ArmPairs) -> dict[str, dict]:
    """The paired statistics of one candidate on the engine: latency (mean, p50, p95, cv ratios) and
    the explain metrics (TTFT and time-per-output-token p50 ratios, output tokens mean ratio)."""
    out = {}
    # only what is read: latency all four ratios; TTFT and TPOT the p50 ratio; tokens the mean ratio
    shapes = {"latency": ((0.5, 0.95), True), "ttft": ((0.5,), False), "tpot": ((0.5,), False), "tokens": ((), True)}
    for m in ("latency", *EXPLAIN_METRICS):
        a, b = getattr(dk, m), getattr(dc, m)
        qs, moments = shapes[m]
        out[m] = BS.register_paired(eng, a, b, np.isfinite(a) & np.isfinite(b), qs=qs, moments=moments)
    return out


def compare(ctx: PairedContext, cand: str, dk: ArmPairs, dc: ArmPairs, regs: dict[str, dict], price: Price) -> dict:
    """One candidate against the control: success over pairs both arms recorded, latency over pairs
    both answered (or timed out), CV and cost ratios, the explain metrics, minimum detectable
    effects (at the current schemas), pairs sent with different settings."""
    n_pairs, success, mde_success = success_comparison(ctx, dk, dc)
    latency, cv_ratio, mde_latency = latency_comparison(ctx, dk, dc, regs["latency"])
    return {
        "control": ctx.control, "candidate": cand, "n_pairs": n_pairs,
        "n_schemas": success["n_schemas"],
        "success": success,
        "latency": latency,
        "cv_ratio": cv_ratio,
        "explain": explain_section(ctx, dk, dc, regs),
        "cost": cost_comparison(ctx, success, price),
        "mde": {"success_diff": mde_success, "latency_p50_ratio": mde_latency, "unit": "schemas"},
        "stream_mismatched_pairs": int(np.sum(dc.present & dk.present & (dc.stream != dk.stream))),
    }


def _adjusted_newcombe(ctx: PairedContext, sc: np.ndarray, sk: np.ndarray, cl: np.ndarray | None) -> dict:
    out = {}
    for k in ctx.family_sizes:
        iv, _ = S.newcombe_clustered(sc, sk, cl, ctx.alpha / k)
        out[str(k)] = {"ci_low": iv.ci_low, "ci_high": iv.ci_high, "level": 1 - ctx.alpha / k}
    return out


def success_comparison(ctx: PairedContext, dk: ArmPairs, dc: ArmPairs) -> tuple[int, dict, float | None]:
    """(pairs, the success section, the minimum detectable difference): the paired 2x2 table, the
    (design-effect) Newcombe interval of the difference with its Bonferroni intervals, McNemar's
    mid-p test (informational; pairs taken as independent) and the per-schema sd."""
    both = dc.present & dk.present
    n_pairs = int(both.sum())
    n_schemas = ctx.units(both)
    sc, sk, cl = dc.success[both], dk.success[both], ctx.cl(both)
    a, b, c, dd = (int(np.sum(sc & sk)), int(np.sum(sc & ~sk)), int(np.sum(~sc & sk)), int(np.sum(~sc & ~sk)))
    diff, deff = S.newcombe_clustered(sc, sk, cl, ctx.alpha)
    method = "newcombe-paired (method 10)" + ("" if cl is None else ", table scaled by the design effect of schemas")
    mcn = S.mcnemar_midp(b, c) if n_pairs else S.TestResult(None, None, "mcnemar-mid-p")
    sd_pair = S.paired_proportion_sd(a, b, c, dd) if n_pairs else None
    # per schema: var(mean) = sd_pair^2 deff / pairs = sd_schema^2 / schemas
    sd_schema = sd_pair * float(np.sqrt(deff * n_schemas / n_pairs)) if sd_pair is not None and n_pairs else None
    sd_ci = S.sd_unit_from_interval(diff.ci_low, diff.ci_high, n_schemas, ctx.alpha)
    section = {
        "table": {"both": a, "candidate_only": b, "control_only": c, "neither": dd},
        "n_schemas": n_schemas, "design_effect": S.num(deff),
        "control_rate": S.num(sk.mean()) if n_pairs else None,
        "candidate_rate": S.num(sc.mean()) if n_pairs else None,
        "diff": {**diff.to_dict(), "method": method, "adjusted": _adjusted_newcombe(ctx, sc, sk, cl) if n_pairs else {}},
        "mcnemar": {**mcn.to_dict(), "informational": True},
        "sd_unit": S.num(sd_ci if sd_ci else sd_schema), "sd_unit_basis": "schema",
    }
    mde = S.num(S.mde_paired_proportion(n_schemas, sd_schema, ctx.alpha, ctx.power)) if sd_schema else None
    return n_pairs, section, mde


def _cluster_means(x: np.ndarray, cl: np.ndarray | None) -> np.ndarray:
    if cl is None:
        return x
    codes = np.unique(cl, return_inverse=True)[1]
    return np.bincount(codes, weights=x) / np.bincount(codes)


def latency_comparison(ctx: PairedContext, dk: ArmPairs, dc: ArmPairs, reg: dict) -> tuple[dict, dict, float | None]:
    """(the latency section, the CV-ratio section, the minimum detectable p50 ratio change): cluster
    bootstrap ratios (Bonferroni intervals on the p50 and CV ratios, which the rule judges), and
    Wilcoxon and TOST on log latency (per-schema means with repeats) over pairs where both arms
    answered or timed out."""
    alpha, valid = ctx.alpha, reg["valid"]
    n_lat = int(valid.sum())
    n_units = ctx.units(valid)
    est, draws = BS.paired_draws(reg, ctx.sums, ctx.qdraws, dk.latency, dc.latency)
    ks = ctx.family_sizes

    def fam(name: str, sizes: tuple[int, ...] = (), expand: float = 1.0) -> dict:
        if name not in draws:
            return S.NO_INTERVAL.to_dict()
        return BS.interval_family(est[name], draws[name], alpha, n_units, sizes, expand)

    ratios = {"mean": fam("mean", (), BS.TAIL_EXPAND), "p50": fam("p50", ks), "p95": fam("p95"),
              "cv": fam("cv", ks, BS.TAIL_EXPAND)}
    cl = ctx.cl(valid)
    a, b = dk.latency[valid], dc.latency[valid]
    wil = S.wilcoxon_signed_rank(a, b, clusters=cl)
    la, lb = np.log(np.maximum(a, 1e-12)), np.log(np.maximum(b, 1e-12))
    tost = S.tost_log_ratio(np.exp(_cluster_means(la, cl)), np.exp(_cluster_means(lb, cl)), ctx.equivalence_margin, alpha)
    sd_lat = S.sd_unit_from_interval(ratios["p50"]["ci_low"], ratios["p50"]["ci_high"], n_units, alpha, log=True)
    sd_cv = S.sd_unit_from_interval(ratios["cv"]["ci_low"], ratios["cv"]["ci_high"], n_units, alpha / BS.TAIL_EXPAND, log=True)
    latency = {
        "n_pairs": n_lat, "n_schemas": n_units,
        "n_censored": {"control": int(np.sum(dk.censored & valid)), "candidate": int(np.sum(dc.censored & valid))},
        "ratio_mean": ratios["mean"], "ratio_p50": ratios["p50"], "ratio_p95": ratios["p95"],
        "wilcoxon": {**wil.to_dict(), "informational": True}, "tost": tost.to_dict(),
        "sd_log_unit": S.num(sd_lat), "sd_unit_basis": "schema",
    }
    cv_ratio = {**ratios["cv"], "sd_log_unit": S.num(sd_cv),
                "method": f"percentile cluster bootstrap, computed at level 1 - alpha/{BS.TAIL_EXPAND:g} (expanded)"}
    return latency, cv_ratio, S.num(S.mde_ratio(n_units, sd_lat, alpha, ctx.power))


def explain_section(ctx: PairedContext, dk: ArmPairs, dc: ArmPairs, regs: dict[str, dict]) -> dict:
    """Why a latency differs: TTFT and time-per-output-token p50 ratios (computing slower), output
    tokens mean ratio and the share of answers cut at max_tokens (writing more), each with its
    (cluster) interval, over pairs where both arms answered; plus the censored counts."""
    out: dict = {}
    for m, key, stat in (("ttft", "ttft_p50_ratio", "p50"), ("tpot", "tpot_p50_ratio", "p50"),
                         ("tokens", "tokens_mean_ratio", "mean")):
        reg = regs[m]
        est, draws = BS.paired_draws(reg, ctx.sums, ctx.qdraws, getattr(dk, m), getattr(dc, m))
        expand = BS.TAIL_EXPAND if stat == "mean" else 1.0
        out[key] = (BS.interval_family(est[stat], draws[stat], ctx.alpha, ctx.units(reg["valid"]), (), expand)
                    if stat in draws else S.NO_INTERVAL.to_dict())
        out[key]["n_pairs"] = int(reg["valid"].sum())
    both = dc.present & dk.present
    tk, tc = dk.truncated[both], dc.truncated[both]
    diff, _ = S.newcombe_clustered(tc, tk, ctx.cl(both), ctx.alpha)
    out["truncation"] = {
        "control_share": S.num(tk.mean()) if tk.size else None, "candidate_share": S.num(tc.mean()) if tc.size else None,
        "control_count": int(tk.sum()), "candidate_count": int(tc.sum()), "diff": diff.to_dict(),
    }
    out["censored"] = {"control": int(dk.censored.sum()), "candidate": int(dc.censored.sum())}
    return out


def cost_comparison(ctx: PairedContext, success: dict, price: Price) -> dict:
    """The candidate/control cost per successful request: (USD/h candidate / USD/h control) x (A/B
    successes control / A/B successes candidate) over the pairs both arms recorded, both arms being
    held for the same A/B time; with its interval and Bonferroni intervals (the rule judges a
    pre-registered saving on them). No interval without both prices.

    The interval is the success difference's (design-effect Newcombe) mapped through
    p_control / p_candidate = 1 - difference / p_candidate, p_candidate taken as known: its own
    uncertainty enters only multiplied by the difference (second order). Chosen over a cluster
    bootstrap of the count ratio, which covered 0.88 at 30 pairs in our simulation: it inherits
    Newcombe's behaviour near success rates of 1.
    """
    t = success["table"]
    succ_k, succ_c = t["both"] + t["control_only"], t["both"] + t["candidate_only"]
    n = succ_k + t["candidate_only"] + t["neither"]
    out: dict = {"price_per_hour": {"control": price.control, "candidate": price.candidate}, "price_basis": price.basis,
                 "ab_successes": {"control": succ_k, "candidate": succ_c},
                 "basis": "A/B pairs both arms recorded (warm-ups and observe excluded); arms held for the same A/B time",
                 "method": "price ratio x (1 - success difference / candidate success rate), Newcombe interval of the difference"}
    if not price.control or not price.candidate or price.control <= 0 or price.candidate <= 0 or not succ_c or not n:
        return {**out, "price_ratio": S.num(S.ratio(price.candidate, price.control)), "ratio": S.NO_INTERVAL.to_dict()}
    r = price.candidate / price.control
    p_c = succ_c / n

    def mapped(d: dict) -> tuple[float | None, float | None]:
        lo, hi = d.get("ci_low"), d.get("ci_high")
        if lo is None or hi is None:
            return None, None
        return r * (1 - hi / p_c), r * (1 - lo / p_c)

    diff = success["diff"]
    lo, hi = mapped(diff)
    adjusted: dict[str, dict] = {}
    for k, adj in (diff.get("adjusted") or {}).items():
        alo, ahi = mapped(adj)
        adjusted[k] = {"ci_low": S.num(alo), "ci_high": S.num(ahi), "level": adj.get("level")}
    ratio = {"estimate": S.num(r * succ_k / succ_c), "ci_low": S.num(lo), "ci_high": S.num(hi), "adjusted": adjusted}
    return {**out, "price_ratio": S.num(r), "ratio": ratio}


def holm_family(comparisons: dict[str, dict], alpha: float) -> list[dict]:
    """Holm over {success (McNemar mid-p), latency (Wilcoxon)} x candidates, informational: sets each
    comparison's `p_holm` and returns the family with its adjusted p-values. The decision does not
    read them (it judges intervals), so they can never contradict it."""
    family: list[dict] = []
    for cand, comp in comparisons.items():
        mcn, wil = comp["success"]["mcnemar"], comp["latency"]["wilcoxon"]
        family += [
            {"candidate": cand, "metric": "success", "test": mcn["method"], "pvalue": mcn["pvalue"]},
            {"candidate": cand, "metric": "latency", "test": "wilcoxon (log latency)", "pvalue": wil["pvalue"]},
        ]
    adjusted = S.holm([f["pvalue"] for f in family], alpha)
    for f, p in zip(family, adjusted):
        f["p_holm"] = p
        comparisons[f["candidate"]].setdefault("p_holm", {})[f["metric"]] = p
    return family
