"""Time limits of the flows and tasks, derived from the config, so that a stuck run ends (and
stops paying for its arms) in bounded time instead of hanging until someone notices.

Each limit is the worst case the config allows, with room to spare, never a guess of the
typical time (that is the dry run's job): a limit that fires on a healthy run is a bug.
- start: building and deploying the apps (Modal image build: up to BUILD_S), plus, for local
  arms that start one after the other, each one's server_start_timeout_s;
- wait: the longest arm's start deadline, times the wait task's 3 attempts;
- observe / ab: every request of the phase taking its whole workload.timeout_s, in waves of
  `concurrency`, twice (the send task retries once), plus SLACK_S; an open-loop phase
  (workload.load): its arrival schedule plus those waves at `max_in_flight`;
- teardown, evaluate: fixed; approval: decision.approval_timeout_s.
Prefect enforces them (flows/experiment.py passes them as timeout_seconds); a timed-out phase
fails the run, whose `finally` and hooks tear the arms down.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from guided_ab.arms.targets import target_for
from guided_ab.config import ExperimentConfig, LoadProfile
from guided_ab.load.arrivals import planned_pairs

BUILD_S = 45 * 60.0  # a Modal image build with a fresh vLLM layer, plus the deploy calls
SLACK_S = 10 * 60.0
WAIT_ATTEMPTS = 3  # tasks/endpoints.py: wait-endpoints has retries=2
SEND_ATTEMPTS = 2  # tasks/requests.py: send-requests has retries=1


@dataclass(frozen=True)
class Limits:
    start_s: float
    wait_s: float
    observe_s: float
    ab_s: float
    teardown_s: float = 15 * 60.0
    evaluate_s: float = 60 * 60.0
    approval_s: float = 0.0

    @property
    def deploy_s(self) -> float:
        return self.start_s + self.wait_s

    @property
    def experiment_s(self) -> float:
        """The whole experiment flow (waiting for a concurrency slot not included)."""
        return (self.deploy_s + self.observe_s + self.ab_s + 2 * self.teardown_s + 2 * self.evaluate_s
                + self.approval_s)


def _phase_s(n_requests: int, cfg: ExperimentConfig) -> float:
    wl = cfg.workload
    return math.ceil(n_requests / wl.concurrency) * wl.timeout_s * SEND_ATTEMPTS + SLACK_S


def _open_phase_s(n_requests: int, arrivals: int, load: LoadProfile, cfg: ExperimentConfig) -> float:
    """An open-loop phase: its schedule (a Poisson one's span bounded by twice its mean, plus ten
    gaps) plus every request taking its whole timeout in waves of `max_in_flight`, twice."""
    assert load.rate is not None and load.max_in_flight is not None
    span = (2 * arrivals + 10) / load.rate
    return (span + math.ceil(n_requests / load.max_in_flight) * cfg.workload.timeout_s) * SEND_ATTEMPTS + SLACK_S


def limits(cfg: ExperimentConfig) -> Limits:
    wl = cfg.workload
    n_arms = len(cfg.arms)
    seq = cfg.decision.sequential
    pairs = seq.max_pairs if seq is not None else wl.size * wl.repeats
    pairs = planned_pairs(wl.load.ab, wl.seed, "ab") or pairs  # an open loop's count / duration_s
    ab_n = (pairs + wl.warmup) * n_arms
    observe_pairs = (planned_pairs(wl.load.observe, wl.seed, "observe") or wl.observe_size) if wl.observe_size else 0
    observe_n = observe_pairs * len(cfg.candidates)
    deadlines = [target_for(a.target).start_deadline(cfg, a.name) for a in cfg.arms]
    local_one_by_one = sum(cfg.server_start_timeout_s for a in cfg.arms if target_for(a.target).shares_local_cores)
    return Limits(
        start_s=BUILD_S + local_one_by_one,
        wait_s=max(deadlines, default=cfg.server_start_timeout_s) * WAIT_ATTEMPTS + SLACK_S,
        observe_s=(_open_phase_s(observe_n, observe_pairs, wl.load.observe, cfg) if wl.load.observe.open_loop
                   else _phase_s(observe_n, cfg)),
        ab_s=_open_phase_s(ab_n, pairs + wl.warmup, wl.load.ab, cfg) if wl.load.ab.open_loop else _phase_s(ab_n, cfg),
        approval_s=float(cfg.decision.approval_timeout_s) if cfg.decision.require_approval else 0.0,
    )
