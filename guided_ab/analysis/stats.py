"""Statistical methods for the A/B evaluation: small functions returning small result objects.

Library first: scipy and statsmodels do the work wherever they have the method (McNemar,
Wilcoxon, TOST). Hand-written pieces are marked "hand-written" below with the reason:

- Newcombe's interval for the difference of *paired* proportions (his method 10):
  statsmodels 0.14/0.15 has only the independent-samples version
  (`confint_proportions_2indep(method="newcomb")`; tests/stats_reference.py wraps it to show
  the paired interval is the narrower one when outcomes agree).
- Holm, the Wilson bounds and the closed-form normal power: statsmodels' formulas, faster, tested
  against statsmodels.
- The design effect of schemas and the intervals built on it (Wilson / Newcombe at the effective
  sample size) and McNemar's mid-p: no library has them (see each docstring).

The percentile bootstrap (quantile draws by order statistics and the count-matrix engine for
means, CVs and paired quantile ratios) lives in `bootstrap.py`: it is the one costly part of an
evaluation and has its own exactness tests. This module is what it builds on (the result
objects, `num`, `cv`, `ratio`) plus the closed-form methods.

No function here prints; non-finite results are returned as None in the `to_dict()` forms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
from scipy import stats as sps
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.weightstats import ttost_paired

QUANTILES: dict[str, float] = {"p50": 0.50, "p95": 0.95, "p99": 0.99}
# below this many observations a p99 rests on < 4 points beyond it: reported, flagged descriptive
# (MLPerf's minimum query counts make the same point for tail percentiles)
P99_MIN_N = 400


def num(x: object) -> float | None:
    """A plain float, or None for None/NaN/inf (JSON has no NaN)."""
    if x is None:
        return None
    try:
        v = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def jsonable(obj: object) -> Any:
    """Plain JSON values: numpy scalars to Python, tuples to lists, NaN/inf to None."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return num(obj)
    return obj


# -- result objects ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided confidence interval (any part may be None)."""

    estimate: float | None
    ci_low: float | None
    ci_high: float | None

    def contains(self, value: float) -> bool:
        return self.ci_low is not None and self.ci_high is not None and self.ci_low <= value <= self.ci_high

    def to_dict(self) -> dict:
        return {"estimate": num(self.estimate), "ci_low": num(self.ci_low), "ci_high": num(self.ci_high)}


NO_INTERVAL = Interval(None, None, None)


@dataclass(frozen=True)
class TestResult:
    statistic: float | None
    pvalue: float | None
    method: str

    def to_dict(self) -> dict:
        return {"statistic": num(self.statistic), "pvalue": num(self.pvalue), "method": self.method}


@dataclass(frozen=True)
class Equivalence:
    """TOST on the mean log ratio: equivalent when both one-sided tests reject at alpha."""

    pvalue: float | None
    equivalent: bool | None
    margin: float  # the ratio may lie in [1/(1+margin), 1+margin]
    ratio: Interval  # geometric-mean ratio with its (1 - 2 alpha) interval, the TOST's own interval

    def to_dict(self) -> dict:
        return {
            "pvalue": num(self.pvalue), "equivalent": self.equivalent, "margin": num(self.margin),
            "bounds": [num(1 / (1 + self.margin)), num(1 + self.margin)],
            "geometric_mean_ratio": self.ratio.to_dict(),
        }


def _z(alpha: float) -> float:
    return NormalDist().inv_cdf(1 - alpha / 2)


# -- proportions ---------------------------------------------------------------------------------
def _wilson_bounds(x: float, n: float, alpha: float) -> tuple[float, float]:
    """Wilson score bounds, the formula statsmodels' `proportion_confint(method="wilson")` uses.

    Hand-written (two lines, tests/test_stats.py compares with statsmodels): statsmodels computes z
    with scipy's `norm.isf` at ~3.5 ms a call, and an evaluation needs ~26 Wilson intervals
    (Newcombe's, the design-effect ones, the Bonferroni levels): 0.1 s of a 0.2 s evaluation."""
    z = _z(alpha)
    p = x / n
    den = 1 + z * z / n
    center = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(max(0.0, p * (1 - p) / n + z * z / (4 * n * n))) / den
    return max(0.0, center - half), min(1.0, center + half)  # rounding can cross 0 or 1 by 1e-18


