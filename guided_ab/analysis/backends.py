"""What the servers resolved: outcome and backend counts, the expected backend's share, and the
backend per schema (observe and A/B phases).

Why its own module: the backend a request really used is this product's one measurement nobody
else makes (the in-server attribution), and the seed's expectation about it is a pre-registered
hypothesis (decision.py) or guardrail; the share's interval has to treat repeats of a schema as
one unit (a schema resolves to the same backend every time), like every other proportion here.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from guided_ab.analysis import stats as S
from guided_ab.analysis.pairs import Columns
from guided_ab.records import OUTCOMES


def counts_of(values: np.ndarray) -> dict[str, int]:
    return {str(k): int(v) for k, v in sorted(Counter(values.tolist()).items(), key=lambda kv: str(kv[0]))}


def outcome_counts(outcomes: np.ndarray) -> dict[str, int]:
    """Counts of every known outcome (in OUTCOMES order, zeros included), plus "other" if any."""
    c = Counter(outcomes.tolist())
    out = {o: int(c.pop(o, 0)) for o in OUTCOMES}
    other = sum(c.values())
    if other:
        out["other"] = int(other)
    return out


def backend_counts(backends: np.ndarray) -> dict[str, int]:
    return counts_of(np.array(["unknown" if b is None else str(b) for b in backends.tolist()], dtype=object))


def backend_share(backends: np.ndarray, expected: str, alpha: float, clusters: np.ndarray | None = None,
                  family_sizes: tuple[int, ...] = ()) -> dict:
    """Backend counts and the share of the expected backend among requests that reported one: Wilson
    at the design effect of the schemas (`clusters`, one label per request), with its Bonferroni
    intervals (`adjusted`) for a rule that makes the expectation a guardrail."""
    counts = backend_counts(backends)
    known_mask = np.array([b is not None for b in backends.tolist()], dtype=bool)
    hits = np.array([b == expected for b in backends.tolist()], dtype=bool)[known_mask]
    cl = None if clusters is None else np.asarray(clusters)[known_mask]
    share = S.wilson_clustered(hits, cl, alpha).to_dict()
    share["adjusted"] = {}
    for k in family_sizes:
        iv = S.wilson_clustered(hits, cl, alpha / k)
        share["adjusted"][str(k)] = {"ci_low": iv.ci_low, "ci_high": iv.ci_high, "level": 1 - alpha / k}
    return {"counts": counts, "expected": expected, "n_known": int(known_mask.sum()), "unknown": counts.get("unknown", 0),
            "share": share}


def observe_section(df: Columns, counts: dict, candidates: list[str], expected: str, alpha: float,
                    family_sizes: tuple[int, ...]) -> dict:
    """The observe phase per arm (outcomes, backend counts and share), and for each candidate the
    backend each schema resolved to most often and the schemas resolved to more than one."""
    obs_mask = (df["phase"] == "observe") & ~df["warmup"]
    observe: dict[str, Any] = {"arms": {}, "schema_backends": {}, "mixed_schemas": {}}
    for arm in sorted(set(df["arm"][obs_mask].tolist())):
        g = df.take(obs_mask & (df["arm"] == arm))
        observe["arms"][str(arm)] = {
            "n": len(g), "n_warmup": int(counts.get("observe", {}).get(str(arm), {}).get("warmup", 0)),
            "outcomes": outcome_counts(g["outcome"]), "backend_counts": backend_counts(g["backend"]),
            "backend_share": backend_share(g["backend"], expected, alpha, g["schema_id"], family_sizes)["share"],
        }
        if arm in candidates:
            per = _backends_per_schema(g)
            observe["schema_backends"][str(arm)] = {k: c.most_common(1)[0][0] for k, c in per.items()}
            observe["mixed_schemas"][str(arm)] = [k for k, c in per.items() if len(c) > 1]
    return observe


def candidate_schema_backends(df: Columns, candidates: list[str]) -> dict[str, dict]:
    """What each candidate resolved for every schema it was sent (observe and A/B, warm-ups excluded)."""
    sent = np.isin(df["phase"], ["observe", "ab"]) & ~df["warmup"]
    return {arm: _schema_backends(df.take(sent & (df["arm"] == arm))) for arm in candidates}


def _backends_per_schema(g: Columns) -> dict[str, Counter]:
    """{schema: Counter of the backends the server reported for it}, schemas sorted."""
    per: dict[str, Counter] = {}
    for sid, be in zip(g["schema_id"].tolist(), g["backend"].tolist()):
        if be is not None:
            per.setdefault(str(sid), Counter())[str(be)] += 1
    return dict(sorted(per.items()))


def _schema_backends(g: Columns) -> dict[str, Any]:
    """{backend: [schemas it was resolved for]} and the schemas resolved to more than one backend."""
    per = _backends_per_schema(g)
    by_backend: dict[str, list[str]] = {}
    for sid, counts in per.items():
        for be in counts:
            by_backend.setdefault(be, []).append(sid)
    return {"by_backend": dict(sorted(by_backend.items())), "schemas": len(per),
            "mixed": [k for k, c in per.items() if len(c) > 1]}
