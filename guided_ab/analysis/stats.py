"""Statistical methods for the A/B evaluation: small functions returning small result objects.

Library first: scipy and statsmodels do the work wherever they have the method (Wilson,
Newcombe for independent samples, McNemar, Wilcoxon, TOST). Hand-written pieces are marked
"hand-written" below with the reason; besides two small ones (Holm and the closed-form normal
power, both faster than statsmodels' and tested against it) they are:

- Newcombe's interval for the difference of *paired* proportions (his method 10):
  statsmodels 0.14/0.15 has only the independent-samples version
  (`confint_proportions_2indep(method="newcomb")`).
- The percentile bootstrap of quantiles by order statistics (`bootstrap_quantile_draws`), and
- the count-matrix bootstrap engine (`CountBootstrap`) for means, CVs and *paired* quantile
  ratios. `scipy.stats.bootstrap` materialises a B x n resample for every statistic (about
  3 s per statistic at n = 50,000, B = 2,000 on one core, and BCa adds an O(n^2) jackknife for
  quantiles); an evaluation needs ~40 such statistics. Both hand-written pieces compute the
  same percentile-bootstrap distribution as resampling with replacement and taking
  `np.quantile`/`np.mean` (tests/test_stats.py checks them against brute force and against
  `scipy.stats.bootstrap`).

No function here prints; non-finite results are returned as None in the `to_dict()` forms.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np
from scipy import stats as sps
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.proportion import confint_proportions_2indep, proportion_confint
from statsmodels.stats.weightstats import ttost_paired

QUANTILES: dict[str, float] = {"p50": 0.50, "p95": 0.95, "p99": 0.99}
# below this many observations a p99 rests on < 4 points beyond it: reported, flagged descriptive
# (MLPerf's minimum query counts make the same point for tail percentiles)
P99_MIN_N = 400
# below this many units a percentile bootstrap has too few distinct resamples to mean anything
# (with n = 1 every resample is the sample): estimates are reported, intervals are not
MIN_BOOTSTRAP_N = 10


def num(x: object) -> float | None:
    """A plain float, or None for None/NaN/inf (JSON has no NaN)."""
    if x is None:
        return None
    try:
        v = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def jsonable(obj: object) -> object:
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


def _z(alpha: float) -> float:
    return NormalDist().inv_cdf(1 - alpha / 2)


# -- proportions ---------------------------------------------------------------------------------
def wilson(successes: int, n: int, alpha: float = 0.05) -> Interval:
    """Wilson score interval for a single proportion (statsmodels)."""
    if n <= 0:
        return NO_INTERVAL
    lo, hi = proportion_confint(int(successes), int(n), alpha=alpha, method="wilson")
    p = successes / n
    # at p = 0 or 1 the formula's bound misses the estimate by rounding (1e-17): clamp
    return Interval(p, min(float(lo), p), max(float(hi), p))


def newcombe_diff_independent(x1: int, n1: int, x0: int, n0: int, alpha: float = 0.05) -> Interval:
    """Newcombe's hybrid score interval for p1 - p0, independent samples (statsmodels "newcomb")."""
    if n1 <= 0 or n0 <= 0:
        return NO_INTERVAL
    lo, hi = confint_proportions_2indep(int(x1), int(n1), int(x0), int(n0), method="newcomb", alpha=alpha)
    return Interval(x1 / n1 - x0 / n0, float(lo), float(hi))


