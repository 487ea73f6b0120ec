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
from typing import Any

import numpy as np
import pandas as pd

from guided_ab.analysis import stats as S
from guided_ab.config import ExperimentConfig
from guided_ab.records import OUTCOMES, RECORD_COLUMNS, TRANSIENT_OUTCOMES

ANSWERED_OUTCOMES = frozenset({"success", "truncated", "invalid_json", "schema_violation"})
SRM_P_MIN = 0.001
LATENCY_BASIS = (
    "requests that got an answer: outcome in success/truncated/invalid_json/schema_violation "
    "with the timing recorded (warm-ups excluded)"
)


def _equivalence_margin(rule: Any) -> float:
    return float(getattr(rule, "equivalence_margin", None) or rule.latency_margin)


# -- frame preparation -----------------------------------------------------------------------------
class _Cols:
    """The record columns as numpy arrays (pandas indexing costs more than the statistics here)."""

    def __init__(self, records: pd.DataFrame | None, idx: np.ndarray | None = None, base: _Cols | None = None):
        if base is not None:
            self.a = {k: v[idx] for k, v in base.a.items()}
            return
        df = records if records is not None else pd.DataFrame(columns=RECORD_COLUMNS)
        n = len(df)

        def col(name: str) -> pd.Series:
            return df[name] if name in df.columns else pd.Series([None] * n, dtype=object)

        a: dict[str, np.ndarray] = {}
        for name in ("latency_s", "ttft_s", "completion_tokens", "attempt", "sent_at"):
            a[name] = pd.to_numeric(col(name), errors="coerce").to_numpy(dtype=float, na_value=np.nan)
        for name in ("warmup", "first_for_schema", "stream"):
            a[name] = col(name).fillna(False).to_numpy(dtype=bool)
        for name in ("phase", "arm", "outcome", "schema_id", "request_id"):
            v = col(name).to_numpy(dtype=object, na_value=None)
            if not all(type(x) is str for x in v.tolist()):
                v = np.array([str(x) for x in v.tolist()], dtype=object)
            a[name] = v
        a["pair_index"] = pd.to_numeric(col("pair_index"), errors="coerce").fillna(-1).to_numpy(dtype=np.int64)
        be = col("backend").to_numpy(dtype=object).copy()
        be[pd.isna(be)] = None
        a["backend"] = be
        self.a = a

    def __len__(self) -> int:
        return int(self.a["phase"].size)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.a[name]

    def take(self, mask: np.ndarray) -> _Cols:
        return _Cols(None, np.flatnonzero(mask) if mask.dtype == bool else mask, self)


class _ArmData:
    """One arm's A/B records aligned to the pair units (NaN/False where the arm has no record)."""

    def __init__(self, rows: _Cols, units: np.ndarray):
        n = units.size
        pos = np.searchsorted(units, rows["pair_index"])
        self.present = np.zeros(n, bool)
        self.present[pos] = True
        outcome = np.full(n, "", dtype=object)
        outcome[pos] = rows["outcome"]
        self.success = outcome == "success"
        answered_rows = np.isin(rows["outcome"], list(ANSWERED_OUTCOMES))

        def aligned(values: np.ndarray, ok: np.ndarray) -> np.ndarray:
            out = np.full(n, np.nan)
            out[pos] = np.where(ok, values, np.nan)
            return out

        lat, ttft, toks = rows["latency_s"], rows["ttft_s"], rows["completion_tokens"]
        self.latency = aligned(lat, answered_rows & np.isfinite(lat))
        self.ttft = aligned(ttft, answered_rows & np.isfinite(ttft))
        with np.errstate(invalid="ignore", divide="ignore"):
            tpot = (lat - ttft) / (toks - 1)
            tpot_ok = answered_rows & np.isfinite(tpot) & (toks > 1) & (lat >= ttft)
        self.tpot = aligned(tpot, tpot_ok)
        self.first = np.zeros(n, bool)
        self.first[pos] = rows["first_for_schema"]
        self.stream = np.full(n, -1, np.int8)
        self.stream[pos] = rows["stream"].astype(np.int8)
        self.rows = rows


