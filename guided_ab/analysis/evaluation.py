"""Evaluate an experiment from its request records: per-arm metrics, paired comparisons of each
candidate with the control, and the validity gates. Prefect-free; the result is plain JSON.

Conventions (documented here once, and repeated in `settings` of the result):
- Statistics use the A/B phase without warm-up rows; warm-ups are counted separately.
- Success = outcome "success". Latency (end-to-end, TTFT, time per output token) is measured
  over requests that got an answer: a generated completion came back (outcome success,
  truncated, invalid_json or schema_violation) and the timing is recorded. Conditioning on
  success alone would make an arm that fails its slow requests look fast; timeouts and
  connection errors have no answer (their elapsed time is censored, not a latency).
- The unit of resampling is the pair (`pair_index`): every percentile-bootstrap interval of
  the A/B phase (per arm and paired) resamples pairs, so paired ratios keep their correlation.
  Per-arm quantile intervals use the equivalent order-statistic bootstrap of that arm's values.
- Paired comparisons use pairs where both arms have a record (success) or both have an answer
  (latency).
- Cost per 1k successful requests: the arm's USD (`costs`, the time it was held) over all its
  successful requests in the run, since the bill covers every phase.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from guided_ab.analysis import bootstrap as BS
from guided_ab.analysis import stats as S
from guided_ab.analysis.gates import GateInput, validity_gates
from guided_ab.analysis.pairs import ANSWERED_OUTCOMES, ArmPairs, Columns, dedupe_pairs
from guided_ab.config import DecisionRule, ExperimentConfig
from guided_ab.records import OUTCOMES, TRANSIENT_OUTCOMES

# the public names: reports read ANSWERED_OUTCOMES (defined with the pair alignment) from here
__all__ = ["ANSWERED_OUTCOMES", "LATENCY_BASIS", "evaluate"]

LATENCY_BASIS = (
    "requests that got an answer: outcome in success/truncated/invalid_json/schema_violation "
    "with the timing recorded (warm-ups excluded)"
)
Counts = dict[str, dict[str, dict[str, int]]]  # {phase: {arm: {"recorded", "warmup", "measured"}}}


def _equivalence_margin(rule: DecisionRule) -> float:
    return float(rule.equivalence_margin or rule.latency_margin)


@dataclass(frozen=True)
class _Setup:
    """The fixed inputs of one evaluation: the config, the rule's level and resamples, the generator."""

    cfg: ExperimentConfig
    alpha: float
    resamples: int
    rng: np.random.Generator

    @property
    def rule(self) -> DecisionRule:
        return self.cfg.decision

    @property
    def control(self) -> str:
        return self.cfg.control.name

    @property
    def candidates(self) -> list[str]:
        return [a.name for a in self.cfg.candidates]

    @property
    def arms(self) -> list[str]:
        return [self.control, *self.candidates]