def wilson(successes: int, n: int, alpha: float = 0.05) -> Interval:
    """Wilson score interval for a single proportion."""
    if n <= 0:
        return NO_INTERVAL
    lo, hi = _wilson_bounds(int(successes), int(n), alpha)
    p = successes / n
    # at p = 0 or 1 the formula's bound misses the estimate by rounding (1e-17): clamp
    return Interval(p, min(float(lo), p), max(float(hi), p))


def newcombe_diff_paired(both: float, only_1: float, only_0: float, neither: float, alpha: float = 0.05) -> Interval:
    """Newcombe's square-and-add interval for p1 - p0 from paired binary outcomes (method 10).

    Cells: `both` = success on arm 1 and arm 0, `only_1` = success on arm 1 only, `only_0` = on
    arm 0 only, `neither`. p1 = (both + only_1)/n, p0 = (both + only_0)/n.

    Hand-written: statsmodels has no paired version of this interval. It combines the Wilson
    intervals of both marginal proportions with their estimated correlation phi, with the
    correction Newcombe (1998, Stat Med 17:2635) gives for phi (the numerator ad - bc is reduced
    by n/2 when positive, and to 0 when between 0 and n/2), as in Fagerland, Lydersen & Laake,
    "Statistical Analysis of Contingency Tables", ch. 8.
    """
    # counts may be fractional: `newcombe_clustered` passes a table scaled by 1/design effect
    a, b, c, d = (float(v) for v in (both, only_1, only_0, neither))
    n = a + b + c + d
    if n <= 0:
        return NO_INTERVAL
    p1, p0 = (a + b) / n, (a + c) / n
    l1, u1 = _wilson_bounds(a + b, n, alpha)
    l0, u0 = _wilson_bounds(a + c, n, alpha)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    if margins == 0:
        phi = 0.0
    else:
        num_ = float(a * d - b * c)
        if num_ > n / 2:
            num_ -= n / 2
        elif num_ >= 0:
            num_ = 0.0
        phi = num_ / math.sqrt(margins)
    diff = p1 - p0
    lower = diff - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u0 - p0) + (u0 - p0) ** 2))
    upper = diff + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p0 - l0) + (p0 - l0) ** 2))
    return Interval(diff, max(-1.0, lower), min(1.0, upper))


def design_effect(values: np.ndarray, clusters: np.ndarray | None) -> float:
    """Variance of the mean of `values` with schemas as clusters over its variance as if every value
    were independent (>= 1; 1 without clusters).

    Hand-written (two lines of sums; statsmodels' cluster-robust covariances need a fitted model):
    both variances carry the same finite-sample factor, so with one value per cluster the ratio is
    exactly 1. It is floored at 1: repeats of a schema never count as more than independent ones.
    """
    v = np.asarray(values, dtype=float)
    n = v.size
    if clusters is None or n < 2:
        return 1.0
    codes = np.unique(np.asarray(clusters), return_inverse=True)[1]
    g = int(codes.max()) + 1
    if g < 2 or g == n:
        return 1.0
    dev = v - v.mean()
    var_iid = float(np.sum(dev * dev)) / (n * (n - 1))
    totals = np.bincount(codes, weights=dev, minlength=g)
    var_cluster = g / (g - 1) * float(np.sum(totals * totals)) / n**2
    return 1.0 if var_iid <= 0 else max(1.0, var_cluster / var_iid)