# -- per-arm metrics -------------------------------------------------------------------------------
def _register_metric(eng: S.CountBootstrap, values: np.ndarray) -> dict:
    valid = np.isfinite(values)
    center = float(values[valid].mean()) if valid.any() else 0.0
    c = np.where(valid, values - center, 0.0)
    return {"valid": valid, "center": center, "cnt": eng.column(valid.astype(float)),
            "s1": eng.column(c), "s2": eng.column(c * c)}


def _metric_summary(reg: dict, values: np.ndarray, sums: np.ndarray, rng: np.random.Generator, B: int,
                    alpha: float) -> dict:
    x = np.sort(values[reg["valid"]])
    n = int(x.size)
    out: dict[str, Any] = {"n": n}
    if n == 0:
        for k in ("mean", *S.QUANTILES, "cv"):
            out[k] = S.NO_INTERVAL.to_dict()
        return out
    means, sds = S._moments(sums, reg["cnt"], reg["s1"], reg["s2"], reg["center"])
    out["mean"] = S.percentile_interval(float(x.mean()), means, alpha, n).to_dict()
    for name, q in S.QUANTILES.items():
        iv = S.percentile_interval(S.sorted_quantile(x, q), S.bootstrap_quantile_draws(x, q, B, rng), alpha, n)
        out[name] = {**iv.to_dict(), "descriptive": bool(q >= 0.99 and n < S.P99_MIN_N)}
    with np.errstate(invalid="ignore", divide="ignore"):
        out["cv"] = S.percentile_interval(S.cv(x), sds / means, alpha, n).to_dict()
    return out


def _register_subset_mean(eng: S.CountBootstrap, values: np.ndarray, mask: np.ndarray) -> dict:
    valid = mask & np.isfinite(values)
    center = float(values[valid].mean()) if valid.any() else 0.0
    return {"valid": valid, "center": center, "cnt": eng.column(valid.astype(float)),
            "s1": eng.column(np.where(valid, values - center, 0.0))}


def _subset_summary(reg: dict, values: np.ndarray, sums: np.ndarray, rng, B: int, alpha: float) -> dict:
    x = np.sort(values[reg["valid"]])
    if x.size == 0:
        return {"n": 0, "mean": S.NO_INTERVAL.to_dict(), "p50": S.NO_INTERVAL.to_dict()}
    with np.errstate(invalid="ignore", divide="ignore"):
        means = reg["center"] + sums[:, reg["s1"]] / sums[:, reg["cnt"]]
    return {
        "n": int(x.size),
        "mean": S.percentile_interval(float(x.mean()), means, alpha, int(x.size)).to_dict(),
        "p50": S.percentile_interval(S.sorted_quantile(x, 0.5), S.bootstrap_quantile_draws(x, 0.5, B, rng),
                                     alpha, int(x.size)).to_dict(),
    }


def _counts(values: np.ndarray) -> dict[str, int]:
    return {str(k): int(v) for k, v in sorted(Counter(values.tolist()).items(), key=lambda kv: str(kv[0]))}


def _outcome_counts(outcomes: np.ndarray) -> dict[str, int]:
    c = Counter(outcomes.tolist())
    out = {o: int(c.pop(o, 0)) for o in OUTCOMES}
    other = sum(c.values())
    if other:
        out["other"] = int(other)
    return out


def _backend_counts(backends: np.ndarray) -> dict[str, int]:
    return _counts(np.array(["unknown" if b is None else str(b) for b in backends.tolist()], dtype=object))