# -- evaluate --------------------------------------------------------------------------------------
def evaluate(
    records: pd.DataFrame,
    cfg: ExperimentConfig,
    *,
    planned: dict[str, dict[str, int]] | None = None,
    costs: dict[str, float] | None = None,
    seed: int = 0,
    endpoints: dict[str, dict] | None = None,
) -> dict:
    """Everything the decision needs, as JSON-ready plain values (None where undefined).

    The steps, in order (the generator is consumed in this order: the bootstrap pass, then each
    arm's quantile draws, so one seed gives the same numbers every time):
    1. prepare rows: `Columns.from_records` (pairs.py);
    2. accounting: `_phase_counts`;
    3. de-duplicate pairs and align the arms on them: `dedupe_pairs` (pairs.py);
    4. register the bootstrap statistics and run the one pass: `_run_bootstrap`;
    5. per-arm metrics: `_per_arm_metrics`;
    6. observe section: `_observe_section`, `_candidate_schema_backends`;
    7. paired comparisons: `_comparison`;
    8. multiplicity (Holm): `_multiplicity`;
    9. validity gates: `gates.validity_gates`.
    """
    rule = cfg.decision
    s = _Setup(cfg, float(rule.alpha), int(rule.bootstrap_resamples), np.random.default_rng(seed))
    df = Columns.from_records(records)
    counts = _phase_counts(df)
    data, dup_pairs = dedupe_pairs(df, s.arms)
    draws = _run_bootstrap(s, data)
    arms_out = _per_arm_metrics(s, df, data, draws, counts, costs or {})
    observe = _observe_section(s, df, counts)
    schema_backends = _candidate_schema_backends(s, df)
    comparisons = {cand: _comparison(s, cand, data, draws, arms_out) for cand in s.candidates}
    family = _multiplicity(comparisons, s.alpha)
    gates = validity_gates(GateInput(
        arms=s.arms, counts=counts, request_ids=df["request_id"], record_arms=df["arm"],
        ab_outcomes={arm: data[arm].rows["outcome"] for arm in s.arms}, duplicated_pairs=dup_pairs,
        comparisons=comparisons, max_error_share=rule.max_error_share, planned=planned, endpoints=endpoints,
    ))
    result = {
        "experiment": cfg.name,
        "control": s.control,
        "candidates": s.candidates,
        "settings": _settings(s, seed),
        "counts": counts,
        "arms": arms_out,
        "observe": observe,
        "schema_backends": schema_backends,
        "comparisons": comparisons,
        "multiplicity": {"method": "holm", "family": family},
        "gates": gates,
        "valid": all(g["passed"] for g in gates),
    }
    return S.jsonable(result)


def _settings(s: _Setup, seed: int) -> dict:
    """The conventions the numbers were computed under (the module docstring, in the result)."""
    return {
        "alpha": s.alpha, "confidence": 1 - s.alpha, "bootstrap_resamples": s.resamples, "seed": seed,
        "bootstrap": "percentile; pairs resampled in the A/B phase",
        "latency_basis": LATENCY_BASIS, "equivalence_margin": _equivalence_margin(s.rule), "p99_min_n": S.P99_MIN_N,
        "min_bootstrap_n": BS.MIN_BOOTSTRAP_N,
        "cost_basis": "USD per arm (from the run's deploy/teardown) over the arm's successful requests "
                      "in the whole run (all phases, warm-ups included)",
        "power": float(s.rule.power),
        "multiplicity": "Holm over {success (McNemar), latency (Wilcoxon)} x candidates",
    }


# -- step 2: accounting ----------------------------------------------------------------------------
def _phase_counts(df: Columns) -> Counts:
    """Records per phase and arm, warm-ups counted separately (the request-accounting gate compares
    `recorded` with the plan)."""
    counts: Counts = {}
    for (phase, arm), k in sorted(Counter(zip(df["phase"].tolist(), df["arm"].tolist())).items()):
        w = int(np.sum(df["warmup"][(df["phase"] == phase) & (df["arm"] == arm)]))
        counts.setdefault(str(phase), {})[str(arm)] = {"recorded": int(k), "warmup": w, "measured": int(k - w)}
    return counts


# -- step 4: register bootstrap statistics ---------------------------------------------------------
@dataclass(frozen=True)
class _Draws:
    """The one bootstrap pass over pairs: each statistic's registration, and the pass's output."""

    per_arm: dict[str, dict[str, dict]]  # {arm: {"latency"/"ttft"/"tpot"/"first"/"repeated": registration}}
    paired: dict[str, dict]  # {candidate: `register_paired`'s registration}
    sums: np.ndarray  # B x registered columns
    qdraws: list[np.ndarray]  # per registered quantile set: B x quantiles


