"""The evaluation's view of the records: numpy columns, and each arm's A/B records de-duplicated and
aligned on the pair units.

The pair (`pair_index`) is the unit of the A/B phase: both arms were sent the same schema. So
before any statistic, each arm's measured A/B rows are cut to one record per pair (the last attempt
wins) and laid out on the union of pair units, NaN/False where an arm has no record or no answer.
The *schema* is the independent unit, though: repeats of a schema are correlated (at temperature 0
nearly identical), so `unit_clusters` labels each pair with its schema for the cluster bootstrap
and the design-effect intervals. Separate from `evaluation.py` so that the statistics there read
arrays only; pandas indexing here would cost more than the statistics themselves.

Latency is never conditioned on the outcome away: a request that got an answer has its measured
latency; a timeout or connection error has none, but the client waited `timeout_s` for it (or gave
up earlier), so it enters latency *right-censored* at the workload's timeout (flagged in
`censored`). Quantiles below the censored share are then exact and the mean is a restricted mean.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from guided_ab.records import RECORD_COLUMNS, UNVALIDATED_OUTCOMES, WORKLOAD_OUTCOMES

# outcomes whose request got a generated completion back: latency is measured over these (an
# answer our validator could not judge is still an answer: its latency and tokens are real)
ANSWERED_OUTCOMES = frozenset({"success", "truncated", "invalid_json", "schema_violation", "no_tool_call",
                               "unknown_tool"}) | UNVALIDATED_OUTCOMES
# outcomes without an answer whose wait still counts: latency right-censored at the timeout
CENSORED_OUTCOMES = frozenset({"timeout", "connection_error"})


def _objects(s: pd.Series) -> np.ndarray:
    """The values as an object array (a copy: the caller's frame is never written), None where missing."""
    v = s.to_numpy(dtype=object, copy=True)
    v[pd.isna(v)] = None
    return v


class Columns:
    """The record columns as numpy arrays (pandas indexing costs more than the statistics here)."""

    def __init__(self, a: dict[str, np.ndarray]):
        self.a = a

    @classmethod
    def from_records(cls, records: pd.DataFrame | None) -> Columns:
        """Every record column as a typed array: floats (NaN where missing), booleans (False where
        missing), strings, pair_index as int (-1 where missing), backend as object (None where unknown)."""
        df = records if records is not None else pd.DataFrame(columns=RECORD_COLUMNS)
        n = len(df)

        def col(name: str) -> pd.Series:
            return df[name] if name in df.columns else pd.Series([None] * n, dtype=object)

        a: dict[str, np.ndarray] = {}
        for name in ("latency_s", "ttft_s", "completion_tokens", "attempt", "sent_at"):
            a[name] = pd.to_numeric(col(name), errors="coerce").to_numpy(dtype=float, na_value=np.nan)
        for name in ("warmup", "first_for_schema", "stream"):
            a[name] = col(name).fillna(False).to_numpy(dtype=bool)
        for name in ("phase", "arm", "outcome", "schema_id", "request_id"):
            v = _objects(col(name))
            if not all(type(x) is str for x in v.tolist()):
                v = np.array([str(x) for x in v.tolist()], dtype=object)
            a[name] = v
        a["pair_index"] = pd.to_numeric(col("pair_index"), errors="coerce").fillna(-1).to_numpy(dtype=np.int64)
        a["backend"] = _objects(col("backend"))
        return cls(a)

    def __len__(self) -> int:
        return int(self.a["phase"].size)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.a[name]

    def take(self, mask: np.ndarray) -> Columns:
        idx = np.flatnonzero(mask) if mask.dtype == bool else mask
        return Columns({k: v[idx] for k, v in self.a.items()})


class ArmPairs:
    """One arm's A/B records aligned to the pair units (NaN/False where the arm has no record).

    `latency` holds answered requests' latency and, for timeouts and connection errors, the
    censoring value: `timeout_s` when given, else the elapsed time the record holds (flagged in
    `censored`). `ttft`, `tpot` and `tokens` (output tokens) are over answered requests only.
    """

    def __init__(self, rows: Columns, units: np.ndarray, timeout_s: float | None = None):
        n = units.size
        pos = np.searchsorted(units, rows["pair_index"])
        self.pos = pos  # each row's unit (rows are in pair order)
        self.present = np.zeros(n, bool)
        self.present[pos] = True
        outcome = np.full(n, "", dtype=object)
        outcome[pos] = rows["outcome"]
        self.success = outcome == "success"
        self.truncated = outcome == "truncated"
        answered_rows = np.isin(rows["outcome"], list(ANSWERED_OUTCOMES))
        censored_rows = np.isin(rows["outcome"], list(CENSORED_OUTCOMES))

        def aligned(values: np.ndarray, ok: np.ndarray) -> np.ndarray:
            out = np.full(n, np.nan)
            out[pos] = np.where(ok, values, np.nan)
            return out

        lat, ttft, toks = rows["latency_s"], rows["ttft_s"], rows["completion_tokens"]
        lat = np.where(censored_rows, float(timeout_s) if timeout_s is not None else lat, lat)
        censored_rows = censored_rows & np.isfinite(lat)
        self.latency = aligned(lat, (answered_rows | censored_rows) & np.isfinite(lat))
        self.censored = np.zeros(n, bool)
        self.censored[pos] = censored_rows
        self.answered = np.zeros(n, bool)
        self.answered[pos] = answered_rows
        self.tokens = aligned(toks, answered_rows & np.isfinite(toks))
        self.ttft = aligned(ttft, answered_rows & np.isfinite(ttft))
        with np.errstate(invalid="ignore", divide="ignore"):
            tpot = (lat - ttft) / (toks - 1)
            tpot_ok = answered_rows & np.isfinite(tpot) & (toks > 1) & (lat >= ttft)
        self.tpot = aligned(tpot, tpot_ok)
        self.first = np.zeros(n, bool)
        self.first[pos] = rows["first_for_schema"]
        self.stream = np.full(n, -1, np.int8)
        self.stream[pos] = rows["stream"].astype(np.int8)
        self.schema = np.full(n, None, dtype=object)
        self.schema[pos] = rows["schema_id"]
        self.rows = rows


def unit_clusters(data: dict[str, ArmPairs]) -> np.ndarray | None:
    """Each pair unit's schema as an integer label (0..schemas-1), or None when every schema is in
    one pair only (then pairs are the independent units and every interval is the pair-level one)."""
    arms = list(data.values())
    if not arms:
        return None
    schema = arms[0].schema.copy()
    for d in arms[1:]:
        missing = np.array([v is None for v in schema.tolist()], dtype=bool)
        schema[missing] = d.schema[missing]
    n = schema.size
    missing = np.array([v is None for v in schema.tolist()], dtype=bool)
    schema[missing] = [f"\0unit{i}" for i in np.flatnonzero(missing)]  # a unit without a schema is its own
    codes = np.unique(schema.astype(str), return_inverse=True)[1].astype(np.int64)
    return None if n == 0 or int(codes.max()) + 1 == n else codes


def dedupe_pairs(df: Columns, arms: list[str], timeout_s: float | None = None) -> tuple[dict[str, ArmPairs], dict[str, int]]:
    """The A/B phase's measured rows, one record per (arm, pair): the last attempt wins (then the
    last sent). Returns every arm aligned on the union of pair units (timeouts and connection
    errors censored at `timeout_s`), and {arm: pairs that had more than one record} for the
    unique-requests gate."""
    ab_mask = (df["phase"] == "ab") & ~df["warmup"]
    dup_pairs: dict[str, int] = {}
    per_arm_idx = {}
    for arm in arms:
        idx = np.flatnonzero(ab_mask & (df["arm"] == arm))
        order = np.lexsort((df["sent_at"][idx], df["attempt"][idx], df["pair_index"][idx]))
        idx = idx[order]
        pi = df["pair_index"][idx]
        last = np.ones(idx.size, bool)
        last[:-1] = pi[1:] != pi[:-1]
        if not last.all():
            dup_pairs[arm] = int(np.unique(pi[~last]).size)
        per_arm_idx[arm] = idx[last]
    units = np.unique(np.concatenate([df["pair_index"][i] for i in per_arm_idx.values()]))
    return {arm: ArmPairs(df.take(per_arm_idx[arm]), units, timeout_s) for arm in arms}, dup_pairs


def workload_problems(df: Columns, arms: list[str]) -> tuple[np.ndarray, dict]:
    """The A/B pairs the server refused for the workload's own sake (records.WORKLOAD_OUTCOMES:
    the prompt over the context, another parameter refusal) on any arm: a backend is not to blame
    for them, so they leave the comparison whole (both arms). Returns (a mask of the rows to drop,
    a summary: pairs excluded of all pairs, their share, the classes, the custom_ids or schemas, and
    each arm's success rate with them counted as failures, the sensitivity line)."""
    ab = (df["phase"] == "ab") & ~df["warmup"] & np.isin(df["arm"], arms)
    bad = ab & np.isin(df["outcome"], list(WORKLOAD_OUTCOMES))
    bad_pairs = np.unique(df["pair_index"][bad])
    drop = ab & np.isin(df["pair_index"], bad_pairs)
    all_pairs = np.unique(df["pair_index"][ab])
    by_outcome: dict[str, int] = {}
    for o in df["outcome"][bad].tolist():
        by_outcome[o] = by_outcome.get(o, 0) + 1
    with_them: dict[str, float | None] = {}
    without: dict[str, float | None] = {}
    for arm in arms:
        rows = ab & (df["arm"] == arm)
        kept = rows & ~drop
        with_them[arm] = float(np.mean(df["outcome"][rows] == "success")) if rows.any() else None
        without[arm] = float(np.mean(df["outcome"][kept] == "success")) if kept.any() else None
    info = {
        "pairs": int(bad_pairs.size), "of_pairs": int(all_pairs.size),
        "share": float(bad_pairs.size / all_pairs.size) if all_pairs.size else 0.0,
        "requests": int(bad.sum()), "by_outcome": by_outcome,
        "schemas": sorted(set(df["schema_id"][bad].tolist())),
        "success_rate_excluded": without, "success_rate_if_included": with_them,
    }
    return drop, info
