"""The evaluation's view of the records: numpy columns, and each arm's A/B records de-duplicated and
aligned on the pair units.

The pair (`pair_index`) is the unit of the A/B phase: both arms were sent the same schema, and
every bootstrap resamples pairs. So before any statistic, each arm's measured A/B rows are cut to
one record per pair (the last attempt wins) and laid out on the union of pair units, NaN/False
where an arm has no record or no answer. Separate from `evaluation.py` so that the statistics
there read arrays only; pandas indexing here would cost more than the statistics themselves.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from guided_ab.records import RECORD_COLUMNS

# outcomes whose request got a generated completion back: latency is measured over these
ANSWERED_OUTCOMES = frozenset({"success", "truncated", "invalid_json", "schema_violation"})


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
    """One arm's A/B records aligned to the pair units (NaN/False where the arm has no record)."""

    def __init__(self, rows: Columns, units: np.ndarray):
        n = units.size
        pos = np.searchsorted(units, rows["pair_index"])
        self.present = np.zeros(n, bool)
        self.present[pos] = True
        outcome = np.full(n, "", dtype=object)
        outcome[pos] = rows["outcome"]
        self.success = outcome == "success"
        answered_rows = np.isin(rows["outcome"], list(ANSWERED_OUTCOMES))

        def aligned(values: np.ndarray, ok: np.ndarray) -> np.ndarray:
            out = np.full(n, np.nan)
            out[pos] = np.where(ok, values, np.nan)
            return out

        lat, ttft, toks = rows["latency_s"], rows["ttft_s"], rows["completion_tokens"]
        self.latency = aligned(lat, answered_rows & np.isfinite(lat))
        self.ttft = aligned(ttft, answered_rows & np.isfinite(ttft))
        with np.errstate(invalid="ignore", divide="ignore"):
            tpot = (lat - ttft) / (toks - 1)
            tpot_ok = answered_rows & np.isfinite(tpot) & (toks > 1) & (lat >= ttft)
        self.tpot = aligned(tpot, tpot_ok)
        self.first = np.zeros(n, bool)
        self.first[pos] = rows["first_for_schema"]
        self.stream = np.full(n, -1, np.int8)
        self.stream[pos] = rows["stream"].astype(np.int8)
        self.rows = rows


def dedupe_pairs(df: Columns, arms: list[str]) -> tuple[dict[str, ArmPairs], dict[str, int]]:
    """The A/B phase's measured rows, one record per (arm, pair): the last attempt wins (then the
    last sent). Returns every arm aligned on the union of pair units, and {arm: pairs that had more
    than one record} for the unique-requests gate."""
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
    return {arm: ArmPairs(df.take(per_arm_idx[arm]), units) for arm in arms}, dup_pairs
