"""The simple synthetic A/B: a records frame with a closed-form truth, for tests and benchmarks.

Why it stays beside the realistic generator (`scenarios.py`): tests of the decision rule and of
the evaluation need a generator whose truth is exact by construction and whose knobs map one to
one onto the truth (a success rate per arm, one latency ratio), and benchmarks need it fast.
`guided-ab simulate` uses `scenarios.py` instead, which is as hard as real runs are.

- success: a Gaussian-copula threshold model. Each pair has a shared difficulty z, each request
  its own noise; a request succeeds when rho z + sqrt(1 - rho^2) e < Phi^-1(p_arm). The marginal
  success rates are exactly p_control and p_candidate (so the true difference is their
  difference) and `success_corr` sets how strongly failures share schemas.
- latency: log L = log(base) + schema effect + N(0, sigma), plus log(ratio) on the candidate.
  The arms' marginal distributions differ by the factor `ratio` alone, so the true mean, p50
  and p95 ratios all equal `ratio` and the CV ratio is 1. Whether a request got an answer is
  independent of its latency, so the truth also holds over answered pairs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from guided_ab.config import Arm, DecisionRule, ExperimentConfig
from guided_ab.records import RECORD_COLUMNS

# how failed requests fail (shares); all but timeout return an answer with a latency
FAILURE_MIX = {"schema_violation": 0.5, "truncated": 0.2, "invalid_json": 0.15, "timeout": 0.1, "server_error": 0.05}


def synthetic_config(*, control: str = "control", candidate: str = "candidate", resamples: int = 2000,
                     **rule: Any) -> ExperimentConfig:
    return ExperimentConfig(
        name="synthetic",
        arms=[Arm(name=control, role="control", backend="guidance"), Arm(name=candidate, role="candidate", backend="auto")],
        decision=DecisionRule(bootstrap_resamples=resamples, **rule),
    )


def synthetic_records(
    pairs: int,
    *,
    p_control: float = 0.9,
    p_candidate: float = 0.9,
    ratio: float = 1.0,
    sigma: float = 0.35,
    schema_sd: float = 0.5,
    success_corr: float = 0.7,
    base_latency: float = 1.0,
    backend_share: float = 0.95,
    expected_backend: str = "guidance",
    warmup: int = 1,
    observe: int = 0,
    control: str = "control",
    candidate: str = "candidate",
    seed: int | np.random.Generator = 0,
) -> pd.DataFrame:
    """A records frame (RECORD_COLUMNS) for a paired two-arm experiment with a known truth."""
    rng = np.random.default_rng(seed)
    n = int(pairs)
    z = rng.standard_normal(n)
    schema = rng.normal(0.0, schema_sd, n)
    rho = float(success_corr)
    frames: list[dict[str, np.ndarray]] = []
    thresholds = {control: sps.norm.ppf(p_control), candidate: sps.norm.ppf(p_candidate)}
    # plan order: warm-ups first, then pairs with ABBA counterbalancing
    first_ctrl = (np.arange(n) % 4 == 0) | (np.arange(n) % 4 == 3)
    base = 2 * warmup
    for j, arm in enumerate((control, candidate)):
        success = rho * z + np.sqrt(1 - rho**2) * rng.standard_normal(n) < thresholds[arm]
        log_lat = np.log(base_latency) + schema + rng.normal(0.0, sigma, n) + (np.log(ratio) if arm == candidate else 0)
        if arm == control:
            backend = np.full(n, "guidance", dtype=object)
            order = base + 2 * np.arange(n) + np.where(first_ctrl, 0, 1)
        else:
            backend = np.where(rng.random(n) < backend_share, expected_backend, "xgrammar").astype(object)
            order = base + 2 * np.arange(n) + np.where(first_ctrl, 1, 0)
        frames.append(_block(rng, "ab", arm, pair_index=np.arange(n), warm=np.zeros(n, bool), success=success,
                             log_lat=log_lat, backend=backend, order=order))
        if warmup:
            w = np.arange(warmup)
            wb = np.full(warmup, "guidance" if arm == control else expected_backend, dtype=object)
            frames.append(_block(rng, "ab", arm, pair_index=-1 - w, warm=np.ones(warmup, bool), success=np.ones(warmup, bool),
                                 log_lat=np.full(warmup, np.log(base_latency) + 1.0), backend=wb, order=2 * w + j))
    if observe:
        k = int(observe)
        be = np.where(rng.random(k) < backend_share, expected_backend, "xgrammar").astype(object)
        frames.append(_block(rng, "observe", candidate, pair_index=np.arange(k), warm=np.zeros(k, bool),
                             success=np.ones(k, bool), log_lat=np.log(base_latency) + rng.normal(0, sigma, k), backend=be,
                             order=np.arange(k)))
    return _frame(frames)


def _frame(frames: list[dict[str, np.ndarray]]) -> pd.DataFrame:
    """The blocks as one records frame in plan order (observe rows after the A/B rows), with the
    columns every synthetic record shares filled in."""
    cols = {c: np.concatenate([f[c] for f in frames]) for c in frames[0]}
    order = np.lexsort((cols["order_index"], cols["phase"] != "ab"))  # observe rows after the A/B rows
    total = order.size
    const = {"run_id": "synthetic", "subset": "synthetic", "first_for_schema": True, "stream": True, "attempt": 1,
             "prompt_tokens": 100, "error": None, "output": None, "custom_id": None, "served_by": None}
    data = {}
    for c in RECORD_COLUMNS:
        # a record field named nowhere here is an optional one (default None: served_by, scheduled_at, ...)
        val = const.get(c)
        v = cols[c][order] if c in cols else np.full(total, val, dtype=object if val is None or
                                                      isinstance(val, str) else None)
        data[c] = pd.Series(v, dtype=object) if v.dtype == object else v
    return pd.DataFrame(data, columns=RECORD_COLUMNS)


def _block(rng: np.random.Generator, phase: str, arm: str, *, pair_index: np.ndarray, warm: np.ndarray,
           success: np.ndarray, log_lat: np.ndarray, backend: np.ndarray, order: np.ndarray) -> dict[str, np.ndarray]:
    """The record columns of one block of requests (one phase, one arm) with the given truth; failed
    requests fail as FAILURE_MIX says, and the timing of those without an answer is not recorded."""
    k = pair_index.size
    fail_kind = rng.choice(np.array(list(FAILURE_MIX), dtype=object), size=k, p=list(FAILURE_MIX.values()))
    outcome = np.where(success, "success", fail_kind).astype(object)
    answered = ~np.isin(outcome, ["timeout", "server_error", "connection_error"])
    lat = np.exp(log_lat)
    ttft = lat * rng.uniform(0.05, 0.25, k)
    toks = rng.integers(20, 200, k)
    status = np.where(outcome == "server_error", 500, 200).astype(object)
    status[outcome == "timeout"] = None
    finish = np.full(k, None, dtype=object)
    finish[answered] = "stop"
    finish[outcome == "truncated"] = "length"
    return {
        "phase": np.full(k, phase, dtype=object), "arm": np.full(k, arm, dtype=object),
        "request_id": np.array([f"{phase}-{o:06d}-{arm}" for o in order.tolist()], dtype=object),
        "schema_id": np.array([f"s{p:05d}" if p >= 0 else f"warm{-p}" for p in pair_index.tolist()], dtype=object),
        "order_index": order, "pair_index": pair_index, "warmup": warm,
        "sent_at": 1.7e9 + order * 0.01,
        "ttft_s": np.where(answered, ttft, np.nan), "latency_s": np.where(answered, lat, np.nan),
        "completion_tokens": np.where(answered, toks, 0),
        "finish_reason": finish,
        "http_status": status, "backend": backend, "outcome": outcome,
    }


def planned_counts(records: pd.DataFrame) -> dict[str, dict[str, int]]:
    """{phase: {arm: count}} of a frame: the plan a complete synthetic run had."""
    out: dict[str, dict[str, int]] = {}
    for (phase, arm), g in records.groupby(["phase", "arm"]):
        out.setdefault(str(phase), {})[str(arm)] = int(len(g))
    return out