def _run_bootstrap(s: _Setup, data: dict[str, ArmPairs]) -> _Draws:
    """Register every linear statistic (per-arm means and sds, first/repeated means) and every paired
    latency ratio on one `CountBootstrap` over the pair units, and run it once, so paired ratios keep
    their correlation and the cost is one pass."""
    eng = BS.CountBootstrap(data[s.control].present.size, s.resamples, s.rng)
    regs: dict[str, dict[str, dict]] = {}
    for arm in s.arms:
        d = data[arm]
        regs[arm] = {m: _register_metric(eng, getattr(d, m)) for m in ("latency", "ttft", "tpot")}
        regs[arm]["first"] = _register_subset_mean(eng, d.latency, d.first)
        regs[arm]["repeated"] = _register_subset_mean(eng, d.latency, ~d.first)
    paired = {}
    for cand in s.candidates:
        a, b = data[s.control].latency, data[cand].latency
        paired[cand] = BS.register_paired(eng, a, b, np.isfinite(a) & np.isfinite(b))
    sums, qdraws = eng.run()
    return _Draws(regs, paired, sums, qdraws)


def _register_metric(eng: BS.CountBootstrap, values: np.ndarray) -> dict:
    """Columns for the mean and sd of one metric (centred, for numerical stability)."""
    valid = np.isfinite(values)
    center = float(values[valid].mean()) if valid.any() else 0.0
    c = np.where(valid, values - center, 0.0)
    return {"valid": valid, "center": center, "cnt": eng.column(valid.astype(float)),
            "s1": eng.column(c), "s2": eng.column(c * c)}


def _register_subset_mean(eng: BS.CountBootstrap, values: np.ndarray, mask: np.ndarray) -> dict:
    """Columns for the mean of a metric over a subset of the units."""
    valid = mask & np.isfinite(values)
    center = float(values[valid].mean()) if valid.any() else 0.0
    return {"valid": valid, "center": center, "cnt": eng.column(valid.astype(float)),
            "s1": eng.column(np.where(valid, values - center, 0.0))}


# -- step 5: per-arm metrics -----------------------------------------------------------------------
def _per_arm_metrics(s: _Setup, df: Columns, data: dict[str, ArmPairs], draws: _Draws, counts: Counts,
                     costs: dict[str, float]) -> dict[str, dict]:
    """{arm: metrics}, arms in the config's order (the order the generator is consumed in)."""
    all_success = Counter(df["arm"][df["outcome"] == "success"].tolist())
    out = {}
    for arm in s.arms:
        n_warmup = int(counts.get("ab", {}).get(arm, {}).get("warmup", 0))
        cost = _cost(S.num(costs.get(arm)), int(all_success.get(arm, 0)))
        out[arm] = _arm_metrics(s, arm, data[arm], draws, n_warmup, cost)
    return out


def _arm_metrics(s: _Setup, arm: str, d: ArmPairs, draws: _Draws, n_warmup: int, cost: dict) -> dict:
    """One arm's A/B metrics: outcomes, success rate (Wilson), latency/TTFT/TPOT with intervals,
    first vs repeated schema latency, backend share, cost. Quantile draws consume the generator in
    the order first, repeated, latency, ttft, tpot."""
    rows, regs, sums, rng, B, alpha = d.rows, draws.per_arm[arm], draws.sums, s.rng, s.resamples, s.alpha
    n = len(rows)
    succ = int(np.sum(rows["outcome"] == "success"))
    transient = int(np.sum(np.isin(rows["outcome"], list(TRANSIENT_OUTCOMES))))
    first = _subset_summary(regs["first"], d.latency, sums, rng, B, alpha)
    rep = _subset_summary(regs["repeated"], d.latency, sums, rng, B, alpha)
    out: dict[str, Any] = {
        "role": "control" if arm == s.control else "candidate",
        "configured_backend": s.cfg.arm(arm).backend,
        "n": n,
        "n_warmup": n_warmup,
        "success": {"count": succ, "rate": S.wilson(succ, n, alpha).to_dict()},
        "outcomes": _outcome_counts(rows["outcome"]),
        "transient_error_share": S.num(transient / n) if n else None,
        "latency": _metric_summary(regs["latency"], d.latency, sums, rng, B, alpha),
        "ttft": _metric_summary(regs["ttft"], d.ttft, sums, rng, B, alpha),
        "tpot": _metric_summary(regs["tpot"], d.tpot, sums, rng, B, alpha),
        "first_vs_repeated": {
            "first": first, "repeated": rep,
            "p50_ratio_first_over_repeated": S.num(S.ratio(first["p50"]["estimate"], rep["p50"]["estimate"])),
        },
        "backend": _backend_share(rows["backend"], s.rule.expected_backend, alpha),
        "cost": cost,
    }
    out["cv"] = out["latency"]["cv"]
    return out


