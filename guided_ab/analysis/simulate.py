"""`guided-ab simulate`: the decision rules run on synthetic experiments whose truth is known.

Why: an interval method or a decision rule is only as good as its error rates on experiments
like the real ones, and those can only be measured where the truth is known. The experiments
come from `scenarios.py` (schemas as clusters, repeats, outcome-dependent latency, timeouts,
costs, effects on and near the margins); the truth of every statistic from `truth.py`.

What one experiment is: a run of the scenario at its cap (200 pairs: 200 schemas, or 50 x 4
repeats), with warm-ups, the candidate's 6 observe requests and both arms' costs. From it:
- fixed-size runs: the disjoint blocks of 30 and of 50 pairs that hold no repeat (6 and 4 of
  them over 200 schemas; the first 30 / 50 pairs of a plan with repeats), and the whole cap;
  each is evaluated and decided (`evaluate` + `decide`) as an experiment of its own;
- the sequential rule (`sequential.judge_look`) at its planned looks up to its planned cap
  (`plan_sequential`; the experiment is drawn that long), stopping
  at the first settled look (inconclusive at the cap), and the same looks' repeated confidence intervals
  judged against the truth at every look;
- naive peeking: `evaluate` + `decide` every `look` pairs up to the scenario's cap, stopping at
  the first verdict that is not
  inconclusive: the contrast that shows why the sequential rule exists.

The headline numbers (the last line of the command), exactly:
- coverage = the lowest, over the cells (size, statistic), of the share of fixed-size 95 %
  intervals that contain the truth (within 2 Monte-Carlo standard errors of it, < 0.006 on
  every statistic). A cell pools every scenario at that size (coverage is a property of the
  interval method at a size, not of the effect); sizes are 30, 50, 200 (one request per schema)
  and 50x4 (50 schemas x 4 repeats). Statistics: the success difference, the p50 / mean / p95
  latency ratios, the CV ratio, and the explain metrics that come with intervals. Intervals not
  reported (too few values) are left out of the rate and counted beside it.
- wrong_decisions = the highest, over scenarios, of the mean over the product's four designs
  (fixed size at 30, 50 and 200 or 50x4 pairs, and the sequential rule) of each design's share
  of wrong decisions (a fixed-size design's runs are its blocks). Wrong: "switch" where the
  truth says keep, "keep" where it says switch, and "invalid" anywhere (the experiments are
  valid by construction); "inconclusive" is never wrong and has its own rate beside it. The
  right decision is derived from the truth (`truth.route`); where it is "either", only
  "invalid" is wrong. The per-design rates are in the table.
- pairs_saved = 1 - S / F over the scenarios with a true effect (the arms differ, and the truth
  names a right decision) whose sequential design reached the power it was planned for (at
  least the rule's `power`, 0.8): S sums the sequential rule's mean pairs used, F the pairs a
  fixed-size run needs for the power the sequential rule reached there (its share of right
  decisions, clamped to [0.05, 0.99]). Each scenario's sequential cap is planned as a team
  would (`plan_sequential`: 90 % power on the binding criterion from a pilot's sds, + 15 % for
  the looks, at least the scenario's cap, at most 5000 pairs); a design that cannot reach its
  power (a repeating scenario's 50-schema pool, an effect needing more than 5000 pairs) is
  listed in the table, "not counted": at a power nobody would plan for, "equal power" compares
  a cap with a pilot study. That fixed size is the normal-approximation sample size
  (stats.n_needed) on the criterion that binds on the way to the right decision, with the
  per-schema sds the evaluation reports (averaged over the cap-size runs; schemas x repeats =
  pairs): for a switch, the largest over success and latency non-inferiority, the CV ratio and
  the easier gain; for a keep by a broken guardrail, the smallest over the broken ones; for a
  keep by futility, the larger of the two futility bounds. Binding criteria instead of the
  joint power favour the fixed design, so the saving is if anything understated; scenarios
  where no fixed size gets there (a truth exactly on a margin) are left out of S and F.
Above it, the naive-peeking line: its wrong-decision rate per scenario, the highest first.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from guided_ab.analysis import sequential as Q
from guided_ab.analysis import stats as S
from guided_ab.analysis import truth as T
from guided_ab.analysis.decision import decide
from guided_ab.analysis.evaluation import evaluate
from guided_ab.analysis.scenarios import CANDIDATE, CONTROL, SCENARIOS, Experiment, Scenario
from guided_ab.analysis.simulate_summary import pairs_for, summarize
from guided_ab.analysis.synthetic import planned_counts, synthetic_config, synthetic_records
from guided_ab.config import Arm, DecisionRule, ExperimentConfig, Sequential, Workload

# the simple generator moved to synthetic.py; tests and benchmarks import it from here too
__all__ = ["INTERVALS", "Settings", "planned_counts", "simulate", "synthetic_config", "synthetic_records"]

Getter = Callable[[dict], dict | None]


def _at(*path: str) -> Getter:
    def get(comp: dict) -> dict | None:
        node: Any = comp
        for p in path:
            if not isinstance(node, dict) or p not in node:
                return None
            node = node[p]
        return node if isinstance(node, dict) else None
    return get


# statistic -> where its interval is in an evaluation's comparison (truth.py names the estimands)
INTERVALS: dict[str, Getter] = {
    "success_diff": _at("success", "diff"),
    "latency_p50_ratio": _at("latency", "ratio_p50"),
    "latency_mean_ratio": _at("latency", "ratio_mean"),
    "latency_p95_ratio": _at("latency", "ratio_p95"),
    "cv_ratio": _at("cv_ratio"),
    "ttft_p50_ratio": _at("explain", "ttft_p50_ratio"),
    "tpot_p50_ratio": _at("explain", "tpot_p50_ratio"),
    "tokens_mean_ratio": _at("explain", "tokens_mean_ratio"),
    "truncation_diff": _at("explain", "truncation", "diff"),
    "cost_ratio": _at("cost", "ratio"),
}
SEQUENCES = {"seq_success_diff": "success_diff", "seq_latency_ratio": "latency_ratio"}


@dataclass(frozen=True)
class Settings:
    experiments: int = 400
    seed: int = 0
    resamples: int = 1000
    workers: int = 2
    look: int = 20  # pairs per look of naive peeking, and the fewest per look of the sequential rule
    seq_cap: int | None = None  # the sequential rule's cap for every scenario; None: planned per scenario
    seq_power: float = 0.9  # the power a scenario's sequential cap is planned for (`plan_sequential`)
    seq_max: int = 5000  # the largest planned cap (pairs)
    seq_looks: int = 25  # looks the planned cap is split into (at least `look` pairs each)
    sizes: tuple[int, int] = (30, 50)  # fixed sizes below the cap (the cap is the third)
    truth_pairs: int = T.TRUTH_PAIRS
    scenarios: tuple[str, ...] = field(default_factory=lambda: tuple(s.name for s in SCENARIOS))


INFLATION = 1.15  # planned cap / fixed-size pairs: what a group-sequential design adds for its looks (R_max)
PILOT_SCHEMAS = 3000


def plan_sequential(scn: Scenario, values: dict[str, float], route: tuple[str, str], settings: Settings,
                    rule: DecisionRule, seq: Sequential, rng: np.random.Generator) -> tuple[int, int, int | None]:
    """(cap, pairs per look, planned fixed-size pairs) of the scenario's sequential design, planned
    as a team would: a pilot's per-schema sds, the normal-approximation pairs for `seq_power` on the
    criterion that binds on the way to the right decision (`simulate_summary.pairs_for`), times
    INFLATION, at least the scenario's own cap, at most `seq_max`. With repeats the schema pool
    bounds the units: the cap stays the scenario's. `seq_cap` set: that cap for every scenario."""
    planned = None
    if settings.seq_cap:
        cap = int(settings.seq_cap)
    elif scn.repeats > 1:
        cap = scn.cap
    else:
        pilot = Experiment.draw(replace(scn, schemas=PILOT_SCHEMAS), rng)
        units = Q.schema_units(pilot.frame()[0], CONTROL, CANDIDATE, scn.world.timeout_s)
        sds: dict[str, float | None] = {"success": float(np.nanstd(units["success_diff"], ddof=1)),
               "latency": float(np.nanstd(units["log_ratio"], ddof=1))}
        planned = pairs_for(values, route, sds, rule, seq, settings.seq_power, Q.alpha_per_interval(rule, 1),
                            latency_key="seq_latency_ratio")[0]
        cap = scn.cap if planned is None else max(scn.cap, math.ceil(INFLATION * planned))
        cap = min(cap, settings.seq_max)
    look = max(settings.look, cap // settings.seq_looks)
    return math.ceil(cap / look) * look, look, planned


def config(scn: Scenario, resamples: int, look: int, max_pairs: int | None = None) -> ExperimentConfig:
    """The experiment config a synthetic run is evaluated under (the default, pre-registered rule)."""
    w = scn.world
    return ExperimentConfig(
        name="synthetic",
        arms=[Arm(name=CONTROL, role="control", backend="guidance", cost_per_hour=scn.control.usd_per_hour),
              Arm(name=CANDIDATE, role="candidate", backend="auto", cost_per_hour=scn.candidate.usd_per_hour)],
        workload=Workload(size=scn.schemas, repeats=scn.repeats, observe_size=w.observe, warmup=w.warmup,
                          max_tokens=w.max_tokens, timeout_s=w.timeout_s),
        decision=DecisionRule(bootstrap_resamples=resamples,
                              sequential=Sequential(pairs_per_look=look, max_pairs=max_pairs or scn.cap)),
    )


def _design(scn: Scenario, cfg: ExperimentConfig) -> Q.Design:
    seq = cfg.decision.sequential
    assert seq is not None
    return Q.Design(planned_pairs=seq.max_pairs, pairs_per_look=seq.pairs_per_look, max_pairs=seq.max_pairs,
                    max_usd=None, min_latency_gain=seq.min_latency_gain, min_success_gain=seq.min_success_gain)


def _size_label(scn: Scenario, size: int) -> str:
    """A coverage cell's size: pairs, or schemas x repeats where the run repeats schemas."""
    if size <= scn.schemas:
        return str(size)
    r = size / scn.schemas
    return f"{scn.schemas}x{r:g}" if r == int(r) else f"{size} ({scn.schemas} schemas)"


def _layout(scn: Scenario, pairs: int) -> float:
    """Pairs per schema of the plan's first `pairs` pairs (<= 1: no repeat yet)."""
    return min(1.0, pairs / scn.schemas) if pairs <= scn.schemas else pairs / scn.schemas


def _fixed_sizes(scn: Scenario, settings: Settings) -> tuple[int, ...]:
    return (*settings.sizes, scn.cap)


def blocks(scn: Scenario, size: int) -> list[np.ndarray]:
    """The disjoint fixed-size runs of `size` pairs in a cap-size experiment: blocks of the first
    pass (no repeats) while they fit, else the plan's prefix."""
    if size >= scn.cap:
        return [np.arange(scn.cap)]
    k = max(1, scn.schemas // size)
    return [np.arange(i * size, (i + 1) * size) for i in range(k)]


# -- the truth of every scenario -------------------------------------------------------------------
@dataclass(frozen=True)
class ScenarioTruth:
    scn: Scenario  # calibrated
    fixed: dict[float, T.Truth]  # layout -> the truth there
    parts: T.SequentialParts | None  # with repeats: the sequential truths at any layout
    route: tuple[str, str]  # the right decision and the way to it (truth.route), at the cap
    differs: bool  # the arms truly differ
    seq_cap: int = 0  # the sequential design's cap and pairs per look (plan_sequential)
    seq_look: int = 20
    seq_planned: int | None = None  # the fixed-size pairs its cap was planned from

    @property
    def verdict(self) -> str:
        return self.route[0]

    @property
    def cap(self) -> T.Truth:
        return self.fixed[_layout(self.scn, self.scn.cap)] if self.scn.cap > self.scn.schemas else self.fixed[1.0]

    def at(self, layout: float) -> T.Truth:
        return self.fixed[1.0] if layout <= 1 else self.fixed[layout]

    def sequence(self, layout: float) -> tuple[dict[str, float], dict[str, float]]:
        """The sequential estimands' truth at a look's layout, and their Monte-Carlo errors."""
        if self.parts is None or layout <= 1:
            return self.fixed[1.0].values, self.fixed[1.0].mc_se
        return self.parts.at(layout), self.cap.mc_se


def _truth_job(job: tuple[Scenario, str, float, int]) -> tuple[str, str, float, Any]:
    scn, kind, layout, pairs = job
    if kind == "parts":
        return scn.name, kind, layout, T.sequential_parts(scn, pairs=pairs)
    return scn.name, kind, layout, T.truth(scn, layout, pairs=pairs)


def truths(scns: list[Scenario], settings: Settings, pool: Any, rule: DecisionRule, seq: Sequential) -> dict[str, ScenarioTruth]:
    """Calibrate every scenario, then compute its truths (layout 1, the cap's, the sequential parts)."""
    cal = list(pool.map(_calibrate, [(s, settings.truth_pairs) for s in scns]))
    jobs = []
    for s in cal:
        layouts = {1.0} | {_layout(s, n) for n in _fixed_sizes(s, settings)}
        jobs += [(s, "truth", lay, settings.truth_pairs) for lay in sorted(layouts) if lay >= 1]
        if s.repeats > 1:
            jobs.append((s, "parts", 2.0, settings.truth_pairs))
    got: dict[str, dict] = {s.name: {"fixed": {}, "parts": None} for s in cal}
    for name, kind, layout, val in pool.map(_truth_job, jobs):
        if kind == "parts":
            got[name]["parts"] = val
        else:
            got[name]["fixed"][layout] = val
    out = {}
    for s in cal:
        fixed = got[s.name]["fixed"]
        cap = fixed[max(1.0, _layout(s, s.cap))]
        out[s.name] = ScenarioTruth(s, fixed, got[s.name]["parts"], T.route(cap, rule, seq), T.differs(cap))
    plans = pool.map(_plan_job, [(out[s.name], settings, rule, seq, i) for i, s in enumerate(cal)])
    for s, (cap_pairs, look, planned) in zip(cal, plans):
        out[s.name] = replace(out[s.name], seq_cap=cap_pairs, seq_look=look, seq_planned=planned)
    return out


def _plan_job(job: tuple[ScenarioTruth, Settings, DecisionRule, Sequential, int]) -> tuple[int, int, int | None]:
    st, settings, rule, seq, i = job
    rng = np.random.default_rng(np.random.SeedSequence([settings.seed, 7919, i]))
    return plan_sequential(st.scn, st.cap.values, st.route, settings, rule, seq, rng)


def _calibrate(args: tuple[Scenario, int]) -> Scenario:
    return T.calibrate(args[0], pairs=args[1])


# -- one experiment --------------------------------------------------------------------------------
def _covers(iv: dict | None, truth: float, mc_se: float) -> bool | None:
    """Does the interval hold the truth (within 2 Monte-Carlo standard errors of it)? None: no
    interval was reported."""
    if not iv or iv.get("ci_low") is None or iv.get("ci_high") is None:
        return None
    tol = 2 * mc_se
    return bool(iv["ci_low"] - tol <= truth <= iv["ci_high"] + tol)


def _judged(ex: Experiment, cfg: ExperimentConfig, pairs: np.ndarray, seed: int) -> tuple[dict, dict]:
    df, planned, costs = ex.frame(pairs)
    ev = evaluate(df, cfg, planned=planned, costs=costs, seed=seed)
    return ev, decide(ev, cfg.decision)


def _fixed_entry(ev: dict, dec: dict, truth: T.Truth) -> dict:
    comp = ev["comparisons"][CANDIDATE]
    v, se = truth.values, truth.mc_se
    return {
        "verdict": dec["verdict"],
        "covers": {k: _covers(get(comp), v[k], se[k]) for k, get in INTERVALS.items() if k in v},
        "sd": {"success": comp["success"].get("sd_unit"), "latency": comp["latency"].get("sd_log_unit"),
               "cv": comp["cv_ratio"].get("sd_log_unit")},
    }


def run_experiment(job: tuple[int, ScenarioTruth, Settings, np.random.SeedSequence]) -> dict:
    """Every design on one synthetic experiment; what each decided and which intervals covered."""
    idx, st, settings, ss = job
    scn = st.scn
    rng = np.random.default_rng(ss)
    cap_seq = st.seq_cap
    ex = Experiment.draw(scn, rng, cap_seq)
    cfg = config(scn, settings.resamples, st.seq_look, cap_seq)
    eval_seed = int(rng.integers(2**31))
    cache: dict[int, tuple[dict, dict]] = {}  # prefix length -> (evaluation, decision)

    def judged(sel: np.ndarray) -> tuple[dict, dict]:
        prefix = sel[0] == 0
        if prefix and sel.size in cache:
            return cache[sel.size]
        out = _judged(ex, cfg, sel, eval_seed)
        if prefix:
            cache[sel.size] = out
        return out

    fixed: dict[str, list[dict]] = {}
    for design, size in zip(("fixed_small", "fixed_mid", "fixed_cap"), _fixed_sizes(scn, settings)):
        truth = st.at(_layout(scn, size))
        fixed[design] = []
        for sel in blocks(scn, size):
            ev, dec = judged(sel)
            fixed[design].append({**_fixed_entry(ev, dec, truth), "size": _size_label(scn, size)})
    naive_looks = list(range(settings.look, scn.cap, settings.look)) + [scn.cap]
    naive = {"verdict": "inconclusive", "pairs": scn.cap}
    for end in naive_looks:
        _, dec = judged(np.arange(end))
        if dec["verdict"] != "inconclusive":
            naive = {"verdict": dec["verdict"], "pairs": end}
            break
    return {"index": idx, "scenario": scn.name, "fixed": fixed, "naive": naive,
            "sequential": _sequential(ex, st, cfg, list(range(st.seq_look, cap_seq + 1, st.seq_look)))}


def _sequential(ex: Experiment, st: ScenarioTruth, cfg: ExperimentConfig, looks: list[int]) -> dict:
    """The sequential rule over the looks (stopping at the first settled one), and whether each
    repeated confidence interval held the truth at every look up to the cap."""
    scn = st.scn
    df, _, _ = ex.frame()
    design = _design(scn, cfg)
    kept: set[str] = set()
    stop: dict | None = None
    held = dict.fromkeys(SEQUENCES, True)
    crit = Q.criticals(design, looks, Q.alpha_per_interval(cfg.decision, 1))
    for end, c in zip(looks, crit):
        j = Q.judge_look(df, CONTROL, [CANDIDATE], cfg.decision, design, scn.world.timeout_s, end, c, kept)
        per = j["per_candidate"][CANDIDATE]
        truth, mc_se = st.sequence(_layout(scn, end))
        for key, field_name in SEQUENCES.items():
            iv = per[field_name]
            lo = -math.inf if iv["ci_low"] is None else iv["ci_low"] - 2 * mc_se[key]
            hi = math.inf if iv["ci_high"] is None else iv["ci_high"] + 2 * mc_se[key]
            held[key] = held[key] and lo <= truth[key] <= hi
        if stop is None and j["verdict"] != "continue":
            stop = {"verdict": j["verdict"], "pairs": end}
        kept |= {c for c, p in j["per_candidate"].items() if p["verdict"] == "keep"}
    return {**(stop or {"verdict": "inconclusive", "pairs": looks[-1]}), "held": held}


# -- many experiments ------------------------------------------------------------------------------
def allocate(scns: list[Scenario], n: int) -> list[Scenario]:
    """n experiments over the scenarios in proportion to their weights (largest remainder),
    interleaved so that any prefix of the list is balanced."""
    w = np.array([s.weight for s in scns], dtype=float)
    exact = n * w / w.sum()
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts))[: n - counts.sum()]:
        counts[i] += 1
    order: list[tuple[float, int]] = []
    for i, c in enumerate(counts):
        order += [((k + 0.5) / c, i) for k in range(c)]
    return [scns[i] for _, i in sorted(order)]


