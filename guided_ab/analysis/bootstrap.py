"""The percentile bootstrap of the A/B evaluation: the resampling engine, hand-written for speed.

`scipy.stats.bootstrap` materialises a B x n resample for every statistic (about 3 s per
statistic at n = 50,000, B = 2,000 on one core, and BCa adds an O(n^2) jackknife for
quantiles); an evaluation needs ~40 such statistics. The two pieces here compute the same
percentile-bootstrap distribution as resampling with replacement and taking
`np.quantile`/`np.mean` (tests/test_stats.py checks them against brute force and against
`scipy.stats.bootstrap`):

- `bootstrap_quantile_draws`: quantiles of one sample by order statistics, O(B) per quantile;
- `CountBootstrap`: one pass over count-matrix resamples of the units (pairs) for every linear
  statistic (means, variances, CVs) and for quantiles needed *jointly* on the same resample
  (paired quantile ratios). `register_paired`/`paired_intervals` set up and read out a paired
  comparison on it. With `clusters` (the schema of each pair) it is a *cluster* bootstrap: it
  draws schemas with replacement and every pair of a drawn schema comes with it, since repeats of
  a schema are not independent; without clusters (one pair per schema) it is exactly the pair
  bootstrap it always was, draw for draw.
- `interval_family`: one statistic's percentile interval at the nominal level and at the
  Bonferroni levels the decision rule needs (`adjusted`), from the same draws.

Separate from `stats.py` because it is the one costly, stateful part (an engine consuming the
random generator in a fixed order); the closed-form methods there do not depend on it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from guided_ab.analysis.stats import NO_INTERVAL, Interval, cv, num, ratio

# below this many units a percentile bootstrap has too few distinct resamples to mean anything
# (with n = 1 every resample is the sample): estimates are reported, intervals are not
MIN_BOOTSTRAP_N = 10

# Intervals of statistics ruled by the latency tail (the CV and CV ratio, the mean ratios) are
# percentile intervals computed at level 1 - alpha/TAIL_EXPAND and reported as the 1 - alpha ones.
# Why: the sample CV of latencies (lognormal-like, a schema effect, a slow mode, stalls)
# has a heavier-tailed sampling distribution than its bootstrap distribution, and no standard
# bootstrap interval fixed that in our simulation (paired, true CV ratio 1, 30 / 50 / 200 pairs,
# 500-800 runs per cell): percentile covered 0.90-0.94, BCa 0.82-0.89 (scipy.stats.bootstrap's
# BCa agreed), a log-scale studentized bootstrap 0.77-0.93 (influence-function or jackknife SEs),
# a sd-ratio double-bootstrap correction 0.92-0.94. The percentile interval's misses are
# symmetric, and at level 1 - 0.05/2.5 it covered 0.953-0.982 over lognormal, bimodal and gamma
# latencies at every size: an expanded percentile interval, the calibration measured, not derived.
# Means of latencies and of output tokens suffer the same way, less (0.885-0.965 plain, in the
# realistic scenarios of scenarios.py at 30-200 pairs).
TAIL_EXPAND = 2.5


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
    qs: list[float]
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

    def __init__(self, n_units: int, resamples: int, rng: np.random.Generator, max_cells: int = 4_000_000,
                 clusters: np.ndarray | None = None):
        self.n = int(n_units)
        self.B = int(resamples)
        self.rng = rng
        self.max_cells = max_cells
        self._cols: list[np.ndarray] = []
        self._specs: list[_QSpec] = []
        # a registration (handle) reads quantiles of one spec; registrations of the same values on the
        # same units share it (a per-arm and a paired latency usually do): one cumulative count each
        self._handles: list[tuple[int, list[int]]] = []
        self._spec_of: dict[tuple[bytes, bytes], int] = {}
        # clusters: unit -> cluster label 0..G-1; counts are drawn per cluster and expanded to its units
        self.cluster = None if clusters is None else np.asarray(clusters, dtype=np.int64)
        if self.cluster is not None and self.cluster.shape != (self.n,):
            raise ValueError(f"clusters has shape {self.cluster.shape}, expected ({self.n},)")
        self.G = self.n if self.cluster is None or self.n == 0 else int(self.cluster.max()) + 1
        sizes = np.bincount(self.cluster, minlength=self.G) if self.cluster is not None else None
        # a resampled count varies by the cluster sizes: widen the quantile windows by the design effect
        self._spread = 1.0 if sizes is None or self.n == 0 else math.sqrt(float(np.sum(sizes**2)) / self.n)

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
        key = (labels.tobytes(), sorted_vals.tobytes())
        if key not in self._spec_of:
            self._spec_of[key] = len(self._specs)
            self._specs.append(_QSpec(self.column(valid.astype(np.float64)), labels, sorted_vals, [], []))
        si = self._spec_of[key]
        spec = self._specs[si]
        idx = []
        for q in qs:
            if q not in spec.qs:
                spec.qs.append(q)
                spec.windows.append(self._window(spec, q))
            idx.append(spec.qs.index(q))
        self._handles.append((si, idx))
        return len(self._handles) - 1

    def _window(self, spec: _QSpec, q: float) -> tuple[int, int, int | None]:
        """The sorted positions a resample's q-quantile is looked for in (the whole range when small)."""
        nv = spec.labels.size
        if nv <= 4096:  # small: the whole range is cheap
            return (0, nv, None)
        # sd of the rank at which the resample's quantile sits: binomial counts below the
        # quantile, plus the variation of the resampled subset size
        sd = (math.sqrt(nv * q * (1 - q)) + q * math.sqrt(nv * max(0.0, 1 - nv / self.n))) * self._spread
        w = int(math.ceil(6 * sd)) + 16  # beyond 6 sd (~1e-9 of rows) the exact fallback runs
        t0 = q * (nv - 1)
        lo, hi = max(0, int(t0) - w), min(nv, int(math.ceil(t0)) + w + 2)
        below = None
        if lo > 0:
            ind = np.zeros(self.n)
            ind[spec.labels[:lo]] = 1.0
            below = self.column(ind)
        return (lo, hi, below)

    def _counts(self, rows: int) -> np.ndarray:
        """`rows` resamples as unit counts: per cluster (expanded to its units) when clustered."""
        if self.cluster is None:
            return self._draw(rows, self.n)
        return self._draw(rows, self.G)[:, self.cluster]

    def _draw(self, rows: int, n: int) -> np.ndarray:
        """rows x n counts of n draws with replacement from n items."""
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
        specs_out = [np.full((B, len(s.qs)), np.nan) for s in self._specs]
        if n == 0:
            return np.full((B, X.shape[1]), np.nan), [specs_out[si][:, idx] for si, idx in self._handles]
        step = max(1, min(B, self.max_cells // max(n, 1)))
        for start in range(0, B, step):
            rows = min(step, B - start)
            C = self._counts(rows)
            S = self._product(C, X)
            sums[start:start + rows] = S
            for spec, out in zip(self._specs, specs_out):
                m = S[:, spec.count_col]
                cache: dict[tuple[int, int], np.ndarray] = {}
                for qi, (q, (lo, hi, below_col)) in enumerate(zip(spec.qs, spec.windows)):
                    out[start:start + rows, qi] = self._window_quantile(C, S, m, spec, q, lo, hi, below_col, cache)
        return sums, [specs_out[si][:, idx] for si, idx in self._handles]

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


# -- reading the engine's sums out: moments and paired ratios --------------------------------------
def moments(sums: np.ndarray, cnt: int, s1: int, s2: int, center: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-resample mean and sample sd (ddof=1) from sums of a centred column and its square."""
    m = sums[:, cnt]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_c = sums[:, s1] / m
        var = (sums[:, s2] - m * mean_c**2) / (m - 1)
        return center + mean_c, np.sqrt(np.maximum(var, 0.0))


def register_paired(eng: CountBootstrap, ctrl: np.ndarray, cand: np.ndarray, valid: np.ndarray,
                    qs: tuple[float, ...] = (0.5, 0.95), moments: bool = True) -> dict:
    """Register the columns/quantiles a paired ratio comparison needs on an engine: the quantiles
    `qs` of each arm (the p50 and p95 ratios by default) and, with `moments`, the columns of the
    mean and CV ratios (every registered column and quantile set costs time at 50k pairs)."""
    cc, ca = (float(np.mean(ctrl[valid])), float(np.mean(cand[valid]))) if valid.any() else (0.0, 0.0)
    v = valid.astype(float)
    reg: dict = {"valid": valid, "center": (cc, ca), "qs": tuple(qs), "cnt": eng.column(v)}
    if moments:
        reg["ctrl"] = (eng.column(np.where(valid, ctrl - cc, 0.0)), eng.column(np.where(valid, (ctrl - cc) ** 2, 0.0)))
        reg["cand"] = (eng.column(np.where(valid, cand - ca, 0.0)), eng.column(np.where(valid, (cand - ca) ** 2, 0.0)))
    if qs:
        reg["q_ctrl"] = eng.quantiles(ctrl, valid, qs)
        reg["q_cand"] = eng.quantiles(cand, valid, qs)
    return reg


_Q_NAMES = {0.5: "p50", 0.95: "p95", 0.99: "p99"}


def paired_draws(reg: dict, sums: np.ndarray, qdraws: list[np.ndarray], ctrl: np.ndarray,
                 cand: np.ndarray) -> tuple[dict[str, float | None], dict[str, np.ndarray]]:
    """({statistic: estimate}, {statistic: B draws}) of the ratios candidate/control (mean, the
    registered quantiles, cv) from an engine run set up by `register_paired`; ({}, {}) without pairs."""
    valid = reg["valid"]
    a, b = ctrl[valid], cand[valid]
    if a.size == 0:
        return {}, {}
    cc, ca = reg["center"]
    draws: dict[str, np.ndarray] = {}
    est: dict[str, float | None] = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        if "ctrl" in reg:
            (a1, a2), (b1, b2) = reg["ctrl"], reg["cand"]
            mean_a, sd_a = moments(sums, reg["cnt"], a1, a2, cc)
            mean_b, sd_b = moments(sums, reg["cnt"], b1, b2, ca)
            draws = {"mean": mean_b / mean_a, "cv": (sd_b / mean_b) / (sd_a / mean_a)}
            est = {"mean": ratio(float(b.mean()), float(a.mean())), "cv": ratio(cv(b), cv(a))}
        for i, q in enumerate(reg["qs"]):
            qa, qb = qdraws[reg["q_ctrl"]], qdraws[reg["q_cand"]]
            name = _Q_NAMES.get(q, f"q{q:g}")
            draws[name] = qb[:, i] / qa[:, i]
            est[name] = ratio(float(np.quantile(b, q)), float(np.quantile(a, q)))
    return est, draws


def paired_intervals(reg: dict, sums: np.ndarray, qdraws: list[np.ndarray], ctrl: np.ndarray, cand: np.ndarray,
                     alpha: float) -> dict[str, Interval]:
    """Ratio intervals (mean, the registered quantiles, cv) from an engine run set up by `register_paired`."""
    est, draws = paired_draws(reg, sums, qdraws, ctrl, cand)
    if not draws:
        names = ("mean", "cv") if "ctrl" in reg else ()
        return {k: NO_INTERVAL for k in (*names, *(_Q_NAMES.get(q, f"q{q:g}") for q in reg["qs"]))}
    n = int(reg["valid"].sum())
    return {k: percentile_interval(est[k], draws[k], alpha, n) for k in draws}


def interval_family(estimate: float | None, draws: np.ndarray, alpha: float, n: int,
                    family_sizes: Iterable[int] = (), expand: float = 1.0) -> dict:
    """A percentile interval as a dict, with `adjusted`: {str(k): its interval at the Bonferroni level
    1 - alpha/k} for each family size k (what the decision rule judges a claim over a family of k
    on, so that the interval shown and the judgement cannot disagree). `expand` > 1 computes each
    interval at level 1 - alpha/(k expand) instead (for statistics whose percentile interval is
    known to under-cover: the CV ratio), while `level` still names the claimed 1 - alpha/k."""
    out = percentile_interval(estimate, draws, alpha / expand, n).to_dict()
    adjusted = {}
    for k in family_sizes:
        iv = percentile_interval(estimate, draws, alpha / (k * expand), n)
        adjusted[str(k)] = {"ci_low": iv.ci_low, "ci_high": iv.ci_high, "level": 1 - alpha / k}
    if adjusted:
        out["adjusted"] = adjusted
    return out