def _backend_share(backends: np.ndarray, expected: str, alpha: float) -> dict:
    counts = _backend_counts(backends)
    known = {k: v for k, v in counts.items() if k != "unknown"}
    n_known = sum(known.values())
    iv = S.wilson(known.get(expected, 0), n_known, alpha)
    return {"counts": counts, "expected": expected, "n_known": n_known, "unknown": counts.get("unknown", 0),
            "share": iv.to_dict()}


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
    """Everything the decision needs, as JSON-ready plain values (None where undefined)."""
    rule = cfg.decision
    alpha, B = float(rule.alpha), int(rule.bootstrap_resamples)
    rng = np.random.default_rng(seed)
    df = _Cols(records)
    control = cfg.control.name
    candidates = [a.name for a in cfg.candidates]
    arms = [control, *candidates]

    # counts per phase and arm (warm-ups separately)
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for (phase, arm), k in sorted(Counter(zip(df["phase"].tolist(), df["arm"].tolist())).items()):
        w = int(np.sum(df["warmup"][(df["phase"] == phase) & (df["arm"] == arm)]))
        counts.setdefault(str(phase), {})[str(arm)] = {"recorded": int(k), "warmup": w, "measured": int(k - w)}

    # the A/B phase, measured rows, one record per (arm, pair): the last attempt wins
    ab_mask = (df["phase"] == "ab") & ~df["warmup"]
    dup_pairs: dict[str, int] = {}
    per_arm_idx = {}
    for arm in arms:
        idx = np.flatnonzero(ab_mask & (df["arm"] == arm))
        order = np.lexsort((df["sent_at"][idx], df["attempt"][idx], df["pair_index"][idx]))
        idx = idx[order]
        pi = df["pair_index"][idx]
        last = np.ones(idx.size, bool)
        last[:-1] = pi[1:] != pi[:-1]
        if not last.all():
            dup_pairs[arm] = int(np.unique(pi[~last]).size)
        per_arm_idx[arm] = idx[last]
    units = np.unique(np.concatenate([df["pair_index"][i] for i in per_arm_idx.values()]))
    data = {arm: _ArmData(df.take(per_arm_idx[arm]), units) for arm in arms}

    # one bootstrap pass over pairs for every linear statistic and every paired ratio
    eng = S.CountBootstrap(units.size, B, rng)
    regs: dict[str, dict[str, dict]] = {}
    for arm in arms:
        d = data[arm]
        regs[arm] = {m: _register_metric(eng, getattr(d, m)) for m in ("latency", "ttft", "tpot")}
        regs[arm]["first"] = _register_subset_mean(eng, d.latency, d.first)
        regs[arm]["repeated"] = _register_subset_mean(eng, d.latency, ~d.first)
    preg = {}
    for cand in candidates:
        a, b = data[control].latency, data[cand].latency
        preg[cand] = S.register_paired(eng, a, b, np.isfinite(a) & np.isfinite(b))
    sums, qdraws = eng.run()

    # per-arm metrics
    arms_out: dict[str, dict] = {}
    all_success = Counter(df["arm"][df["outcome"] == "success"].tolist())
    for arm in arms:
        d, rows = data[arm], data[arm].rows
        n = len(rows)
        succ = int(np.sum(rows["outcome"] == "success"))
        transient = int(np.sum(np.isin(rows["outcome"], list(TRANSIENT_OUTCOMES))))
        first = _subset_summary(regs[arm]["first"], d.latency, sums, rng, B, alpha)
        rep = _subset_summary(regs[arm]["repeated"], d.latency, sums, rng, B, alpha)
        usd = S.num((costs or {}).get(arm))
        successes_all = int(all_success.get(arm, 0))
        arms_out[arm] = {
            "role": "control" if arm == control else "candidate",
            "configured_backend": cfg.arm(arm).backend,
            "n": n,
            "n_warmup": int(counts.get("ab", {}).get(arm, {}).get("warmup", 0)),
            "success": {"count": succ, "rate": S.wilson(succ, n, alpha).to_dict()},
            "outcomes": _outcome_counts(rows["outcome"]),
            "transient_error_share": S.num(transient / n) if n else None,
            "latency": _metric_summary(regs[arm]["latency"], d.latency, sums, rng, B, alpha),
            "ttft": _metric_summary(regs[arm]["ttft"], d.ttft, sums, rng, B, alpha),
            "tpot": _metric_summary(regs[arm]["tpot"], d.tpot, sums, rng, B, alpha),
            "first_vs_repeated": {
                "first": first, "repeated": rep,
                "p50_ratio_first_over_repeated": S.num(S._ratio(first["p50"]["estimate"], rep["p50"]["estimate"])),
            },
            "backend": _backend_share(rows["backend"], rule.expected_backend, alpha),
            "cost": {
                "usd": usd, "successful_requests": successes_all,
                "per_1k_success": S.num(usd / successes_all * 1000) if usd is not None and successes_all else None,
            },
        }
        arms_out[arm]["cv"] = arms_out[arm]["latency"]["cv"]

    # observe phase
    obs_mask = (df["phase"] == "observe") & ~df["warmup"]
    observe: dict[str, Any] = {"arms": {}, "schema_backends": {}, "mixed_schemas": {}}
    for arm in sorted(set(df["arm"][obs_mask].tolist())):
        g = df.take(obs_mask & (df["arm"] == arm))
        observe["arms"][str(arm)] = {
            "n": len(g), "n_warmup": int(counts.get("observe", {}).get(str(arm), {}).get("warmup", 0)),
            "outcomes": _outcome_counts(g["outcome"]), "backend_counts": _backend_counts(g["backend"]),
            "backend_share": _backend_share(g["backend"], rule.expected_backend, alpha)["share"],
        }
        if arm in candidates:
            per = _backends_per_schema(g)
            observe["schema_backends"][str(arm)] = {k: c.most_common(1)[0][0] for k, c in per.items()}
            observe["mixed_schemas"][str(arm)] = [k for k, c in per.items() if len(c) > 1]

    # what each candidate resolved for every schema it was sent (observe and A/B, warm-ups excluded)
    sent = np.isin(df["phase"], ["observe", "ab"]) & ~df["warmup"]
    schema_backends = {str(arm): _schema_backends(df.take(sent & (df["arm"] == arm))) for arm in candidates}

    # paired comparisons
    comparisons: dict[str, dict] = {}
    family: list[dict] = []
    eq_margin = _equivalence_margin(rule)
    for cand in candidates:
        dc, dk = data[cand], data[control]
        both_present = dc.present & dk.present
        n_pairs = int(both_present.sum())
        sc, sk = dc.success[both_present], dk.success[both_present]
        a, b, c, dd = (int(np.sum(sc & sk)), int(np.sum(sc & ~sk)), int(np.sum(~sc & sk)), int(np.sum(~sc & ~sk)))
        diff = S.newcombe_diff_paired(a, b, c, dd, alpha)
        mcn = S.mcnemar_test(a, b, c, dd) if n_pairs else S.TestResult(None, None, "mcnemar")
        sd_success = S.paired_proportion_sd(a, b, c, dd) if n_pairs else None
        lat_valid = preg[cand]["valid"]
        n_lat = int(lat_valid.sum())
        ratios = S.paired_intervals(preg[cand], sums, qdraws, dk.latency, dc.latency, alpha)
        wil = S.wilcoxon_signed_rank(dk.latency[lat_valid], dc.latency[lat_valid])
        tost = S.tost_log_ratio(dk.latency[lat_valid], dc.latency[lat_valid], eq_margin, alpha)
        sd_lat = S.sd_unit_from_interval(ratios["p50"].ci_low, ratios["p50"].ci_high, n_lat, alpha, log=True)
        sd_cv = S.sd_unit_from_interval(ratios["cv"].ci_low, ratios["cv"].ci_high, n_lat, alpha, log=True)
        sd_success_ci = S.sd_unit_from_interval(diff.ci_low, diff.ci_high, n_pairs, alpha)
        stream_mismatch = int(np.sum(both_present & (dc.stream != dk.stream)))
        cost_k, cost_c = arms_out[control]["cost"]["per_1k_success"], arms_out[cand]["cost"]["per_1k_success"]
        comparisons[cand] = {
            "control": control, "candidate": cand, "n_pairs": n_pairs,
            "success": {
                "table": {"both": a, "candidate_only": b, "control_only": c, "neither": dd},
                "control_rate": S.num(sk.mean()) if n_pairs else None,
                "candidate_rate": S.num(sc.mean()) if n_pairs else None,
                "diff": {**diff.to_dict(), "method": "newcombe-paired (method 10)"},
                "mcnemar": mcn.to_dict(),
                "sd_unit": S.num(sd_success_ci if sd_success_ci else sd_success),
            },
            "latency": {
                "n_pairs": n_lat,
                "ratio_mean": ratios["mean"].to_dict(), "ratio_p50": ratios["p50"].to_dict(),
                "ratio_p95": ratios["p95"].to_dict(),
                "wilcoxon": wil.to_dict(), "tost": tost.to_dict(),
                "sd_log_unit": S.num(sd_lat),
            },
            "cv_ratio": {**ratios["cv"].to_dict(), "sd_log_unit": S.num(sd_cv)},
            "cost_ratio_per_1k_success": S.num(S._ratio(cost_c, cost_k)),
            "mde": {
                "success_diff": S.num(S.mde_paired_proportion(n_pairs, sd_success, alpha, rule.power))
                if sd_success else None,
                "latency_p50_ratio": S.num(S.mde_ratio(n_lat, sd_lat, alpha, rule.power)),
            },
            "stream_mismatched_pairs": stream_mismatch,
        }
        family += [
            {"candidate": cand, "metric": "success", "test": mcn.method, "pvalue": mcn.pvalue},
            {"candidate": cand, "metric": "latency", "test": "wilcoxon (log latency)", "pvalue": wil.pvalue},
        ]
    adjusted = S.holm([f["pvalue"] for f in family], alpha)
    for f, p in zip(family, adjusted):
        f["p_holm"] = p
        comparisons[f["candidate"]].setdefault("p_holm", {})[f["metric"]] = p

    gates = _gates(df, cfg, counts, data, dup_pairs, planned, endpoints, comparisons)
    result = {
        "experiment": cfg.name,
        "control": control,
        "candidates": candidates,
        "settings": {
            "alpha": alpha, "confidence": 1 - alpha, "bootstrap_resamples": B, "seed": seed,
            "bootstrap": "percentile; pairs resampled in the A/B phase",
            "latency_basis": LATENCY_BASIS, "equivalence_margin": eq_margin, "p99_min_n": S.P99_MIN_N,
            "min_bootstrap_n": S.MIN_BOOTSTRAP_N,
            "cost_basis": "USD per arm (from the run's deploy/teardown) over the arm's successful requests "
                          "in the whole run (all phases, warm-ups included)",
            "power": float(rule.power),
            "multiplicity": "Holm over {success (McNemar), latency (Wilcoxon)} x candidates",
        },
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


def _backends_per_schema(g: _Cols) -> dict[str, Counter]:
    """{schema: Counter of the backends the server reported for it}, schemas sorted."""
    per: dict[str, Counter] = {}
    for sid, be in zip(g["schema_id"].tolist(), g["backend"].tolist()):
        if be is not None:
            per.setdefault(str(sid), Counter())[str(be)] += 1
    return dict(sorted(per.items()))


def _schema_backends(g: _Cols) -> dict[str, Any]:
    """{backend: [schemas it was resolved for]} and the schemas resolved to more than one backend."""
    per = _backends_per_schema(g)
    by_backend: dict[str, list[str]] = {}
    for sid, counts in per.items():
        for be in counts:
            by_backend.setdefault(be, []).append(sid)
    return {"by_backend": dict(sorted(by_backend.items())), "schemas": len(per),
            "mixed": [k for k, c in per.items() if len(c) > 1]}


# -- validity gates --------------------------------------------------------------------------------
def _gate(name: str, passed: bool, detail: str, **extra: Any) -> dict:
    return {"name": name, "passed": bool(passed), "detail": detail, **extra}


def _gates(df, cfg, counts, data, dup_pairs, planned, endpoints, comparisons) -> list[dict]:
    rule = cfg.decision
    arms = [cfg.control.name, *[a.name for a in cfg.candidates]]
    gates = []

    # 1. request accounting: recorded == planned per arm and phase (warm-ups included)
    if planned is None:
        gates.append(_gate("request_accounting", True, "no plan given: recorded counts not checked", skipped=True))
    else:
        problems = []
        for phase in sorted(set(planned) | set(counts)):
            want = planned.get(phase, {})
            got = {arm: c["recorded"] for arm, c in counts.get(phase, {}).items()}
            for arm in sorted(set(want) | set(got)):
                w, g = int(want.get(arm, 0)), int(got.get(arm, 0))
                if w != g:
                    problems.append(f"arm '{arm}' phase '{phase}': recorded {g} of {w} planned")
        gates.append(_gate(
            "request_accounting", not problems,
            "; ".join(problems) if problems else "recorded == planned for every arm and phase",
        ))

    # 2. no duplicated request ids, one measured record per arm and pair
    ids = df["request_id"]
    uniq, inv, cnt = np.unique(ids.astype(str), return_inverse=True, return_counts=True)
    dup = cnt[inv] > 1
    problems = []
    for arm in sorted(set(df["arm"][dup].tolist())):
        k = np.unique(ids[dup & (df["arm"] == arm)].astype(str)).size
        problems.append(f"arm '{arm}': {k} request_id(s) recorded more than once")
    for arm, k in sorted(dup_pairs.items()):
        problems.append(f"arm '{arm}': {k} A/B pair(s) with more than one record")
    gates.append(_gate("unique_requests", not problems, "; ".join(problems) or "every request recorded once"))

    # 3. sample-ratio mismatch on the measured A/B counts (equal by design)
    n_arm = [int(len(data[a].rows)) for a in arms]
    if sum(n_arm) == 0:
        gates.append(_gate("sample_ratio", True, "no A/B records", skipped=True))
    else:
        srm = S.sample_ratio_test(n_arm)
        ok = srm.pvalue is None or srm.pvalue >= SRM_P_MIN
        detail = ", ".join(f"'{a}' {k}" for a, k in zip(arms, n_arm))
        worst = arms[int(np.argmin(n_arm))]
        p = "n/a" if srm.pvalue is None else f"{srm.pvalue:.3g}"
        gates.append(_gate(
            "sample_ratio", ok,
            f"A/B counts {detail}; chi-square p={p}" + ("" if ok else f" < {SRM_P_MIN} (arm '{worst}' short)"),
            pvalue=S.num(srm.pvalue),
        ))

    # 4. transient error share per arm
    problems, parts = [], []
    for a in arms:
        rows = data[a].rows
        if len(rows) == 0:
            continue
        share = float(np.mean(np.isin(rows["outcome"], list(TRANSIENT_OUTCOMES))))
        parts.append(f"'{a}' {share:.1%}")
        if share > rule.max_error_share:
            problems.append(f"arm '{a}': server_error+timeout+connection_error share {share:.1%} > {rule.max_error_share:.1%}")
    gates.append(_gate("error_share", not problems, "; ".join(problems) or f"shares {', '.join(parts) or 'n/a'}"))

    # 5. same vLLM version on every arm
    if not endpoints:
        gates.append(_gate("same_vllm_version", True, "no endpoint information given", skipped=True))
    else:
        versions = {a: (endpoints.get(a) or {}).get("vllm_version") for a in arms}
        known = {a: v for a, v in versions.items() if v}
        unknown = sorted(a for a, v in versions.items() if not v)
        ok = len(set(known.values())) <= 1
        detail = ", ".join(f"'{a}' {v}" for a, v in known.items()) or "no versions known"
        if unknown:
            detail += f"; unknown for arm(s) {', '.join(repr(u) for u in unknown)}"
        gates.append(_gate("same_vllm_version", ok, ("different vLLM versions: " if not ok else "") + detail))

    # 6. same request settings within each pair (the stream flag is what records show)
    bad = {c: comp["stream_mismatched_pairs"] for c, comp in comparisons.items() if comp["stream_mismatched_pairs"]}
    gates.append(_gate(
        "same_request_settings", not bad,
        "; ".join(f"arm '{c}': {k} pair(s) streamed differently from the control" for c, k in bad.items())
        or "both arms of every pair sent with the same settings",
    ))

    # 7. there is something to compare
    problems = [f"arm '{a}': no measured A/B records" for a in arms if len(data[a].rows) == 0]
    for c, comp in comparisons.items():
        if len(data[c].rows) and comp["n_pairs"] == 0:
            problems.append(f"arm '{c}': no complete pair with the control")
        elif comp["n_pairs"] and comp["latency"]["n_pairs"] == 0:
            problems.append(f"arm '{c}': no pair in which both arms answered (no latency to compare)")
    gates.append(_gate("paired_data", not problems, "; ".join(problems) or "every candidate has pairs with the control"))
    return gates