def wilson_clustered(hits: np.ndarray, clusters: np.ndarray | None, alpha: float = 0.05) -> Interval:
    """Wilson interval for a proportion whose units are clustered by schema: Wilson at the effective
    sample size n / design effect (the count scaled alike), as in survey practice (Korn & Graubard);
    exactly `wilson` without clusters. Wilson's behaviour near 0 and 1 is what the bootstrap lacks
    (a cluster bootstrap of a proportion near 1 covered 0.71-0.88 in our simulation, this 0.95+)."""
    h = np.asarray(hits, dtype=bool)
    n = int(h.size)
    k = int(h.sum())
    deff = design_effect(h.astype(float), clusters)
    if deff == 1.0:
        return wilson(k, n, alpha)
    if n <= 0:
        return NO_INTERVAL
    lo, hi = _wilson_bounds(k / deff, n / deff, alpha)
    p = k / n
    return Interval(p, min(float(lo), p), max(float(hi), p))


def newcombe_clustered(cand: np.ndarray, ctrl: np.ndarray, clusters: np.ndarray | None,
                       alpha: float = 0.05) -> tuple[Interval, float]:
    """(interval of mean(cand) - mean(ctrl) over paired binary outcomes, design effect).

    Newcombe's paired interval (method 10) on the 2x2 table scaled by 1/design effect of the
    per-pair difference (Donner & Klar's adjustment for clustered binary data): repeats of a schema
    count once as much as they are correlated. Without clusters it is `newcombe_diff_paired` on the
    table itself. Chosen over a cluster bootstrap by simulation (tests/test_decision_rules.py and
    the report of issue 14): at 30-50 schemas with success rates near 1 the percentile and BCa
    cluster bootstraps covered 0.67-0.93, this 0.95-1.0, and at 50 schemas x 4 repeats at
    temperature 0 it covered 0.96 where the pair-level interval covered 0.67.
    """
    c, k = np.asarray(cand, dtype=bool), np.asarray(ctrl, dtype=bool)
    a, b, cc, d = (int(np.sum(c & k)), int(np.sum(c & ~k)), int(np.sum(~c & k)), int(np.sum(~c & ~k)))
    deff = design_effect(c.astype(float) - k.astype(float), clusters)
    if deff == 1.0:
        return newcombe_diff_paired(a, b, cc, d, alpha), 1.0
    f = 1.0 / deff
    iv = newcombe_diff_paired(a * f, b * f, cc * f, d * f, alpha)
    return Interval((b - cc) / max(1, a + b + cc + d), iv.ci_low, iv.ci_high), deff


def mcnemar_midp(only_1: int, only_0: int) -> TestResult:
    """McNemar's mid-p test of paired proportions: the exact conditional (binomial) p-value minus the
    probability of the observed discordant split (Fagerland, Lydersen & Laake 2013, BMC Med Res
    Methodol 13:91: closer to nominal than the exact test, which is too conservative).

    Hand-written from scipy's binomial distribution: statsmodels' `mcnemar` has only the exact and
    chi-square forms, and its `test_poisson_2indep(method="cond-midp")` subtracts half the point
    probability from a two-sided p-value, not the mid-p of the paper.
    """
    b, c = int(only_1), int(only_0)
    n = b + c
    if n == 0:
        return TestResult(None, 1.0, "mcnemar-mid-p")
    k = min(b, c)
    p = 2 * float(sps.binom.cdf(k, n, 0.5)) - float(sps.binom.pmf(k, n, 0.5))
    return TestResult(float(k), min(1.0, p), "mcnemar-mid-p")


def mcnemar_test(both: int, only_1: int, only_0: int, neither: int) -> TestResult:
    """McNemar's test of paired proportions (statsmodels); exact binomial when the discordant
    count is below 25, else chi-square with continuity correction."""
    b, c = int(only_1), int(only_0)
    exact = (b + c) < 25
    res = mcnemar([[int(both), b], [c, int(neither)]], exact=exact, correction=True)
    return TestResult(num(res.statistic), num(res.pvalue), "mcnemar-exact" if exact else "mcnemar-chi2-cc")


