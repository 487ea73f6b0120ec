"""Evaluate an experiment from its request records: per-arm metrics, paired comparisons of each
candidate with the control, and the validity gates. Prefect-free; the result is plain JSON.

Conventions (documented here once, and repeated in `settings` of the result):
- Statistics use the A/B phase without warm-up rows; warm-ups are counted separately.
- Success = outcome "success". Latency (end-to-end) is measured over requests that got an answer
  (outcome success, truncated, invalid_json, schema_violation, or not validated in time) *and*
  over timeouts and connection errors, right-censored at the workload's `timeout_s` (flagged,
  counted per arm as `n_censored`): conditioning on an answer would make an arm that times out on
  its slow requests look fast. Quantiles below the censored share are exact, those above it are
  flagged `censored` (a lower bound), and the mean is a restricted mean (up to timeout_s). TTFT,
  time per output token and output tokens are over answered requests only.
- The unit of resampling is the *schema* (`schema_id`): repeats of a schema are correlated, so
  every percentile-bootstrap interval of the A/B phase (per arm and paired) is a cluster bootstrap
  that draws schemas and takes all their pairs, in one pass (`bootstrap.CountBootstrap`), and
  success-type proportions use Wilson/Newcombe at the design effect of the schemas. When every
  schema is in one pair, these are exactly the pair-level intervals (per-arm quantile intervals
  then use the equivalent order-statistic bootstrap of that arm's values).
- CV intervals (per arm and the paired ratio) and the paired mean ratios are expanded percentile
  intervals (`bootstrap.TAIL_EXPAND`: the plain percentile interval under-covers for latencies).
- Intervals the decision rule judges claims on carry `adjusted`: Bonferroni intervals at the
  family sizes the rule may need (2, 3 or 4 claims per candidate, times the candidates).
- Paired comparisons use pairs where both arms have a record (success) or both have a latency.
- Cost: per arm, USD (`costs`, the time it was held) over all its successful requests in the run
  (informational: the bill covers every phase); the comparison's cost per successful request
  uses prices per hour and A/B successes only (comparison.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from guided_ab.analysis import bootstrap as BS
from guided_ab.analysis import comparison as CMP
from guided_ab.analysis import stats as S
from guided_ab.analysis.backends import backend_share, candidate_schema_backends, observe_section, outcome_counts
from guided_ab.analysis.gates import GateInput, validity_gates
from guided_ab.analysis.pairs import ANSWERED_OUTCOMES, ArmPairs, Columns, dedupe_pairs, unit_clusters, workload_problems
from guided_ab.config import DecisionRule, ExperimentConfig
from guided_ab.records import TRANSIENT_OUTCOMES

# the public names: reports read ANSWERED_OUTCOMES (defined with the pair alignment) from here
__all__ = ["ANSWERED_OUTCOMES", "LATENCY_BASIS", "evaluate", "family_sizes"]

LATENCY_BASIS = (
    "requests that got an answer (outcome success/truncated/invalid_json/schema_violation or not validated "
    "in time, timing recorded), plus timeouts and connection errors right-censored at the workload's "
    "timeout_s (warm-ups excluded): quantiles below the censored share are exact, the mean is a restricted mean"
)
Counts = dict[str, dict[str, dict[str, int]]]  # {phase: {arm: {"recorded", "warmup", "measured"}}}


def _equivalence_margin(rule: DecisionRule) -> float:
    return float(rule.equivalence_margin or rule.latency_margin)


def family_sizes(candidates: int) -> tuple[int, ...]:
    """The Bonferroni family sizes an evaluation prepares intervals for: per candidate 2 or 3 primary
    claims (faster, more successful, cheaper when a cost saving is pre-registered) and 3 or 4
    guardrails (success, latency, variability, the backend expectation when it is a guardrail), times
    the candidates. Preparing all of them lets a decision re-run with another rule without
    re-evaluating."""
    m = max(1, int(candidates))
    return tuple(sorted({2 * m, 3 * m, 4 * m}))


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

    @property
    def family_sizes(self) -> tuple[int, ...]:
        return family_sizes(len(self.candidates))


# -- evaluate --------------------------------------------------------------------------------------
def evaluate(
    records: pd.DataFrame,
    cfg: ExperimentConfig,
    *,
    planned: dict[str, dict[str, int]] | None = None,
    costs: dict[str, float] | None = None,
    seed: int = 0,
    endpoints: dict[str, dict] | None = None,
    schema_pool: int | None = None,
) -> dict:
    """Everything the decision needs, as JSON-ready plain values (None where undefined).

    `schema_pool`: how many schemas the workload's suite holds (the phases pass
    `len(workload.suite_pool(cfg.workload))`); "how many more would settle it" is capped by the ones
    observe + A/B have not used yet. None: not capped.

    The steps, in order (the generator is consumed in this order: the bootstrap pass, then each
    arm's quantile draws, so one seed gives the same numbers every time):
    1. prepare rows: `Columns.from_records` (pairs.py);
    2. accounting: `_phase_counts`;
    3. de-duplicate pairs, align the arms on them, label their schemas: `dedupe_pairs`, `unit_clusters`;
    4. register the bootstrap statistics and run the one (cluster) pass: `_run_bootstrap`;
    5. per-arm metrics: `_per_arm_metrics`;
    6. observe section: `backends.observe_section`, `backends.candidate_schema_backends`;
    7. paired comparisons: `comparison.compare`;
    8. multiplicity (Holm, informational): `comparison.holm_family`;
    9. validity gates: `gates.validity_gates`.
    """
    rule = cfg.decision
    s = _Setup(cfg, float(rule.alpha), int(rule.bootstrap_resamples), np.random.default_rng(seed))
    df = Columns.from_records(records)
    counts = _phase_counts(df)
    # pairs refused for the workload's own sake (context overflow, bad parameters) leave the
    # comparison whole; counted in `workload_problems` (accounting above still sees every record)
    drop, problems = workload_problems(df, s.arms)
    full_df, df = df, df.take(~drop) if drop.any() else df
    data, dup_pairs = dedupe_pairs(df, s.arms, float(cfg.workload.timeout_s))
    clusters = unit_clusters(data)
    draws = _run_bootstrap(s, data, clusters)
    arms_out = _per_arm_metrics(s, df, data, draws, counts, costs or {})
    observe = observe_section(df, counts, s.candidates, rule.expected_backend, s.alpha, s.family_sizes)
    schema_backends = candidate_schema_backends(df, s.candidates)
    ctx = CMP.PairedContext(s.control, s.alpha, float(rule.power), s.family_sizes, clusters, draws.sums, draws.qdraws,
                            _equivalence_margin(rule))
    comparisons = {
        cand: CMP.compare(ctx, cand, data[s.control], data[cand], draws.paired[cand], _prices(s, cand, costs, endpoints))
        for cand in s.candidates
    }
    for cand, comp in comparisons.items():  # the whole-run figure, kept for reports (informational)
        comp["cost_ratio_per_1k_success"] = S.num(S.ratio(arms_out[cand]["cost"]["per_1k_success"],
                                                          arms_out[s.control]["cost"]["per_1k_success"]))
    family = CMP.holm_family(comparisons, s.alpha)
    gates = validity_gates(GateInput(
        arms=s.arms, counts=counts, request_ids=full_df["request_id"], record_arms=full_df["arm"],
        ab_outcomes={arm: data[arm].rows["outcome"] for arm in s.arms}, duplicated_pairs=dup_pairs,
        comparisons=comparisons, max_error_share=rule.max_error_share, planned=planned, endpoints=endpoints,
        workload_problems=problems, max_workload_problem_share=rule.max_workload_problem_share,
    ))
    result = {
        "experiment": cfg.name,
        "control": s.control,
        "candidates": s.candidates,
        "settings": _settings(s, seed, clusters),
        "counts": counts,
        "arms": arms_out,
        "observe": observe,
        "schema_backends": schema_backends,
        "comparisons": comparisons,
        "multiplicity": {"method": "holm", "informational": True, "family": family,
                         "decision": "Bonferroni intervals over the rule's families (see settings.multiplicity)"},
        "pool": _pool(full_df, schema_pool),
        "workload_problems": problems,
        "gates": gates,
        "valid": all(g["passed"] for g in gates),
    }
    return S.jsonable(result)


def _settings(s: _Setup, seed: int, clusters: np.ndarray | None) -> dict:
    """The conventions the numbers were computed under (the module docstring, in the result)."""
    return {
        "alpha": s.alpha, "confidence": 1 - s.alpha, "bootstrap_resamples": s.resamples, "seed": seed,
        "bootstrap": ("percentile; schemas resampled with all their pairs (cluster bootstrap) in the A/B phase"
                      if clusters is not None else "percentile; pairs resampled in the A/B phase (one pair per schema)"),
        "unit": "schema", "schemas_repeated": clusters is not None,
        "success_interval": "Wilson / paired Newcombe (method 10), at the design effect of the schemas when repeated",
        "cv_interval": f"CV and mean ratios: percentile interval computed at level 1 - alpha/{BS.TAIL_EXPAND:g} "
                       "(expanded: the plain one under-covers)",
        "latency_basis": LATENCY_BASIS, "censoring_s": float(s.cfg.workload.timeout_s),
        "equivalence_margin": _equivalence_margin(s.rule), "p99_min_n": S.P99_MIN_N,
        "min_bootstrap_n": BS.MIN_BOOTSTRAP_N,
        "cost_basis": "per arm: USD (from the run's deploy/teardown) over the arm's successful requests in the whole "
                      "run (informational); compared: USD/h ratio x A/B successes ratio (A/B rows only)",
        "power": float(s.rule.power),
        "family_sizes": list(s.family_sizes),
        "multiplicity": "the decision judges Bonferroni intervals: a claim over a family of k at level 1 - alpha/k "
                        "(primary gains; guardrails broken); Holm over {success (McNemar mid-p), latency (Wilcoxon)} "
                        "x candidates is reported, informational",
    }


def _pool(df: Columns, schema_pool: int | None) -> dict:
    """The workload's schemas: in the suite, used by observe + A/B, left for more pairs."""
    sent = np.isin(df["phase"], ["observe", "ab"]) & ~df["warmup"]
    used = int(np.unique(df["schema_id"][sent].astype(str)).size) if sent.any() else 0
    left = None if schema_pool is None else max(0, int(schema_pool) - used)
    return {"schemas": schema_pool, "used": used, "left": left}


def _prices(s: _Setup, cand: str, costs: dict[str, float] | None, endpoints: dict[str, dict] | None) -> CMP.Price:
    """USD per hour of the control and a candidate: the endpoints' (what deploy recorded), else the
    config's; when neither knows one, the ratio of the run's USD totals (which include the
    candidate's observe phase: a fallback, said so in `price_basis`)."""
    def per_hour(arm: str) -> float | None:
        ep = (endpoints or {}).get(arm) or {}
        v = S.num(ep.get("cost_per_hour"))
        if v:
            return v
        a = s.cfg.arm(arm)
        v = float(a.modal.cost_per_hour) if a.target == "modal" else float(a.cost_per_hour)
        return v or None

    pk, pc = per_hour(s.control), per_hour(cand)
    if pk and pc:
        return CMP.Price(pk, pc, "USD per hour held (endpoints / config)")
    uk, uc = S.num((costs or {}).get(s.control)), S.num((costs or {}).get(cand))
    if uk and uc:
        return CMP.Price(uk, uc, "the run's USD totals (no prices per hour known; includes observe and warm-up time)")
    return CMP.Price(pk, pc, "no prices known")


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
    """The one bootstrap pass over pairs (schemas): each statistic's registration, and the pass's output."""

    per_arm: dict[str, dict[str, Any]]  # {arm: {metric: registration}}
    paired: dict[str, dict[str, dict]]  # {candidate: {metric: `register_paired`'s registration}}
    sums: np.ndarray  # B x registered columns
    qdraws: list[np.ndarray]  # per registered quantile set: B x quantiles
    clusters: np.ndarray | None


PER_ARM_METRICS = ("latency", "ttft", "tpot", "tokens")


def _run_bootstrap(s: _Setup, data: dict[str, ArmPairs], clusters: np.ndarray | None) -> _Draws:
    """Register every linear statistic (per-arm means and sds, first/repeated means),
    every paired ratio, and (with repeated schemas, or for output tokens) the per-arm quantiles on
    one `CountBootstrap` over the pair units clustered by schema, and run it once, so paired ratios
    keep their correlation and the cost is one pass."""
    eng = BS.CountBootstrap(data[s.control].present.size, s.resamples, s.rng, clusters=clusters)
    regs: dict[str, dict[str, Any]] = {}
    for arm in s.arms:
        d = data[arm]
        regs[arm] = {m: _register_metric(eng, getattr(d, m)) for m in PER_ARM_METRICS}
        regs[arm]["first"] = _register_subset_mean(eng, d.latency, d.first)
        regs[arm]["repeated"] = _register_subset_mean(eng, d.latency, ~d.first)
        regs[arm]["tokens_success"] = _register_subset_mean(eng, d.tokens, d.success)
        if clusters is not None:  # per-arm quantiles need the schema draws too (else: order statistics)
            for m in ("latency", "ttft", "tpot"):
                regs[arm][m]["q"] = eng.quantiles(getattr(d, m), regs[arm][m]["valid"], tuple(S.QUANTILES.values()))
            for sub in ("first", "repeated"):
                regs[arm][sub]["q"] = eng.quantiles(d.latency, regs[arm][sub]["valid"], (0.5,))
    paired = {cand: CMP.register_candidate(eng, data[s.control], data[cand]) for cand in s.candidates}
    sums, qdraws = eng.run()
    return _Draws(regs, paired, sums, qdraws, clusters)


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
@dataclass(frozen=True)
class _ArmCtx:
    """What one arm's summaries read: the pass, the generator (order-statistic draws), the level, and
    the schema labels of the pair units."""

    sums: np.ndarray
    qdraws: list[np.ndarray]
    rng: np.random.Generator
    B: int
    alpha: float
    clusters: np.ndarray | None

    def units(self, valid: np.ndarray) -> int:
        return int(valid.sum()) if self.clusters is None else int(np.unique(self.clusters[valid]).size)


def _per_arm_metrics(s: _Setup, df: Columns, data: dict[str, ArmPairs], draws: _Draws, counts: Counts,
                     costs: dict[str, float]) -> dict[str, dict]:
    """{arm: metrics}, arms in the config's order (the order the generator is consumed in)."""
    all_success = Counter(df["arm"][df["outcome"] == "success"].tolist())
    ax = _ArmCtx(draws.sums, draws.qdraws, s.rng, s.resamples, s.alpha, draws.clusters)
    out = {}
    for arm in s.arms:
        n_warmup = int(counts.get("ab", {}).get(arm, {}).get("warmup", 0))
        cost = _cost(S.num(costs.get(arm)), int(all_success.get(arm, 0)))
        out[arm] = _arm_metrics(s, ax, arm, data[arm], draws.per_arm[arm], n_warmup, cost)
    return out


def _arm_metrics(s: _Setup, ax: _ArmCtx, arm: str, d: ArmPairs, regs: dict, n_warmup: int, cost: dict) -> dict:
    """One arm's A/B metrics: outcomes, success rate (Wilson), latency/TTFT/TPOT with intervals,
    output tokens, truncation, first vs repeated schema latency, backend share, cost. Without
    repeated schemas the quantile draws consume the generator in the order first, repeated,
    latency, ttft, tpot."""
    rows = d.rows
    n = len(rows)
    row_cl = None if ax.clusters is None else ax.clusters[d.pos]
    succ = int(np.sum(rows["outcome"] == "success"))
    transient = int(np.sum(np.isin(rows["outcome"], list(TRANSIENT_OUTCOMES))))
    first = _subset_summary(ax, regs["first"], d.latency)
    rep = _subset_summary(ax, regs["repeated"], d.latency)
    truncated = d.truncated[d.present]
    out: dict[str, Any] = {
        "role": "control" if arm == s.control else "candidate",
        "configured_backend": s.cfg.arm(arm).backend,
        "n": n,
        "n_warmup": n_warmup,
        "success": {"count": succ, "rate": S.wilson_clustered(rows["outcome"] == "success", row_cl, ax.alpha).to_dict()},
        "outcomes": outcome_counts(rows["outcome"]),
        "transient_error_share": S.num(transient / n) if n else None,
        "latency": _metric_summary(ax, regs["latency"], d.latency, int(np.sum(d.censored))),
        "ttft": _metric_summary(ax, regs["ttft"], d.ttft),
        "tpot": _metric_summary(ax, regs["tpot"], d.tpot),
        "output_tokens": _tokens_summary(ax, regs, d),
        "truncated": {"count": int(truncated.sum()),
                      "share": S.wilson_clustered(truncated, row_cl, ax.alpha).to_dict()},
        "first_vs_repeated": {
            "first": first, "repeated": rep,
            "p50_ratio_first_over_repeated": S.num(S.ratio(first["p50"]["estimate"], rep["p50"]["estimate"])),
        },
        "backend": backend_share(rows["backend"], s.rule.expected_backend, ax.alpha, row_cl, s.family_sizes),
        "cost": cost,
    }
    out["cv"] = out["latency"]["cv"]
    return out


def _cost(usd: float | None, successes: int) -> dict:
    """The arm's USD over its successful requests in the whole run (the bill covers every phase)."""
    return {"usd": usd, "successful_requests": successes,
            "per_1k_success": S.num(usd / successes * 1000) if usd is not None and successes else None}


def _quantile_draws(ax: _ArmCtx, reg: dict, x: np.ndarray, q: float, i: int) -> np.ndarray:
    """B draws of the q-quantile: from the cluster pass when schemas repeat, else order statistics."""
    if "q" in reg:
        return ax.qdraws[reg["q"]][:, i]
    return BS.bootstrap_quantile_draws(x, q, ax.B, ax.rng)


def _metric_summary(ax: _ArmCtx, reg: dict, values: np.ndarray, n_censored: int = 0) -> dict:
    """Mean, p50/p95/p99 and CV of one metric, each with its percentile-bootstrap interval; with
    censored values, the quantiles that reach into them are flagged `censored` (lower bounds)."""
    x = np.sort(values[reg["valid"]])
    n = int(x.size)
    units = ax.units(reg["valid"])
    out: dict[str, Any] = {"n": n}
    if n_censored:
        out["n_censored"] = n_censored
        out["restricted_mean"] = True
    if n == 0:
        for k in ("mean", *S.QUANTILES, "cv"):
            out[k] = S.NO_INTERVAL.to_dict()
        return out
    means, sds = BS.moments(ax.sums, reg["cnt"], reg["s1"], reg["s2"], reg["center"])
    out["mean"] = BS.percentile_interval(float(x.mean()), means, ax.alpha, units).to_dict()
    for i, (name, q) in enumerate(S.QUANTILES.items()):
        iv = BS.percentile_interval(BS.sorted_quantile(x, q), _quantile_draws(ax, reg, x, q, i), ax.alpha, units)
        out[name] = {**iv.to_dict(), "descriptive": bool(q >= 0.99 and n < S.P99_MIN_N)}
        if n_censored and int(np.ceil((n - 1) * q)) >= n - n_censored:
            out[name]["censored"] = True
    with np.errstate(invalid="ignore", divide="ignore"):
        out["cv"] = BS.percentile_interval(S.cv(x), sds / means, ax.alpha / BS.TAIL_EXPAND, units).to_dict()
    return out


def _subset_summary(ax: _ArmCtx, reg: dict, values: np.ndarray) -> dict:
    """Mean and p50 of a metric over a subset of the units, with intervals."""
    x = np.sort(values[reg["valid"]])
    if x.size == 0:
        return {"n": 0, "mean": S.NO_INTERVAL.to_dict(), "p50": S.NO_INTERVAL.to_dict()}
    units = ax.units(reg["valid"])
    with np.errstate(invalid="ignore", divide="ignore"):
        means = reg["center"] + ax.sums[:, reg["s1"]] / ax.sums[:, reg["cnt"]]
    return {
        "n": int(x.size),
        "mean": BS.percentile_interval(float(x.mean()), means, ax.alpha, units).to_dict(),
        "p50": BS.percentile_interval(BS.sorted_quantile(x, 0.5), _quantile_draws(ax, reg, x, 0.5, 0),
                                      ax.alpha, units).to_dict(),
    }


def _tokens_summary(ax: _ArmCtx, regs: dict, d: ArmPairs) -> dict:
    """Output tokens per answer (mean with its interval, p50) and per successful answer (mean with its
    interval), from the one pass: the generator is not touched."""
    reg, sreg = regs["tokens"], regs["tokens_success"]
    x = np.sort(d.tokens[reg["valid"]])
    xs = d.tokens[sreg["valid"]]
    out: dict[str, Any] = {"n": int(x.size), "mean": S.NO_INTERVAL.to_dict(), "p50": S.NO_INTERVAL.to_dict(),
                           "per_success": {"n": int(xs.size), "mean": S.NO_INTERVAL.to_dict()}}
    with np.errstate(invalid="ignore", divide="ignore"):
        if x.size:
            means, _ = BS.moments(ax.sums, reg["cnt"], reg["s1"], reg["s2"], reg["center"])
            out["mean"] = BS.percentile_interval(float(x.mean()), means, ax.alpha, ax.units(reg["valid"])).to_dict()
            out["p50"] = {"estimate": BS.sorted_quantile(x, 0.5), "ci_low": None, "ci_high": None}  # no interval: not worth a pass
        if xs.size:
            smeans = sreg["center"] + ax.sums[:, sreg["s1"]] / ax.sums[:, sreg["cnt"]]
            out["per_success"]["mean"] = BS.percentile_interval(float(xs.mean()), smeans, ax.alpha,
                                                                ax.units(sreg["valid"])).to_dict()
    return out
