"""The plan of an experiment before anything runs: arms, where they are served, requests, cost.

`guided-ab run CONFIG --dry-run` prints `describe_plan(cfg)`. Nothing here touches the network
or starts a server: app names, GPU counts and request counts come from the config, and time
and cost from stated assumptions (by default the seed's ~14 s per request).

Cost model: every arm this run starts is held from deploy to teardown, i.e. its start-up plus
the observe and A/B phases (the phases run one after the other; within a phase
`workload.concurrency` requests are in flight across all arms). The arms start and are waited
for at once, and a Modal arm's containers are kept warm (`modal.replicas.min_containers`, by
default one) for all that time, so they are billed for all of it. Held hours times the arm's $/h
(Modal: warm containers x (GPUs x GPU $/h + CPU cores x core $/h + memory GiB x GiB $/h), list
prices in the config; local/external: the arm's cost_per_hour) is its cost, the same formula the
teardown records with the measured held time; `guided-ab cost --run-id` puts what Modal billed
beside it. Containers Modal's autoscaler adds under load (up to max_containers) are not
foreseeable: the plan states the most they could cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from guided_ab.arms.targets import target_for
from guided_ab.config import ExperimentConfig, LoadProfile, TargetKind
from guided_ab.load.arrivals import planned_pairs

SEED_LATENCY_S = 14.0  # the seed's average end-to-end latency per structured request
MODAL_STARTUP_S = 600.0  # assumed cold start of a Modal arm: container, weights from the Volume, vLLM load
LOCAL_STARTUP_S = 60.0  # a local CPU server with --enforce-eager (measured ~55 s)


@dataclass(frozen=True)
class ArmPlan:
    arm: str
    role: str
    target: TargetKind
    backend: str
    model: str
    where: str  # Modal app name, external URL, or "this machine"
    gpu: str  # "H100 x 4" or "-"
    warmup: int
    observe: int
    ab: int
    startup_s: float
    held_s: float
    cost_per_hour: float
    max_startup_s: float  # the startup timeout: a start cannot take longer without failing

    @property
    def requests(self) -> int:
        return self.warmup + self.observe + self.ab

    @property
    def cost_usd(self) -> float:
        return self.held_s / 3600 * self.cost_per_hour

    @property
    def slow_start_cost_usd(self) -> float:
        """The cost if the start takes as long as the startup timeout allows."""
        return (self.held_s - self.startup_s + self.max_startup_s) / 3600 * self.cost_per_hour


@dataclass(frozen=True)
class ExperimentPlan:
    experiment: str
    run_id: str
    phases: list[str]
    arms: list[ArmPlan]
    observe_s: float
    ab_s: float
    latency_s: float
    concurrency: int
    modal_startup_s: float
    local_startup_s: float

    @property
    def requests(self) -> int:
        return sum(a.requests for a in self.arms)

    @property
    def cost_usd(self) -> float:
        return sum(a.cost_usd for a in self.arms)

    @property
    def slow_start_cost_usd(self) -> float:
        return sum(a.slow_start_cost_usd for a in self.arms)

    @property
    def wall_s(self) -> float:
        return max((a.held_s for a in self.arms), default=0.0)


def _phase_s(n_requests: int, concurrency: int, latency_s: float) -> float:
    return math.ceil(n_requests / concurrency) * latency_s if n_requests else 0.0


def plan_experiment(
    cfg: ExperimentConfig,
    *,
    run_id: str | None = None,
    latency_s: float = SEED_LATENCY_S,
    modal_startup_s: float = MODAL_STARTUP_S,
    local_startup_s: float = LOCAL_STARTUP_S,
) -> ExperimentPlan:
    """Per arm: where it runs, how many requests it gets, how long it is held and what it costs."""
    if run_id is None:
        from guided_ab.store import new_run_id

        run_id = new_run_id(cfg.name)
    wl = cfg.workload
    phases: list[str] = list(cfg.phases)
    observe_n = wl.observe_size if "observe" in phases else 0
    warmup_n = wl.warmup if "ab" in phases else 0
    seq = cfg.decision.sequential
    # a sequential A/B sends looks until it settles: at most max_pairs (the plan shows the most)
    ab_n = (seq.max_pairs if seq else wl.size * wl.repeats) if "ab" in phases else 0
    # an open-loop phase sends the pairs its load profile pre-registered (count or duration_s)
    observe_n = (planned_pairs(wl.load.observe, wl.seed, "observe") or observe_n) if observe_n else 0
    ab_n = (planned_pairs(wl.load.ab, wl.seed, "ab") or ab_n) if ab_n else 0
    n_candidates = len(cfg.candidates)
    observe_s = _phase_s(observe_n * n_candidates, wl.concurrency, latency_s)
    ab_s = _phase_s((warmup_n + ab_n) * len(cfg.arms), wl.concurrency, latency_s)
    if wl.load.observe.open_loop and wl.load.observe.rate and observe_n:  # arrivals at the rate, + the last answer
        observe_s = observe_n / wl.load.observe.rate + latency_s
    if wl.load.ab.open_loop and wl.load.ab.rate and ab_n:
        ab_s = (warmup_n + ab_n) / wl.load.ab.rate + latency_s
    # assumed start-up per target kind; without a deploy phase this run starts nothing
    startups = {"modal": modal_startup_s, "local": local_startup_s} if "deploy" in phases else {}
    arms = []
    for arm in cfg.arms:
        est = target_for(arm.target).estimate(arm, experiment=cfg.name, run_id=run_id, startup_s=startups)
        arms.append(ArmPlan(
            arm=arm.name, role=arm.role, target=arm.target, backend=arm.backend, model=arm.model,
            where=est.where, gpu=est.gpu,
            warmup=warmup_n, observe=observe_n if arm.role == "candidate" else 0, ab=ab_n,
            startup_s=est.startup_s, held_s=est.startup_s + observe_s + ab_s,
            cost_per_hour=est.cost_per_hour, max_startup_s=est.max_startup_s,
        ))
    return ExperimentPlan(
        experiment=cfg.name, run_id=run_id, phases=phases, arms=arms, observe_s=observe_s, ab_s=ab_s,
        latency_s=latency_s, concurrency=wl.concurrency, modal_startup_s=modal_startup_s,
        local_startup_s=local_startup_s,
    )


def _load_line(phase: str, load: LoadProfile, pairs: int, concurrency: int, per_look: bool) -> str:
    """What a phase's load profile will send (workload.load)."""
    if not load.open_loop:
        return f"  {phase} load: closed loop, {concurrency} requests in flight (the next sent when one returns)"
    kind = "Poisson arrivals (exponential gaps, seeded)" if load.profile == "poisson" else "evenly spaced arrivals"
    what = ("each look's pairs on its own schedule" if per_look else
            f"{pairs} pairs" + (f" (the schedule's arrivals in {load.duration_s:g} s)" if load.duration_s else ""))
    return (f"  {phase} load: open loop, {kind} at {load.rate:g}/s per arm, both arms of a pair at one instant; "
            f"{what}, warm-ups first; at most {load.max_in_flight} in flight, a late send recorded with its lag")


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _autoscaling_lines(cfg: ExperimentConfig, p: ExperimentPlan) -> list[str]:
    """Modal arms that may run more containers than the estimate counts: the most that could cost
    (every container up for the whole time the arm is held)."""
    out = []
    for a in p.arms:
        s = cfg.arm(a.arm).modal
        if a.target == "modal" and s.replicas.max_containers > s.warm_containers:
            out.append(f"  {a.arm}: {s.warm_containers} warm container(s) counted; with all {s.replicas.max_containers} "
                       f"(max_containers) up all the time: ${a.held_s / 3600 * s.max_cost_per_hour:.2f}")
    if out:
        out.insert(0, "  Modal autoscaling (replicas): the estimate counts the warm containers (min_containers);")
    return out


