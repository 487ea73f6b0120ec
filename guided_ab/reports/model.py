"""The report model: everything a run's outputs show, gathered once from the run's results.

report.md, report.html, the PNGs, the CLI tables and the Prefect artifacts are siblings that read
this one typed object and never each other (guidellm's benchmark outputs are the pattern). It is
built from what the run store holds: the config, evaluation.json, decision.json, the request
records and teardown.json. Numbers come from the evaluation as evaluation.py computed them (the
p50/p95 in a plot's legend included); the records only feed what the evaluation does not keep
(the plots' points, per-subset failure counts, error messages, the drift check).

`Summary` is the part that needs only evaluation.json and decision.json (the CLI tables read
many runs and load nothing else); `ReportModel` holds it with the rest. `version` changes when
the shape changes in a way a reader must know about.

Plots and tables use the same rows as the statistics (evaluation.py): the A/B phase without
warm-ups; latency and TTFT over requests that got an answer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd

from guided_ab.analysis.evaluation import ANSWERED_OUTCOMES
from guided_ab.config import ExperimentConfig
from guided_ab.records import RECORD_COLUMNS
from guided_ab.reports.format import ARM_COLORS, counts_text, hypothesis_line, interval, num, verdict_text

REPORT_MODEL_VERSION = 1


def dig(d: Any, *path: str) -> Any:
    """d[path[0]][path[1]]...; None where a level is missing or not a mapping."""
    for p in path:
        if not isinstance(d, Mapping):
            return None
        d = d.get(p)
    return d


# -- rows shared by every output -------------------------------------------------------------------
def arm_rows(evaluation: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per arm: the seed's comparison table (success, latency, backend, variability, cost)."""
    rows = []
    for name, a in evaluation.get("arms", {}).items():
        lat = a.get("latency", {})
        backend = a.get("backend", {})
        counts = backend.get("counts", {})
        rows.append({
            "arm": name,
            "role": a.get("role"),
            "backend (configured)": a.get("configured_backend"),
            "n": a.get("n"),
            "success rate [95% CI]": interval(a.get("success", {}).get("rate"), "{:.1%}"),
            "latency p50 s": interval(lat.get("p50")),
            "latency p95 s": interval(lat.get("p95")),
            "TTFT p50 s": interval(a.get("ttft", {}).get("p50")),
            "CV": interval(a.get("cv") or lat.get("cv")),
            "backend used": counts_text(counts) or "n/a",
            "failures": counts_text({k: v for k, v in a.get("outcomes", {}).items() if k != "success" and v}) or "none",
            "cost USD": num(a.get("cost", {}).get("usd"), "{:.4f}"),
        })
    return rows


def _judged_on(c: Mapping[str, Any]) -> str:
    """The Bonferroni interval a gain or a broken guardrail is judged on ("" where none applies)."""
    if c.get("adjusted_level") is None or c.get("adjusted_ci_low") is None:
        return ""
    return f"{c['adjusted_level']:.1%} [{num(c.get('adjusted_ci_low'), '{:.3f}')}, {num(c.get('adjusted_ci_high'), '{:.3f}')}]"


def interval_label(decision: Mapping[str, Any]) -> str:
    """What the criteria's intervals are: fixed-size 95 % intervals, or a sequential run's repeated
    confidence intervals (valid at every look at once: wider than a fixed-size interval)."""
    return "95% repeated CI (every look)" if decision.get("sequential") else "95% CI"


