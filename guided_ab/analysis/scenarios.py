"""Synthetic A/B experiments as hard as real runs: the generator behind `guided-ab simulate`.

Why: a simulation whose latency is independent of the outcome, whose schemas never repeat, that
has no costs and whose effects sit far from the margins measures a gentler world than the one
the decision rule faces (DESIGN.md, "Measured pitfalls"). This generator builds in what real runs
showed, one mechanism per line of the model:

- schemas are clusters. Each schema s has a difficulty d_s, an intended answer length (longer for
  harder schemas), a compute cost per token (grammar complexity) and a prefill cost; each arm has
  its own draw per schema of quality, length and speed noise. At temperature 0 the per-request
  noise is small (`temp_noise`, `request_sd`), so repeats of a schema are nearly identical;
- success through a latent threshold: q = rho d_s + sqrt(1 - rho^2) (arm-schema noise + a little
  request noise) ~ N(0, 1); a complete answer is schema-valid when q < theta_arm (Phi(theta) =
  `valid`); failures share schemas across arms through d_s;
- answer length drives both truncation and latency: the intended length (tokens) of an answer is
  `len_median` x the arm's `length` x the schema's and the arm's factors; at `max_tokens` the
  answer is cut ("truncated", finish_reason "length"), so truncated answers are the slowest ones
  (they ran to max_tokens: ~10-15 s against ~2-8 s for complete answers with the defaults);
- latency = TTFT + (output tokens - 1) x TPOT (+ a rare stall): TTFT (prefill, plus a grammar
  compile on an arm's first request of a schema) and TPOT (the schema's compute cost x the
  arm's factor) are separate, so "writes more" (`length`) and "computes slower" (`tpot_s`) are
  separate causes of a latency difference;
- timeouts: a request still running at `timeout_s` is a "timeout" recorded with latency_s =
  timeout_s (the client's elapsed time: a censored latency, never a missing one); rare server
  errors (HTTP 500) fail fast, and so do refusals (HTTP 400: a backend refuses the schema's
  features up front, the same schema every time; the arms' refusals share features);
- costs: each arm is billed `usd_per_hour` for the time it is held: deploy, the observe phase
  (only the candidate gets observe requests, but both arms are up), warm-ups and the A/B, so
  arms with equal prices cost the same and the candidate's observe successes are a trap for a
  cost-per-success comparison.

The truth of every statistic is computed from a very large sample of this same generator
(`truth.py`), never derived by hand, so a change here changes the truth with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from scipy import stats as sps

from guided_ab.records import RECORD_COLUMNS

CONTROL, CANDIDATE = "control", "candidate"
ANSWERED = ("success", "truncated", "invalid_json", "schema_violation")


@dataclass(frozen=True)
class ArmModel:
    """How one arm serves: speed, answer length, validity, price."""

    ttft_s: float = 0.5  # median time to first token (prefill) of a schema already compiled
    compile_s: float = 0.4  # added to TTFT on the arm's first request of a schema (grammar compile)
    tpot_s: float = 0.045  # median seconds per output token
    length: float = 1.0  # answer-length factor (> 1: "writes more")
    valid: float = 0.90  # Phi(theta): P(schema-valid | complete answer) at average difficulty
    theta: float | None = None  # the threshold itself (set by calibration; overrides `valid`)
    reject: float = 0.03  # share of schemas the backend refuses up front (HTTP 400: unsupported features)
    usd_per_hour: float = 15.8
    backend: str = "guidance"  # what the server reports for most schemas
    other_backend_share: float = 0.0  # share of schemas it resolves to "xgrammar" instead

    @property
    def threshold(self) -> float:
        return float(self.theta) if self.theta is not None else float(sps.norm.ppf(self.valid))


@dataclass(frozen=True)
class World:
    """What both arms share: the workload, the sampling settings, the noise, the clock."""

    max_tokens: int = 256
    timeout_s: float = 20.0
    len_median: float = 90.0  # tokens of a complete answer, median schema
    len_sd: float = 0.65  # log-sd of the intended length over schemas
    len_difficulty: float = 0.5  # correlation of length with difficulty (hard schemas: long answers)
    arm_len_sd: float = 0.1  # log-sd of an arm's own length factor per schema
    difficulty_share: float = 0.85  # rho: how much of the quality latent is the schema's difficulty
    temp_noise: float = 0.05  # request-level share of the per-schema noise (temperature 0: small)
    speed_sd: float = 0.25  # log-sd of a schema's compute cost per token (both arms)
    prefill_sd: float = 0.3  # log-sd of a schema's prefill time (prompt length)
    arm_speed_sd: float = 0.08  # log-sd of an arm's own speed factor per schema
    request_sd: float = 0.06  # log-sd of per-request timing noise
    reject_shared: float = 0.7  # how much the arms' refusals share schema features (correlation)
    stall_p: float = 0.04  # share of requests that stall (queueing, a preempted sequence)
    stall_mean_s: float = 10.0
    server_error_p: float = 0.005
    deploy_s: float = 600.0  # both arms held while starting (Modal cold start of a large model)
    observe: int = 6  # observe requests (candidate only)
    warmup: int = 1  # warm-up requests per arm, before the A/B pairs


@dataclass(frozen=True)
class Scenario:
    """One kind of experiment: the arms, the workload shape, and the cap (schemas x repeats)."""

    name: str
    about: str
    candidate: ArmModel = field(default_factory=ArmModel)
    control: ArmModel = field(default_factory=ArmModel)
    schemas: int = 200  # schemas in the plan at the cap
    repeats: int = 1  # passes over them (the plan sends the whole list again)
    success_diff: float | None = None  # calibrate the candidate's theta to this true difference
    weight: float = 1.0  # share of the experiments (relative)
    world: World = field(default_factory=World)

    @property
    def cap(self) -> int:
        return self.schemas * self.repeats

    def arm(self, role: str) -> ArmModel:
        return self.control if role == CONTROL else self.candidate


def _faster(f: float, **kw) -> ArmModel:
    return ArmModel(ttft_s=0.5 * f, tpot_s=0.045 * f, **kw)


# The catalogue. Truth verdicts are not written here: truth.py derives them from the computed truth.
SCENARIOS: tuple[Scenario, ...] = (
    Scenario("identical", "identical arms, equal $/h, 6 observe requests to the candidate"),
    Scenario("identical_repeats", "identical arms, 50 schemas x 4 repeats (temperature 0)",
             schemas=50, repeats=4, weight=2.0),
    Scenario("faster", "candidate computes 25% faster, success equal", candidate=_faster(0.75)),
    Scenario("faster_repeats", "candidate 25% faster, 50 schemas x 4 repeats", candidate=_faster(0.75),
             schemas=50, repeats=4, weight=2.0),
    Scenario("margin_peek", "success difference ON the margin (-5 points), candidate 20% faster",
             candidate=_faster(0.8), success_diff=-0.05),
    Scenario("worse_beyond_margin", "success 12 points worse, candidate 20% faster",
             candidate=_faster(0.8), success_diff=-0.12),
    Scenario("more_reliable", "candidate +10 points success, latency equal",
             control=ArmModel(valid=0.80), success_diff=0.10),
    Scenario("writes_more", "candidate writes 25% more tokens and truncates more: slower, TPOT equal",
             candidate=ArmModel(length=1.25)),
    Scenario("near_margin_faster", "candidate 10% faster, success 2 points lower (inside the margins)",
             candidate=_faster(0.90), success_diff=-0.02),
    Scenario("near_margin_slower", "candidate 7% slower (inside the 10% margin), success equal",
             candidate=_faster(1.07)),
)


def scenario(name: str) -> Scenario:
    for s in SCENARIOS:
        if s.name == name:
            return s
    raise KeyError(f"no scenario {name!r}; scenarios: {[s.name for s in SCENARIOS]}")


# -- drawing requests ------------------------------------------------------------------------------
def _schema_latents(w: World, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    c = w.len_difficulty
    d = rng.standard_normal(n)
    return {"d": d, "len_z": c * d + math.sqrt(1 - c * c) * rng.standard_normal(n),
            "speed": rng.normal(0.0, w.speed_sd, n), "prefill": rng.normal(0.0, w.prefill_sd, n),
            "exotic": rng.standard_normal(n)}


def _arm_requests(w: World, a: ArmModel, sch: dict[str, np.ndarray], idx: np.ndarray, first: np.ndarray,
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One arm's requests for the schemas `idx` (one per request): outcome, latency, TTFT, tokens,
    backend, and the latent q with the mask of complete answers (for calibration)."""
    S, n = sch["d"].size, idx.size
    eta, lam = rng.standard_normal(S), rng.normal(0.0, w.arm_len_sd, S)
    kap, kind_u, other = rng.normal(0.0, w.arm_speed_sd, S), rng.random(S), rng.random(S) < a.other_backend_share
    r = w.reject_shared
    refuse = (math.sqrt(r) * sch["exotic"] + math.sqrt(1 - r) * rng.standard_normal(S)) > sps.norm.ppf(1 - a.reject)
    rho, tau = w.difficulty_share, w.temp_noise
    q = rho * sch["d"][idx] + math.sqrt(1 - rho**2) * (math.sqrt(1 - tau**2) * eta[idx] + tau * rng.standard_normal(n))
    intended = w.len_median * a.length * np.exp(w.len_sd * sch["len_z"][idx] + lam[idx] + tau * rng.standard_normal(n))
    trunc = intended >= w.max_tokens
    tokens = np.where(trunc, w.max_tokens, np.maximum(1.0, np.round(intended)))
    ttft = a.ttft_s * np.exp(sch["prefill"][idx] + rng.normal(0.0, w.request_sd, n)) + a.compile_s * first
    tpot = a.tpot_s * np.exp(sch["speed"][idx] + kap[idx] + rng.normal(0.0, w.request_sd, n))
    stall = np.where(rng.random(n) < w.stall_p, rng.exponential(w.stall_mean_s, n), 0.0)
    latency = ttft + (tokens - 1) * tpot + stall
    timeout = latency >= w.timeout_s
    rejected = refuse[idx]
    timeout &= ~rejected
    error = (rng.random(n) < w.server_error_p) & ~timeout & ~rejected
    fail = np.where(kind_u[idx] < 0.7, "schema_violation", "invalid_json")
    outcome = np.where(trunc, "truncated", np.where(q < a.threshold, "success", fail)).astype(object)
    outcome[timeout], outcome[error], outcome[rejected] = "timeout", "server_error", "rejected"
    fast = error | rejected
    latency = np.where(timeout, w.timeout_s, np.where(error, 0.05, np.where(rejected, 0.01, latency)))
    ttft = np.where(fast | (ttft >= w.timeout_s), np.nan, ttft)
    tokens = np.where(timeout | fast, np.nan, tokens)
    return {"outcome": outcome, "latency_s": latency, "ttft_s": ttft, "tokens": tokens,
            "backend": np.where(other[idx], "xgrammar", a.backend).astype(object),
            "q": q, "complete": ~trunc & ~timeout & ~fast}


