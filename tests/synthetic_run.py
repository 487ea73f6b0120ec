"""A finished run in a real RunStore, from synthetic records (no vLLM): for tests of the
phases after A/B (evaluate, decide, reports, artifacts, Prefect deployments)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from guided_ab import phases
from guided_ab.analysis.simulate import synthetic_records
from guided_ab.config import parse_config
from guided_ab.records import RequestRecord
from guided_ab.store import RunStore


def make_finished_run(root: Path, run_id: str = "synthetic-run", *, pairs: int = 120, ratio: float = 0.8, seed: int = 1,
                      observe: int = 8, bootstrap_resamples: int = 500, decide: bool = True,
                      edit_row: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> RunStore:
    """`edit_row` gets each record's fields (missing values as None) before the record is written,
    and returns them: what a test adds to or changes in the synthetic records."""
    cfg = parse_config({
        "name": "synthetic",
        "store": str(root),
        "arms": [
            {"name": "guidance", "role": "control", "backend": "guidance"},
            {"name": "auto", "role": "candidate", "backend": "auto"},
        ],
        "workload": {"size": pairs, "observe_size": observe, "warmup": 1},
        "decision": {"bootstrap_resamples": bootstrap_resamples},
    })
    store = RunStore.create(cfg, run_id)
    df = synthetic_records(pairs, ratio=ratio, control="guidance", candidate="auto", observe=observe, warmup=1, seed=seed)
    df["run_id"] = run_id
    for row in df.to_dict("records"):
        fields = {k: (None if v != v else v) for k, v in row.items()}
        store.append_record(RequestRecord.model_validate(edit_row(fields) if edit_row else fields))
    for phase in ("observe", "ab"):
        store.finalize_records(phase)
    if decide:
        phases.evaluate_run(store)
        phases.decide_run(store)
    return store


def writable_record(raw, outcome: str, error: str | None) -> RequestRecord:
    """The runner's record for one response (fixed planned fields): it must build and serialize
    to JSON for whatever a server sent."""
    rec = RequestRecord.from_response(
        raw, outcome, error, run_id="r", phase="ab", arm="a", request_id="ab-0", schema_id="s", subset="x",
        order_index=0, pair_index=0, warmup=False, first_for_schema=True, stream=True, attempt=1,
    )
    json.loads(rec.model_dump_json())
    return rec