def _pool(workers: int) -> Any:
    if workers <= 1:
        return _Serial()
    return mp.get_context("fork").Pool(workers)


class _Serial:
    """The pool interface, in this process (workers=1: tests, profiling)."""

    def map(self, f: Callable, xs: list) -> list:
        return [f(x) for x in xs]

    def imap_unordered(self, f: Callable, xs: list) -> Iterator:
        return (f(x) for x in xs)

    def __enter__(self) -> _Serial:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def simulate(n_experiments: int = 400, *, seed: int = 0, resamples: int = 1000, workers: int = 2, look: int = 20,
             pairs: int | None = None, max_pairs: int | None = None, scenarios: tuple[str, ...] | None = None,
             truth_pairs: int = T.TRUTH_PAIRS, progress: Callable[[int, int], None] | None = None) -> dict:
    """Run the simulation; the result holds every table of the report and the headline numbers
    (module docstring). `pairs` (the cap) and `scenarios` narrow it (tests); `max_pairs` gives the
    sequential rule (and naive peeking) a larger cap than the fixed sizes'. Each experiment has its
    own seed, spawned from `seed`."""
    t0 = time.perf_counter()
    settings = Settings(experiments=int(n_experiments), seed=seed, resamples=resamples, workers=workers, look=look,
                        seq_cap=max_pairs, truth_pairs=truth_pairs,
                        scenarios=tuple(scenarios) if scenarios else tuple(s.name for s in SCENARIOS))
    unknown = set(settings.scenarios) - {s.name for s in SCENARIOS}
    if unknown:
        raise KeyError(f"no scenario {sorted(unknown)}; scenarios: {[s.name for s in SCENARIOS]}")
    if settings.experiments < 1:
        raise ValueError("--experiments must be at least 1")
    scns = [s for s in SCENARIOS if s.name in settings.scenarios]
    if pairs is not None:  # a smaller cap: the same scenarios with fewer schemas
        scns = [replace(s, schemas=max(1, int(pairs) // s.repeats)) for s in scns]
    rule = DecisionRule()
    seq = Sequential()
    with _pool(workers) as pool:
        st = truths(scns, settings, pool, rule, seq)
        t_truth = time.perf_counter() - t0
        plan = allocate([st[s.name].scn for s in scns], settings.experiments)
        seqs = np.random.SeedSequence(seed).spawn(len(plan))
        jobs = [(i, st[s.name], settings, seqs[i]) for i, s in enumerate(plan)]
        results = []
        for r in pool.imap_unordered(run_experiment, jobs):
            results.append(r)
            if progress:
                progress(len(results), len(jobs))
    results.sort(key=lambda r: r["index"])
    out = summarize(results, st, settings, rule, seq)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    out["truth_s"] = round(t_truth, 1)
    return S.jsonable(out)
