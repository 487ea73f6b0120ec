"""Arrival schedules of an open-loop load profile: when each request (or pair) is due.

An open loop sends at a rate fixed before the run, whether or not the server keeps up (production
traffic does not wait for the previous answer); the runner (load/runner.py) sends each arrival at
its scheduled time, on a clock independent of the responses. Schedules are seconds from the
start of sending and follow from a seed alone, so a phase re-run after a crash, or a sweep
repeated, reproduces them.

- constant: one arrival every 1/rate s (the first at 0);
- poisson: exponential gaps at the rate (numpy's Generator, seeded), the first at 0 too, so a
  schedule never starts with an idle gap that would only lengthen the phase.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from guided_ab.config import LoadProfile

OpenProfile = Literal["constant", "poisson"]
Seed = int | Sequence[int]


def arrival_times(profile: OpenProfile, rate: float, n: int, seed: Seed) -> list[float]:
    """n non-decreasing arrival times (s from the start) at `rate` arrivals per second.

    `seed`: an int or a sequence of ints (e.g. [workload seed, phase code, look]); only the
    Poisson schedule draws from it. The first k times do not depend on n (the draws are taken in
    order), so a longer schedule extends a shorter one.
    """
    if not rate > 0 or rate == float("inf"):
        raise ValueError(f"rate must be a positive number of arrivals per second, got {rate!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n == 0:
        return []
    if profile == "constant":
        return (np.arange(n, dtype=float) / rate).tolist()
    if profile == "poisson":
        gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n - 1)
        return np.concatenate(([0.0], np.cumsum(gaps))).tolist()
    raise ValueError(f"unknown open-loop profile {profile!r}: constant or poisson")


def arrivals_within(profile: OpenProfile, rate: float, duration_s: float, seed: Seed) -> list[float]:
    """The schedule's arrivals in [0, duration_s): what a pre-registered duration sends."""
    if not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s!r}")
    # enough draws for the Poisson count to exceed the window with overwhelming probability
    # (mean + 10 standard deviations), grown if ever it does not
    n = int(rate * duration_s + 10 * (rate * duration_s) ** 0.5 + 10)
    while True:
        times = arrival_times(profile, rate, n, seed)
        if times[-1] >= duration_s:
            return [t for t in times if t < duration_s]
        n *= 2


def schedule_seed(seed: int, phase: str, look: int = 0) -> list[int]:
    """A phase's schedule seed: the workload seed, the phase and the look (0: a fixed-size plan)."""
    return [seed, zlib.crc32(phase.encode()), look]


def planned_pairs(load: LoadProfile, seed: int, phase: str) -> int | None:
    """The pairs an open-loop phase pre-registered: its `count`, or the arrivals its schedule holds
    within `duration_s` (at least 1); None for a closed loop or an unsized one (a sequential A/B:
    pairs_per_look per look), whose plan keeps its own size."""
    if not load.open_loop or load.rate is None or (load.count is None and load.duration_s is None):
        return None
    if load.count is not None:
        return load.count
    assert load.duration_s is not None and load.profile != "closed"
    return max(1, len(arrivals_within(load.profile, load.rate, load.duration_s, schedule_seed(seed, phase))))