def draw_pairs(scn: Scenario, schema_of_pair: np.ndarray, n_schemas: int,
               rng: np.random.Generator) -> dict[str, dict[str, np.ndarray]]:
    """Both arms' requests for pairs sending schema `schema_of_pair[i]` (plan order): {role: arrays}.
    A pair is an arm's first request of its schema when no earlier pair sent that schema."""
    sch = _schema_latents(scn.world, n_schemas, rng)
    first = _first_in(schema_of_pair)
    return {role: _arm_requests(scn.world, scn.arm(role), sch, schema_of_pair, first, rng)
            for role in (CONTROL, CANDIDATE)}


def plan_schemas(schemas: int, pairs: int) -> np.ndarray:
    """The schema of each pair in plan order: the list, then the list again (repeats), as make_plan."""
    return np.arange(pairs) % schemas


# -- one experiment --------------------------------------------------------------------------------
@dataclass
class Experiment:
    """One synthetic run at its cap: the A/B pairs in plan order, the observe requests, warm-ups."""

    scn: Scenario
    pairs: dict[str, dict[str, np.ndarray]]  # {role: arrays over the cap's pairs}
    schema_of_pair: np.ndarray
    observe: dict[str, np.ndarray]  # the candidate's observe requests
    warmup: dict[str, np.ndarray]  # {role: warm-up latencies}
    _full: pd.DataFrame | None = None  # the records of the whole cap (built once)

    @classmethod
    def draw(cls, scn: Scenario, rng: np.random.Generator, pairs_total: int | None = None) -> Experiment:
        """The experiment at its cap, or at `pairs_total` pairs (more: the plan goes on, new schemas
        without repeats, further passes over the same schemas with repeats; the cap's pairs are a
        prefix of it in distribution)."""
        n = max(scn.cap, int(pairs_total or 0))
        n_schemas = n if scn.repeats == 1 else scn.schemas
        sop = plan_schemas(n_schemas, n)
        pairs = draw_pairs(scn, sop, n_schemas, rng)
        k = scn.world.observe
        obs = draw_pairs(scn, np.arange(k), k, rng)[CANDIDATE] if k else {}
        warm = {role: 2.0 * rng.uniform(1.0, 1.5, scn.world.warmup) for role in (CONTROL, CANDIDATE)}
        return cls(scn, pairs, sop, obs, warm)

    def frame(self, pairs: range | np.ndarray | None = None) -> tuple[pd.DataFrame, dict, dict[str, float]]:
        """(records, planned counts, USD per arm) of a run made of the given pairs (default: all),
        with this experiment's warm-ups and observe requests. Pairs keep their plan indices."""
        n_all = self.schema_of_pair.size
        sel = np.arange(n_all) if pairs is None else np.asarray(pairs, dtype=np.int64)
        if self._full is None:
            self._full = self._records()
        df = self._full
        if sel.size != n_all:
            keep = (df["phase"].to_numpy() != "ab") | df["warmup"].to_numpy() | np.isin(df["pair_index"].to_numpy(), sel)
            df = df[keep].reset_index(drop=True)
        w = self.scn.world
        planned = {"ab": {CONTROL: sel.size + w.warmup, CANDIDATE: sel.size + w.warmup}}
        if self.observe:
            planned["observe"] = {CANDIDATE: w.observe}
        return df, planned, self.costs(sel)

    def _records(self) -> pd.DataFrame:
        n, w = self.schema_of_pair.size, self.scn.world
        blocks: list[dict[str, np.ndarray]] = []
        first_ctrl = (np.arange(n) % 4 == 0) | (np.arange(n) % 4 == 3)  # ABBA
        schema_ids = np.array([f"s{s:05d}" for s in self.schema_of_pair.tolist()], dtype=object)
        firsts = _first_in(self.schema_of_pair)
        for j, role in enumerate((CONTROL, CANDIDATE)):
            order = 2 * w.warmup + 2 * np.arange(n) + np.where(first_ctrl == (role == CONTROL), 0, 1)
            blocks.append(_block("ab", role, self.pairs[role], np.arange(n), order, schema_ids, firsts, warm=False))
            if w.warmup:
                m = w.warmup
                wr = {"outcome": np.full(m, "success", dtype=object), "latency_s": self.warmup[role],
                      "ttft_s": self.warmup[role] * 0.3, "tokens": np.full(m, 40.0),
                      "backend": np.full(m, self.scn.arm(role).backend, dtype=object)}
                blocks.append(_block("ab", role, wr, -1 - np.arange(m), 2 * np.arange(m) + j,
                                     np.array([f"warmup-{i}" for i in range(m)], dtype=object), np.ones(m, bool), warm=True))
        if self.observe:
            k = w.observe
            blocks.append(_block("observe", CANDIDATE, self.observe, np.arange(k), np.arange(k),
                                 np.array([f"o{i:03d}" for i in range(k)], dtype=object), np.ones(k, bool), warm=False))
        return _frame(blocks)

    def costs(self, sel: np.ndarray) -> dict[str, float]:
        """USD per arm: both arms are held from deploy to the last request (observe phase included)."""
        w = self.scn.world
        ab = float(np.sum(np.maximum(self.pairs[CONTROL]["latency_s"][sel], self.pairs[CANDIDATE]["latency_s"][sel])))
        held = w.deploy_s + (float(np.sum(self.observe["latency_s"])) if self.observe else 0.0) + ab + float(
            np.sum(np.maximum(self.warmup[CONTROL], self.warmup[CANDIDATE])))
        return {role: held * self.scn.arm(role).usd_per_hour / 3600.0 for role in (CONTROL, CANDIDATE)}