def newcombe_diff_paired(both: int, only_1: int, only_0: int, neither: int, alpha: float = 0.05) -> Interval:
    """Newcombe's square-and-add interval for p1 - p0 from paired binary outcomes (method 10).

    Cells: `both` = success on arm 1 and arm 0, `only_1` = success on arm 1 only, `only_0` = on
    arm 0 only, `neither`. p1 = (both + only_1)/n, p0 = (both + only_0)/n.

    Hand-written: statsmodels has no paired version of this interval. It combines the Wilson
    intervals of both marginal proportions with their estimated correlation phi, with the
    correction Newcombe (1998, Stat Med 17:2635) gives for phi (the numerator ad - bc is reduced
    by n/2 when positive, and to 0 when between 0 and n/2), as in Fagerland, Lydersen & Laake,
    "Statistical Analysis of Contingency Tables", ch. 8.
    """
    a, b, c, d = (int(v) for v in (both, only_1, only_0, neither))
    n = a + b + c + d
    if n <= 0:
        return NO_INTERVAL
    p1, p0 = (a + b) / n, (a + c) / n
    l1, u1 = proportion_confint(a + b, n, alpha=alpha, method="wilson")
    l0, u0 = proportion_confint(a + c, n, alpha=alpha, method="wilson")
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    if margins == 0:
        phi = 0.0
    else:
        num_ = a * d - b * c
        if num_ > n / 2:
            num_ -= n / 2
        elif num_ >= 0:
            num_ = 0.0
        phi = num_ / math.sqrt(margins)
    diff = p1 - p0
    lower = diff - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u0 - p0) + (u0 - p0) ** 2))
    upper = diff + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p0 - l0) + (p0 - l0) ** 2))
    return Interval(diff, max(-1.0, lower), min(1.0, upper))


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