def _cost(usd: float | None, successes: int) -> dict:
    """The arm's USD over its successful requests in the whole run (the bill covers every phase)."""
    return {"usd": usd, "successful_requests": successes,
            "per_1k_success": S.num(usd / successes * 1000) if usd is not None and successes else None}


def _metric_summary(reg: dict, values: np.ndarray, sums: np.ndarray, rng: np.random.Generator, B: int,
                    alpha: float) -> dict:
    """Mean, p50/p95/p99 and CV of one metric, each with its percentile-bootstrap interval."""
    x = np.sort(values[reg["valid"]])
    n = int(x.size)
    out: dict[str, Any] = {"n": n}
    if n == 0:
        for k in ("mean", *S.QUANTILES, "cv"):
            out[k] = S.NO_INTERVAL.to_dict()
        return out
    means, sds = BS.moments(sums, reg["cnt"], reg["s1"], reg["s2"], reg["center"])
    out["mean"] = BS.percentile_interval(float(x.mean()), means, alpha, n).to_dict()
    for name, q in S.QUANTILES.items():
        iv = BS.percentile_interval(BS.sorted_quantile(x, q), BS.bootstrap_quantile_draws(x, q, B, rng), alpha, n)
        out[name] = {**iv.to_dict(), "descriptive": bool(q >= 0.99 and n < S.P99_MIN_N)}
    with np.errstate(invalid="ignore", divide="ignore"):
        out["cv"] = BS.percentile_interval(S.cv(x), sds / means, alpha, n).to_dict()
    return out


def _subset_summary(reg: dict, values: np.ndarray, sums: np.ndarray, rng: np.random.Generator, B: int,
                    alpha: float) -> dict:
    """Mean and p50 of a metric over a subset of the units, with intervals."""
    x = np.sort(values[reg["valid"]])
    if x.size == 0:
        return {"n": 0, "mean": S.NO_INTERVAL.to_dict(), "p50": S.NO_INTERVAL.to_dict()}
    with np.errstate(invalid="ignore", divide="ignore"):
        means = reg["center"] + sums[:, reg["s1"]] / sums[:, reg["cnt"]]
    return {
        "n": int(x.size),
        "mean": BS.percentile_interval(float(x.mean()), means, alpha, int(x.size)).to_dict(),
        "p50": BS.percentile_interval(BS.sorted_quantile(x, 0.5), BS.bootstrap_quantile_draws(x, 0.5, B, rng),
                                      alpha, int(x.size)).to_dict(),
    }


def _counts(values: np.ndarray) -> dict[str, int]:
    return {str(k): int(v) for k, v in sorted(Counter(values.tolist()).items(), key=lambda kv: str(kv[0]))}


def _outcome_counts(outcomes: np.ndarray) -> dict[str, int]:
    """Counts of every known outcome (in OUTCOMES order, zeros included), plus "other" if any."""
    c = Counter(outcomes.tolist())
    out = {o: int(c.pop(o, 0)) for o in OUTCOMES}
    other = sum(c.values())
    if other:
        out["other"] = int(other)
    return out


def _backend_counts(backends: np.ndarray) -> dict[str, int]:
    return _counts(np.array(["unknown" if b is None else str(b) for b in backends.tolist()], dtype=object))