def _first_in(schema_of_pair: np.ndarray) -> np.ndarray:
    first = np.zeros(schema_of_pair.size, bool)
    first[np.unique(schema_of_pair, return_index=True)[1]] = True
    return first


def _block(phase: str, arm: str, r: dict[str, np.ndarray], pair_index: np.ndarray, order: np.ndarray,
           schema_ids: np.ndarray, first: np.ndarray, *, warm: bool) -> dict[str, np.ndarray]:
    k = pair_index.size
    outcome = r["outcome"]
    answered = np.isin(outcome, ANSWERED)
    status = np.where(answered, 200, np.where(outcome == "server_error", 500,
                                              np.where(outcome == "rejected", 400, -1))).astype(object)
    status[status == -1] = None
    finish = np.full(k, None, dtype=object)
    finish[answered] = "stop"
    finish[outcome == "truncated"] = "length"
    return {
        "phase": np.full(k, phase, dtype=object), "arm": np.full(k, arm, dtype=object),
        "request_id": np.array([f"{phase}-{o:06d}-{arm}" for o in order.tolist()], dtype=object),
        "schema_id": schema_ids, "order_index": order, "pair_index": pair_index, "warmup": np.full(k, warm),
        "first_for_schema": first, "sent_at": 1.7e9 + order * 0.01 + (phase == "ab") * 1e4,
        "ttft_s": r["ttft_s"], "latency_s": r["latency_s"],
        "completion_tokens": r["tokens"],
        "finish_reason": finish, "http_status": status, "backend": r["backend"], "outcome": outcome,
    }


def _frame(blocks: list[dict[str, np.ndarray]]) -> pd.DataFrame:
    cols = {c: np.concatenate([np.asarray(b[c]) for b in blocks]) for c in blocks[0]}
    order = np.lexsort((cols["order_index"], cols["phase"] != "ab"))
    n = order.size
    const = {"run_id": "synthetic", "subset": "synthetic", "stream": True, "attempt": 1,
             "prompt_tokens": 100, "error": None, "output": None, "custom_id": None, "served_by": None}
    data: dict[str, object] = {}
    for c in RECORD_COLUMNS:
        if c in cols:
            v = cols[c][order]
            data[c] = pd.Series(v, dtype=object) if v.dtype == object else v
        else:
            val = const.get(c)  # a record field named nowhere here is an optional one (default None)
            data[c] = pd.Series([val] * n, dtype=object) if val is None or isinstance(val, str) else np.full(n, val)
    return pd.DataFrame(data, columns=RECORD_COLUMNS)


def with_world(scn: Scenario, **world: object) -> Scenario:
    """The scenario with some world settings changed (tests, what-ifs)."""
    return replace(scn, world=replace(scn.world, **world))  # type: ignore[arg-type]