def sample_ratio_test(counts: Sequence[int], expected_shares: Sequence[float] | None = None) -> TestResult:
    """Chi-square goodness of fit of arm counts to the planned ratio (equal by default)."""
    obs = np.asarray(counts, dtype=float)
    if obs.size < 2 or obs.sum() <= 0:
        return TestResult(None, None, "chi-square")
    shares = np.full(obs.size, 1 / obs.size) if expected_shares is None else np.asarray(expected_shares, float)
    res = sps.chisquare(obs, f_exp=shares / shares.sum() * obs.sum())
    return TestResult(num(res.statistic), num(res.pvalue), "chi-square")


# -- descriptive ---------------------------------------------------------------------------------
def cv(x: np.ndarray) -> float | None:
    """Coefficient of variation, sample sd (ddof=1) over the mean."""
    x = np.asarray(x, dtype=float)
    if x.size < 2 or np.mean(x) == 0:
        return None
    return float(np.std(x, ddof=1) / np.mean(x))


def ratio(x: float | None, y: float | None) -> float | None:
    """x / y, or None when either is undefined or y is 0."""
    return None if x is None or y is None or y == 0 else x / y


# -- paired location tests ------------------------------------------------------------------------
def wilcoxon_signed_rank(control: np.ndarray, candidate: np.ndarray, *, log: bool = True,
                         clusters: np.ndarray | None = None) -> TestResult:
    """Wilcoxon signed-rank test of paired differences (of log values by default), scipy. With
    `clusters` (schemas with repeats) the test runs on each schema's mean difference: the schema,
    not the pair, is the independent unit."""
    a, b = np.asarray(control, float), np.asarray(candidate, float)
    keep = np.isfinite(a) & np.isfinite(b) & ((a > 0) & (b > 0) if log else True)
    d = (np.log(b[keep]) - np.log(a[keep])) if log else (b[keep] - a[keep])
    if clusters is not None and d.size:
        codes = np.unique(np.asarray(clusters)[keep], return_inverse=True)[1]
        d = np.bincount(codes, weights=d) / np.bincount(codes)
    if d.size < 2 or not np.any(d != 0):
        return TestResult(None, None if d.size < 2 else 1.0, "wilcoxon")
    res = sps.wilcoxon(d)
    return TestResult(num(res.statistic), num(res.pvalue), "wilcoxon")


def tost_log_ratio(control: np.ndarray, candidate: np.ndarray, margin: float, alpha: float = 0.05) -> Equivalence:
    """Equivalence of candidate/control latency: TOST (statsmodels `ttost_paired`) on log values
    with bounds log(1/(1+margin)) .. log(1+margin), and the geometric-mean ratio with its
    (1 - 2 alpha) interval (the interval the TOST decision corresponds to)."""
    a, b = np.asarray(control, float), np.asarray(candidate, float)
    keep = np.isfinite(a) & np.isfinite(b) & (a > 0) & (b > 0)
    la, lb = np.log(a[keep]), np.log(b[keep])
    bound = math.log1p(margin)
    n = la.size
    if n < 2:
        return Equivalence(None, None, margin, NO_INTERVAL)
    d = lb - la
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0:
        eq = -bound < mean < bound
        return Equivalence(0.0 if eq else 1.0, eq, margin, Interval(math.exp(mean), math.exp(mean), math.exp(mean)))
    p, _, _ = ttost_paired(lb, la, -bound, bound)
    half = float(sps.t.ppf(1 - alpha, n - 1)) * sd / math.sqrt(n)
    return Equivalence(num(p), bool(p < alpha), margin,
                       Interval(math.exp(mean), math.exp(mean - half), math.exp(mean + half)))


