"""What every phase flow shares: opening a run from its id, and the run-id parameter."""

from __future__ import annotations

from guided_ab.config import ExperimentConfig
from guided_ab.store import RunStore

DEFAULT_STORE = "runs"


def open_run(run_id: str, store: str = DEFAULT_STORE) -> tuple[RunStore, ExperimentConfig]:
    """The run's store and its pre-registered config snapshot."""
    rs = RunStore.open(store, run_id)
    return rs, rs.load_config()
