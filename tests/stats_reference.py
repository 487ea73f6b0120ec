"""Statistics used only by the tests: one-sample and paired conveniences over the bootstrap engine,
and Newcombe's interval for independent proportions.

They are not part of an evaluation (which registers everything on one `CountBootstrap` pass,
see guided_ab/analysis/evaluation.py); here they give the tests a way to run the engine on a
plain sample and compare it with `scipy.stats.bootstrap`, and a reference for the paired
Newcombe interval (test_stats.py, test_properties.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from statsmodels.stats.proportion import confint_proportions_2indep

from guided_ab.analysis.bootstrap import (
    CountBootstrap,
    bootstrap_quantile_draws,
    moments,
    paired_intervals,
    percentile_interval,
    register_paired,
    sorted_quantile,
)
from guided_ab.analysis.stats import NO_INTERVAL, P99_MIN_N, QUANTILES, Interval, cv


@dataclass(frozen=True)
class Summary:
    """Descriptive statistics of one sample with percentile-bootstrap intervals."""

    n: int
    mean: Interval
    quantiles: dict[str, Interval]
    cv: Interval
    descriptive: dict[str, bool] = field(default_factory=dict)

    def to_dict(self) -> dict:
        out: dict = {"n": self.n, "mean": self.mean.to_dict()}
        for k, v in self.quantiles.items():
            out[k] = {**v.to_dict(), "descriptive": self.descriptive.get(k, False)}
        out["cv"] = self.cv.to_dict()
        return out


def newcombe_diff_independent(x1: int, n1: int, x0: int, n0: int, alpha: float = 0.05) -> Interval:
    """Newcombe's hybrid score interval for p1 - p0, independent samples (statsmodels "newcomb")."""
    if n1 <= 0 or n0 <= 0:
        return NO_INTERVAL
    lo, hi = confint_proportions_2indep(int(x1), int(n1), int(x0), int(n0), method="newcomb", alpha=alpha)
    return Interval(x1 / n1 - x0 / n0, float(lo), float(hi))


def bootstrap_summary(
    x: Sequence[float] | np.ndarray, *, resamples: int = 2000, alpha: float = 0.05, seed: int | np.random.Generator = 0,
    quantiles: dict[str, float] = QUANTILES,
) -> Summary:
    """Mean, quantiles and CV of one sample, each with a percentile-bootstrap interval."""
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    rng = np.random.default_rng(seed)
    n = x.size
    if n == 0:
        return Summary(0, NO_INTERVAL, {k: NO_INTERVAL for k in quantiles}, NO_INTERVAL)
    xs = np.sort(x)
    qints = {k: percentile_interval(sorted_quantile(xs, q), bootstrap_quantile_draws(xs, q, resamples, rng), alpha, n)
             for k, q in quantiles.items()}
    eng = CountBootstrap(n, resamples, rng)
    center = float(x.mean())
    one, s1, s2 = eng.column(np.ones(n)), eng.column(x - center), eng.column((x - center) ** 2)
    sums, _ = eng.run()
    means, sds = moments(sums, one, s1, s2, center)
    with np.errstate(invalid="ignore", divide="ignore"):
        cvs = sds / means
    return Summary(
        n, percentile_interval(center, means, alpha, n), qints, percentile_interval(cv(x), cvs, alpha, n),
        {k: (q >= 0.99 and n < P99_MIN_N) for k, q in quantiles.items()},
    )


def coefficient_of_variation(x: Sequence[float] | np.ndarray, *, resamples: int = 2000, alpha: float = 0.05,
                             seed: int | np.random.Generator = 0) -> Interval:
    """CV (ddof=1) with a percentile-bootstrap interval."""
    return bootstrap_summary(x, resamples=resamples, alpha=alpha, seed=seed, quantiles={}).cv


def paired_ratio_bootstrap(
    control: Sequence[float] | np.ndarray, candidate: Sequence[float] | np.ndarray, *, resamples: int = 2000,
    alpha: float = 0.05, seed: int | np.random.Generator = 0,
) -> dict[str, Interval]:
    """Ratios candidate/control of mean, p50, p95 and CV, resampling pairs (both values finite)."""
    a = np.asarray(control, dtype=float)
    b = np.asarray(candidate, dtype=float)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    return _paired_ratios(a, b, np.ones(a.size, bool), resamples, alpha, np.random.default_rng(seed))


def _paired_ratios(a: np.ndarray, b: np.ndarray, valid: np.ndarray, resamples: int, alpha: float,
                   rng: np.random.Generator) -> dict[str, Interval]:
    eng = CountBootstrap(a.size, resamples, rng)
    reg = register_paired(eng, a, b, valid)
    sums, qd = eng.run()
    return paired_intervals(reg, sums, qd, a, b, alpha)