def holm(pvalues: Sequence[float | None], alpha: float = 0.05) -> list[float | None]:
    """Holm step-down adjusted p-values; None entries stay None and are not counted.

    Hand-written (the same three lines as statsmodels `multipletests(method="holm")`, which
    tests/test_stats.py compares against): statsmodels calls `gc.collect()` on every Holm call,
    ~0.1 s in a large process, which dominated `simulate`.
    """
    idx = [i for i, p in enumerate(pvalues) if num(p) is not None]
    out: list[float | None] = [None] * len(pvalues)
    if idx:
        p = np.array([float(pvalues[i]) for i in idx])  # type: ignore[arg-type]
        order = np.argsort(p, kind="mergesort")
        m = p.size
        adj_sorted = np.minimum(np.maximum.accumulate(p[order] * np.arange(m, 0, -1)), 1.0)
        adj = np.empty(m)
        adj[order] = adj_sorted
        for i, v in zip(idx, adj):
            out[i] = float(v)
    return out


# -- power: minimum detectable effect and the sample size that settles a margin --------------------
# One-sample normal power on a per-pair standard deviation `sd_unit`: a two-sided (1 - alpha)
# interval clears a bound on one side, i.e. a one-sided test at alpha/2. This is statsmodels'
# NormalIndPower(ratio=0, alternative="larger") at alpha/2, whose solution is closed-form:
# effect/sd = (z_{1-alpha/2} + z_power) / sqrt(n). The closed form is used because solve_power's
# root finder costs ~10 ms a call; tests/test_stats.py checks both agree.
def _z_sum(alpha: float, power: float) -> float:
    nd = NormalDist()
    return nd.inv_cdf(1 - alpha / 2) + nd.inv_cdf(power)


def mde(sd_unit: float | None, n: int, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """Smallest true effect (in the units of sd_unit) detected with `power` at n pairs."""
    if n < 2 or not sd_unit or not math.isfinite(sd_unit):
        return None
    return _z_sum(alpha, power) / math.sqrt(n) * sd_unit


def n_needed(effect: float, sd_unit: float | None, alpha: float = 0.05, power: float = 0.8,
             cap: int = 10**9) -> int | None:
    """Pairs needed for a (1 - alpha) interval to exclude a bound `effect` away, with `power`;
    None when that is not reachable (no effect, or beyond `cap`)."""
    effect = abs(effect)
    if not sd_unit or not math.isfinite(sd_unit) or effect <= 0:
        return None
    n = (_z_sum(alpha, power) * sd_unit / effect) ** 2
    return None if n > cap else int(math.ceil(n))


def paired_proportion_sd(both: int, only_1: int, only_0: int, neither: int) -> float:
    """Per-pair sd of the success difference (floored at 1/sqrt(n) so a table without discordant
    pairs does not claim infinite precision)."""
    n = both + only_1 + only_0 + neither
    if n == 0:
        return float("nan")
    p10, p01 = only_1 / n, only_0 / n
    return math.sqrt(max(p10 + p01 - (p10 - p01) ** 2, 1.0 / n))


def mde_paired_proportion(n_pairs: int, sd_unit: float, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """Minimum detectable success-rate difference (absolute) at n pairs."""
    return mde(sd_unit, n_pairs, alpha, power)


def sd_unit_from_interval(ci_low: float | None, ci_high: float | None, n: int, alpha: float = 0.05,
                          log: bool = False) -> float | None:
    """Per-pair sd implied by an interval's width (normal approximation; log scale for ratios)."""
    if ci_low is None or ci_high is None or n < 1:
        return None
    if log:
        if ci_low <= 0 or ci_high <= 0:
            return None
        ci_low, ci_high = math.log(ci_low), math.log(ci_high)
    width = ci_high - ci_low
    return width / (2 * _z(alpha)) * math.sqrt(n) if width > 0 else None


def mde_ratio(n_pairs: int, sd_log_unit: float | None, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """Minimum detectable latency ratio change at n pairs, as a fraction (0.1 = 10% faster/slower)."""
    m = mde(sd_log_unit, n_pairs, alpha, power) if sd_log_unit else None
    return None if m is None else math.expm1(m)