def criteria_rows(decision: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per pre-registered criterion: estimate, interval, margin, verdict, and the Bonferroni
    interval over its family (what a gain or a clearly broken guardrail is judged on)."""
    label = interval_label(decision)
    return [
        {
            "criterion": c.get("name"), "candidate": c.get("candidate"),
            "estimate": num(c.get("estimate"), "{:.3f}"),
            label: f"[{num(c.get('ci_low'), '{:.3f}')}, {num(c.get('ci_high'), '{:.3f}')}]",
            "margin": num(c.get("margin"), "{:.3f}"), "verdict": c.get("verdict"),
            "Bonferroni interval": _judged_on(c),
        }
        for c in decision.get("criteria", [])
    ]


def explain_rows(evaluation: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per candidate: why its latency differs (TTFT and time-per-output-token p50 ratios,
    output tokens mean ratio, answers cut at max_tokens, timeouts censored), intervals in brackets."""
    rows = []
    for cand, c in (evaluation.get("comparisons") or {}).items():
        ex = c.get("explain") or {}
        if not ex:
            continue
        tr = ex.get("truncation") or {}
        cens = ex.get("censored") or {}
        rows.append({
            "candidate / control": f"{cand} / {c.get('control')}",
            "p50 latency ratio": interval(dig(c, "latency", "ratio_p50"), "{:.3f}"),
            "TTFT p50 ratio": interval(ex.get("ttft_p50_ratio"), "{:.3f}"),
            "time/token p50 ratio": interval(ex.get("tpot_p50_ratio"), "{:.3f}"),
            "output tokens ratio": interval(ex.get("tokens_mean_ratio"), "{:.3f}"),
            "cut at max_tokens": f"{num(tr.get('candidate_share'), '{:.0%}')} vs {num(tr.get('control_share'), '{:.0%}')}",
            "timeouts (censored)": f"{cens.get('candidate', 0)} vs {cens.get('control', 0)}",
        })
    return rows


# -- the servers' own metrics (guided_ab/load/server_metrics.py: evaluation["server_metrics"]) --------
SERVER_METRICS_NOTE = (
    "What each vLLM server reported on its Prometheus /metrics while the A/B phase ran (scraped at its start, "
    "every few seconds and at its end): the mean time per request the server finished in that span, split into "
    "queue (waiting for a batch slot, and for the request's grammar to compile: vLLM keeps a structured-output "
    "request unscheduled until its grammar is ready), prefill and decode, beside the server's and the client's own TTFT and "
    "latency. Server times start when the request reaches the engine; the client's include the network and the "
    "HTTP front end. Warm-ups included (the server cannot tell them apart).")


def server_metrics_arms(evaluation: Mapping[str, Any], key: str = "server_metrics") -> dict[str, dict[str, Any]]:
    """arm -> its time split (only arms with numbers; see server_metrics_notes for the others).
    `key`: the evaluation's entry, "server_metrics" (A/B phase) or OBSERVE_SERVER_METRICS."""
    arms = dig(evaluation, key, "arms") or {}
    order = [evaluation.get("control"), *(evaluation.get("candidates") or [])]  # the report's arm order
    ranked = sorted(arms, key=lambda a: order.index(a) if a in order else len(order))
    return {a: arms[a] for a in ranked if isinstance(arms[a], Mapping) and "mean_s" in arms[a]}


def server_time_rows(evaluation: Mapping[str, Any], key: str = "server_metrics") -> list[dict[str, Any]]:
    """One row per arm with scraped metrics: the server's mean queue, prefill and decode time per
    request, its TTFT and latency beside the client's, and the peaks of its load gauges."""
    rows = []
    for arm, e in server_metrics_arms(evaluation, key).items():
        mean, client, peak = e.get("mean_s") or {}, e.get("client") or {}, e.get("peak") or {}
        rows.append({
            "arm": arm,
            "requests (server / client)": f"{num(e.get('requests_finished'), '{}')} / {num(client.get('answered'), '{}')}",
            "queue s": num(mean.get("queue"), "{:.3f}"),
            "prefill s": num(mean.get("prefill"), "{:.3f}"),
            "decode s": num(mean.get("decode"), "{:.3f}"),
            "TTFT s (server / client)": f"{num(mean.get('ttft'), '{:.3f}')} / {num(client.get('ttft_mean_s'), '{:.3f}')}",
            "latency s (server / client)": f"{num(mean.get('e2e'), '{:.3f}')} / {num(client.get('latency_mean_s'), '{:.3f}')}",
            "peak running / waiting": f"{num(peak.get('running'), '{:.0f}')} / {num(peak.get('waiting'), '{:.0f}')}",
            "peak KV cache": num(peak.get("kv_cache"), "{:.1%}"),
            "preemptions": num(e.get("preemptions"), "{:.0f}"),
        })
    return rows


def server_metrics_notes(evaluation: Mapping[str, Any]) -> list[str]:
    """One line per arm without numbers (and why), or one line when nothing was scraped at all."""
    sm = evaluation.get("server_metrics")
    if not isinstance(sm, Mapping) or not sm.get("arms"):
        return ["No server metrics: nothing was scraped in the A/B phase (workload.metrics_interval_s is 0, "
                "or the run predates scraping)."]
    return [f"{arm}: no server metrics, {e.get('why')}." for arm, e in sm["arms"].items()
            if isinstance(e, Mapping) and "mean_s" not in e]


# the observe phase's time split (phases.evaluate_run): the candidates alone, before the A/B
OBSERVE_SERVER_METRICS = "server_metrics_observe"
OBSERVE_SERVER_METRICS_NOTE = (
    "The observe phase, before the A/B: only the candidates are sent requests (to see which backend they resolve), "
    "without warm-ups and each schema new to the server, so these are each candidate's first requests, grammar "
    "compiles included. Few requests and no control beside them: a candidate's cold start, not a comparison.")


def observe_server_notes(evaluation: Mapping[str, Any]) -> list[str]:
    """One line per observe-phase arm scraped without numbers (nothing when observe was not scraped)."""
    arms = dig(evaluation, OBSERVE_SERVER_METRICS, "arms") or {}
    return [f"{arm} (observe): no server metrics, {e.get('why')}." for arm, e in arms.items()
            if isinstance(e, Mapping) and "mean_s" not in e]


# -- the load as offered (guided_ab/analysis/offered_load.py: evaluation["offered_load"][phase]) -----
OFFERED_LOAD_NOTE = (
    "How the A/B phase's requests were sent. An open loop sends arrivals on a clock of their own, whether or not "
    "the servers keep up; one arrival is one pair (both arms at one instant), so pairs/s is requests/s per arm. "
    "Offered: the rate the config asked for (and the schedule as drawn); achieved: the rate the arrivals really "
    "went out at. Send lag: how late each request went out (the in-flight cap or a busy client held it back); "
    "its latency starts when it was sent, so a long lag hides queueing from the latency figures. Warm-ups included.")
_PROFILE_NAMES = {"poisson": "Poisson", "constant": "Constant-rate"}


def offered_load(evaluation: Mapping[str, Any], phase: str = "ab") -> Mapping[str, Any] | None:
    """The phase's load as run, or None (an evaluation written before it was computed)."""
    block = dig(evaluation, "offered_load", phase)
    return block if isinstance(block, Mapping) and "open_loop" in block else None


def _ms(x: Any) -> str:
    return num(x, "{:.2f} ms")


def offered_load_line(block: Mapping[str, Any]) -> str:
    """One sentence: the profile, offered and achieved rate, send lag p50 / p99 / max and the late
    requests of an open loop; the concurrency of a closed one."""
    if not block.get("open_loop"):
        return (f"Closed loop, {num(block.get('concurrency'), '{}')} in flight (all arms together): each next request "
                "went out when one returned, so a slow server slowed the sending (no schedule, no send lag).")
    profile = _PROFILE_NAMES.get(str(block.get("profile")), str(block.get("profile")))
    target, drawn = block.get("target_rate"), block.get("offered_rate")
    offered = (f"{num(target, '{:.3g}')} pairs/s offered (the schedule as drawn: {num(drawn, '{:.3g}')}/s)"
               if target is not None else f"{num(drawn, '{:.3g}')} pairs/s offered")
    lag = block.get("send_lag_ms") or {}
    cap = block.get("max_in_flight")
    return (f"{profile} {offered}, {num(block.get('achieved_rate'), '{:.3g}')}/s achieved; send lag p50 "
            f"{_ms(lag.get('p50'))}, p99 {_ms(lag.get('p99'))}, max {_ms(lag.get('max'))} ({block.get('late', 0)} of "
            f"{block.get('requests', 0)} requests more than {num(block.get('late_ms'), '{:g}')} ms late)"
            + (f"; at most {cap} in flight." if cap is not None else "."))


def offered_load_rows(block: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per arm of an open loop: requests, achieved rate, send lag and late requests (none for a closed loop)."""
    if not block.get("open_loop"):
        return []
    late = f"> {num(block.get('late_ms'), '{:g}')} ms late"
    return [{"arm": arm, "requests": a.get("requests"), "achieved /s": num(a.get("achieved_rate"), "{:.3g}"),
             "send lag p50": _ms(dig(a, "send_lag_ms", "p50")), "p99": _ms(dig(a, "send_lag_ms", "p99")),
             "max": _ms(dig(a, "send_lag_ms", "max")), late: a.get("late")}
            for arm, a in (block.get("arms") or {}).items() if isinstance(a, Mapping)]


@dataclass(frozen=True)
class ArmGlance:
    """An arm's two headline numbers (the list of runs shows them)."""

    name: str
    success_rate: float | None
    latency_p50: float | None


@dataclass(frozen=True)
class Summary:
    """What a run decided and its per-arm and per-criterion rows: evaluation.json and decision.json only."""

    run_id: str
    verdict: str
    verdict_text: str
    serve: Any
    control: Any
    candidates: list[str]
    reasons: list[str]
    n_pairs: int  # the most pairs any candidate had with the control
    arm_rows: list[dict[str, Any]]
    criteria_rows: list[dict[str, Any]]
    arms: list[ArmGlance]
    hypotheses: list[str] = field(default_factory=list)  # pre-registered hypotheses and their outcomes

    @classmethod
    def from_results(cls, evaluation: Mapping[str, Any], decision: Mapping[str, Any], run_id: str) -> Summary:
        verdict = str(decision.get("verdict", "?"))
        return cls(
            run_id=run_id, verdict=verdict, verdict_text=verdict_text(verdict), serve=decision.get("serve"),
            control=evaluation.get("control"), candidates=list(evaluation.get("candidates") or []),
            reasons=list(decision.get("reasons", [])),
            n_pairs=max((int(c.get("n_pairs", 0)) for c in (evaluation.get("comparisons") or {}).values()), default=0),
            arm_rows=arm_rows(evaluation), criteria_rows=criteria_rows(decision),
            arms=[ArmGlance(n, dig(a, "success", "rate", "estimate"), dig(a, "latency", "p50", "estimate"))
                  for n, a in evaluation.get("arms", {}).items()],
            hypotheses=[hypothesis_line(h) for h in decision.get("hypotheses") or [] if isinstance(h, Mapping)],
        )

    @classmethod
    def load(cls, run_dir: Path) -> Summary:
        """From a run directory's evaluation.json and decision.json (OSError, ValueError if unreadable)."""
        evaluation = json.loads((run_dir / "evaluation.json").read_text())
        decision = json.loads((run_dir / "decision.json").read_text())
        return cls.from_results(evaluation, decision, run_dir.name)


# -- the records, split once -----------------------------------------------------------------------
@dataclass(frozen=True)
class Records:
    """The request records the plots and record tables use, split once."""

    all: pd.DataFrame
    ab: pd.DataFrame  # A/B phase, warm-ups excluded: the rows of the statistics
    observe: pd.DataFrame  # observe phase, warm-ups excluded
    answered: pd.DataFrame  # A/B rows that got an answer (the latency basis)
    arms: list[str]  # the configured arms, then any arm only the records know

    @classmethod
    def build(cls, records: pd.DataFrame | None, arms: list[str]) -> Records:
        df = records if records is not None and len(records) else pd.DataFrame(columns=RECORD_COLUMNS)
        df = df.copy()
        for c in ("latency_s", "ttft_s", "sent_at"):
            df[c] = pd.to_numeric(df[c], errors="coerce")
        df["warmup"] = df["warmup"].fillna(False).astype(bool)
        df["backend"] = df["backend"].where(df["backend"].notna(), "unknown").astype(str)
        df["subset"] = df["subset"].where(df["subset"].notna(), "?").astype(str)
        ab = df[(df["phase"] == "ab") & ~df["warmup"]]
        extra = sorted(set(ab["arm"].astype(str)) - set(arms))
        return cls(all=df, ab=ab, observe=df[(df["phase"] == "observe") & ~df["warmup"]],
                   answered=ab[ab["outcome"].isin(ANSWERED_OUTCOMES)], arms=list(arms) + extra)

    @staticmethod
    def arm(frame: pd.DataFrame, arm: str) -> pd.DataFrame:
        return frame[frame["arm"] == arm]


@dataclass(frozen=True)
class Quantiles:
    """One arm's n, p50 and p95 of one metric, as evaluation.py computed them (plot legends)."""

    n: int | None
    p50: float | None
    p95: float | None


@dataclass(frozen=True)
class ErrorMessage:
    """One of the most frequent error messages of failed A/B requests (first 160 characters)."""

    arm: str
    outcome: str
    count: int
    message: str


@dataclass(frozen=True)
class DriftRow:
    """One arm's latency trend over the A/B phase in send order (answered requests)."""

    arm: str
    answered: int
    p50_first_third: float
    p50_last_third: float
    spearman_rho: float
    spearman_p: float


@dataclass(frozen=True)
class ReplicaRow:
    """One container of an arm served by several (Modal replicas), A/B phase without warm-ups:
    what it served and how fast, beside its arm's median, so a slow container is seen."""

    arm: str
    container: str  # the x-guided-ab-served-by header (Modal's task id), or NO_CONTAINER
    requests: int
    success_rate: float
    answered: int  # the latency basis, as everywhere in the report
    p50: float | None
    p95: float | None
    p50_vs_arm: float | None  # this container's p50 over the p50 of all the arm's answered requests

    @property
    def slow(self) -> bool:
        return self.p50_vs_arm is not None and self.p50_vs_arm >= SLOW_REPLICA_RATIO


NO_CONTAINER = "(no answer)"  # requests no container answered (connection errors, timeouts before the headers)
# a container whose median latency is this much above its arm's is marked: a quarter is well past
# the scatter of medians of a few dozen requests each, and small enough to catch a throttled GPU
SLOW_REPLICA_RATIO = 1.25


@dataclass(frozen=True)
class ReportModel:
    """Everything report.md, report.html and its plots show; build it with `build_report`."""

    version: int
    run_id: str
    cfg: ExperimentConfig
    evaluation: dict[str, Any]
    decision: dict[str, Any]
    summary: Summary
    colors: dict[str, str]  # arm -> plot and card colour (configured arms; others draw near-black)
    records: Records
    teardown: dict[str, Any]  # teardown.json: how long each endpoint was held
    quantiles: dict[str, dict[str, Quantiles]]  # "latency" | "ttft" -> arm -> numbers from the evaluation
    subsets: pd.DataFrame  # per schema subset and arm: n, failed, top failure, failure rate
    backend_mix: list[tuple[str, dict[str, int]]]  # ("A/B · arm" | "observe · arm", resolved backend counts)
    errors: list[ErrorMessage] = field(default_factory=list)
    drift: list[DriftRow] = field(default_factory=list)
    # per container, for arms served by more than one (empty when every arm had one container)
    replicas: list[ReplicaRow] = field(default_factory=list)

    @property
    def arms(self) -> list[str]:
        """Display order: control, candidates, then any arm only the records know."""
        return self.records.arms

    def arm_result(self, arm: str) -> dict[str, Any] | None:
        """The arm's entry in evaluation.json (None for an arm the evaluation does not know)."""
        a = dig(self.evaluation, "arms", arm)
        return a if isinstance(a, dict) else None

    def with_records(self, records: pd.DataFrame | None, teardown: Mapping[str, Any] | None = None) -> ReportModel:
        """The same results with the records (and teardown.json) behind the plots added."""
        return build_report(self.cfg, self.evaluation, self.decision, self.run_id, records, teardown)


def build_report(cfg: ExperimentConfig, evaluation: dict[str, Any], decision: dict[str, Any], run_id: str,
                 records: pd.DataFrame | None = None, teardown: Mapping[str, Any] | None = None) -> ReportModel:
    """The report model of a run. Without records the record-based parts are empty (report.md
    needs none of them)."""
    arms = [evaluation.get("control") or cfg.control.name, *(evaluation.get("candidates") or [a.name for a in cfg.candidates])]
    arms = [a for a in arms if a]
    data = Records.build(records, arms)
    quantiles = {
        metric: {arm: Quantiles(dig(evaluation, "arms", arm, metric, "n"), dig(evaluation, "arms", arm, metric, "p50", "estimate"),
                                dig(evaluation, "arms", arm, metric, "p95", "estimate"))
                 for arm in data.arms}
        for metric in ("latency", "ttft")
    }
    return ReportModel(
        version=REPORT_MODEL_VERSION, run_id=run_id, cfg=cfg, evaluation=evaluation, decision=decision,
        summary=Summary.from_results(evaluation, decision, run_id),
        colors={a: ARM_COLORS[i % len(ARM_COLORS)] for i, a in enumerate(arms)},
        records=data, teardown=dict(teardown or {"arms": []}), quantiles=quantiles,
        subsets=_subset_table(data), backend_mix=_backend_mix(data), errors=_error_messages(data), drift=_drift(data),
        replicas=_replicas(data),
    )


# -- record-based parts ----------------------------------------------------------------------------
def _subset_table(data: Records) -> pd.DataFrame:
    ab = data.ab
    if ab.empty:
        return pd.DataFrame()
    g = ab.groupby(["subset", "arm"], sort=True)
    out = g.size().rename("n").to_frame()
    out["failed"] = g["outcome"].agg(lambda s: int((s != "success").sum()))
    out["top failure"] = g["outcome"].agg(
        lambda s: (lambda vc: f"{vc.index[0]} {int(vc.iloc[0])}" if len(vc) else "")(s[s != "success"].value_counts())
    )
    out["failure rate"] = out["failed"] / out["n"]
    out = out.reset_index()
    rank = {a: i for i, a in enumerate(data.arms)}
    return out.sort_values(["subset", "arm"], key=lambda s: s.map(rank) if s.name == "arm" else s, kind="stable")


def _backend_mix(data: Records) -> list[tuple[str, dict[str, int]]]:
    rows = []
    for label, frame in (("A/B", data.ab), ("observe", data.observe)):
        for arm in data.arms:
            f = data.arm(frame, arm)
            if len(f):
                rows.append((f"{label} · {arm}", {str(b): int(k) for b, k in f["backend"].value_counts().items()}))
    return rows


def _error_messages(data: Records) -> list[ErrorMessage]:
    ab = data.ab
    errs = ab[(ab["outcome"] != "success") & ab["error"].notna()] if "error" in ab else ab.iloc[:0]
    if not len(errs):
        return []
    top = errs.assign(msg=errs["error"].astype(str).str.slice(0, 160)).groupby(["arm", "outcome", "msg"]).size()
    out = []
    for key, k in top.sort_values(ascending=False).head(12).items():
        arm, outcome, msg = cast(tuple[Any, Any, Any], key)
        out.append(ErrorMessage(str(arm), str(outcome), int(k), str(msg)))
    return out


def _drift(data: Records) -> list[DriftRow]:
    """Median latency of the first and last third of each arm's answered requests, and Spearman's
    rho of latency against send order; [] if it cannot be computed (a drift check never fails a report)."""
    try:
        from scipy import stats as sps

        rows = []
        for arm in data.arms:
            f = data.arm(data.answered, arm).sort_values("sent_at")
            lat = f["latency_s"].to_numpy(dtype=float)
            lat = lat[np.isfinite(lat)]
            if lat.size < 6:
                continue
            k = lat.size // 3
            rho = sps.spearmanr(np.arange(lat.size), lat)
            rows.append(DriftRow(arm, int(lat.size), float(np.median(lat[:k])), float(np.median(lat[-k:])),
                                 float(rho.statistic), float(rho.pvalue)))
        return rows
    except Exception:  # noqa: BLE001
        return []


def _replicas(data: Records) -> list[ReplicaRow]:
    """Per container of each arm that more than one container served (the records' `served_by`):
    requests, success rate, p50/p95 latency over answered requests, and p50 against the arm's."""
    ab = data.ab
    if "served_by" not in ab.columns or not ab["served_by"].notna().any():
        return []
    rows = []
    for arm in data.arms:
        f = data.arm(ab, arm)
        if f["served_by"].dropna().nunique() < 2:
            continue
        answered = f[f["outcome"].isin(ANSWERED_OUTCOMES)]
        arm_lat = answered["latency_s"].to_numpy(dtype=float)
        arm_lat = arm_lat[np.isfinite(arm_lat)]
        arm_p50 = float(np.median(arm_lat)) if arm_lat.size else None
        for container, g in f.groupby(f["served_by"].where(f["served_by"].notna(), NO_CONTAINER).astype(str), sort=True):
            lat = g.loc[g["outcome"].isin(ANSWERED_OUTCOMES), "latency_s"].to_numpy(dtype=float)
            lat = lat[np.isfinite(lat)]
            p50 = float(np.median(lat)) if lat.size else None
            rows.append(ReplicaRow(
                arm=arm, container=str(container), requests=len(g), success_rate=float((g["outcome"] == "success").mean()),
                answered=int(lat.size), p50=p50, p95=float(np.quantile(lat, 0.95)) if lat.size else None,
                p50_vs_arm=p50 / arm_p50 if p50 is not None and arm_p50 else None,
            ))
    return rows


REPLICAS_NOTE = (
    "An arm's requests were served by more than one container (Modal replicas): each container is its own "
    f"vLLM server, with its own caches and GPU. A container whose median latency is {SLOW_REPLICA_RATIO:.2f}x its "
    "arm's or more is marked slow; the arm's numbers above pool all its containers.")


def replica_rows(replicas: list[ReplicaRow]) -> list[dict[str, Any]]:
    """The per-replica table (markdown and HTML): one row per container of a multi-container arm."""
    return [{
        "arm": r.arm, "container": r.container, "requests": r.requests, "success": f"{r.success_rate:.1%}",
        "answered": r.answered, "latency p50 s": num(r.p50, "{:.3f}"), "latency p95 s": num(r.p95, "{:.3f}"),
        "p50 vs arm": num(r.p50_vs_arm, "{:.2f}x") + (" (slow)" if r.slow else ""),
    } for r in replicas]
