"""Benchmark: which sequential design saves pairs at equal power, side by side in one run.

Not a test. The textbook setting under every sequential A/B: a z statistic that follows a
Brownian motion with drift theta (the expected z at the cap), looked at K times, equally spaced,
stopping at the first crossing. For each design: its power, its expected pairs (share of the
cap), the pairs a fixed-size run needs for that same power, and the share saved. Designs:

  hsd-2    Hwang-Shih-DeCani gamma -2 (what guided_ab/analysis/groupseq.py uses)
  pocock   Lan-DeMets Pocock-type spending
  obf      Lan-DeMets O'Brien-Fleming-type spending
  cs       the asymptotic confidence sequence the rule used before (Robbins' normal mixture,
           narrowest at the cap): valid at any number of looks, any horizon

Boundaries for the spending designs come from groupseq.critical_values (one-sided here: two-sided
alpha 2 x 0.025). Prints a table per drift, then one line:
`saved_at_90pct_power hsd-2=<x> pocock=<x> obf=<x> cs=<x>` (theta = 3.24: 90 % power fixed-size).
A few seconds.

    .venv/bin/python bench/sequential_designs.py [--looks 10] [--paths 20000]
"""

from __future__ import annotations

import argparse
import math

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.stats import norm

from guided_ab.analysis.groupseq import critical_values

ONE_SIDED = 0.025


def pocock(t: float, a: float) -> float:
    return a * math.log(1 + (math.e - 1) * t)


def obf(t: float, a: float) -> float:
    return 4 - 4 * norm.cdf(norm.ppf(1 - a / 4) / math.sqrt(t))


def hsd(t: float, a: float, gamma: float = -2.0) -> float:
    return a * (1 - math.exp(-gamma * t)) / (1 - math.exp(-gamma))


def cs_boundary(ts: list[float], alpha: float, n_cap: int = 200) -> np.ndarray:
    """z-scale boundary of the two-sided normal-mixture confidence sequence, tuned to the cap."""
    def b(t: float, rho: float) -> float:
        return math.sqrt((t + rho) * math.log((t + rho) / (rho * alpha**2)))
    rho = math.exp(minimize_scalar(lambda lr: b(n_cap, math.exp(lr)), bounds=(-10, 15), method="bounded").x)
    return np.array([b(t * n_cap, rho) / math.sqrt(t * n_cap) for t in ts])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--looks", type=int, default=10)
    ap.add_argument("--paths", type=int, default=20000)
    args = ap.parse_args()
    k = args.looks
    ts = [(i + 1) / k for i in range(k)]
    designs = {name: np.array(critical_values(ts, 2 * ONE_SIDED, spend)) for name, spend in
               (("hsd-2", hsd), ("pocock", pocock), ("obf", obf))}
    designs["cs"] = cs_boundary(ts, 2 * ONE_SIDED)
    rng = np.random.default_rng(1)
    saved_90 = {}
    for theta in (2.5, 3.24, 4.0, 5.0):
        steps = rng.standard_normal((args.paths, k)) * math.sqrt(1 / k) + theta / k
        z = np.cumsum(steps, axis=1) / np.sqrt(ts)
        print(f"theta {theta} (expected z at the cap)")
        print(f"  {'design':8} {'power':>6} {'pairs/cap':>9} {'fixed/cap':>9} {'saved':>7}")
        for name, c in designs.items():
            cross = z >= c
            hit = cross.any(axis=1)
            first = np.where(hit, cross.argmax(axis=1) + 1, k)
            power, pairs = float(hit.mean()), float(first.mean()) / k
            fixed = ((norm.ppf(1 - ONE_SIDED) + norm.ppf(min(power, 0.999))) / theta) ** 2
            saved = 1 - pairs / fixed
            if theta == 3.24:
                saved_90[name] = saved
            print(f"  {name:8} {power:6.2f} {pairs:9.2f} {fixed:9.2f} {saved:+7.2f}")
    print("saved_at_90pct_power " + " ".join(f"{n}={v:.2f}" for n, v in saved_90.items()))


if __name__ == "__main__":
    main()
