"""The statistics: textbook values, library agreement, and exactness of the hand-written bootstrap."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import stats_reference as R
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import NormalIndPower

from guided_ab.analysis import bootstrap as BS
from guided_ab.analysis import stats as S
from guided_ab.analysis.evaluation import evaluate
from guided_ab.analysis.simulate import planned_counts, synthetic_config, synthetic_records
from guided_ab.records import OUTCOMES, records_frame


# -- textbook values -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "x,n,lo,hi",
    [  # Newcombe (1998) Stat Med 17:857, Table I, method 3 (Wilson score)
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0000, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_textbook(x, n, lo, hi):
    iv = S.wilson(x, n)
    assert iv.estimate == pytest.approx(x / n)
    assert iv.ci_low == pytest.approx(lo, abs=5e-5)
    assert iv.ci_high == pytest.approx(hi, abs=5e-5)


@pytest.mark.parametrize(
    "x1,n1,x0,n0,lo,hi",
    [  # Newcombe (1998) Stat Med 17:873, Table II, method 10
        (56, 70, 48, 80, 0.0524, 0.3339),
        (9, 10, 3, 10, 0.1705, 0.8090),
    ],
)
def test_newcombe_independent_textbook(x1, n1, x0, n0, lo, hi):
    iv = R.newcombe_diff_independent(x1, n1, x0, n0)
    assert iv.ci_low == pytest.approx(lo, abs=5e-5)
    assert iv.ci_high == pytest.approx(hi, abs=5e-5)


def test_newcombe_paired_textbook():
    # Fagerland, Lydersen & Laake (2017), ch. 8: complete response before/after consolidation
    # therapy (Cavo et al. 2012), table [[59, 6], [16, 80]]: -0.0621 (-0.1186 to -0.0046)
    iv = S.newcombe_diff_paired(59, 6, 16, 80)
    assert iv.estimate == pytest.approx(-0.0621, abs=5e-5)
    assert iv.ci_low == pytest.approx(-0.1186, abs=5e-5)
    assert iv.ci_high == pytest.approx(-0.0046, abs=5e-5)


def test_paired_interval_narrower_than_independent_when_outcomes_agree():
    paired = S.newcombe_diff_paired(300, 5, 25, 70)  # strongly concordant pairs
    indep = R.newcombe_diff_independent(305, 400, 325, 400)
    assert paired.estimate == pytest.approx(indep.estimate)
    assert (paired.ci_high - paired.ci_low) < (indep.ci_high - indep.ci_low)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 60), st.integers(0, 60), st.integers(0, 60), st.integers(0, 60))
def test_intervals_contain_their_estimate(a, b, c, d):
    n = a + b + c + d
    if n == 0:
        assert S.newcombe_diff_paired(a, b, c, d).estimate is None
        return
    for iv, lo, hi in (
        (S.newcombe_diff_paired(a, b, c, d), -1, 1),
        (R.newcombe_diff_independent(a + b, n, a + c, n), -1, 1),
        (S.wilson(a + b, n), 0, 1),
    ):
        assert lo - 1e-12 <= iv.ci_low <= iv.estimate + 1e-12
        assert iv.estimate - 1e-12 <= iv.ci_high <= hi + 1e-12


def test_mcnemar_exact_is_the_binomial_test():
    res = S.mcnemar_test(40, 3, 9, 20)
    assert res.method == "mcnemar-exact"
    assert res.pvalue == pytest.approx(sps.binomtest(3, 12, 0.5).pvalue)
    assert S.mcnemar_test(40, 30, 60, 20).method == "mcnemar-chi2-cc"


# -- bootstrap: exactness and agreement with scipy ---------------------------------------------------
def test_order_statistic_bootstrap_matches_brute_force():
    rng = np.random.default_rng(1)
    x = np.sort(rng.lognormal(0, 1, 101))
    for q in (0.5, 0.95, 0.99):
        fast = BS.bootstrap_quantile_draws(x, q, 40_000, rng)
        brute = np.quantile(x[rng.integers(0, x.size, (40_000, x.size))], q, axis=1)
        assert sps.ks_2samp(fast, brute).pvalue > 1e-3
        assert np.quantile(fast, [0.025, 0.975]) == pytest.approx(np.quantile(brute, [0.025, 0.975]), rel=0.02)


def _engine_counts(n: int, B: int, seed: int) -> np.ndarray:
    eng = BS.CountBootstrap(n, B, np.random.default_rng(seed))
    step = max(1, min(B, eng.max_cells // n))
    return np.vstack([eng._counts(min(step, B - s)) for s in range(0, B, step)])


@pytest.mark.parametrize("n", [60, 6000])  # whole-range and windowed paths
def test_count_engine_equals_quantiles_of_explicit_resamples(n):
    rng = np.random.default_rng(2)
    a = rng.lognormal(0, 0.5, n)
    b = a * rng.lognormal(0, 0.2, n)
    valid = rng.random(n) < 0.9
    B = 40
    eng = BS.CountBootstrap(n, B, np.random.default_rng(7))
    h = eng.quantiles(b, valid, (0.5, 0.95, 0.99))
    col = eng.column(np.where(valid, b, 0.0))
    sums, qd = eng.run()
    C = _engine_counts(n, B, 7)  # the same generator stream: the same resamples
    for r in range(B):
        vals = np.repeat(b[valid], C[r].astype(int)[valid])
        assert qd[h][r] == pytest.approx(np.quantile(vals, [0.5, 0.95, 0.99]), rel=1e-12)
        assert sums[r, col] == pytest.approx(vals.sum(), rel=1e-12)


def test_count_engine_fallback_outside_the_window_is_exact():
    n, B = 5000, 30
    x = np.random.default_rng(3).normal(size=n)
    eng = BS.CountBootstrap(n, B, np.random.default_rng(4))
    h = eng.quantiles(x, np.ones(n, bool), (0.5,))
    spec = eng._specs[h]
    # shrink the window to a few positions so that most resamples fall outside it
    lo = 2490
    ind = np.zeros(n)
    ind[spec.labels[:lo]] = 1
    spec.windows[0] = (lo, lo + 5, eng.column(ind))
    _, qd = eng.run()
    C = _engine_counts(n, B, 4)
    for r in range(B):
        assert qd[h][r, 0] == pytest.approx(np.quantile(np.repeat(x, C[r].astype(int)), 0.5), rel=1e-12)


def test_bootstrap_summary_agrees_with_scipy_bootstrap():
    x = np.random.default_rng(5).lognormal(0, 0.6, 300)
    ours = R.bootstrap_summary(x, resamples=5000, seed=1)
    for name, stat in (("mean", np.mean), ("p50", np.median)):
        ref = sps.bootstrap((x,), stat, vectorized=True, n_resamples=5000, method="percentile",
                            random_state=np.random.default_rng(2)).confidence_interval
        iv = ours.mean if name == "mean" else ours.quantiles["p50"]
        assert iv.ci_low == pytest.approx(ref.low, rel=0.03)
        assert iv.ci_high == pytest.approx(ref.high, rel=0.03)
    assert ours.descriptive["p99"] is True  # n < 400


def test_paired_ratio_bootstrap_agrees_with_scipy_paired_bootstrap():
    rng = np.random.default_rng(6)
    base = rng.lognormal(0, 0.5, 400)
    ctrl, cand = base * rng.lognormal(0, 0.2, 400), 0.8 * base * rng.lognormal(0, 0.2, 400)
    ours = R.paired_ratio_bootstrap(ctrl, cand, resamples=5000, seed=3)

    def ratio_p50(a, b, axis=-1):
        return np.median(b, axis=axis) / np.median(a, axis=axis)

    ref = sps.bootstrap((ctrl, cand), ratio_p50, paired=True, vectorized=True, n_resamples=5000,
                        method="percentile", random_state=np.random.default_rng(4)).confidence_interval
    assert ours["p50"].ci_low == pytest.approx(ref.low, rel=0.02)
    assert ours["p50"].ci_high == pytest.approx(ref.high, rel=0.02)
    for k in ("mean", "p50", "p95", "cv"):
        assert ours[k].contains(ours[k].estimate)
    assert ours["p50"].contains(0.8)


def test_coefficient_of_variation():
    x = np.random.default_rng(8).lognormal(0, 0.4, 2000)
    iv = R.coefficient_of_variation(x, resamples=2000, seed=0)
    assert iv.estimate == pytest.approx(np.std(x, ddof=1) / np.mean(x))
    true_cv = math.sqrt(math.exp(0.4**2) - 1)
    assert iv.ci_low < true_cv < iv.ci_high


# -- tests, multiplicity, power ----------------------------------------------------------------------
def test_holm_matches_statsmodels():
    p = [0.01, 0.04, 0.03, 0.005, None, 0.2]
    ours = S.holm(p)
    ref = multipletests([v for v in p if v is not None], method="holm")[1]
    assert ours[4] is None
    assert [v for v in ours if v is not None] == pytest.approx(list(ref))


def test_power_closed_form_matches_statsmodels():
    power = NormalIndPower()
    for n, sd in ((50, 0.3), (400, 1.2), (5000, 0.05)):
        es = power.solve_power(effect_size=None, nobs1=n, alpha=0.025, power=0.8, ratio=0, alternative="larger")
        assert S.mde(sd, n) == pytest.approx(es * sd, rel=1e-4)  # statsmodels' root finder
    need = power.solve_power(effect_size=0.02 / 0.3, nobs1=None, alpha=0.025, power=0.8, ratio=0, alternative="larger")
    assert abs(S.n_needed(0.02, 0.3) - need) < 1.0
    assert S.n_needed(0.0, 0.3) is None
    # the MDE at the pairs needed for an effect is that effect
    assert S.mde(0.3, S.n_needed(0.05, 0.3)) == pytest.approx(0.05, rel=0.01)


def test_tost_and_wilcoxon():
    rng = np.random.default_rng(9)
    a = rng.lognormal(0, 0.5, 500)
    same = a * rng.lognormal(0, 0.05, 500)
    slower = 1.3 * a * rng.lognormal(0, 0.05, 500)
    eq = S.tost_log_ratio(a, same, margin=0.1)
    assert eq.equivalent and eq.ratio.contains(1.0)
    neq = S.tost_log_ratio(a, slower, margin=0.1)
    assert not neq.equivalent and neq.ratio.contains(1.3)
    assert S.wilcoxon_signed_rank(a, slower).pvalue < 1e-10
    assert S.wilcoxon_signed_rank(a, same).pvalue > 1e-3


def test_sample_ratio_test():
    assert S.sample_ratio_test([500, 500]).pvalue == pytest.approx(1.0)
    assert S.sample_ratio_test([500, 400]).pvalue < 0.001


# -- evaluate: shape and JSON ------------------------------------------------------------------------
def test_evaluate_is_plain_json_with_the_documented_keys():
    df = synthetic_records(120, ratio=0.8, warmup=2, observe=6, seed=11)
    cfg = synthetic_config(resamples=500)
    ev = evaluate(df, cfg, planned=planned_counts(df), costs={"control": 1.0, "candidate": 0.8}, seed=1)
    text = json.dumps(ev, allow_nan=False)
    assert json.loads(text) == ev
    assert set(ev) >= {"experiment", "control", "candidates", "settings", "counts", "arms", "observe",
                       "comparisons", "multiplicity", "gates", "valid"}
    arm = ev["arms"]["candidate"]
    assert set(arm) >= {"n", "n_warmup", "success", "outcomes", "latency", "ttft", "tpot", "cv",
                        "first_vs_repeated", "backend", "cost"}
    assert arm["n"] == 120 and arm["n_warmup"] == 2
    assert list(arm["outcomes"])[: len(OUTCOMES)] == list(OUTCOMES)
    assert sum(arm["outcomes"].values()) == 120
    assert arm["latency"]["p99"]["descriptive"] is True
    for m in ("mean", "p50", "p95", "p99", "cv"):
        iv = arm["latency"][m]
        assert iv["ci_low"] <= iv["estimate"] <= iv["ci_high"]
    assert arm["cost"]["per_1k_success"] == pytest.approx(0.8 / arm["cost"]["successful_requests"] * 1000)
    assert ev["counts"]["ab"]["candidate"] == {"recorded": 122, "warmup": 2, "measured": 120}
    assert ev["observe"]["arms"]["candidate"]["n"] == 6
    assert set(ev["observe"]["schema_backends"]["candidate"].values()) <= {"guidance", "xgrammar"}
    # every schema the candidate was sent (observe + A/B), grouped by the backend the server reported
    sb = ev["schema_backends"]["candidate"]
    sent = df[(df.arm == "candidate") & ~df.warmup & df.phase.isin(["observe", "ab"])
                   & df.backend.notna()]
    assert sb["schemas"] == sent.schema_id.nunique()
    for backend, ids in sb["by_backend"].items():
        assert set(ids) == set(sent.loc[sent.backend == backend, "schema_id"])
    assert sb["mixed"] == sorted(k for k, g in sent.groupby("schema_id") if g.backend.nunique() > 1)
    assert "control" not in ev["schema_backends"]
    comp = ev["comparisons"]["candidate"]
    assert comp["n_pairs"] == 120
    assert comp["latency"]["ratio_p50"]["ci_low"] < comp["latency"]["ratio_p50"]["ci_high"]
    assert all(g["passed"] for g in ev["gates"]), ev["gates"]
    assert [f["metric"] for f in ev["multiplicity"]["family"]] == ["success", "latency"]


def test_evaluate_accepts_records_frame_with_missing_values():
    rows = []
    for pair in range(6):
        for arm in ("control", "candidate"):
            ok = not (arm == "candidate" and pair == 2)
            rows.append({
                "run_id": "r", "phase": "ab", "arm": arm, "request_id": f"ab-{pair}-{arm}", "schema_id": f"s{pair}",
                "subset": "t", "order_index": 2 * pair + (arm == "candidate"), "pair_index": pair, "warmup": False,
                "first_for_schema": True, "stream": False, "attempt": 1, "sent_at": 1.0 + pair,
                "ttft_s": None, "latency_s": 0.5 + 0.1 * pair if ok else None, "prompt_tokens": 10,
                "completion_tokens": 20 if ok else None, "finish_reason": "stop" if ok else None,
                "http_status": 200 if ok else None, "backend": "guidance" if ok else None,
                "outcome": "success" if ok else "timeout", "error": None if ok else "timed out", "output": None,
            })
    ev = evaluate(records_frame(rows), synthetic_config(resamples=200))
    json.dumps(ev, allow_nan=False)
    arm = ev["arms"]["candidate"]
    # issue 14: the timeout is not dropped from latency, it is censored at the workload's timeout_s
    assert arm["outcomes"]["timeout"] == 1 and arm["latency"]["n"] == 6 and arm["latency"]["n_censored"] == 1
    assert arm["latency"]["p99"]["estimate"] > 100 and arm["latency"]["p99"]["censored"]  # near 120 s
    assert arm["ttft"]["n"] == 0 and arm["ttft"]["p50"]["estimate"] is None
    assert ev["comparisons"]["candidate"]["latency"]["n_pairs"] == 6
    assert arm["backend"]["unknown"] == 1


def test_wilson_bounds_are_statsmodels():
    from statsmodels.stats.proportion import proportion_confint

    for x, n, alpha in ((0, 20, 0.05), (7, 9, 0.05), (81, 263, 0.01), (150, 151, 0.0125), (12.5, 40.2, 0.05)):
        assert S._wilson_bounds(x, n, alpha) == pytest.approx(proportion_confint(x, n, alpha=alpha, method="wilson"), abs=1e-12)
