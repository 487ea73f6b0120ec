"""The validity gates of an evaluation: the checks that decide whether its numbers can be trusted
at all (any failed gate makes the decision "invalid", whatever the comparisons say).

Separate from `evaluation.py` because the gates judge the *run* (was every planned request
recorded, once; were the arms treated alike), not the arms: they read counts and a few
columns, never the bootstrap. `evaluate` computes what they need once and hands it over as a
`GateInput`; each gate is one function returning one `{"name", "passed", "detail", ...}` entry,
in a fixed order (reports show them in this order).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from guided_ab.analysis import stats as S
from guided_ab.records import TRANSIENT_OUTCOMES

# the sample-ratio test fails below this p-value (arms planned equal; a real mismatch is extreme)
SRM_P_MIN = 0.001


@dataclass(frozen=True)
class GateInput:
    """What the gates read, computed once by `evaluate`.

    arms: control first, then the candidates (the config's order).
    counts: {phase: {arm: {"recorded", "warmup", "measured"}}} over every record.
    request_ids / record_arms: every record's request_id and arm (all phases, aligned).
    ab_outcomes: each arm's measured A/B outcomes after de-duplication (one per pair).
    duplicated_pairs: {arm: A/B pairs that had more than one measured record}.
    comparisons: the evaluation's paired comparisons ({candidate: comparison}).
    max_error_share: the rule's ceiling on the transient-error share.
    planned: {phase: {arm: planned requests}}, or None when no plan was given.
    endpoints: {arm: endpoint info (vllm_version, ...)}, or None when not known.
    """

    arms: list[str]
    counts: dict[str, dict[str, dict[str, int]]]
    request_ids: np.ndarray
    record_arms: np.ndarray
    ab_outcomes: dict[str, np.ndarray]
    duplicated_pairs: dict[str, int]
    comparisons: dict[str, dict]
    max_error_share: float
    planned: dict[str, dict[str, int]] | None = None
    endpoints: dict[str, dict] | None = None
    workload_problems: dict | None = None  # pairs.workload_problems' summary (None: not computed)
    max_workload_problem_share: float = 0.2


def _gate(name: str, passed: bool, detail: str, **extra: Any) -> dict:
    return {"name": name, "passed": bool(passed), "detail": detail, **extra}


def request_accounting(g: GateInput) -> dict:
    """Recorded == planned per arm and phase (warm-ups included); skipped without a plan."""
    if g.planned is None:
        return _gate("request_accounting", True, "no plan given: recorded counts not checked", skipped=True)
    problems = []
    for phase in sorted(set(g.planned) | set(g.counts)):
        want = g.planned.get(phase, {})
        got = {arm: c["recorded"] for arm, c in g.counts.get(phase, {}).items()}
        for arm in sorted(set(want) | set(got)):
            w, n = int(want.get(arm, 0)), int(got.get(arm, 0))
            if w != n:
                problems.append(f"arm '{arm}' phase '{phase}': recorded {n} of {w} planned")
    return _gate(
        "request_accounting", not problems,
        "; ".join(problems) if problems else "recorded == planned for every arm and phase",
    )


def unique_requests(g: GateInput) -> dict:
    """No request id recorded twice, and one measured record per arm and A/B pair."""
    ids, arms = g.request_ids, g.record_arms
    uniq, inv, cnt = np.unique(ids.astype(str), return_inverse=True, return_counts=True)
    dup = cnt[inv] > 1
    problems = []
    for arm in sorted(set(arms[dup].tolist())):
        k = np.unique(ids[dup & (arms == arm)].astype(str)).size
        problems.append(f"arm '{arm}': {k} request_id(s) recorded more than once")
    for arm, k in sorted(g.duplicated_pairs.items()):
        problems.append(f"arm '{arm}': {k} A/B pair(s) with more than one record")
    return _gate("unique_requests", not problems, "; ".join(problems) or "every request recorded once")


def sample_ratio(g: GateInput) -> dict:
    """Sample-ratio mismatch on the measured A/B counts (equal by design): chi-square p >= SRM_P_MIN."""
    arms = g.arms
    n_arm = [int(len(g.ab_outcomes[a])) for a in arms]
    if sum(n_arm) == 0:
        return _gate("sample_ratio", True, "no A/B records", skipped=True)
    srm = S.sample_ratio_test(n_arm)
    ok = srm.pvalue is None or srm.pvalue >= SRM_P_MIN
    detail = ", ".join(f"'{a}' {k}" for a, k in zip(arms, n_arm))
    worst = arms[int(np.argmin(n_arm))]
    p = "n/a" if srm.pvalue is None else f"{srm.pvalue:.3g}"
    return _gate(
        "sample_ratio", ok,
        f"A/B counts {detail}; chi-square p={p}" + ("" if ok else f" < {SRM_P_MIN} (arm '{worst}' short)"),
        pvalue=S.num(srm.pvalue),
    )


def error_share(g: GateInput) -> dict:
    """Each arm's share of transient errors (server_error, timeout, connection_error) within the rule's ceiling."""
    problems, parts = [], []
    limit = g.max_error_share
    for a in g.arms:
        outcomes = g.ab_outcomes[a]
        if len(outcomes) == 0:
            continue
        share = float(np.mean(np.isin(outcomes, list(TRANSIENT_OUTCOMES))))
        parts.append(f"'{a}' {share:.1%}")
        if share > limit:
            problems.append(f"arm '{a}': server_error+timeout+connection_error share {share:.1%} > {limit:.1%}")
    return _gate("error_share", not problems, "; ".join(problems) or f"shares {', '.join(parts) or 'n/a'}")


def same_vllm_version(g: GateInput) -> dict:
    """The same vLLM version on every arm (where known); skipped without endpoint information."""
    if not g.endpoints:
        return _gate("same_vllm_version", True, "no endpoint information given", skipped=True)
    endpoints = g.endpoints
    versions = {a: (endpoints.get(a) or {}).get("vllm_version") for a in g.arms}
    known = {a: v for a, v in versions.items() if v}
    unknown = sorted(a for a, v in versions.items() if not v)
    ok = len(set(known.values())) <= 1
    detail = ", ".join(f"'{a}' {v}" for a, v in known.items()) or "no versions known"
    if unknown:
        detail += f"; unknown for arm(s) {', '.join(repr(u) for u in unknown)}"
    return _gate("same_vllm_version", ok, ("different vLLM versions: " if not ok else "") + detail)


def same_request_settings(g: GateInput) -> dict:
    """Both arms of every pair sent with the same settings (the stream flag is what records show)."""
    bad = {c: comp["stream_mismatched_pairs"] for c, comp in g.comparisons.items() if comp["stream_mismatched_pairs"]}
    return _gate(
        "same_request_settings", not bad,
        "; ".join(f"arm '{c}': {k} pair(s) streamed differently from the control" for c, k in bad.items())
        or "both arms of every pair sent with the same settings",
    )


def paired_data(g: GateInput) -> dict:
    """There is something to compare: every arm has A/B records, every candidate pairs in which both answered."""
    problems = [f"arm '{a}': no measured A/B records" for a in g.arms if len(g.ab_outcomes[a]) == 0]
    for c, comp in g.comparisons.items():
        if len(g.ab_outcomes[c]) and comp["n_pairs"] == 0:
            problems.append(f"arm '{c}': no complete pair with the control")
        elif comp["n_pairs"] and comp["latency"]["n_pairs"] == 0:
            problems.append(f"arm '{c}': no pair in which both arms answered (no latency to compare)")
    return _gate("paired_data", not problems, "; ".join(problems) or "every candidate has pairs with the control")


def workload_problem_share(g: GateInput) -> dict:
    """The share of A/B pairs refused for the workload's own sake (context_overflow,
    invalid_request: excluded from the comparison) within the rule's cap: past it, what is left is
    not the workload the experiment was planned on."""
    wp = g.workload_problems
    if not wp or not wp.get("of_pairs"):
        return _gate("workload_problems", True, "no workload problems", share=0.0)
    share, cap = float(wp["share"]), g.max_workload_problem_share
    classes = ", ".join(f"{k} {v}" for k, v in sorted(wp["by_outcome"].items())) or "none"
    detail = (f"{wp['pairs']} of {wp['of_pairs']} A/B pairs ({share:.1%}) refused for the workload's own sake "
              f"({classes}), excluded from the comparison")
    if share > cap:
        detail += f"; over max_workload_problem_share {cap:.1%}: shorten the prompts or lower max_tokens"
    return _gate("workload_problems", share <= cap, detail, share=share)


GATES: tuple[Callable[[GateInput], dict], ...] = (
    request_accounting, unique_requests, sample_ratio, error_share, same_vllm_version, same_request_settings,
    paired_data, workload_problem_share,
)


def validity_gates(g: GateInput) -> list[dict]:
    """Every gate's entry, in the order of `GATES`."""
    return [gate(g) for gate in GATES]