def _backend_share(backends: np.ndarray, expected: str, alpha: float) -> dict:
    """Backend counts and the share (Wilson) of the expected backend among requests that reported one."""
    counts = _backend_counts(backends)
    known = {k: v for k, v in counts.items() if k != "unknown"}
    n_known = sum(known.values())
    iv = S.wilson(known.get(expected, 0), n_known, alpha)
    return {"counts": counts, "expected": expected, "n_known": n_known, "unknown": counts.get("unknown", 0),
            "share": iv.to_dict()}


# -- step 6: observe section -----------------------------------------------------------------------
def _observe_section(s: _Setup, df: Columns, counts: Counts) -> dict:
    """The observe phase per arm (outcomes, backend counts and share), and for each candidate the
    backend each schema resolved to most often and the schemas resolved to more than one."""
    obs_mask = (df["phase"] == "observe") & ~df["warmup"]
    observe: dict[str, Any] = {"arms": {}, "schema_backends": {}, "mixed_schemas": {}}
    for arm in sorted(set(df["arm"][obs_mask].tolist())):
        g = df.take(obs_mask & (df["arm"] == arm))
        observe["arms"][str(arm)] = {
            "n": len(g), "n_warmup": int(counts.get("observe", {}).get(str(arm), {}).get("warmup", 0)),
            "outcomes": _outcome_counts(g["outcome"]), "backend_counts": _backend_counts(g["backend"]),
            "backend_share": _backend_share(g["backend"], s.rule.expected_backend, s.alpha)["share"],
        }
        if arm in s.candidates:
            per = _backends_per_schema(g)
            observe["schema_backends"][str(arm)] = {k: c.most_common(1)[0][0] for k, c in per.items()}
            observe["mixed_schemas"][str(arm)] = [k for k, c in per.items() if len(c) > 1]
    return observe


def _candidate_schema_backends(s: _Setup, df: Columns) -> dict[str, dict]:
    """What each candidate resolved for every schema it was sent (observe and A/B, warm-ups excluded)."""
    sent = np.isin(df["phase"], ["observe", "ab"]) & ~df["warmup"]
    return {arm: _schema_backends(df.take(sent & (df["arm"] == arm))) for arm in s.candidates}


def _backends_per_schema(g: Columns) -> dict[str, Counter]:
    """{schema: Counter of the backends the server reported for it}, schemas sorted."""
    per: dict[str, Counter] = {}
    for sid, be in zip(g["schema_id"].tolist(), g["backend"].tolist()):
        if be is not None:
            per.setdefault(str(sid), Counter())[str(be)] += 1
    return dict(sorted(per.items()))


def _schema_backends(g: Columns) -> dict[str, Any]:
    """{backend: [schemas it was resolved for]} and the schemas resolved to more than one backend."""
    per = _backends_per_schema(g)
    by_backend: dict[str, list[str]] = {}
    for sid, counts in per.items():
        for be in counts:
            by_backend.setdefault(be, []).append(sid)
    return {"by_backend": dict(sorted(by_backend.items())), "schemas": len(per),
            "mixed": [k for k, c in per.items() if len(c) > 1]}


# -- step 7: paired comparisons --------------------------------------------------------------------
def _comparison(s: _Setup, cand: str, data: dict[str, ArmPairs], draws: _Draws, arms_out: dict[str, dict]) -> dict:
    """One candidate against the control: success over pairs both arms recorded, latency over pairs
    both answered, CV and cost ratios, minimum detectable effects, pairs sent with different settings."""
    dk, dc = data[s.control], data[cand]
    n_pairs, success, mde_success = _success_comparison(dk, dc, s.alpha, s.rule.power)
    latency, cv_ratio, mde_latency = _latency_comparison(s, dk, dc, draws, draws.paired[cand])
    cost_k, cost_c = arms_out[s.control]["cost"]["per_1k_success"], arms_out[cand]["cost"]["per_1k_success"]
    return {
        "control": s.control, "candidate": cand, "n_pairs": n_pairs,
        "success": success,
        "latency": latency,
        "cv_ratio": cv_ratio,
        "cost_ratio_per_1k_success": S.num(S.ratio(cost_c, cost_k)),
        "mde": {"success_diff": mde_success, "latency_p50_ratio": mde_latency},
        "stream_mismatched_pairs": int(np.sum(dc.present & dk.present & (dc.stream != dk.stream))),
    }