def describe_plan(
    cfg: ExperimentConfig,
    *,
    run_id: str | None = None,
    latency_s: float = SEED_LATENCY_S,
    modal_startup_s: float = MODAL_STARTUP_S,
    local_startup_s: float = LOCAL_STARTUP_S,
) -> str:
    """The dry-run text: what would be started, sent and paid, and under which assumptions."""
    p = plan_experiment(
        cfg, run_id=run_id, latency_s=latency_s, modal_startup_s=modal_startup_s, local_startup_s=local_startup_s,
    )
    wl, seq = cfg.workload, cfg.decision.sequential
    ab_line = (f"workload: suite '{wl.suite}', sequential A/B: looks of {seq.pairs_per_look} pairs until the verdict settles, "
               f"up to {seq.max_pairs} pairs" + (f" or ${seq.max_usd:g}" if seq.max_usd else "") + " to every arm"
               " (counts and costs below are that cap: the most it can send),"
               if seq else f"workload: suite '{wl.suite}', {wl.size} A/B schemas x {wl.repeats} to every arm,")
    lines = [
        f"Dry run of '{p.experiment}': nothing is deployed, no request is sent.",
        f"phases: {', '.join(p.phases)}",
        ab_line,
        f"  {wl.observe_size} observe-only to each candidate, {wl.warmup} warm-up per arm, "
        f"concurrency {wl.concurrency}",
        *[_load_line(phase, getattr(wl.load, phase), n, wl.concurrency, bool(seq) and phase == "ab")
          for phase, n in (("observe", max(a.observe for a in p.arms)), ("ab", p.arms[0].ab)) if phase in p.phases],
        "",
        "arms:",
    ]
    for a in p.arms:
        target = target_for(a.target)
        lines += [
            f"  {a.arm} ({a.role}): target {a.target}, backend {a.backend}",
            f"    model: {a.model}",
            f"    {target.where_label}: {a.where}",
            *target.describe(cfg.arm(a.arm)),
        ]
    lines += ["", "requests and estimated cost:"]
    rows = [["arm", "warmup", "observe", "A/B", "total", "startup", "held", "$/h", "est. cost"]]
    for a in p.arms:
        rows.append([
            a.arm, str(a.warmup), str(a.observe), str(a.ab), str(a.requests), _minutes(a.startup_s),
            _minutes(a.held_s), f"{a.cost_per_hour:.2f}", f"${a.cost_usd:.2f}",
        ])
    rows.append(["all", "", "", "", str(p.requests), "", _minutes(p.wall_s), "", f"${p.cost_usd:.2f}"])
    lines += ["  " + line for line in _table(rows)]
    seed_note = " (the seed's mean latency)" if p.latency_s == SEED_LATENCY_S else ""
    lines += [
        "",
        "assumptions:",
        f"  {p.latency_s:g} s per request{seed_note}, {p.concurrency} in flight across all arms",
        f"  observe phase {_minutes(p.observe_s)}, A/B phase {_minutes(p.ab_s)}",
        f"  start-up: Modal {_minutes(p.modal_startup_s)}, local {_minutes(p.local_startup_s)}; all arms start at once",
        f"  pre-flight ({wl.preflight}): each A/B prompt is counted with the served model's own tokenizer (the",
        "  server's /tokenize) once the arms are up, before the first A/B request; a dry run starts no server,",
        "  so prompts that cannot fit max_model_len - max_tokens are counted then, not here",
    ]
    if any(target_for(a.target).slow_start for a in p.arms):
        lines += [
            "  if every Modal start takes its whole startup timeout (a first start",
            f"  downloads the weights): ${p.slow_start_cost_usd:.2f}",
        ]
    lines += _autoscaling_lines(cfg, p)
    lines += [
        "Teardown stops every app this run started; the recorded cost uses the held time.",
        f"App names are shown for a run id like {p.run_id}.",
    ]
    return "\n".join(lines)