# -- bootstrap: quantiles by order statistics -----------------------------------------------------
def bootstrap_quantile_draws(sorted_x: np.ndarray, q: float, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """B draws from the bootstrap distribution of `np.quantile(x, q)` (linear interpolation).

    Hand-written because it costs O(B) instead of O(B n): with indices I = ceil(m U), U uniform,
    the k-th smallest resampled index is ceil(m U_(k)), and the uniform order statistics follow
    from m + 1 exponential spacings: U_(k) = G/T, U_(k+1) = (G + E)/T with G ~ Gamma(k),
    E ~ Exp(1), T = G + E + Gamma(m - k). So the draws have exactly the distribution of the
    quantile of a resample with replacement (tests compare against brute force).
    """
    m = int(sorted_x.size)
    if m == 0:
        return np.full(resamples, np.nan)
    if m == 1:
        return np.full(resamples, float(sorted_x[0]))
    h = (m - 1) * q
    j = int(math.floor(h))
    frac = h - j
    k = j + 1  # 1-based rank of the lower order statistic
    g = rng.standard_gamma(k, resamples)
    e = rng.standard_exponential(resamples)
    t = g + e + (rng.standard_gamma(m - k, resamples) if m - k > 0 else 0.0)
    i1 = np.clip(np.ceil(m * (g / t)).astype(np.int64) - 1, 0, m - 1)
    lo = sorted_x[i1]
    if frac == 0.0:
        return lo.astype(float)
    i2 = np.clip(np.ceil(m * ((g + e) / t)).astype(np.int64) - 1, 0, m - 1)
    return lo + frac * (sorted_x[i2] - lo)


def _quantiles(d: np.ndarray, qs: Sequence[float]) -> list[float]:
    """np.quantile(d, qs) (linear interpolation) via one partial sort (less overhead per call)."""
    m = d.size
    hs = [(m - 1) * q for q in qs]
    ks = sorted({min(int(math.floor(h)) + i, m - 1) for h in hs for i in (0, 1)})
    part = np.partition(d, ks)
    out = []
    for h in hs:
        j = int(math.floor(h))
        a, b = part[j], part[min(j + 1, m - 1)]
        out.append(float(a + (h - j) * (b - a)))
    return out


def sorted_quantile(xs: np.ndarray, q: float) -> float | None:
    """np.quantile(xs, q) for an already sorted array (linear interpolation)."""
    m = xs.size
    if m == 0:
        return None
    h = (m - 1) * q
    j = int(math.floor(h))
    a, b = xs[j], xs[min(j + 1, m - 1)]
    return float(a + (h - j) * (b - a))


def percentile_interval(estimate: float | None, draws: np.ndarray, alpha: float = 0.05,
                        n: int | None = None) -> Interval:
    """Percentile-bootstrap interval from B draws of a statistic of n units (no interval when n is
    below MIN_BOOTSTRAP_N or more than 10% of the draws are undefined)."""
    d = np.asarray(draws, dtype=float)
    total = d.size
    d = d[np.isfinite(d)]
    if estimate is None or (n is not None and n < MIN_BOOTSTRAP_N) or d.size < max(20, 0.9 * total):
        return Interval(num(estimate), None, None)
    lo, hi = _quantiles(d, (alpha / 2, 1 - alpha / 2))
    return Interval(num(estimate), lo, hi)


# -- bootstrap: count-matrix engine ---------------------------------------------------------------
@dataclass
class _QSpec:
    count_col: int
    labels: np.ndarray  # valid unit labels sorted by value
    values: np.ndarray  # their values, ascending
    qs: tuple[float, ...]
    windows: list[tuple[int, int, int | None]]  # (lo, hi, column of the "rank < lo" indicator)


class CountBootstrap:
    """A percentile bootstrap over n units (pairs) computing many statistics in one pass.

    Hand-written for speed (see the module docstring). Each resample is a row of counts
    C[b, i] = how often unit i was drawn (n draws with replacement), built in row chunks.
    - Linear statistics (sums of any per-unit column, so means, variances, ratios of means and
      CVs on any subset) are C @ X, one matrix product for all of them.
    - Quantiles of a subset's values on the same resample (needed *jointly* for paired ratios)
      come from the cumulative counts in value order; only a window of sorted positions around
      the quantile is touched (the count below the window is one more column of X), and any
      resample whose quantile falls outside the window is recomputed in full, so results are
      exactly those of `np.quantile` on the explicit resample.
    """

    def __init__(self, n_units: int, resamples: int, rng: np.random.Generator, max_cells: int = 4_000_000):
        self.n = int(n_units)
        self.B = int(resamples)
        self.rng = rng
        self.max_cells = max_cells
        self._cols: list[np.ndarray] = []
        self._specs: list[_QSpec] = []

    def column(self, values: np.ndarray) -> int:
        """Register a per-unit column; returns its index in `run()`'s sums (NaN counts as 0)."""
        v = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if v.shape != (self.n,):
            raise ValueError(f"column has shape {v.shape}, expected ({self.n},)")
        self._cols.append(v)
        return len(self._cols) - 1

    def quantiles(self, values: np.ndarray, valid: np.ndarray, qs: Iterable[float]) -> int:
        """Register quantiles of `values[valid]` (per resample); returns a handle for `run()`."""
        values = np.asarray(values, dtype=np.float64)
        valid = np.asarray(valid, dtype=bool) & np.isfinite(values)
        labels = np.flatnonzero(valid)
        order = np.argsort(values[labels], kind="stable")
        labels, sorted_vals = labels[order], values[labels][order]
        count_col = self.column(valid.astype(np.float64))
        nv = labels.size
        windows = []
        for q in qs:
            if nv <= 4096:  # small: the whole range is cheap
                windows.append((0, nv, None))
                continue
            # sd of the rank at which the resample's quantile sits: binomial counts below the
            # quantile, plus the variation of the resampled subset size
            sd = math.sqrt(nv * q * (1 - q)) + q * math.sqrt(nv * max(0.0, 1 - nv / self.n))
            w = int(math.ceil(8 * sd)) + 16
            t0 = q * (nv - 1)
            lo, hi = max(0, int(t0) - w), min(nv, int(math.ceil(t0)) + w + 2)
            below = None
            if lo > 0:
                ind = np.zeros(self.n)
                ind[labels[:lo]] = 1.0
                below = self.column(ind)
            windows.append((lo, hi, below))
        self._specs.append(_QSpec(count_col, labels, sorted_vals, tuple(qs), windows))
        return len(self._specs) - 1

    def _counts(self, rows: int) -> np.ndarray:
        n = self.n
        idx = self.rng.integers(0, n, size=(rows, n), dtype=np.int32 if n < 2**31 else np.int64)
        if n <= 4096:
            flat = idx.astype(np.int64) + (np.arange(rows, dtype=np.int64) * n)[:, None]
            return np.bincount(flat.ravel(), minlength=rows * n).reshape(rows, n).astype(np.float64)
        c = np.empty((rows, n), dtype=np.float64)
        for r in range(rows):  # per row: the histogram fits in cache (a flat bincount does not)
            c[r] = np.bincount(idx[r], minlength=n)
        return c

    def run(self) -> tuple[np.ndarray, list[np.ndarray]]:
        """(sums (B x columns), [quantiles (B x len(qs)) per registered quantile set])."""
        B, n = self.B, self.n
        X = np.column_stack(self._cols) if self._cols else np.zeros((n, 0))
        sums = np.empty((B, X.shape[1]))
        qout = [np.full((B, len(s.qs)), np.nan) for s in self._specs]
        if n == 0:
            return np.full((B, X.shape[1]), np.nan), qout
        step = max(1, min(B, self.max_cells // max(n, 1)))
        for start in range(0, B, step):
            rows = min(step, B - start)
            C = self._counts(rows)
            S = self._product(C, X)
            sums[start:start + rows] = S
            for spec, out in zip(self._specs, qout):
                m = S[:, spec.count_col]
                cache: dict[tuple[int, int], np.ndarray] = {}
                for qi, (q, (lo, hi, below_col)) in enumerate(zip(spec.qs, spec.windows)):
                    out[start:start + rows, qi] = self._window_quantile(C, S, m, spec, q, lo, hi, below_col, cache)
        return sums, qout

    @staticmethod
    def _product(C: np.ndarray, X: np.ndarray) -> np.ndarray:
        """C @ X. Small products go in row blocks under OpenBLAS's threading threshold
        (m*n*k <= 262,144): on products this small its threads cost ~5x the CPU of one thread
        (measured), which dominated `simulate` on a busy machine."""
        block = 262_144 // max(1, C.shape[1] * X.shape[1])
        if block < 8 or block >= C.shape[0]:
            return C @ X
        return np.vstack([C[i:i + block] @ X for i in range(0, C.shape[0], block)])

    @staticmethod
    def _window_quantile(C, S, m, spec: _QSpec, q, lo, hi, below_col, cache: dict) -> np.ndarray:
        rows = C.shape[0]
        res = np.full(rows, np.nan)
        has = m >= 1
        if not has.any() or hi <= lo:
            return res
        h = np.where(has, (m - 1) * q, 0.0)
        j = np.floor(h)
        frac = h - j
        j2 = np.minimum(j + 1, np.maximum(m - 1, 0))
        below = S[:, below_col] if below_col is not None else np.zeros(rows)
        w = hi - lo
        off = np.arange(rows) * float(C.shape[1] + 1)
        if (lo, hi) not in cache:
            # cumulative counts in value order; rows made globally increasing by an offset larger
            # than any count, so one search finds every row's position
            cum = np.cumsum(C[:, spec.labels[lo:hi]], axis=1)
            cum += (below + off)[:, None]
            cache[(lo, hi)] = cum.ravel()
        flat = cache[(lo, hi)]
        ok = has & (below <= j) & (flat[np.arange(1, rows + 1) * w - 1] - off > j2)
        p1 = np.searchsorted(flat, j + off, side="right") - np.arange(rows) * w
        p2 = np.searchsorted(flat, j2 + off, side="right") - np.arange(rows) * w
        p1, p2 = np.clip(p1, 0, w - 1), np.clip(p2, 0, w - 1)
        v1, v2 = spec.values[lo + p1], spec.values[lo + p2]
        res[ok] = (v1 + frac * (v2 - v1))[ok]
        for r in np.flatnonzero(has & ~ok):  # outside the window (very rare): the whole row
            full = np.cumsum(C[r, spec.labels])
            a = spec.values[np.searchsorted(full, j[r], side="right")]
            b = spec.values[np.searchsorted(full, j2[r], side="right")]
            res[r] = a + frac[r] * (b - a)
        return res


# -- bootstrap: public conveniences ---------------------------------------------------------------
def _moments(sums: np.ndarray, cnt: int, s1: int, s2: int, center: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-resample mean and sample sd (ddof=1) from sums of a centred column and its square."""
    m = sums[:, cnt]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_c = sums[:, s1] / m
        var = (sums[:, s2] - m * mean_c**2) / (m - 1)
        return center + mean_c, np.sqrt(np.maximum(var, 0.0))


def cv(x: np.ndarray) -> float | None:
    """Coefficient of variation, sample sd (ddof=1) over the mean."""
    x = np.asarray(x, dtype=float)
    if x.size < 2 or np.mean(x) == 0:
        return None
    return float(np.std(x, ddof=1) / np.mean(x))


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
    means, sds = _moments(sums, one, s1, s2, center)
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


def _ratio(x: float | None, y: float | None) -> float | None:
    return None if x is None or y is None or y == 0 else x / y


def register_paired(eng: CountBootstrap, ctrl: np.ndarray, cand: np.ndarray, valid: np.ndarray) -> dict:
    """Register the columns/quantiles a paired ratio comparison needs on an engine."""
    cc, ca = (float(np.mean(ctrl[valid])), float(np.mean(cand[valid]))) if valid.any() else (0.0, 0.0)
    v = valid.astype(float)
    return {
        "valid": valid, "center": (cc, ca),
        "cnt": eng.column(v),
        "ctrl": (eng.column(np.where(valid, ctrl - cc, 0.0)), eng.column(np.where(valid, (ctrl - cc) ** 2, 0.0))),
        "cand": (eng.column(np.where(valid, cand - ca, 0.0)), eng.column(np.where(valid, (cand - ca) ** 2, 0.0))),
        "q_ctrl": eng.quantiles(ctrl, valid, (0.5, 0.95)),
        "q_cand": eng.quantiles(cand, valid, (0.5, 0.95)),
    }


def paired_intervals(reg: dict, sums: np.ndarray, qdraws: list[np.ndarray], ctrl: np.ndarray, cand: np.ndarray,
                     alpha: float) -> dict[str, Interval]:
    """Ratio intervals (mean, p50, p95, cv) from an engine run set up by `register_paired`."""
    valid = reg["valid"]
    a, b = ctrl[valid], cand[valid]
    if a.size == 0:
        return {k: NO_INTERVAL for k in ("mean", "p50", "p95", "cv")}
    cc, ca = reg["center"]
    mean_a, sd_a = _moments(sums, reg["cnt"], *reg["ctrl"], cc)
    mean_b, sd_b = _moments(sums, reg["cnt"], *reg["cand"], ca)
    qa, qb = qdraws[reg["q_ctrl"]], qdraws[reg["q_cand"]]
    with np.errstate(invalid="ignore", divide="ignore"):
        draws = {"mean": mean_b / mean_a, "p50": qb[:, 0] / qa[:, 0], "p95": qb[:, 1] / qa[:, 1],
                 "cv": (sd_b / mean_b) / (sd_a / mean_a)}
    est = {
        "mean": _ratio(float(b.mean()), float(a.mean())),
        "p50": _ratio(float(np.quantile(b, 0.5)), float(np.quantile(a, 0.5))),
        "p95": _ratio(float(np.quantile(b, 0.95)), float(np.quantile(a, 0.95))),
        "cv": _ratio(cv(b), cv(a)),
    }
    return {k: percentile_interval(est[k], draws[k], alpha, int(a.size)) for k in draws}


def _paired_ratios(a, b, valid, resamples, alpha, rng) -> dict[str, Interval]:
    eng = CountBootstrap(a.size, resamples, rng)
    reg = register_paired(eng, a, b, valid)
    sums, qd = eng.run()
    return paired_intervals(reg, sums, qd, a, b, alpha)


# -- paired location tests ------------------------------------------------------------------------
def wilcoxon_signed_rank(control: np.ndarray, candidate: np.ndarray, *, log: bool = True) -> TestResult:
    """Wilcoxon signed-rank test of paired differences (of log values by default), scipy."""
    a, b = np.asarray(control, float), np.asarray(candidate, float)
    keep = np.isfinite(a) & np.isfinite(b) & ((a > 0) & (b > 0) if log else True)
    d = (np.log(b[keep]) - np.log(a[keep])) if log else (b[keep] - a[keep])
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