def _success_comparison(dk: ArmPairs, dc: ArmPairs, alpha: float, power: float) -> tuple[int, dict, float | None]:
    """(pairs, the success section, the minimum detectable difference): the paired 2x2 table,
    Newcombe's interval of the difference, McNemar's test and the per-pair sd."""
    both_present = dc.present & dk.present
    n_pairs = int(both_present.sum())
    sc, sk = dc.success[both_present], dk.success[both_present]
    a, b, c, dd = (int(np.sum(sc & sk)), int(np.sum(sc & ~sk)), int(np.sum(~sc & sk)), int(np.sum(~sc & ~sk)))
    diff = S.newcombe_diff_paired(a, b, c, dd, alpha)
    mcn = S.mcnemar_test(a, b, c, dd) if n_pairs else S.TestResult(None, None, "mcnemar")
    sd_success = S.paired_proportion_sd(a, b, c, dd) if n_pairs else None
    sd_success_ci = S.sd_unit_from_interval(diff.ci_low, diff.ci_high, n_pairs, alpha)
    section = {
        "table": {"both": a, "candidate_only": b, "control_only": c, "neither": dd},
        "control_rate": S.num(sk.mean()) if n_pairs else None,
        "candidate_rate": S.num(sc.mean()) if n_pairs else None,
        "diff": {**diff.to_dict(), "method": "newcombe-paired (method 10)"},
        "mcnemar": mcn.to_dict(),
        "sd_unit": S.num(sd_success_ci if sd_success_ci else sd_success),
    }
    mde = S.num(S.mde_paired_proportion(n_pairs, sd_success, alpha, power)) if sd_success else None
    return n_pairs, section, mde


def _latency_comparison(s: _Setup, dk: ArmPairs, dc: ArmPairs, draws: _Draws,
                        reg: dict) -> tuple[dict, dict, float | None]:
    """(the latency section, the CV-ratio section, the minimum detectable p50 ratio change): paired
    bootstrap ratios, Wilcoxon and TOST on log latency over pairs where both arms answered."""
    alpha, valid = s.alpha, reg["valid"]
    n_lat = int(valid.sum())
    ratios = BS.paired_intervals(reg, draws.sums, draws.qdraws, dk.latency, dc.latency, alpha)
    wil = S.wilcoxon_signed_rank(dk.latency[valid], dc.latency[valid])
    tost = S.tost_log_ratio(dk.latency[valid], dc.latency[valid], _equivalence_margin(s.rule), alpha)
    sd_lat = S.sd_unit_from_interval(ratios["p50"].ci_low, ratios["p50"].ci_high, n_lat, alpha, log=True)
    sd_cv = S.sd_unit_from_interval(ratios["cv"].ci_low, ratios["cv"].ci_high, n_lat, alpha, log=True)
    latency = {
        "n_pairs": n_lat,
        "ratio_mean": ratios["mean"].to_dict(), "ratio_p50": ratios["p50"].to_dict(),
        "ratio_p95": ratios["p95"].to_dict(),
        "wilcoxon": wil.to_dict(), "tost": tost.to_dict(),
        "sd_log_unit": S.num(sd_lat),
    }
    cv_ratio = {**ratios["cv"].to_dict(), "sd_log_unit": S.num(sd_cv)}
    return latency, cv_ratio, S.num(S.mde_ratio(n_lat, sd_lat, alpha, s.rule.power))


# -- step 8: multiplicity (Holm) -------------------------------------------------------------------
def _multiplicity(comparisons: dict[str, dict], alpha: float) -> list[dict]:
    """Holm over the pre-declared family {success (McNemar), latency (Wilcoxon)} x candidates: sets
    each comparison's `p_holm` and returns the family with its adjusted p-values."""
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
